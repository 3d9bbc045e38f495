"""Turn a :class:`Config` into the objects a run needs: data, cohort, method, teacher."""
from __future__ import annotations

import dataclasses
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
from ..errors import PeerdistillError, nearest
from ..methods import ADDONS, METHODS, AddOn, DataInfo, Method, Needs
from ..metrics.robust_options import options_from_mapping
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


def load_splits(cfg: Config) -> DatasetSplits:
    """Read the configured dataset (with every parameter of its source), remove held-out classes and keep an
    optional stratified subset (``data.train_subset``: exactly that many images, before the validation split)."""
    d = cfg.data
    splits = DATASETS.build(d.name, root=d.root, **source_args(d)).check(d.name)
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


def crop_padding(cfg: Config, splits: DatasetSplits) -> int | None:
    """The run's crop padding: ``data.padding``, else the dataset's standard one."""
    return splits.crop_padding if cfg.data.padding is None else cfg.data.padding


def make_augment(cfg: Config, splits: DatasetSplits, channels_last: bool) -> BatchAugment:
    d = cfg.data
    pad = crop_padding(cfg, splits)
    flip = splits.flip if d.flip is None else d.flip
    return BatchAugment(splits.mean, splits.std, pad, flip, d.cutout, channels_last)


def make_mixer(cfg: Config) -> Mixer | None:
    return None if cfg.mixer is None else MIXERS.build(cfg.mixer.name, **cfg.mixer.args)


def resolve_components(cfg: Config) -> None:
    """Check every component's and the data source's arguments and fill in the defaults of the others, so
    that the config written into a run (and compared on ``--resume``) names every value the run uses."""
    cfg.data.args = source_args(cfg.data)
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
        options_from_mapping(cfg.robustness).check()
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
    splits = load_splits(cfg)
    data = split_to_device(splits, cfg.data.val_split, cfg.seed, device)
    needs = method.needs
    n = cohort_size(cfg, needs)
    num_classes, in_channels = splits.num_classes, splits.train.images.shape[-1]
    cohort = build_cohort(cfg.model_names, n, num_classes, in_channels, cfg.model.args,
                          needs.topology, needs.split_after, cfg.fused, 1.0 / n if needs.trunk_grad == "mean" else 1.0)
    check_peers(cohort.nets, in_channels, tuple(splits.train.images.shape[1:3]))
    info = DataInfo(num_classes, len(data.train), torch.from_numpy(data.train.host_labels), in_channels,
                    tuple(splits.train.images.shape[1:3]), crop_padding(cfg, splits))
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
    train = built.data.train.images
    return {"num_classes": built.num_classes, "in_channels": built.in_channels,
            "image_size": list(train.shape[-2:]), "train_size": int(train.shape[0])}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
