"""The typed run config: YAML presets plus dotted ``key=value`` overrides, validated (DESIGN §5).

Components (``method``, ``model``, ``mixer``) are a name plus keyword arguments: on the command line
``method=dml method.temperature=2``; in YAML ``method: {name: dml, temperature: 2}`` or ``method: dml``.
Their arguments are validated against the constructor's signature when the run is built.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import PeerdistillError, nearest


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
    val_split: float = 0.1
    size: int = 512
    test_size: int = 256
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    padding: int | None = None
    flip: bool | None = None
    cutout: int = 0
    train_subset: int = 0  # keep only this many (stratified) training samples; 0 = all
    eval_batch_size: int = 1000


@dataclass
class OptimConfig:
    """SGD and the learning-rate schedule (set per step)."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[float] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass
class Config:
    """Everything that defines a run."""

    method: Component = field(default_factory=lambda: Component("dml"))
    model: Component = field(default_factory=lambda: Component("resnet14"))
    peers: int = 2
    mixer: Component | None = None
    epochs: int = 5
    batch_size: int = 128
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | None = None  # None = auto (on)
    threads: int = 0  # CPU intra-op threads; 0 = torch's default (one per core)
    fused: bool = False  # run a homogeneous independent cohort as one vmapped network (Cohort._fused_forward)
    device: str = "auto"
    sync_bn: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 20
    tensorboard: bool = True
    progress: bool = True
    name: str | None = None

    @property
    def model_names(self) -> list[str]:
        """One name (homogeneous cohort) or a comma-separated list (heterogeneous)."""
        return [m.strip() for m in self.model.name.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("method", "model", "mixer"):
            comp = d[key]
            d[key] = None if comp is None else {"name": comp["name"], **comp["args"]}
        return d


COMPONENTS = ("method", "model", "mixer")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a nested dict (as read from YAML)."""
    cfg = Config()
    for key, value in raw.items():
        set_key(cfg, key, value)
    return cfg


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read an optional YAML preset and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise PeerdistillError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise PeerdistillError(f"config {path} must be a mapping of keys to values")
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
        if head != "mixer":
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
    hint = typing.get_type_hints(type(obj))[key]
    setattr(obj, key, _coerce(value, hint, dotted))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, key)
            except PeerdistillError:
                pass
        raise PeerdistillError(f"config key {key!r} must be {_type_name(hint)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, inner, key) for v in value]
    ok = (isinstance(value, bool) if hint is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if hint is float else
          isinstance(value, int) and not isinstance(value, bool) if hint is int else
          isinstance(value, hint))
    if not ok:
        raise PeerdistillError(f"config key {key!r} must be {_type_name(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "none")


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
