"""A study file and its expansion into runs: base config × grid × named rows × seeds, with stable names.

A study file is YAML (see ``docs/studies.md``)::

    name: fmnist-cohorts            # default: the file's stem
    base: configs/fmnist/dml.yaml   # a preset (relative to the study file, else to the current folder)
                                    # (a named row may name its own: ``preset: configs/...``)
    config: {epochs: 2, data.train_subset: 5000}   # inline keys, applied after the preset
    grid:                           # a Cartesian product; a list means alternatives
      method: [independent, dml]
      model: [resnet8, resnet14]
    rows:                           # named rows, each a mapping of overrides (also inside grid:, see below)
      - {name: plain}
      - {name: cutmix, mixer: cutmix}
    seeds: 3                        # or [0, 1, 2]
    baseline: {method: independent} # Δ to the row with these choices and otherwise the same ones

Every axis (each ``grid`` key, and each named-rows axis) contributes one choice to a row; a row times a
seed is a run. A grid key that is not a config key and whose value is a list of mappings (or a mapping of
name → mapping) is itself a named-rows axis, so ``rows:`` is the axis called ``rows``.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import config as C
from ..errors import PeerdistillError, nearest
from ..report.configs import NEUTRAL_KEYS, canon, flat_config, resolve, under
from .names import MAX_NAME, safe, token, value_text

TOP_KEYS = ("name", "description", "base", "config", "grid", "rows", "seeds", "baseline", "heads", "metrics",
            "which", "columns", "out", "launcher", "slots", "threads", "nproc_per_node", "slurm")
METRICS = ("top1", "top5", "nll", "ece")  # what summary.json holds per head
# Keys a study may not vary: the runner owns them (seeds come from ``seeds:``, threads from the slot plan).
RUNNER_KEYS = ("seed", "threads")
# Config keys that cannot change a run's numbers are the keys ``--resume`` may change: they are ignored when
# deciding whether two rows are the same experiment or whether a run folder holds this study's run.
NUMERIC_IGNORED = NEUTRAL_KEYS


@dataclass(frozen=True)
class Choice:
    """One alternative of one axis: the overrides it applies, as named in run names and table labels."""

    axis: str
    token: str  # in the run name (filesystem-safe)
    label: str  # in the table
    overrides: tuple[tuple[str, Any], ...]
    named: bool  # a named row (label is its name) rather than a config value


@dataclass(frozen=True)
class Row:
    """One combination of choices (one per axis): a table row, pooled over seeds."""

    id: str
    choices: tuple[Choice, ...]

    @property
    def overrides(self) -> dict[str, Any]:
        return {k: v for c in self.choices for k, v in c.overrides}


@dataclass
class RunSpec:
    """One run of the study: a row with a seed, its resolved config and its folder name."""

    name: str
    row: Row
    seed: int
    config: C.Config


@dataclass
class Study:
    """A parsed, validated study file (see the module docstring)."""

    path: Path
    name: str
    description: str
    base: Path | None
    base_config: dict[str, Any]
    axes: list[tuple[str, list[Choice]]]
    seeds: list[int]
    baseline: dict[str, str] | None  # axis -> choice token
    heads: list[str] | None
    metrics: list[str]
    which: str
    columns: list[dict[str, str]]
    out: Path
    launch: dict[str, Any] = field(default_factory=dict)  # launcher, slots, threads, nproc_per_node
    slurm: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    runs: list[RunSpec] = field(default_factory=list)

    def row_runs(self, row: Row) -> list[RunSpec]:
        return [r for r in self.runs if r.row.id == row.id]

    def baseline_of(self, row: Row) -> Row | None:
        """The row with the baseline's choices on the baseline's axes and ``row``'s choices elsewhere."""
        if self.baseline is None:
            return None
        want = tuple(self.baseline.get(c.axis, c.token) for c in row.choices)
        return next((r for r in self.rows if tuple(c.token for c in r.choices) == want), None)


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Read, expand and validate a study file; every problem is a one-line :class:`PeerdistillError`.

    Every run's config is built with the config loader and checked with
    :func:`~peerdistill.engine.build.validate_config` here, before anything runs.
    """
    path = Path(path)
    raw = C.read_mapping(path, "study")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise PeerdistillError(f"{path}: unknown study key {unknown[0]!r}{nearest(str(unknown[0]), TOP_KEYS)} "
                               f"(valid: {', '.join(TOP_KEYS)})")
    name = str(raw.get("name") or path.stem)
    study = Study(path=path, name=name, description=str(raw.get("description") or ""),
                  base=_base_path(path, raw.get("base")), base_config=_mapping(raw, "config", path),
                  axes=_axes(raw, path), seeds=[], baseline=None, heads=_names(raw, "heads", path),
                  metrics=_names(raw, "metrics", path) or ["top1"], which=str(raw.get("which", "final")),
                  columns=_columns(raw.get("columns"), path), out=Path(out or raw.get("out") or Path("runs") / name),
                  launch={k: raw[k] for k in ("launcher", "slots", "threads", "nproc_per_node") if k in raw},
                  slurm=_mapping(raw, "slurm", path))
    _check_options(study)
    base = _base_config(study)
    study.seeds = _seeds(raw.get("seeds"), base.seed, path)
    study.rows = [Row(row_id(combo), combo) for combo in itertools.product(*(c for _, c in study.axes))]
    study.runs = [_run(study, base, row, seed) for seed in study.seeds for row in study.rows]
    study.baseline = _baseline(raw.get("baseline"), study)
    _check_unique(study)
    return study


def _mapping(raw: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise PeerdistillError(f"{path}: {key} must be a mapping, got {value!r}")
    return value


def _names(raw: dict[str, Any], key: str, path: Path) -> list[str] | None:
    value = raw.get(key)
    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PeerdistillError(f"{path}: {key} must be a non-empty list of names, got {raw.get(key)!r}")
    return value


def _base_path(study: Path, base: Any) -> Path | None:
    """A preset next to the study file wins over one in the current folder (``configs/...`` from the root)."""
    if base is None:
        return None
    for cand in (study.parent / str(base), Path(str(base))):
        if cand.is_file():
            return cand
    raise PeerdistillError(f"{study}: base preset {base} not found (looked in {study.parent} and the current folder)")


def _columns(value: Any, path: Path) -> list[dict[str, str]]:
    """Extra per-run results: ``[{name: FGSM 8/255, file: eval.json, key: latest.adversarial.fgsm.peer0.8/255}]``."""
    cols = value or []
    ok = isinstance(cols, list) and all(isinstance(c, dict) and set(c) == {"name", "file", "key"} for c in cols)
    if not ok:
        raise PeerdistillError(f"{path}: columns must be a list of {{name, file, key}} mappings, got {value!r}")
    return [{k: str(v) for k, v in c.items()} for c in cols]


def _check_options(study: Study) -> None:
    where = study.path
    if study.which not in ("final", "best"):
        raise PeerdistillError(f"{where}: which must be final or best, got {study.which!r}")
    bad = [m for m in study.metrics if m not in METRICS]
    if bad:
        raise PeerdistillError(f"{where}: unknown metric {bad[0]!r}{nearest(bad[0], METRICS)} "
                               f"(summary.json holds {', '.join(METRICS)}; other results go in columns:)")
    if not study.axes:
        raise PeerdistillError(f"{where}: the study has an empty grid: give grid: and/or rows: with at least one entry")
    _check_launch(study)
    for key in RUNNER_KEYS:
        if key in study.base_config:
            raise PeerdistillError(f"{where}: config sets {key!r}, which the runner sets (use seeds: / --threads)")


def _check_launch(study: Study) -> None:
    from .slurm import SLURM_KEYS

    launch, where = study.launch, study.path
    if launch.get("launcher", "local") not in ("local", "torchrun", "submitit"):
        raise PeerdistillError(f"{where}: launcher must be local, torchrun or submitit, got {launch['launcher']!r}")
    for key in ("slots", "threads", "nproc_per_node"):
        v = launch.get(key, "auto" if key != "nproc_per_node" else 1)
        if not (v == "auto" and key != "nproc_per_node") and not (isinstance(v, int) and not isinstance(v, bool)
                                                                  and v >= 1):
            raise PeerdistillError(f"{where}: {key} must be a positive integer{' or auto' * (key != 'nproc_per_node')}"
                                   f", got {v!r}")
    unknown = [k for k in study.slurm if k not in SLURM_KEYS]
    if unknown:
        raise PeerdistillError(f"{where}: unknown slurm option {unknown[0]!r}{nearest(str(unknown[0]), SLURM_KEYS)} "
                               f"(valid: {', '.join(SLURM_KEYS)})")


# ------------------------------------------------------------------------------------------ axes
def _axes(raw: dict[str, Any], path: Path) -> list[tuple[str, list[Choice]]]:
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise PeerdistillError(f"{path}: grid must be a mapping of config keys to values, got {grid!r}")
    items = list(grid.items()) + ([("rows", raw["rows"])] if raw.get("rows") is not None else [])
    axes = [(str(key), _axis(str(key), value, path)) for key, value in items]
    for key, choices in axes:
        if not choices:
            raise PeerdistillError(f"{path}: grid entry {key!r} is empty")
    _check_no_overlap(axes, path)
    return axes


def _is_config_key(key: str) -> bool:
    return key.split(".")[0] in {f.name for f in fields(C.Config)}


def _axis(key: str, value: Any, path: Path) -> list[Choice]:
    if _is_config_key(key):
        if key.split(".")[0] in RUNNER_KEYS:
            raise PeerdistillError(f"{path}: grid key {key!r} is set by the runner (use seeds: / --threads)")
        values = value if isinstance(value, list) else [value]
        return [Choice(key, f"{key.split('.')[-1]}-{token(v)}", f"{key}={value_text(v)}", ((key, v),), False)
                for v in values]
    rows = _named_rows(value)
    if rows is None and key == "rows":
        raise PeerdistillError(f"{path}: rows must be a list of override mappings ({{name: ..., key: value}}) or a "
                               f"mapping of row names to overrides, got {value!r}")
    if rows is None:
        valid = [f.name for f in fields(C.Config)]
        raise PeerdistillError(f"{path}: unknown config key {key!r} in grid{nearest(key, valid)} (a named-rows axis "
                               f"needs a list of override mappings)")
    return [_row_choice(key, name, overrides, path) for name, overrides in rows]


def _named_rows(value: Any) -> list[tuple[str | None, dict[str, Any]]] | None:
    """``[{name: a, k: v}, ...]`` or ``{a: {k: v}, ...}`` as (name, overrides) pairs; ``None`` if neither."""
    if isinstance(value, dict) and all(isinstance(v, dict) or v is None for v in value.values()):
        return [(str(n), dict(v or {})) for n, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        return [(None if v.get("name") is None else str(v["name"]), {k: x for k, x in v.items() if k != "name"})
                for v in value]
    return None


def _row_choice(axis: str, name: str | None, overrides: dict[str, Any], path: Path) -> Choice:
    for key in overrides:
        if key == "preset":  # the row's own base preset instead of the study's ``base:``
            if not isinstance(overrides[key], str) or not overrides[key]:
                raise PeerdistillError(f"{path}: {axis} row {name or overrides!r}: preset must be a file name, "
                                       f"got {overrides[key]!r}")
            _base_path(path, overrides[key])
            continue
        if not _is_config_key(key):
            valid = [f.name for f in fields(C.Config)]
            raise PeerdistillError(f"{path}: unknown config key {key!r} in {axis} row {name or overrides!r}"
                                   f"{nearest(key, valid)}")
        if key.split(".")[0] in RUNNER_KEYS:
            raise PeerdistillError(f"{path}: {axis} row {name or overrides!r} sets {key!r}, which the runner sets")
    if name is None:  # an unnamed row is named by its overrides, in key order: independent of dict order
        name = "_".join(f"{k.split('.')[-1]}-{token(v)}" for k, v in sorted(overrides.items())) or "default"
    return Choice(axis, safe(name), name, tuple(overrides.items()), True)


def _check_no_overlap(axes: list[tuple[str, list[Choice]]], path: Path) -> None:
    """Two axes setting the same key would make the result depend on their order."""
    owner: dict[str, str] = {}
    for axis, choices in axes:
        for key in dict.fromkeys(k for c in choices for k, _ in c.overrides):
            if key in owner and owner[key] != axis:
                raise PeerdistillError(f"{path}: {key!r} is set by both {owner[key]!r} and {axis!r}")
            owner[key] = axis


# ------------------------------------------------------------------------------------------ configs
def _base_config(study: Study, preset: Path | None = None) -> C.Config:
    try:
        cfg = C.load(preset or study.base)
        for key, value in study.base_config.items():
            C.set_key(cfg, str(key), copy.deepcopy(value))
    except PeerdistillError as e:
        raise PeerdistillError(f"{study.path}: base config: {e}") from None
    return cfg


def _run(study: Study, base: C.Config, row: Row, seed: int) -> RunSpec:
    from ..engine.build import validate_config

    name = run_name(row, seed)
    overrides = row.overrides
    preset = overrides.pop("preset", None)
    # a row's own preset, then the study's inline config, then the row's keys
    cfg = copy.deepcopy(base) if preset is None else _base_config(study, _base_path(study.path, preset))
    # Component names before their arguments (``method=one`` resets the arguments ``method.x`` sets).
    for key, value in sorted(overrides.items(), key=lambda kv: kv[0].count(".")):
        try:
            C.set_key(cfg, key, copy.deepcopy(value))
        except PeerdistillError as e:
            raise PeerdistillError(f"{study.path}: run {name}: {e}") from None
    cfg.seed = seed
    try:
        validate_config(cfg)
    except PeerdistillError as e:
        raise PeerdistillError(f"{study.path}: run {name}: {e}") from None
    return RunSpec(name, row, seed, cfg)


def experiment(cfg: C.Config | dict[str, Any]) -> dict[str, Any]:
    """A run's config as compared, flat: every default filled in, keys that cannot change its numbers left out."""
    flat = flat_config(resolve(cfg.to_dict() if isinstance(cfg, C.Config) else cfg))
    return {k: v for k, v in flat.items() if not under(k, NUMERIC_IGNORED)}


