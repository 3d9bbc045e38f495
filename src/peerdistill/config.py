"""The typed run config: YAML presets plus dotted ``key=value`` overrides, validated (DESIGN §5).

Components (``method``, ``model``, ``mixer``) are a name plus keyword arguments: on the command line
``method=dml method.temperature=2``; in YAML ``method: {name: dml, temperature: 2}`` or ``method: dml``.
Their arguments are validated against the constructor's signature when the run is built.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from . import plugins
from .errors import PeerdistillError, nearest
from .params import (Decay, Fraction, Interval, NonNegative, NonNegativeInt, Positive, PositiveInt,
                     check_value)
from .robust_options import RobustOptions


@dataclass
class Component:
    """A registry name with keyword arguments for its constructor."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Dataset, validation split and augmentation.

    Attributes:
        name: the dataset source (``peerdistill list datasets``).
        root: the folder the source reads (default: the source's standard places and ``$PEERDISTILL_DATA``).
        val_split: share of the labelled pool held out for validation (stratified, seeded); 0 = none.
        padding: random-crop padding in pixels (default: the dataset's standard one).
        flip: random horizontal flips (default: the dataset's standard augmentation).
        cutout: side in pixels of a Cutout square cut from every training image; 0 = none.
        auto_augment: ``randaugment`` or ``trivialaugment`` on every training image after its crop and flip
            (kornia's operations, on the device; needs the ``autoaugment`` extra); ``none`` = off.
        ra_n: RandAugment's operations per image.
        ra_m: RandAugment's magnitude on the 0-30 scale of kornia and torchvision (whose default, 9, is this
            one's; timm's ``rand-m9``, 9 of 10, is 27).
        auto_augment_select: ``image``: each image draws its own operations (the published recipes);
            ``batch``: one draw for the whole batch (kornia's own behaviour; fewer, larger calls).
        train_subset: N > 0 draws exactly N images of the dataset's training set as the labelled pool, before
            the validation split (which then takes ``round(val_split x N)`` of them); every class gets its share
            of N in proportion to its size (largest remainders, ties to the lower class). 0 = the whole set.
        holdout_classes: classes removed from training and test; their test images become an OOD set.
        eval_batch_size: images per forward pass when evaluating.
        stream: read the images from their files as they are needed (worker processes decode and crop them)
            instead of decoding the whole set into memory: ``true``, ``false`` or ``auto`` (stream when the
            decoded set would take more than half of the free host memory, or of the free GPU memory when
            training on one). Only sources that read image files can stream (``imagefolder``, ``shards``).
        workers: streaming: worker processes that decode and crop; 0 decodes in the training process.
            Default: on a GPU, one per CPU core of this process, less one for the training loop, at least one;
            on the CPU, the cores the compute threads (``threads``) leave free, often 0.
        image_size: side of the square images the networks see (default: the source's own, e.g. 32 for an
            in-memory ``imagefolder``, 224 for ``shards``); the in-memory ``imagefolder`` and ``synthetic``
            read it too.
        crop_pct: streaming evaluation: the shorter side is resized to ``image_size / crop_pct`` (256 for 224 at
            0.875) and the centre ``image_size`` square is kept.
        rrc_scale: streaming training: RandomResizedCrop's range of the crop's share of the image's area.
        rrc_ratio: streaming training: RandomResizedCrop's range of the crop's aspect ratio (width / height).
        args: the source's own parameters (e.g. ``image_size`` of ``imagefolder``), written ``data.<parameter>``
            and checked against the source's signature when the run is built (``peerdistill list datasets``).
    """

    name: str = "fashion_mnist"
    root: str | None = None
    val_split: Fraction = 0.1
    padding: NonNegativeInt | None = None
    flip: bool | None = None
    cutout: NonNegativeInt = 0
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    ra_n: PositiveInt = 2
    ra_m: Annotated[int, Interval(ge=1, le=29)] = 9
    auto_augment_select: Literal["image", "batch"] = "image"
    train_subset: NonNegativeInt = 0
    holdout_classes: list[NonNegativeInt] = field(default_factory=list)
    eval_batch_size: PositiveInt = 1000
    stream: bool | Literal["auto"] = "auto"
    workers: NonNegativeInt | None = None
    image_size: Annotated[int, Interval(ge=8)] | None = None
    crop_pct: Annotated[float, Interval(gt=0, le=1)] = 0.875
    rrc_scale: list[Annotated[float, Interval(gt=0, le=1)]] = field(default_factory=lambda: [0.08, 1.0])
    rrc_ratio: list[Positive] = field(default_factory=lambda: [3 / 4, 4 / 3])
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (the rate is set every step).

    Attributes:
        name: ``sgd`` (momentum, Nesterov: what every distillation paper here uses) or ``adamw``.
        lr: peak learning rate (after warm-up).
        momentum: SGD momentum.
        nesterov: Nesterov momentum (SGD with momentum > 0).
        betas: AdamW's two betas.
        weight_decay: L2 penalty (SGD) or decoupled weight decay (AdamW).
        no_decay_bn_bias: exempt BN weights and biases (every parameter with one dimension) from weight decay.
        schedule: ``cosine`` to 0 over the epochs after warm-up, ``multistep`` (x ``gamma`` at each of the
            ``milestones``) or ``constant``.
        milestones: epochs at which ``multistep`` multiplies the rate by ``gamma``.
        gamma: factor of ``multistep`` at each milestone.
        warmup_epochs: linear warm-up from ~0 to ``lr`` over this many epochs (fractions allowed); 0 = none.
        grad_clip: clip the global gradient norm of every trained parameter to this; 0 = no clipping.
        accum_steps: accumulate gradients over this many batches per optimizer step.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: NonNegative = 0.1
    momentum: Decay = 0.9
    nesterov: bool = True
    betas: list[Annotated[float, Interval(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: NonNegative = 5e-4
    no_decay_bn_bias: bool = False
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[NonNegative] = field(default_factory=list)
    gamma: Positive = 0.1
    warmup_epochs: NonNegative = 0.0
    grad_clip: NonNegative = 0.0
    accum_steps: PositiveInt = 1


@dataclass
class Config:
    """Everything that defines a run.

    Attributes:
        method: the distillation method and its parameters (``peerdistill list methods``).
        model: the network of every peer, or a comma-separated list for a heterogeneous cohort
            (``peerdistill list models``).
        peers: the cohort size (default: the method's own, e.g. 2 for DML, 1 for self-distillation and KD).
        mixer: a mixed-sample augmentation applied to every training batch (``peerdistill list mixers``); none by
            default.
        addon: a loss term added to any method (e.g. ``sd_dropout``); none by default.
        epochs: passes over the training split.
        batch_size: images per optimizer step (the global batch under torchrun).
        seed: seeds the initialisation, the data order, the augmentation and the validation split.
        precision: autocast precision; ``auto`` is bf16 on CPUs and GPUs with native bf16, fp16 with a gradient
            scaler on older GPUs, else fp32.
        channels_last: channels_last memory format; default (none): on the CPU, and on a GPU under bf16 / fp16.
        threads: CPU intra-op threads; 0 = torch's default (one per core).
        fused: run a homogeneous independent cohort as one vmapped network (faster on GPUs only).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        deterministic: deterministic kernels only (cuDNN without autotuning): a GPU run and its resume repeat
            bit for bit, at a cost in speed (docs/performance.md). CPU runs are deterministic either way.
        sync_bn: synchronise BatchNorm statistics across processes under torchrun (CUDA only).
        dist_timeout: seconds a torchrun process waits in a collective (e.g. while rank 0 evaluates).
        data: the dataset and its augmentation (``data.*``).
        optim: the optimizer and learning-rate schedule (``optim.*``).
        eval_every: evaluate on validation and test every k epochs, and always after the last one.
        robustness: a robustness evaluation run after training, e.g. ``{adversarial: true, limit: 500}``; its keys
            are the options of ``peerdistill eval --robustness`` (``limit`` sets all three limits), checked when
            the config is read. A run's config.yaml stores the section as given; ``--resume`` compares it with
            every default filled in. None: not run.
        log_every: steps between per-step loss records (``steps.jsonl``, which also gets every epoch's last
            step) and progress-bar updates.
        progress_every: seconds between progress lines when stderr is not a terminal.
        tensorboard: write TensorBoard events to ``<run>/tb`` (the ``tensorboard`` extra).
        wandb: log to Weights & Biases (the ``wandb`` extra).
        progress: show progress while training.
        name: the run's name in the default output folder ``runs/<name>-<time>``.
        plugins: modules (``mypkg.models``) or ``.py`` files of the user's that register models, methods,
            mixers, add-ons or dataset sources; imported when the config is read, and again by every command
            reading the run (docs/api.md).
    """

    method: Component = field(default_factory=lambda: Component("dml"))
    model: Component = field(default_factory=lambda: Component("resnet14"))
    peers: PositiveInt | None = None
    mixer: Component | None = None
    addon: Component | None = None
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 128
    seed: NonNegativeInt = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    threads: NonNegativeInt = 0
    fused: bool = False
    device: str = "auto"
    deterministic: bool = False
    sync_bn: bool = False
    dist_timeout: PositiveInt = 3600
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: PositiveInt = 1
    robustness: RobustOptions | None = None
    log_every: PositiveInt = 20
    progress_every: Positive = 30.0
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    name: str | None = None
    plugins: list[str] = field(default_factory=list)

    @property
    def model_names(self) -> list[str]:
        """One name (homogeneous cohort) or a comma-separated list (heterogeneous)."""
        return [m.strip() for m in self.model.name.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        """The config as written to ``config.yaml``: a component's (and the data source's) arguments sit
        beside its name."""
        d = asdict(self)
        for key in COMPONENTS:
            comp = d[key]
            d[key] = None if comp is None else {"name": comp["name"], **comp["args"]}
        d["data"].update(d["data"].pop("args"))
        for key in SECTIONS:  # a section is stored as the user gave it
            value = getattr(self, key)
            d[key] = None if value is None else value.mapping()
        return d


COMPONENTS = ("method", "model", "mixer", "addon")
# Typed sections read from a mapping (``from_mapping``) and stored as given (``mapping()``), not merged key by key.
SECTIONS = {"robustness": RobustOptions}
OPTIONAL = ("mixer", "addon")  # components that may be none
# Constructor parameters the engine supplies (from the data, or the general data.root), never set as arguments.
# A source that declares ``image_size`` gets the general data.image_size (when set), and one that declares ``lazy``
# can stream: it is asked for a lazy listing (see peerdistill.data.streamed).
ENGINE_ARGS = {"model": ("num_classes", "in_channels"), "data": ("root", "image_size", "lazy")}


def from_dict(raw: dict[str, Any], stored: bool = False) -> Config:
    """Build a validated :class:`Config` from a nested dict (as read from YAML).

    Args:
        raw: the mapping.
        stored: ``raw`` is a run's own config (its ``config.yaml`` or checkpoint), perhaps written by an
            older version: see :func:`upgrade`.
    """
    cfg = Config()
    raw = upgrade(raw) if stored else raw
    if "plugins" in raw:  # first: the other keys may name what the plugins register
        set_key(cfg, "plugins", raw["plugins"])
    for key, value in raw.items():
        if key != "plugins":
            set_key(cfg, key, value)
    return cfg


# Before data sources had parameters of their own, every run's config.yaml held these keys of the synthetic
# source (with its defaults) whatever the dataset, and no other source ever received them.
LEGACY_DATA_KEYS = ("size", "test_size", "num_classes", "image_size", "channels")


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored run config as this version writes it: the legacy synthetic keys of another dataset's run
    dropped (they never reached its source, so the run was trained without them)."""
    data = raw.get("data")
    if (not isinstance(data, dict) or data.get("name", DataConfig.name) == "synthetic"
            or not all(k in data for k in LEGACY_DATA_KEYS)):
        return raw
    return {**raw, "data": {k: v for k, v in data.items() if k not in LEGACY_DATA_KEYS}}


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``); unreadable, unparsable or other content is one line."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise PeerdistillError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise PeerdistillError(f"cannot parse {what} {path}: {yaml_error(e)}") from None
    if not isinstance(raw, dict):
        raise PeerdistillError(f"{what} {path} must be a mapping of keys to values")
    return raw


def load(path: str | Path | None, overrides: list[str] = (), stored: bool = False) -> Config:
    """Read an optional YAML preset (``stored``: a run's own config.yaml) and apply ``key=value`` overrides."""
    raw = read_mapping(Path(path), "config") if path is not None else {}
    cfg = from_dict(raw, stored)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise PeerdistillError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        set_key(cfg, key.strip(), value)
    return cfg


def yaml_error(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line that keeps the problem and its line and column."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(e, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` on the config, validating the key and the value's type."""
    head, _, rest = dotted.partition(".")
    if head in COMPONENTS:
        _set_component(cfg, head, rest, value)
        return
    _set_field(cfg, dotted.split("."), value, dotted)


def _set_component(cfg: Config, head: str, rest: str, value: Any) -> None:
    comp: Component | None = getattr(cfg, head)
    if rest:  # method.temperature=2
        if comp is None:
            raise PeerdistillError(f"set {head}=<name> before {head}.{rest}")
        if rest == "name":
            comp.name = str(value)
        else:
            comp.args[rest] = value
        return
    if value is None or value == "none":
        if head not in OPTIONAL:
            raise PeerdistillError(f"{head} cannot be none")
        setattr(cfg, head, None)
    elif isinstance(value, str):
        if comp is None or comp.name != value:
            setattr(cfg, head, Component(value))
    elif isinstance(value, dict) and "name" in value:
        args = {k: v for k, v in value.items() if k != "name"}
        setattr(cfg, head, Component(str(value["name"]), args))
    else:
        raise PeerdistillError(f"{head} must be a name or a mapping with a 'name' key, got {value!r}")


def _set_field(obj: Any, path: list[str], value: Any, dotted: str) -> None:
    names = {f.name for f in fields(obj)} - {"args"}
    key = path[0]
    if isinstance(obj, Config) and key in SECTIONS:
        _set_section(obj, path, value)
        return
    if key not in names and isinstance(obj, DataConfig) and len(path) == 1:
        obj.args[key] = value  # a parameter of the source: checked against its signature when the run is built
        return
    if key not in names:
        prefix = dotted[: len(dotted) - len(".".join(path))]
        valid = [prefix + n for n in names]
        raise PeerdistillError(f"unknown config key {dotted!r}{nearest(dotted, valid)}")
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise PeerdistillError(f"config key {dotted!r} must be a mapping")
            for k, v in value.items():
                _set_field(current, [k], v, f"{dotted}.{k}")
            return
        _set_field(current, path[1:], value, dotted)
        return
    if len(path) > 1:
        raise PeerdistillError(f"config key {key!r} has no sub-key {'.'.join(path[1:])!r}")
    hint = typing.get_type_hints(type(obj), include_extras=True)[key]
    value = _coerce(value, hint, dotted)
    if isinstance(obj, Config) and key == "plugins":
        value = [plugins.normalize(v) for v in value]
        plugins.load(value)
    setattr(obj, key, value)


def _set_section(cfg: Config, path: list[str], value: Any) -> None:
    """``robustness={...}`` replaces the section; ``robustness.<option>=value`` sets one option of it."""
    key, cls = path[0], SECTIONS[path[0]]
    if len(path) > 2:
        raise PeerdistillError(f"config key {key!r} has no sub-key {'.'.join(path[1:])!r}")
    if len(path) == 2:
        current = getattr(cfg, key)
        value = {**(current.mapping() if current is not None else {}), path[1]: value}
    setattr(cfg, key, None if value is None or value == "none" else cls.from_mapping(value))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a config value against its field's annotation (type and declared range)."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    if typing.get_origin(base) is list and not isinstance(value, (list, tuple)):
        value = [value]  # `optim.milestones=150` is a one-element list
    return check_value(value, hint, f"config key {key!r}")


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
