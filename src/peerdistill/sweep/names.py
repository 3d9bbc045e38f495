"""The text of values in run names and tables: filesystem-safe, short, independent of dict order (a study's
row and run names are built from them in :mod:`peerdistill.sweep.study`)."""
from __future__ import annotations

import re
from typing import Any

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