def experiment_key(cfg: C.Config | dict[str, Any]) -> str:
    return json.dumps(canon(experiment(cfg)), sort_keys=True, default=str)


def config_change(old: dict[str, Any], new: C.Config) -> str | None:
    """``"key: old -> new"`` for the first key in which a stored run config differs from ``new``, else None."""
    a, b = experiment(old), experiment(new)
    key = next((k for k in sorted(set(a) | set(b)) if canon(a.get(k, "–")) != canon(b.get(k, "–"))), None)
    return None if key is None else f"{key}: {a.get(key, '–')!r} -> {b.get(key, '–')!r}"


def _check_unique(study: Study) -> None:
    seen: dict[str, str] = {}
    names: dict[str, RunSpec] = {}
    for run in study.runs:
        key = experiment_key(run.config)
        if key in seen:
            raise PeerdistillError(f"{study.path}: duplicate runs: {seen[key]} and {run.name} expand to the same "
                                   f"config; remove one of the rows")
        seen[key] = run.name
        if run.name in names:
            raise PeerdistillError(f"{study.path}: two different rows get the run name {run.name}; give the rows "
                                   f"names (rows: [{{name: ..., ...}}])")
        names[run.name] = run


def _seeds(value: Any, default: int, path: Path) -> list[int]:
    if value is None:
        return [default]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return list(range(value))
    ok = isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in value)
    if not ok or len(set(value)) != len(value):
        raise PeerdistillError(f"{path}: seeds must be a count or a list of distinct non-negative integers, "
                               f"got {value!r}")
    return list(value)


