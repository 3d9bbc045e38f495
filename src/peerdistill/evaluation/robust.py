"""Robustness evaluation of a saved run (SD-Dropout's evaluations, spec §6.4): adversarial
accuracy (FGSM, PGD), corruption accuracy (CIFAR-C families), OOD detection (MSP, ODIN, energy).

Every evaluated head of the run's method is scored (``method.eval_heads``), in float32 with BN in
eval mode. The attacked / scored function of a head is ``x -> eval_heads(cohort(normalize(x)))[head]``
on [0, 1] images, so budgets are in pixel units. Results go to ``<run>/eval.json`` under the
checkpoint and a key naming the settings, next to the plots ``robust_accuracy_eps.png`` and
``ood_scores.png``; ``summary.json`` is never touched. :func:`robust_evaluate` is the entry point.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import ImageSet
from ..engine.checkpoint import resolve_checkpoint
from ..engine.trainer import Trainer
from ..errors import PeerdistillError, nearest
from ..fileio import find_dataset_dir, write_json
from ..metrics import corruptions as CR
from ..metrics import ood as OOD
from ..robust_options import RobustOptions
from ..metrics.robustness import Attacked, fgsm, fgsm_normalised, pgd
from ..seeds import seed_stream
from ..text import plural
from .load import LoadedRun, load_run
from .ood_sets import ood_sets, subset
from .plots import plot_accuracy_eps, plot_ood_scores

# The normalisation of the SD-Dropout authors' test loaders (yechanp/self_kd dataset.py), in which their ART
# FGSM's eps = 0.2 is measured: CIFAR-10's statistics for both CIFAR sets, ImageNet's for their other
# (RGB, 224 px) sets. A grey dataset has no counterpart and keeps the run's own normalisation.
AUTHORS_NORMALISATION = {"cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                         "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
CIFAR_C = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}


# ------------------------------------------------------------------------------ the evaluated run
class Evaluated:
    """A loaded run (:class:`~peerdistill.evaluation.load.LoadedRun`): its heads as functions of [0, 1]
    images, its test set and its facts.

    ``trainer``: the run's live trainer (at the end of training), loaded with the checkpoint instead of
    building the networks again, whose copy of the data and networks would double the device memory.
    """

    def __init__(self, path: str | Path, which: str | None, threads: int | None = None,
                 trainer: Trainer | None = None) -> None:
        self.ckpt_path = resolve_checkpoint(path, which)
        self.run = (load_run(self.ckpt_path, None, threads) if trainer is None
                    else LoadedRun.from_trainer(trainer, self.ckpt_path))
        self.cfg = self.run.cfg
        self.mean, self.std = self.run.mean, self.run.std
        if not isinstance(self.run.data.splits.test, ImageSet):
            raise PeerdistillError("the robustness evaluation needs in-memory data; this run streams its images "
                                   "(data.stream)")
        self.test: ImageSet = self.run.data.splits.test

    @property
    def run_dir(self) -> Path:
        p = self.ckpt_path.parent
        return p.parent if p.name == "checkpoints" else p

    def heads_of(self, x: Tensor) -> dict[str, Tensor]:
        """Every head's (B, K) output for (B, C, H, W) images in [0, 1]."""
        return self.run.heads(x)

    def head_fn(self, head: str) -> Attacked:
        return lambda x: self.heads_of(x)[head].float()

    def head_names(self, wanted: list[str] | None) -> list[str]:
        x = torch.zeros((1, *self.tensor(self.test.images[:1]).shape[1:]), device=self.run.device)
        with torch.no_grad():
            names = list(self.heads_of(x))
        for h in wanted or []:
            if h not in names:
                raise PeerdistillError(f"unknown head {h!r}{nearest(h, names)}; this run has {', '.join(names)}")
        return list(wanted) if wanted else names

    def tensor(self, images: np.ndarray) -> Tensor:
        """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1] on the run's device."""
        return torch.from_numpy(np.ascontiguousarray(images)).to(self.run.device).permute(0, 3, 1, 2).float() / 255


def _batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def accuracy(ev: Evaluated, images: np.ndarray, labels: np.ndarray, heads: list[str], bs: int) -> dict[str, float]:
    """Top-1 (%) of every head on uint8 images."""
    hits = dict.fromkeys(heads, 0)
    y = torch.from_numpy(labels).to(ev.run.device)
    for s in _batches(len(labels), bs):
        out = ev.heads_of(ev.tensor(images[s]))
        for h in heads:
            hits[h] += int((out[h].argmax(1) == y[s]).sum())
    return {h: 100.0 * v / max(len(labels), 1) for h, v in hits.items()}


