"""Run configurations as the result table compares them: every default filled in, values canonical.

``method: dml`` and ``method: {name: dml, temperature: 1.0}`` describe the same run, and a config.yaml
written before a key existed means that key's default (or, for the synthetic source's keys an older version
wrote into every run, nothing: :func:`~peerdistill.config.upgrade`); :func:`resolve` makes such configs equal.
"""
from __future__ import annotations

import inspect
from typing import Any

from ..config import ENGINE_ARGS, Config, upgrade
from ..data import DATASETS
from ..data.mix import MIXERS
from ..errors import PeerdistillError
from ..methods import ADDONS, METHODS
from ..models import MODELS
from ..registry import Registry, plain
from ..robust_options import normalised_section

# The registry behind each component key.
REGISTRIES: dict[str, Registry[Any]] = {"method": METHODS, "model": MODELS, "mixer": MIXERS, "addon": ADDONS}


def resolve(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's config with every default filled in, as the table compares runs.

    Args:
        raw: the mapping read from a run's ``config.yaml`` (of this or an older version).
    """
    raw = upgrade(raw)
    defaults = Config().to_dict()
    # Every config.yaml names its cohort size (the engine resolves the method's default before writing
    # it); the only files without it are fakes and predate that default, when it was 2.
    defaults["peers"] = 2
    cfg = _merge({k: v for k, v in defaults.items() if k not in REGISTRIES}, raw)
    for key, registry in REGISTRIES.items():  # a component is replaced whole, never merged with the default
        comp = _component(raw.get(key, defaults.get(key)))
        if comp is not None:
            comp = {**comp, "name": canonical_name(registry, comp["name"])}
        cfg[key] = None if comp is None else {"name": comp["name"], **component_defaults(registry, comp["name"]),
                                              **comp}
    cfg["robustness"] = normalised_section(cfg.get("robustness"))  # stored as given, compared with its defaults
    if isinstance(cfg.get("data"), dict):  # the data source's own parameters, at their defaults where not set
        name = canonical_name(DATASETS, cfg["data"].get("name", ""))
        source = component_defaults(DATASETS, name, ENGINE_ARGS["data"])
        cfg["data"] = {**source, **cfg["data"], "name": name}
    return cfg


def canonical_name(registry: Registry[Any], name: Any) -> Any:
    """A registry name (or a comma-separated list of model names) in its canonical spelling: a run written
    with an older spelling (``fashion-mnist``) compares equal to one written with the key (``fashion_mnist``)."""
    return registry.canonical_list(name) if isinstance(name, str) else name


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, dict) else v
    return out


def _component(value: Any) -> dict[str, Any] | None:
    """``name`` or ``{name: ..., **args}`` as a mapping; ``None`` for none."""
    if isinstance(value, str):
        return {"name": value}
    return value if isinstance(value, dict) and "name" in value else None


def component_defaults(registry: Registry[Any], name: str, engine: tuple[str, ...] = ENGINE_ARGS["model"]
                       ) -> dict[str, Any]:
    """Constructor defaults of ``name``; of a heterogeneous cohort ``a,b``, those all members share.
    ``engine``: parameters the engine supplies, never set in a config.

    An unknown name (a component since renamed or removed) has none: such runs are grouped as written.
    """
    try:
        params = [registry.params(part.strip()) for part in str(name).split(",")]
    except PeerdistillError:
        return {}
    return {k: plain(v) for k, v in params[0].items() if v is not inspect.Parameter.empty and k not in engine
            and all(k in p and canon(p[k]) == canon(v) for p in params[1:])}


def canon(v: Any) -> Any:
    """A value as compared: ``1`` and ``1.0`` (YAML writes what was typed), tuples and lists are equal."""
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [canon(x) for x in v]
    return {k: canon(x) for k, x in v.items()} if isinstance(v, dict) else v


# Config keys (and everything under them) that cannot change a run's numbers: where data and output live,
# how work is spread on the hardware, what is printed and logged (the same maths up to float rounding; the
# evaluation batch size too, since evaluation runs in eval mode, sample by sample). ``--resume`` may change
# them, and ``table`` and ``sweep`` ignore them when deciding whether two runs are the same experiment.
NEUTRAL_KEYS = ("threads", "progress", "progress_every", "tensorboard", "wandb", "log_every", "device", "name",
                "data.root", "data.eval_batch_size", "dist_timeout", "deterministic")


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_config(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether dotted ``key`` is one of ``prefixes`` or lies under one (``optim.lr`` is under ``optim``)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)
