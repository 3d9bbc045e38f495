"""Aggregate finished runs into a mean ± std table: one row per experiment, pooling its seeds.

Runs are compared by their configuration with every default filled in: the config's own defaults for
keys an older ``config.yaml`` lacks, and each component's constructor defaults for the arguments it does
not set, so ``method: dml`` and ``method: {name: dml, temperature: 1.0}`` are the same experiment. Keys
that cannot change the numbers are left out of the comparison.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import PeerdistillError
from .configs import NEUTRAL_KEYS, REGISTRIES, canon, component_defaults, flat_config, resolve, under
from .logger import read_jsonl

_IGNORED = ("seed", *NEUTRAL_KEYS)  # the grouping axis and the keys that cannot change the numbers
# Evaluating every k epochs leaves training and the last epoch unchanged (the trainer always evaluates
# after the last one) but changes which epochs can be the best: it splits rows for ``which="best"`` only.
_IGNORED_FOR_FINAL = ("eval_every",)
_HEADLINE = ("method", "mixer", "addon", "model", "peers", "data.name", "epochs")  # shown in every label


@dataclass
class Run:
    """One finished run as the table reads it."""

    dir: Path
    config: dict[str, Any]  # resolved: every default filled in (see :func:`resolve`)
    summary: dict[str, Any]
    epoch_s: float  # mean training seconds per epoch; NaN without a readable metrics.jsonl


@dataclass
class RunSet:
    """The usable runs among some directories, and one note per directory that was skipped."""

    runs: list[Run]
    skipped: list[str]


class _Unusable(Exception):
    """Why a directory holds no usable run."""


def load_runs(dirs: list[Path]) -> RunSet:
    """Read run directories; one that is unfinished or unreadable is skipped with a note, not fatal.

    Raises:
        PeerdistillError: if no directory holds a usable run.
    """
    runs, skipped = [], []
    for d in map(Path, dirs):
        try:
            runs.append(_read_run(d))
        except _Unusable as e:
            skipped.append(f"skipped {d}: {e}")
    if not runs:
        reasons = "; ".join(skipped[:3]) + ("; …" if len(skipped) > 3 else "")
        raise PeerdistillError(f"no usable run to tabulate ({reasons or 'no run directories given'})")
    return RunSet(runs, skipped)


def _read_run(d: Path) -> Run:
    raw = _read(d / "config.yaml", yaml.safe_load)
    summary = _read(d / "summary.json", json.loads)
    if not isinstance(raw, dict) or not isinstance(summary, dict):
        raise _Unusable("config.yaml or summary.json is not a mapping")
    test = summary["final"].get("test") if isinstance(summary.get("final"), dict) else None
    if not isinstance(test, dict) or not test:
        raise _Unusable("summary.json has no final test metrics (unfinished run?)")
    try:  # seconds is in every epoch record, evaluated or not
        seconds = _numbers(r.get("seconds") for r in read_jsonl(d / "metrics.jsonl"))
    except OSError:
        seconds = []
    return Run(d, resolve(raw), summary, statistics.mean(seconds) if seconds else math.nan)


def _read(path: Path, parse: Callable[[str], Any]) -> Any:
    if not path.is_file():
        raise _Unusable(f"no {path.name}" + (" (unfinished run?)" if path.name == "summary.json" else ""))
    try:
        return parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise _Unusable(f"cannot read {path.name}: {' '.join(str(e).split())[:160]}") from None


def _ignored(which: str) -> tuple[str, ...]:
    return _IGNORED + (_IGNORED_FOR_FINAL if which == "final" else ())


def group_runs(runs: RunSet, which: str = "final") -> dict[str, list[Run]]:
    """Runs that differ only in keys that cannot change their ``which`` numbers, by experiment."""
    ignored = _ignored(which)
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs.runs:
        kept = {k: v for k, v in flat_config(run.config).items() if not under(k, ignored)}
        groups[_key(kept)].append(run)
    return groups


def markdown_table(runs: RunSet, which: str = "final") -> str:
    """One row per experiment: how many seeds it pools, peer mean / best peer / ensemble test top-1, peer ECE,
    seconds per epoch.

    Below the table: a warning for each row that pools runs with the same seed, and the skipped
    directories.

    Args:
        runs: from :func:`load_runs`.
        which: ``"final"`` reads the last epoch; ``"best"`` the epoch of best validation top-1 per head.
    """
    groups = list(group_runs(runs, which).values())
    varying = _varying([g[0].config for g in groups], _ignored(which))
    rows = ["| run | seeds | peer top-1 (mean of peers) | best peer top-1 | ensemble top-1 | peer ECE (%) | s/epoch |",
            "|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for group in groups:
        label = _label(group[0].config, varying)
        rows.append(_row(label, group, which))
        notes += _duplicate_seeds(label, group)
    notes += runs.skipped
    return "\n".join(rows + ([""] + notes if notes else []))


def _varying(configs: list[dict[str, Any]], ignored: tuple[str, ...]) -> list[str]:
    """Keys beyond the headline whose value differs between rows: they must show in the labels."""
    flats = [flat_config(c) for c in configs]
    keys = dict.fromkeys(k for f in flats for k in f if not under(k, ignored + _HEADLINE))
    return [k for k in keys if len({_key(f.get(k, "–")) for f in flats}) > 1]


def _key(value: Any) -> str:
    return json.dumps(canon(value), sort_keys=True, default=str)


def _label(cfg: dict[str, Any], varying: list[str]) -> str:
    what = " + ".join(_component_label(k, cfg[k]) for k in ("method", "mixer", "addon") if cfg.get(k))
    flat = flat_config(cfg)
    extra = "".join(f" · {k}={flat.get(k, '–')}" for k in varying)
    return (f"{what} · {_component_label('model', cfg['model'])} x{cfg.get('peers')} · {flat.get('data.name')} · "
            f"{cfg.get('epochs')} ep{extra}")


def _component_label(key: str, comp: dict[str, Any] | None) -> str:
    """``name(arg=value, ...)`` with only the arguments that differ from the constructor's defaults."""
    if comp is None:
        return "none"
    defaults = component_defaults(REGISTRIES[key], comp["name"])
    args = ", ".join(f"{k}={v}" for k, v in comp.items()
                     if k != "name" and (k not in defaults or canon(v) != canon(defaults[k])))
    return f"{comp['name']}({args})" if args else str(comp["name"])