# ---------------------------------------------------------------------------------- adversarial
def adversarial(ev: Evaluated, opt: RobustOptions, heads: list[str]) -> dict[str, Any]:
    """Accuracy (%) per attack, per head, per eps on a fixed test subset."""
    idx = subset(len(ev.test), opt.adv_limit, opt.seed)
    x_all, y_all = ev.tensor(ev.test.images[idx]), torch.from_numpy(ev.test.labels[idx]).to(ev.run.device)
    res: dict[str, Any] = {"clean": accuracy(ev, ev.test.images[idx], ev.test.labels[idx], heads, opt.batch_size)}
    for attack in opt.attacks:
        res[attack] = {h: {_eps_key(e): _attacked_acc(ev, h, attack, e, x_all, y_all, opt, k)
                           for k, e in enumerate(opt.eps)} for h in heads}
    if opt.fgsm_authors:
        res["fgsm_authors"] = {h: _authors_fgsm(ev, h, x_all, y_all, opt) for h in heads}
        res["fgsm_authors_setting"] = authors_setting(ev, opt)
    return res


def _eps_key(eps: float) -> str:
    return f"{eps * 255:g}/255"


def _attacked_acc(ev: Evaluated, head: str, attack: str, eps: float, x: Tensor, y: Tensor,
                  opt: RobustOptions, k: int) -> float:
    f = ev.head_fn(head)
    gen = torch.Generator().manual_seed(seed_stream(opt.seed, 0, k))
    hits = 0
    for s in _batches(len(y), opt.batch_size):
        if attack == "fgsm":
            adv = fgsm(f, x[s], y[s], eps)
        else:
            adv = pgd(f, x[s], y[s], eps, opt.pgd_steps, opt.pgd_step_size, opt.pgd_random_start, gen=gen)
        with torch.no_grad():
            hits += int((f(adv).argmax(1) == y[s]).sum())
    return 100.0 * hits / len(y)


def authors_normalisation(data: str, mean: Tensor, std: Tensor) -> tuple[str, Tensor, Tensor]:
    """(name, mean, std) the SD-Dropout authors' FGSM runs in for dataset ``data``, whose own (C, 1, 1)
    normalisation is ``mean`` / ``std`` (kept for a grey dataset)."""
    key = "cifar" if data.startswith("cifar") else "imagenet" if mean.numel() == 3 else None
    if key is None:
        return "run", mean, std
    m, s = (torch.tensor(v, device=mean.device).view(-1, 1, 1) for v in AUTHORS_NORMALISATION[key])
    return key, m, s


def authors_setting(ev: Evaluated, opt: RobustOptions) -> dict[str, Any]:
    """What ``--fgsm-authors`` does in pixels: its normalisation, per-channel eps and clip box (in 1/255)."""
    key, mean, std = authors_normalisation(ev.cfg.data.name, ev.mean, ev.std)
    m, s = mean.flatten().tolist(), std.flatten().tolist()
    return {"normalisation": key, "eps": opt.authors_eps,
            "pixel_eps_255": [round(opt.authors_eps * v * 255, 3) for v in s],
            "clip_255": [[round(a * 255, 2), round((a + b) * 255, 2)] for a, b in zip(m, s)]}


def _authors_fgsm(ev: Evaluated, head: str, x: Tensor, y: Tensor, opt: RobustOptions) -> float:
    """IBM ART ``FastGradientMethod(eps)`` as ``_3_adv_robust.py`` calls it: on tensors normalised as the
    authors' loaders do, against the model's own predictions, clipped to (0, 1) there
    (:func:`~peerdistill.metrics.robustness.fgsm_normalised`)."""
    f = ev.head_fn(head)
    _, mean, std = authors_normalisation(ev.cfg.data.name, ev.mean, ev.std)
    hits = 0
    for s in _batches(len(y), opt.batch_size):
        adv = fgsm_normalised(f, x[s], opt.authors_eps, mean, std)
        with torch.no_grad():
            hits += int((f(adv).argmax(1) == y[s]).sum())
    return 100.0 * hits / len(y)


# ---------------------------------------------------------------------------------- corruptions
def corruptions(ev: Evaluated, opt: RobustOptions, heads: list[str]) -> dict[str, Any]:
    """Top-1 (%) per family and severity, per head; mCA = mean over families of the severity mean."""
    idx = subset(len(ev.test), opt.corruption_limit, opt.seed)
    npy = _npy_folder(ev, opt)
    per: dict[str, Any] = {}
    for fam in opt.families:
        source, sets = _corrupted(ev, opt, fam, idx, npy)
        accs = [accuracy(ev, im, lab, heads, opt.batch_size) for im, lab in sets]
        per[fam] = {"source": source, **{h: {"severity": {str(s): a[h] for s, a in zip(opt.severities, accs)},
                                             "mean": float(np.mean([a[h] for a in accs]))} for h in heads}}
    mca = {h: float(np.mean([per[f][h]["mean"] for f in opt.families])) for h in heads}
    return {"clean": accuracy(ev, ev.test.images[idx], ev.test.labels[idx], heads, opt.batch_size),
            "mca": mca, "families": per}


