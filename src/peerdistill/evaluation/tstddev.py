"""The T. stddev driver (Good-DA-in-KD; the statistic is :mod:`peerdistill.metrics.tstddev`): runs a
saved teacher over the training set with every augmentation compared, as the authors' ``check_ce_var``
loop does, over 10 epochs of the training set (about 1 560 groups on CIFAR). The mean teacher entropy over every
sample seen (both halves) is reported too. The driver runs the teacher only (eval mode, no gradient,
the run's autocast precision) on the device-resident data, and shares each iteration's original half
and its teacher forward across all the augmentations compared (common random numbers: the ranking
does not depend on which augmentations run together, and costs one extra forward per augmentation).
"""
from __future__ import annotations

import time
import typing
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
import yaml
from tqdm import tqdm

from .. import config as C
from ..data.augmentations import (PAPER_AUGS, Augmentation, aug_label, augmentation_params, build_augmentation,
                                  parse_aug_spec)
from ..data.loader import DeviceLoader, split_to_device
from ..data.views import ViewContext
from ..engine.build import crop_padding, load_splits, load_teacher, make_augment
from ..engine.checkpoint import load_checkpoint
from ..engine.precision import resolve_channels_last, resolve_device, resolve_precision
from ..errors import PeerdistillError
from ..metrics.tstddev import GroupMeans
from ..params import NonNegativeInt, Positive, PositiveInt, check_value
from ..seeds import seed_stream
from ..text import plural, text_table


@dataclass
class TStdDevOptions:
    """How to compute T. stddev (defaults: the paper's code).

    Attributes:
        epochs: passes over the training split (10).
        batch_size: original images per iteration (64; the augmented half has as many).
        group_iters: iterations per group mean (5: 640 probabilities per group with an augmentation).
        temperature: softmax temperature of the probabilities (1).
        seed: seed of the batch order and of every augmentation's draws.
        precision: autocast precision; ``None``: the teacher run's (``auto``: bf16 where native).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        threads: CPU threads (0: torch's default).
        teacher_peer: which peer of the teacher run is the teacher.
        student: run directory or checkpoint of a student, for student-scored pickers (frozen, eval
            mode, as the code's ``--fix_student``).
        student_peer: which peer of the student run.
        overrides: ``data.*=value`` changes to the teacher run's data config (root, train_subset, ...).
        progress: show a progress bar (on a terminal).
    """

    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    group_iters: PositiveInt = 5
    temperature: Positive = 1.0
    seed: NonNegativeInt = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    device: str = "auto"
    threads: NonNegativeInt = 0
    teacher_peer: NonNegativeInt = 0
    student: str | None = None
    student_peer: NonNegativeInt = 0
    overrides: list[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class _Entry:
    label: str
    aug: Augmentation | None  # None: no augmentation (the original batch only, 5 x 64 per group)
    acc: GroupMeans
    params: dict[str, Any] = field(default_factory=dict)  # every parameter, defaults included (provenance)
    gen: torch.Generator = field(default_factory=torch.Generator)  # this augmentation's own draws
    ctx: ViewContext | None = None


def run_tstddev(teacher: str, augs: list[str] | None, opts: TStdDevOptions) -> dict[str, Any]:
    """T. stddev of every augmentation spec (``name`` or ``name:key=value,...``; ``none`` for the original
    batch alone) for one teacher; ``augs`` empty or ``None``: the paper's list. Returns the JSON record."""
    _check_options(opts)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    other = lambda o: f"give {o} as the teacher"  # noqa: E731
    cfg = _teacher_config(load_checkpoint(teacher, prefer="best.pt", use_other=other)["config"], opts.overrides)
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision or cfg.precision, device)
    splits = load_splits(cfg)
    if not hasattr(splits.train, "images"):
        raise PeerdistillError("the T. stddev study needs in-memory data; the teacher's run streams its images")
    data = split_to_device(splits, cfg.data.val_split, cfg.seed, device)
    k, c = splits.num_classes, splits.train.images.shape[-1]
    channels_last = resolve_channels_last(None, device, precision)  # inference: the automatic choice
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t_net = load_teacher(teacher, opts.teacher_peer, k, c, use_other=other).to(device, memory_format=fmt)
    s_net = (load_teacher(opts.student, opts.student_peer, k, c, use_other=lambda o: f"--student {o}")
             .to(device, memory_format=fmt) if opts.student else None)
    entries, notes = _entries(augs, s_net is not None, tuple(splits.train.images.shape[1:3]), crop_padding(cfg, splits),
                              opts.group_iters)
    augment = make_augment(cfg, splits, channels_last)
    loader = DeviceLoader(data.train, opts.batch_size, True, opts.seed)
    if opts.epochs * len(loader) < 2 * opts.group_iters:
        raise PeerdistillError(f"{plural(opts.epochs, 'epoch')} of {plural(len(loader), 'batch', 'batches')} of "
                               f"{opts.batch_size} make fewer than 2 groups of "
                               f"{plural(opts.group_iters, 'iteration')}; raise --epochs or lower --batch-size or "
                               f"--group-iters")

    def logits_of(net: Any) -> Any:
        def run(x: Tensor) -> Tensor:
            with precision.autocast():
                return net([x])[0].logits
        return run

    teacher_fn, student_fn = logits_of(t_net), logits_of(s_net) if s_net is not None else None
    for e in entries:  # what a picker may score with: the teacher, and the student as peer 0
        e.ctx = ViewContext(lambda u, g=e.gen: augment(u, g), augment.normalize, None, e.gen, 1, teacher_fn,
                            (lambda i, z: student_fn(z)) if student_fn is not None else None)
    t0 = time.perf_counter()
    bar = tqdm(total=opts.epochs * len(loader), desc="T. stddev", leave=False, dynamic_ncols=True,
               disable=None if opts.progress else True)
    with torch.inference_mode():
        for epoch in range(opts.epochs):
            loader.set_epoch(epoch)
            gen = torch.Generator().manual_seed(seed_stream(opts.seed, epoch))  # training's draws of that epoch
            for e in entries:
                e.gen.manual_seed(seed_stream(opts.seed, epoch, zlib.crc32(e.label.encode())))
            for batch in loader:
                x = augment(batch.images, gen)  # (B, C, H, W) the standard crop + flip view
                _iteration(x, entries, teacher_fn, opts.temperature)
                bar.update(1)
    bar.close()
    results = sorted(({"aug": e.label, "params": e.params, **e.acc.result()} for e in entries),
                     key=lambda r: r["t_stddev"])
    return {"teacher": str(teacher), "dataset": cfg.data.name, "epochs": opts.epochs, "batch_size": opts.batch_size,
            "group_iters": opts.group_iters, "temperature": opts.temperature, "seed": opts.seed,
            "precision": precision.name, "student": opts.student, "seconds": time.perf_counter() - t0,
            "notes": notes, "results": results}