def _baseline(value: Any, study: Study) -> dict[str, str] | None:
    """``name`` (a named row) or ``{axis: value-or-row-name}`` as axis -> choice token."""
    if value is None:
        return None
    axes = dict(study.axes)
    if isinstance(value, str):
        hits = [(a, c) for a, cs in study.axes for c in cs if c.named and c.label == value]
        if len(hits) != 1:
            names = [c.label for _, cs in study.axes for c in cs if c.named]
            raise PeerdistillError(f"{study.path}: baseline {value!r} is not {'one' if not hits else 'a unique'} "
                                   f"named row{nearest(value, names)}")
        return {hits[0][0]: hits[0][1].token}
    if not isinstance(value, dict) or not value:
        raise PeerdistillError(f"{study.path}: baseline must be a row name or a mapping of grid keys to values")
    out = {}
    for axis, want in value.items():
        if axis not in axes:
            raise PeerdistillError(f"{study.path}: baseline key {axis!r} is not a grid entry{nearest(str(axis), axes)}")
        hit = next((c for c in axes[axis] if (c.label == want if c.named else canon(c.overrides[0][1]) == canon(want))),
                   None)
        if hit is None:
            raise PeerdistillError(f"{study.path}: baseline {axis}={want!r} is not one of the grid's values")
        out[str(axis)] = hit.token
    return out


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