def _npy_folder(ev: Evaluated, opt: RobustOptions) -> Path | None:
    """The published CIFAR-C folder: given, or found for a CIFAR run under the data roots."""
    if opt.corruptions_npy:
        folder = Path(opt.corruptions_npy)
        if not (folder / "labels.npy").is_file():
            raise PeerdistillError(f"--corruptions-npy {folder}: no labels.npy there")
        return _npy_fits(ev, folder)
    name = CIFAR_C.get(ev.cfg.data.name)
    if name is None:
        return None
    try:
        return _npy_fits(ev, find_dataset_dir(name, ev.cfg.data.root, lambda d: (d / "labels.npy").is_file(), ""))
    except PeerdistillError:
        return None


def _npy_fits(ev: Evaluated, folder: Path) -> Path:
    if ev.cfg.data.holdout_classes:
        raise PeerdistillError("published corruption files hold every class; this run holds classes out "
                               "(data.holdout_classes): use the generated corruptions")
    return folder


def _corrupted(ev: Evaluated, opt: RobustOptions, fam: str, idx: np.ndarray,
               npy: Path | None) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    if npy is not None and (npy / f"{fam}.npy").is_file():
        sets = CR.read_npy_corruption(npy, fam, idx)
        shape = ev.test.images.shape[1:]
        if sets[0][0].shape[1:] != shape:
            raise PeerdistillError(f"{npy / fam}.npy holds {sets[0][0].shape[1:]} images; the run's are {shape}")
        return f"npy:{npy}", [sets[s - 1] for s in opt.severities]
    if opt.corruptions_npy:
        raise PeerdistillError(f"--corruptions-npy {npy}: no {fam}.npy there (choose families with --families)")
    fn = CR.corrupt if opt.corruption_source == "builtin" else CR.imagecorruptions_corrupt
    images, labels = ev.test.images[idx], ev.test.labels[idx]
    return opt.corruption_source, [(fn(images, fam, s, opt.seed, idx), labels) for s in opt.severities]


# -------------------------------------------------------------------------------------------- OOD
def _ood_sets(ev: Evaluated, opt: RobustOptions) -> dict[str, Any]:
    from ..metrics.ood import sklearn_metrics

    sklearn_metrics()  # the metrics' library, checked before any scoring
    return ood_sets(opt.ood_data, ev.cfg.data.name, ev.test, ev.run.data.splits.meta, opt.ood_limit, opt.seed,
                    opt.ood_root)


