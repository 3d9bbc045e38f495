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

from .errors import PeerdistillError, nearest
from .params import (Decay, Fraction, Interval, NonNegative, NonNegativeInt, Positive, PositiveInt,
                     check_value)


@dataclass
class Component:
    """A registry name with keyword arguments for its constructor."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Dataset and augmentation.

    ``size``/``test_size``/``num_classes``/``image_size``/``channels`` configure the ``synthetic`` source;
    ``padding``/``flip`` default to the dataset's standard augmentation.
    """

    name: str = "fashion-mnist"
    root: str | None = None
    val_split: Fraction = 0.1
    size: PositiveInt = 512
    test_size: PositiveInt = 256
    num_classes: Annotated[int, Interval(ge=2)] = 10
    image_size: Annotated[int, Interval(ge=8)] = 32
    channels: PositiveInt = 3
    padding: NonNegativeInt | None = None
    flip: bool | None = None
    cutout: NonNegativeInt = 0
    train_subset: NonNegativeInt = 0  # keep only this many (stratified) training samples; 0 = all
    holdout_classes: list[NonNegativeInt] = field(default_factory=list)  # classes removed from training (OOD)
    eval_batch_size: PositiveInt = 1000


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (set per step).

    ``name=sgd`` (momentum, Nesterov) is what every distillation paper here uses; ``adamw`` uses
    ``betas`` and decoupled ``weight_decay``. ``grad_clip`` > 0 clips the global gradient norm of every
    trained parameter; ``accum_steps`` > 1 accumulates gradients over that many batches per step.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: NonNegative = 0.1
    momentum: Decay = 0.9
    nesterov: bool = True
    betas: list[Annotated[float, Interval(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: NonNegative = 5e-4
    no_decay_bn_bias: bool = False
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[NonNegative] = field(default_factory=list)  # epochs, for multistep
    gamma: Positive = 0.1
    warmup_epochs: NonNegative = 0.0
    grad_clip: NonNegative = 0.0
    accum_steps: PositiveInt = 1


@dataclass
class Config:
    """Everything that defines a run."""

    method: Component = field(default_factory=lambda: Component("dml"))
    model: Component = field(default_factory=lambda: Component("resnet14"))
    peers: PositiveInt | None = None  # None: the method's default (2 for most cohorts, 1 for self-KD, 3 for PCL)
    mixer: Component | None = None
    addon: Component | None = None  # a loss term added to any method (e.g. sd_dropout)
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 128
    seed: NonNegativeInt = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None  # None = auto (on)
    threads: NonNegativeInt = 0  # CPU intra-op threads; 0 = torch's default (one per core)
    fused: bool = False  # run a homogeneous independent cohort as one vmapped network (Cohort._fused_forward)
    device: str = "auto"
    # Deterministic kernels only (cuDNN without autotuning): a GPU run and its resume repeat bit for bit,
    # at a cost in speed (docs/performance.md). CPU runs are deterministic either way.
    deterministic: bool = False
    sync_bn: bool = False
    dist_timeout: PositiveInt = 3600  # seconds a torchrun process waits in a collective (rank 0's evaluation)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: PositiveInt = 1  # evaluate every k epochs (and always after the last)
    # Robustness evaluation after training (peerdistill eval --robustness), e.g. {adversarial: true, ood: true,
    # limit: 500}; the keys are those of peerdistill.engine.robust.RobustOptions. None: not run.
    robustness: dict[str, Any] | None = None
    log_every: PositiveInt = 20  # steps between per-step loss records (steps.jsonl) and progress updates
    progress_every: Positive = 30.0  # seconds between progress lines when stderr is not a terminal
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    name: str | None = None

    @property
    def model_names(self) -> list[str]:
        """One name (homogeneous cohort) or a comma-separated list (heterogeneous)."""
        return [m.strip() for m in self.model.name.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in COMPONENTS:
            comp = d[key]
            d[key] = None if comp is None else {"name": comp["name"], **comp["args"]}
        return d


COMPONENTS = ("method", "model", "mixer", "addon")
OPTIONAL = ("mixer", "addon")  # components that may be none


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict (as read from YAML)."""
    cfg = Config()
    for key, value in raw.items():
        set_key(cfg, key, value)
    return cfg


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


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read an optional YAML preset and apply ``key=value`` overrides."""
    raw = read_mapping(Path(path), "config") if path is not None else {}
    cfg = from_dict(raw)
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
    names = {f.name for f in fields(obj)}
    key = path[0]
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
    setattr(obj, key, _coerce(value, hint, dotted))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a config value against its field's annotation (type and declared range)."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    if typing.get_origin(base) is list and not isinstance(value, (list, tuple)):
        value = [value]  # `optim.milestones=150` is a one-element list
    return check_value(value, hint, f"config key {key!r}")


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