def _row(label: str, group: list[Run], which: str) -> str:
    per_run = [_run_numbers(r.summary, which) for r in group]
    cells = [_ms([m[col] for m in per_run if col in m]) for col in ("peer_mean", "peer_best", "ensemble", "ece")]
    seeds = [r.config.get("seed") for r in group]
    seed_cell = f"{len(seeds)}" + (" ⚠" if len(set(seeds)) < len(seeds) else "")  # counted, as in study.md
    secs = _numbers(r.epoch_s for r in group)
    return f"| {label} | {seed_cell} | {' | '.join(cells)} | {f'{statistics.mean(secs):.1f}' if secs else '–'} |"


def _duplicate_seeds(label: str, group: list[Run]) -> list[str]:
    by_seed: dict[Any, list[str]] = defaultdict(list)
    for r in group:
        by_seed[r.config.get("seed")].append(str(r.dir))
    return [f"warning: ⚠ {len(dirs)} runs with seed {seed} pooled in row '{label}': {', '.join(dirs)}"
            for seed, dirs in by_seed.items() if len(dirs) > 1]


def _run_numbers(summary: dict[str, Any], which: str) -> dict[str, float]:
    """One run's peer mean / best peer / ensemble top-1 and mean peer ECE; missing numbers left out."""
    if which == "final":
        test = summary["final"]["test"]
    else:
        test = {h: b.get("test", {}) for h, b in (summary.get("best") or {}).items() if isinstance(b, dict)}
    peers = [m for h, m in test.items() if h.startswith("peer") and h != "peers_mean" and isinstance(m, dict)]
    top1, ece = _numbers(m.get("top1") for m in peers), _numbers(m.get("ece") for m in peers)
    ens = test.get("ensemble")
    ensemble = _numbers([ens.get("top1")] if isinstance(ens, dict) else [])
    out = {"peer_mean": statistics.mean(top1), "peer_best": max(top1)} if top1 else {}
    return out | ({"ece": statistics.mean(ece)} if ece else {}) | ({"ensemble": ensemble[0]} if ensemble else {})


def _numbers(values: Any) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
