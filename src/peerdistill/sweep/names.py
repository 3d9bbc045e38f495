"""Run names: derived from a row's choices and the seed, filesystem-safe, short, independent of dict order."""
from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .study import Choice, Row

MAX_NAME = 80  # longer names are cut and made unique with a hash: paths stay short on every filesystem


def value_text(v: Any) -> str:
    """A value as the table shows it."""
    if isinstance(v, dict):
        args = ", ".join(f"{k}={value_text(x)}" for k, x in sorted(v.items()) if k != "name")
        if "name" not in v:  # a plain section (optim, data keys): its keys only
            return f"({args})"
        return f"{v['name']}({args})" if args else str(v["name"])
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value_text(x) for x in v) + "]"
    if isinstance(v, bool) or v is None:
        return "none" if v is None else str(v).lower()
    if isinstance(v, float):
        return format(v, "g") if float(format(v, "g")) == v else repr(v)
    return str(v)


def token(v: Any) -> str:
    """A value as a run name shows it (``dml.temperature2``, ``resnet8+resnet14``)."""
    if isinstance(v, dict):
        return "".join([str(v.get("name")), *(f".{k}{token(x)}" for k, x in sorted(v.items()) if k != "name")])
    if isinstance(v, (list, tuple)):
        return "+".join(token(x) for x in v)
    return value_text(v).replace(",", "+")


def safe(name: str) -> str:
    """Letters, digits and ``. _ + -`` only (safe in paths, shells and Slurm job names)."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._+-]", "-", name)).strip(".-") or "row"


def row_id(choices: tuple[Choice, ...]) -> str:
    """Named rows first, then config values, each sorted by axis name: the study file's order never matters."""
    ordered = sorted(choices, key=lambda c: (not c.named, c.axis))
    return "_".join(c.token for c in ordered)


def run_name(row: Row, seed: int) -> str:
    """``<row id>_s<seed>``, cut to :data:`MAX_NAME` characters with a hash of the overrides if longer."""
    name = f"{safe(row.id)}_s{seed}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha1(json.dumps([sorted((c.axis, c.token) for c in row.choices), seed], default=str)
                          .encode()).hexdigest()[:8]
    return f"{name[:MAX_NAME - 10 - len(str(seed))]}-{digest}_s{seed}"