def _iteration(x: Tensor, entries: list[_Entry], teacher_fn: Any, temperature: float) -> None:
    """One batch: every augmentation's copy of ``x``, one batched teacher forward, the accumulators."""
    outs = [e.aug(x, e.ctx) if e.aug is not None else None for e in entries]
    todo = [o.x for o in outs if o is not None and o.teacher_logits is None and o.x is not x]
    logits = teacher_fn(torch.cat([x, *todo])) if todo else teacher_fn(x)
    parts = iter(logits.split([x.shape[0], *(t.shape[0] for t in todo)]))
    t_x = next(parts)
    prob = _softmax(t_x, temperature)
    for e, o in zip(entries, outs):
        if o is None:
            e.acc.add(prob)
            continue
        t_aug = t_x if o.x is x else o.teacher_logits if o.teacher_logits is not None else next(parts)
        e.acc.add(prob, _softmax(t_aug, temperature))


def _softmax(logits: Tensor, temperature: float) -> Tensor:
    return F.softmax(logits.float() / temperature, dim=1)


def _entries(augs: list[str] | None, has_student: bool, image_size: tuple[int, int], crop_padding: int | None,
             group_iters: int) -> tuple[list[_Entry], list[str]]:
    """The augmentations to compare (the paper's list when none is named) and notes on any left out."""
    named, notes = bool(augs), []
    entries: list[_Entry] = []
    for spec in augs or list(PAPER_AUGS):
        name, args = parse_aug_spec(spec)
        label = aug_label(name, args)
        if label in (e.label for e in entries):
            raise PeerdistillError(f"augmentation {label!r} is named twice")
        if name in ("", "none"):
            entries.append(_Entry("none", None, GroupMeans(group_iters)))
            continue
        if _needs_student(name, args) and not has_student:
            if named:
                raise PeerdistillError(f"augmentation {label!r} scores with a student: give --student RUN")
            notes.append(f"{label} left out: it scores with a student (give --student RUN)")
            continue
        try:
            aug = build_augmentation(name, args)
        except PeerdistillError as e:
            if named or "kornia" not in str(e):
                raise
            notes.append(f"{label} left out: {e}")
            continue
        aug.setup(image_size, crop_padding)
        entries.append(_Entry(label, aug, GroupMeans(group_iters), {**augmentation_params(name), **args}))
    return entries, notes


def _needs_student(name: str, args: dict[str, Any]) -> bool:
    return name == "cutmixpick" and args.get("criterion") in ("student_entropy", "kld")


def _teacher_config(raw: dict[str, Any], overrides: list[str]) -> C.Config:
    cfg = C.from_dict(raw, stored=True)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.startswith("data."):
            raise PeerdistillError(f"--set {item!r}: only data.<key>=<value> can be changed (e.g. data.root=DIR)")
        C.set_key(cfg, key, yaml.safe_load(text) if text else "")
    return cfg


def _check_options(opts: TStdDevOptions) -> None:
    """Each option against its annotation (the command line's types read the same ones)."""
    hints = typing.get_type_hints(TStdDevOptions, include_extras=True)
    for f in fields(opts):
        if f.name != "overrides":
            check_value(getattr(opts, f.name), hints[f.name], f"--{f.name.replace('_', '-')}")


def format_ranking(result: dict[str, Any]) -> str:
    """The ranked table: lower T. stddev first (the better augmentation for KD, by the paper)."""
    rows = [[str(i), r["aug"], f"{r['t_stddev']:.6f}", f"{r['entropy']:.4f}", str(r["groups"])]
            for i, r in enumerate(result["results"], 1)]
    return "\n".join(text_table(["rank", "augmentation", "T. stddev", "entropy", "groups"], rows, "llrrr"))

