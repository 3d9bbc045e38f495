"""Turn a :class:`Config` into the objects a run needs: data, cohort, method, teacher."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ENGINE_ARGS, Config, DataConfig, from_dict
from ..data import DATASETS, DatasetSplits, ImageSet
from ..data.batch_augment import BatchAugment
from ..data.loader import DataBundle, split_to_device, stratified_subset
from ..data.mix import MIXERS, Mixer
from ..data.policy import PolicyAugment
from ..data.stream import HostTransform
from ..data.streamed import StreamSplits, default_workers, should_stream, stream_bundle
from ..errors import PeerdistillError, nearest
from ..methods import ADDONS, METHODS, AddOn, DataInfo, Method, Needs
from ..models import MODELS
from ..models.adapt import check_peers
from ..models.base import check_model_args
from ..models.cohort import Cohort, build_cohort
from ..models.pretrained import load_pretrained, split_weights_spec
from .checkpoint import load_checkpoint


def source_args(d: DataConfig) -> dict[str, object]:
    """The dataset source's own parameters: every ``data.<parameter>`` checked against its signature, the
    others at their defaults (``root`` is the general ``data.root``)."""
    params = [k for k in DATASETS.params(d.name) if k not in ENGINE_ARGS["data"]]
    general = [f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.name != "args"]
    shadowed = [k for k in params if f"data.{k}" in general]
    if shadowed:  # data.<key> would set the general key and never reach the source
        raise PeerdistillError(f"dataset {d.name!r} has a parameter {shadowed[0]!r} named like the general key "
                               f"data.{shadowed[0]}; rename the parameter")
    unknown = [k for k in d.args if k not in params]
    if unknown:
        key = f"data.{unknown[0]}"
        takes = ", ".join(f"data.{k}" for k in params) or "no parameters of its own"
        raise PeerdistillError(f"unknown config key {key!r}{nearest(key, general + [f'data.{k}' for k in params])}; "
                               f"dataset {d.name!r} takes {takes}")
    return DATASETS.resolve(d.name, d.args, skip=ENGINE_ARGS["data"])


def engine_source_args(d: DataConfig) -> dict[str, object]:
    """What the engine hands the source besides its own parameters: ``root``, and ``image_size`` to a source
    that declares it."""
    out: dict[str, object] = {"root": d.root}
    if d.image_size is not None and "image_size" in DATASETS.params(d.name):
        out["image_size"] = d.image_size
    return out


def load_splits(cfg: Config, device: torch.device | None = None) -> DatasetSplits | StreamSplits:
    """Read the configured dataset (with every parameter of its source), remove held-out classes and keep an
    optional stratified subset (``data.train_subset``: exactly that many images, before the validation split).

    A source that can stream (it declares ``lazy``) is first asked for its listing; ``data.stream`` (``auto``:
    :func:`~peerdistill.data.streamed.should_stream`) decides whether the run streams it or decodes it into
    memory. A source that only streams (``shards``) refuses ``data.stream=false``."""
    d = cfg.data
    args = {**engine_source_args(d), **source_args(d)}
    if "lazy" in DATASETS.params(d.name):
        splits: DatasetSplits | StreamSplits = DATASETS.build(d.name, lazy=True, **args).check(d.name)
        if not should_stream(d.stream, splits, stream_image_size(cfg, splits), device or torch.device("cpu")):
            splits = DATASETS.build(d.name, **args).check(d.name)
    else:
        splits = DATASETS.build(d.name, **args).check(d.name)
    streamed = isinstance(splits, StreamSplits)
    if d.stream is True and not streamed:
        raise PeerdistillError(f"dataset {d.name!r} is read into memory only; data.stream=true needs a source that "
                               f"reads image files (imagefolder, shards)")
    if d.stream is False and streamed:
        raise PeerdistillError(f"dataset {d.name!r} is always streamed; remove data.stream=false")
    if streamed and d.holdout_classes:
        raise PeerdistillError("data.holdout_classes needs in-memory data (data.stream=false); streamed data has "
                               "no held-out OOD set")
    if d.holdout_classes:
        splits = hold_out(splits, d.holdout_classes, d.name)
    if d.train_subset:
        keep = stratified_subset(splits.train.labels, d.train_subset, cfg.seed + 1, splits.classes,
                                 f"data.train_subset={d.train_subset}")
        splits.train = splits.train.subset(keep)
    return splits


def hold_out(splits: DatasetSplits, classes: list[int], name: str) -> DatasetSplits:
    """Remove ``classes`` from training and test (the kept classes are renumbered 0..K'-1 in order) and
    keep their test images as ``splits.meta["holdout"]``: an out-of-distribution set the model never saw."""
    k = splits.num_classes
    bad = sorted(c for c in set(classes) if c >= k)
    if bad:
        raise PeerdistillError(f"data.holdout_classes {bad} out of range: dataset {name!r} has classes 0..{k - 1}")
    if len(set(classes)) > k - 2:
        raise PeerdistillError(f"data.holdout_classes leaves fewer than 2 of the {k} classes to train on")
    kept = [c for c in range(k) if c not in set(classes)]
    remap = np.full(k, -1, np.int64)
    remap[kept] = np.arange(len(kept))

    def keep(s: ImageSet) -> ImageSet:
        idx = np.flatnonzero(remap[s.labels] >= 0)
        return ImageSet(s.images[idx], remap[s.labels[idx]])

    held = np.flatnonzero(remap[splits.test.labels] < 0)
    meta = {**splits.meta, "holdout": ImageSet(splits.test.images[held], splits.test.labels[held]),
            "holdout_classes": sorted(set(classes))}
    return dataclasses.replace(splits, train=keep(splits.train), test=keep(splits.test),
                               classes=[splits.classes[c] for c in kept], meta=meta)


def stream_image_size(cfg: Config, splits: DatasetSplits | StreamSplits) -> int:
    """The side of the images the networks see."""
    if isinstance(splits, StreamSplits):
        return cfg.data.image_size or splits.image_size
    return int(splits.train.images.shape[1])


def host_transforms(cfg: Config, splits: StreamSplits) -> tuple[HostTransform, HostTransform]:
    """The streaming (training, evaluation) host transforms of the config: the ImageNet protocol's
    RandomResizedCrop (+ flip on the host, one draw per view) and resize + centre crop."""
    d = cfg.data
    if len(d.rrc_scale) != 2 or d.rrc_scale[0] > d.rrc_scale[1]:
        raise PeerdistillError(f"config key 'data.rrc_scale' must hold two values lo <= hi, got {d.rrc_scale}")
    if len(d.rrc_ratio) != 2 or d.rrc_ratio[0] > d.rrc_ratio[1]:
        raise PeerdistillError(f"config key 'data.rrc_ratio' must hold two values lo <= hi, got {d.rrc_ratio}")
    size = stream_image_size(cfg, splits)
    flip = splits.flip if d.flip is None else d.flip
    common = {"image_size": size, "channels": splits.channels, "seed": cfg.seed}
    return (HostTransform(train=True, scale=(d.rrc_scale[0], d.rrc_scale[1]), ratio=(d.rrc_ratio[0], d.rrc_ratio[1]),
                          flip=flip, **common),
            HostTransform(train=False, crop_pct=d.crop_pct, **common))


def host_views(needs: Needs, n_peers: int) -> int:
    """Independent training crops per image a step draws (``Needs.host_views``, else one per peer with
    per-peer views, else one)."""
    return needs.host_views or (n_peers if needs.views == "per_peer" else 1)


def crop_padding(cfg: Config, splits: DatasetSplits) -> int | None:
    """The run's crop padding: ``data.padding``, else the dataset's standard one."""
    return splits.crop_padding if cfg.data.padding is None else cfg.data.padding


def make_augment(cfg: Config, splits: DatasetSplits | StreamSplits, channels_last: bool) -> BatchAugment:
    """The device augmentation: padded random crop and flip in memory; streamed, the host has cropped and
    flipped already, so normalisation (and Cutout) alone."""
    d = cfg.data
    policy = None if d.auto_augment == "none" else PolicyAugment(d.auto_augment, d.ra_n, d.ra_m,
                                                                 d.auto_augment_select)
    if isinstance(splits, StreamSplits):
        return BatchAugment(splits.mean, splits.std, 0, False, d.cutout, channels_last, policy)
    pad = crop_padding(cfg, splits)
    flip = splits.flip if d.flip is None else d.flip
    return BatchAugment(splits.mean, splits.std, pad, flip, d.cutout, channels_last, policy)


def make_mixer(cfg: Config) -> Mixer | None:
    return None if cfg.mixer is None else MIXERS.build(cfg.mixer.name, **cfg.mixer.args)


def resolve_components(cfg: Config) -> None:
    """Check every component's and the data source's arguments and fill in the defaults of the others, so
    that the config written into a run (and compared on ``--resume``) names every value the run uses.
    Names given in an older spelling (an alias: ``fashion-mnist``) become the canonical key (``fashion_mnist``)."""
    canonical_names(cfg)
    cfg.data.args = source_args(cfg.data)
    if "image_size" in DATASETS.params(cfg.data.name):
        if cfg.data.image_size is None:  # the config names the size used
            cfg.data.image_size = DATASETS.params(cfg.data.name)["image_size"]
    elif cfg.data.image_size is not None:
        raise PeerdistillError(f"dataset {cfg.data.name!r} has images of a fixed size; data.image_size applies to "
                               f"imagefolder, shards and synthetic")
    names = cfg.model_names or [""]
    for name in names:
        check_model_args(name, cfg.model.args)
    own = {k: v for k, v in cfg.model.args.items() if k != "pretrained"}  # pretrained: every model's, no default
    per_model = [MODELS.resolve(name, own, skip=ENGINE_ARGS["model"]) for name in names]
    # a heterogeneous cohort records the arguments given and the defaults its models share
    shared = {k: v for k, v in per_model[0].items() if all(k in p and p[k] == v for p in per_model[1:])}
    cfg.model.args = {**shared, **{k: v for k, v in cfg.model.args.items() if k == "pretrained"}}
    for comp, registry in ((cfg.method, METHODS), (cfg.mixer, MIXERS), (cfg.addon, ADDONS)):
        if comp is not None:
            comp.args = registry.resolve(comp.name, comp.args)


def canonical_names(cfg: Config) -> None:
    """Every registry name of the config in its canonical spelling (aliases resolved; unknown names unchanged,
    for the registry's own error later)."""
    cfg.data.name = DATASETS.canonical(cfg.data.name)
    cfg.model.name = MODELS.canonical_list(cfg.model.name)
    for comp, registry in ((cfg.method, METHODS), (cfg.mixer, MIXERS), (cfg.addon, ADDONS)):
        if comp is not None:
            comp.name = registry.canonical(comp.name)


@dataclass
class Built:
    data: DataBundle
    method: Method
    cohort: Cohort
    addons: list[AddOn]
    num_classes: int
    in_channels: int


def validate_config(cfg: Config) -> tuple[Method, list[AddOn]]:
    """Check every component's parameters and the method's needs against the config, before any data
    is read or any file written; returns the method and add-ons it built (cheap: no networks). The config
    is resolved on the way: every default is filled in (see :func:`resolve_components`)."""
    resolve_components(cfg)
    if cfg.mixer is not None:
        make_mixer(cfg)
    if cfg.robustness is not None:
        dataclasses.replace(cfg.robustness).check()  # the options together (each was checked when read)
    if len(cfg.optim.betas) != 2:
        raise PeerdistillError(f"config key 'optim.betas' must hold two values, got {cfg.optim.betas}")
    method = METHODS.build(cfg.method.name, **cfg.method.args)
    needs = method.needs
    if needs.teacher:
        check_teacher(needs.teacher, needs.teacher_peer, needs.teacher_model)
    n = cohort_size(cfg, needs)
    cfg.peers = n  # the resolved config (written into the run) names the cohort size
    if n < needs.min_peers:
        raise PeerdistillError(f"method {cfg.method.name!r} needs at least {needs.min_peers} peers, got {n}")
    if len(cfg.model_names) not in (1, n):
        raise PeerdistillError(f"{len(cfg.model_names)} model names given for {n} peers; give one or {n}")
    if cfg.mixer is not None and not needs.mixing:
        raise PeerdistillError(f"method {cfg.method.name!r} as configured does not support mixers (mixer={cfg.mixer.name}); "
                               f"remove the mixer")
    addons = [ADDONS.build(cfg.addon.name, **cfg.addon.args)] if cfg.addon is not None else []
    return method, addons


def cohort_size(cfg: Config, needs: Needs) -> int:
    """The number of networks: fixed by the method, else the config's ``peers``, else the method's default."""
    if needs.peers is not None:
        if cfg.peers not in (None, needs.peers):
            raise PeerdistillError(f"method {cfg.method.name!r} trains exactly {needs.peers} network"
                                   f"{'s' if needs.peers > 1 else ''}; remove peers={cfg.peers}")
        return needs.peers
    return cfg.peers or needs.default_peers


def build_run(cfg: Config, device: torch.device) -> Built:
    """Build data, method and cohort, and check that they fit together."""
    method, addons = validate_config(cfg)
    splits = load_splits(cfg, device)
    if isinstance(splits, StreamSplits):
        if cfg.robustness is not None:
            raise PeerdistillError("the robustness evaluation needs in-memory data; remove robustness or set "
                                   "data.stream=false")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        workers = cfg.data.workers if cfg.data.workers is not None else default_workers(world, device)
        data = stream_bundle(splits, cfg.data.val_split, cfg.seed, device, stream_image_size(cfg, splits), workers,
                             *host_transforms(cfg, splits))
        in_channels, padding = splits.channels, 0
    else:
        data = split_to_device(splits, cfg.data.val_split, cfg.seed, device)
        in_channels, padding = splits.train.images.shape[-1], crop_padding(cfg, splits)
    needs = method.needs
    n = cohort_size(cfg, needs)
    num_classes = splits.num_classes
    cohort = build_cohort(cfg.model_names, n, num_classes, in_channels, cfg.model.args,
                          needs.topology, needs.split_after, cfg.fused, 1.0 / n if needs.trunk_grad == "mean" else 1.0)
    check_peers(cohort.nets, in_channels, tuple(data.train.shape[1:]))
    info = DataInfo(num_classes, len(data.train), torch.from_numpy(data.train.host_labels), in_channels,
                    tuple(data.train.shape[1:]), padding)
    method.setup(cohort, info)
    for addon in addons:
        addon.setup(method, cohort, info)
    return Built(data, method, cohort, addons, num_classes, in_channels)


def check_teacher(spec: str, peer: int, expected_model: str | None) -> None:
    """Check a teacher given as ``MODEL:WEIGHTS`` (a registered model and a weights file, e.g. torchvision's)
    before anything is read or written; a run directory or checkpoint is checked when it is loaded."""
    parts = split_weights_spec(spec)
    if parts is None:
        return
    name, weights = parts
    if not Path(weights).expanduser().is_file():
        raise PeerdistillError(f"teacher weights file {weights} does not exist")
    if peer:
        raise PeerdistillError(f"teacher {spec} is a single network; teacher_peer={peer} applies to a run's cohort")
    if expected_model and expected_model != name:
        raise PeerdistillError(f"teacher {spec} is a {name}, not the expected {expected_model}")


def load_teacher(path: str, peer: int, num_classes: int, in_channels: int, expected_model: str | None = None,
                 use_other: Callable[[Path], str] = lambda other: f"method.teacher={other}") -> Cohort:
    """Load a frozen teacher, checking it fits this data: peer ``peer`` of another run's checkpoint, or
    ``MODEL:WEIGHTS``, a registered model initialised from a weights file whose classifier has this
    data's classes (:mod:`peerdistill.models.pretrained`). ``use_other`` says how to point at the run's
    other checkpoint when this one is unreadable."""
    parts = split_weights_spec(path)
    if parts is not None:
        check_teacher(path, peer, expected_model)
        net = MODELS.build(parts[0], num_classes=num_classes, in_channels=in_channels)
        load_pretrained(net, parts[0], parts[1], head="require")
        return Cohort([net]).eval().requires_grad_(False)
    ckpt = load_checkpoint(path, prefer="best.pt", use_other=use_other)
    tcfg = from_dict(ckpt["config"], stored=True)
    meta = ckpt.get("data", {})
    if meta.get("num_classes") != num_classes or meta.get("in_channels") != in_channels:
        raise PeerdistillError(f"teacher {path} was trained for {meta.get('num_classes')} classes and "
                               f"{meta.get('in_channels')} input channels; this run has {num_classes} and {in_channels}")
    names = tcfg.model_names
    if expected_model and expected_model not in names:
        raise PeerdistillError(f"teacher {path} is a {','.join(names)}, not the expected {expected_model}")
    method = METHODS.build(tcfg.method.name, **tcfg.method.args)
    n = cohort_size(tcfg, method.needs)
    args = {k: v for k, v in tcfg.model.args.items() if k != "pretrained"}  # the checkpoint holds the weights
    cohort = build_cohort(tcfg.model_names, n, num_classes, in_channels, args,
                          method.needs.topology, method.needs.split_after)
    try:
        cohort.load_state_dict(ckpt["cohort"])
    except RuntimeError as e:
        raise PeerdistillError(f"teacher {path}: weights do not match its architecture "
                               f"({str(e).splitlines()[0][:160]})") from None
    if not 0 <= peer < len(cohort):
        raise PeerdistillError(f"teacher {path} has {len(cohort)} peers; teacher_peer={peer} is out of range")
    return Cohort([cohort.nets[peer]]).eval().requires_grad_(False)


def data_meta(built: Built) -> dict[str, object]:
    train = built.data.train
    return {"num_classes": built.num_classes, "in_channels": built.in_channels,
            "image_size": list(train.shape[-2:]), "train_size": len(train)}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