def ood(ev: Evaluated, opt: RobustOptions, heads: list[str],
        sets: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Detection metrics per OOD set, head and score; also the raw scores (for the histogram plot)."""
    sets = _ood_sets(ev, opt) if sets is None else sets
    idx = subset(len(ev.test), opt.ood_limit, opt.seed)
    in_scores = {h: _scores(ev, ev.test.images[idx], h, opt) for h in heads}
    res: dict[str, Any] = {"in_distribution": f"{ev.cfg.data.name} test ({plural(len(idx), 'image')})"}
    raw: dict[str, Any] = {"in": in_scores, "out": {}}
    for name, images in sets.items():
        raw["out"][name] = {h: _scores(ev, images, h, opt) for h in heads}
        out = raw["out"][name]
        res[name] = {"images": len(images), **{h: {s: _metrics(in_scores[h][s], out[h][s], opt.fpr_rule)
                                                    for s in opt.scores} for h in heads}}
    return res, raw


def _odin_step(ev: Evaluated, opt: RobustOptions) -> Tensor | float:
    """ODIN perturbs [0, 1] images by eps (= eps/std on the normalised tensor, as ODIN's code divides the
    signed gradient by the std); ``normalised``: eps on the normalised tensor itself (the paper's formula
    read literally), i.e. eps*std in pixel units."""
    return 1.0 if opt.odin_space == "pixel" else ev.std


def _scores(ev: Evaluated, images: np.ndarray, head: str, opt: RobustOptions) -> dict[str, np.ndarray]:
    f, step = ev.head_fn(head), _odin_step(ev, opt)
    out: dict[str, list[np.ndarray]] = {s: [] for s in opt.scores}
    for s in _batches(len(images), opt.batch_size):
        got = OOD.scores(f, ev.tensor(images[s]), opt.scores, opt.odin_temperature, opt.odin_eps, step,
                         opt.energy_temperature)
        for name, v in got.items():
            out[name].append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _metrics(s_in: np.ndarray, s_out: np.ndarray, rule: str) -> dict[str, float | None] | None:
    if np.isnan(s_in).any() or np.isnan(s_out).any():
        return None  # energy of a head that outputs log-probabilities (an ensemble): not defined
    return OOD.detection_metrics(s_in, s_out, fpr_rule=rule)


# ------------------------------------------------------------------------------------- the driver
def settings_key(settings: dict[str, Any]) -> str:
    """A readable, deterministic name of the settings an evaluation ran with."""
    def fmt(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return "+".join(fmt(i) for i in v)
        return f"{v:g}" if isinstance(v, float) else str(v)
    return ",".join(f"{k}={fmt(v)}" for k, v in settings.items() if v is not None)


def _settings(opt: RobustOptions, part: str) -> dict[str, Any]:
    d = asdict(opt)
    common = {"seed": d["seed"]}
    if part == "adversarial":
        keep = ["attacks", "adv_limit", "pgd_steps", "pgd_step_size", "pgd_random_start", "fgsm_authors"]
        extra = {"eps_255": [round(e * 255, 6) for e in opt.eps],
                 "authors_eps": opt.authors_eps if opt.fgsm_authors else None}
    elif part == "corruptions":
        keep, extra = ["families", "severities", "corruption_limit", "corruption_source", "corruptions_npy"], {}
    else:
        keep = ["ood_data", "ood_root", "ood_limit", "scores", "odin_temperature", "odin_eps", "odin_space",
                "energy_temperature", "fpr_rule"]
        extra = {}
    return {**{k: d[k] for k in keep}, **extra, **common}


def robust_evaluate(path: str | Path, options: RobustOptions, checkpoint: str | None = None,
                    threads: int | None = None, echo: Callable[[str], None] | None = None,
                    trainer: Trainer | None = None) -> dict[str, Any]:
    """Evaluate a run directory (or checkpoint) and record the results in its ``eval.json`` (``trainer``:
    the run's live one, reused; see :class:`Evaluated`).

    ``checkpoint`` names the run directory's checkpoint (default ``last.pt``); one that does not exist is an error.

    Returns ``{"checkpoint", "epoch", "run_dir", "heads", "<part>": {"key", "settings", "seconds",
    "results"}}`` for each part evaluated (``adversarial``, ``corruptions``, ``ood``).
    """
    options.check()
    ev = Evaluated(path, checkpoint, threads, trainer)
    heads = ev.head_names(options.heads)
    out: dict[str, Any] = {"checkpoint": str(ev.ckpt_path), "epoch": ev.run.epoch,
                           "run_dir": str(ev.run_dir), "heads": heads}
    raw_ood = None
    sets = _ood_sets(ev, options) if options.ood else {}  # first: a bad OOD set costs no other part
    parts = (("adversarial", adversarial), ("corruptions", corruptions), ("ood", lambda e, o, h: ood(e, o, h, sets)))
    for part, fn in parts:
        if not getattr(options, part):
            continue
        if echo is not None:
            echo(f"evaluating {part} ...")
        t0 = time.perf_counter()
        results = fn(ev, options, heads)
        if part == "ood":
            results, raw_ood = results
        settings = _settings(options, part)
        out[part] = {"key": settings_key(settings), "settings": settings,
                     "seconds": round(time.perf_counter() - t0, 2), "results": results}
        record(ev, out)  # after each part: a later failure keeps what is done
    if options.plots:
        _plots(ev.run_dir, out, raw_ood)
    return out


def record(ev: Evaluated, out: dict[str, Any]) -> Path:
    """Merge into ``<run>/eval.json``: ``checkpoints.<file>.<part>.<settings key>``, and the results of the
    latest evaluation of each part as ``latest.<part>`` (what study columns read), in one atomic write."""
    path = ev.run_dir / "eval.json"
    try:
        store = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        store = {}  # an unreadable file is replaced, not a reason to lose this evaluation
    entry = store.setdefault("checkpoints", {}).setdefault(ev.ckpt_path.name, {})
    entry["epoch"] = out["epoch"]
    for part in ("adversarial", "corruptions", "ood"):
        if part in out:
            res = out[part]
            entry.setdefault(part, {})[res["key"]] = {
                "settings": res["settings"], "results": res["results"], "seconds": res["seconds"],
                "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            store.setdefault("latest", {})[part] = {"checkpoint": ev.ckpt_path.name, **res["results"]}
    write_json(path, store)
    return path


def _plots(run_dir: Path, out: dict[str, Any], raw_ood: dict[str, Any] | None) -> None:
    if "adversarial" in out:
        plot_accuracy_eps(out["adversarial"]["results"], run_dir / "robust_accuracy_eps.png")
    if raw_ood is not None:
        plot_ood_scores(raw_ood, run_dir / "ood_scores.png")
