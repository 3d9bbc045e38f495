"""Does a lower T. stddev mean a lower student test loss? (Good-DA-in-KD, spec §5.1, §5.6)

Joins the JSON of ``peerdistill tstddev`` with KD student runs, one group of seeds per augmentation
(the run's ``method.extra_aug`` and ``method.extra_aug_args``), and reports the Pearson, Spearman and
Kendall correlations, with their two-sided p-values, between T. stddev and the students' test loss
(NLL of the final epoch, mean over seeds), plus a labelled scatter plot.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..data.augmentations import AUGMENTATIONS, aug_label  # noqa: E402
from ..errors import PeerdistillError  # noqa: E402
from .configs import NEUTRAL_KEYS, flat_config, under  # noqa: E402
from .table import RunSet  # noqa: E402
from ..text import text_table  # noqa: E402

STATS_EXTRA = "pip install 'peerdistill[stats]'"
# Keys that may differ between the runs of one study: the axis itself, seeds, and what cannot change numbers.
_STUDY_AXIS = ("seed", "method.extra_aug", "method.extra_aug_args", *NEUTRAL_KEYS)


@dataclass
class Point:
    """One augmentation: its T. stddev and its students' test losses (one per seed)."""

    aug: str
    t_stddev: float
    losses: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return statistics.mean(self.losses)

    @property
    def loss_std(self) -> float:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else 0.0


def student_aug(config: dict[str, Any]) -> str | None:
    """The canonical augmentation label of a KD student run (``none``: plain KD); ``None``: not KD."""
    method = config.get("method") or {}
    if method.get("name") != "kd":
        return None
    return aug_label(method.get("extra_aug") or "", method.get("extra_aug_args") or {})


def canonical_label(label: str) -> str:
    """A stored label with its augmentation's canonical name (a result written as ``crop+flip`` is ``crop_flip``)."""
    name, sep, rest = str(label).partition(":")
    return AUGMENTATIONS.canonical(name) + sep + rest


def collect(tstddev: dict[str, Any], runs: RunSet, head: str = "peer0", metric: str = "nll",
            ) -> tuple[list[Point], list[str]]:
    """The points of the study and notes on runs or augmentations left out."""
    labels = [(canonical_label(r["aug"]), r) for r in tstddev.get("results", [])]
    points = {label: Point(label, float(r["t_stddev"])) for label, r in labels}
    notes = list(runs.skipped)
    for run in runs.runs:
        aug = student_aug(run.config)
        value = run.summary["final"]["test"].get(head, {}).get(metric)
        if aug is None or aug not in points or not isinstance(value, (int, float)):
            why = ("not a kd run" if aug is None else f"augmentation {aug!r} is not in the T. stddev results"
                   if aug not in points else f"no final test {metric} for head {head!r}")
            notes.append(f"skipped {run.dir}: {why}")
            continue
        points[aug].losses.append(float(value))
        points[aug].runs.append(str(run.dir))
    kept = [p for p in points.values() if p.losses]
    notes += [f"{p.aug}: no student run" for p in points.values() if not p.losses]
    notes += _differences([r for r in runs.runs if student_aug(r.config) in points])
    return kept, notes


def _differences(runs: list[Any]) -> list[str]:
    """A note naming the config keys (besides the augmentation and the seed) the study's runs differ in."""
    flats = [{k: v for k, v in flat_config(r.config).items() if not under(k, _STUDY_AXIS)} for r in runs]
    keys = sorted({k for f in flats for k in f if any(g.get(k) != f.get(k) for g in flats)})
    return [f"the student runs also differ in: {', '.join(keys)}"] if keys else []


EXACT_MAX_N = 8  # up to 8! = 40 320 orderings, the Spearman p-value is counted exactly


def correlations(x: list[float], y: list[float]) -> dict[str, dict[str, Any]]:
    """Pearson, Spearman and Kendall coefficients with two-sided p-values (scipy.stats).

    For few points the t approximation scipy uses for Spearman is far off (3 points in perfect order give
    p = 0, where 2 of the 6 orderings are as extreme: p = 1/3), so up to :data:`EXACT_MAX_N` points its
    p-value is the exact permutation one, and Kendall's is scipy's exact one wherever that exists (no ties);
    ``exact`` says which p-values are exact.
    """
    try:
        from scipy import stats
    except ImportError:
        raise PeerdistillError(f"peerdistill correlate needs scipy: {STATS_EXTRA}") from None
    if len(x) < 3:
        raise PeerdistillError(f"correlations need at least 3 augmentations with student runs, got {len(x)}")
    ties = len(set(x)) < len(x) or len(set(y)) < len(y)
    exact_tau = not ties and len(x) <= 33  # scipy's exact null distribution of tau exists without ties
    out = {}
    for name, res, exact in (("pearson", stats.pearsonr(x, y), False), ("spearman", stats.spearmanr(x, y), False),
                             ("kendall", stats.kendalltau(x, y, method="exact" if exact_tau else "asymptotic"),
                              exact_tau)):
        out[name] = {"r": float(res.statistic), "p": float(res.pvalue), "exact": exact}
    if len(x) <= EXACT_MAX_N:
        out["spearman"].update(p=spearman_exact_p(x, y), exact=True)
    return out


def spearman_exact_p(x: list[float], y: list[float]) -> float:
    """Two-sided permutation p-value of Spearman's rho: the share of the orderings of ``y``'s ranks whose
    |rho| is at least the observed one (ties keep their average ranks)."""
    import itertools

    import numpy as np
    from scipy.stats import rankdata

    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y)
    perms = ry[np.array(list(itertools.permutations(range(len(y)))))]  # (n!, n)
    perms = perms - perms.mean(1, keepdims=True)
    rho = perms @ rx / np.sqrt((perms ** 2).sum(1) * (rx ** 2).sum())
    observed = abs(rho[0])  # the identity ordering comes first
    return float(np.mean(np.abs(rho) >= observed - 1e-12))


def correlate(tstddev: dict[str, Any], runs: RunSet, head: str = "peer0", metric: str = "nll") -> dict[str, Any]:
    """The whole study as one JSON-ready record."""
    points, notes = collect(tstddev, runs, head, metric)
    stats = correlations([p.t_stddev for p in points], [p.loss for p in points])
    return {"teacher": tstddev.get("teacher"), "head": head, "metric": metric, **stats, "notes": notes,
            "points": [{"aug": p.aug, "t_stddev": p.t_stddev, "loss": p.loss, "loss_std": p.loss_std,
                        "seeds": len(p.losses), "runs": p.runs} for p in sorted(points, key=lambda p: p.t_stddev)]}


def format_study(study: dict[str, Any]) -> str:
    cells = [[p["aug"], f"{p['t_stddev']:.6f}", f"{p['loss']:.4f} ± {p['loss_std']:.3f}", str(p["seeds"])]
             for p in study["points"]]
    rows = text_table(["augmentation", "T. stddev", f"S. test {study['metric']}", "seeds"], cells, "lrrr")
    rows.append("")
    rows += [f"{name:<9} {study[name]['r']:+.4f}  (p = {_p(study[name]['p'])}"
             f"{', exact' if study[name].get('exact') else ''})" for name in ("pearson", "spearman", "kendall")]
    return "\n".join(rows)


def _p(p: float) -> str:
    return f"{100 * p:.2f} %" if math.isfinite(p) else "n/a"


def plot_correlation(study: dict[str, Any], path: Path) -> Path:
    """Scatter of the students' test loss (mean ± std over seeds) against T. stddev, labelled by
    augmentation, with the least-squares line and the three coefficients in the title."""
    pts = study["points"]
    x, y, err = ([p[k] for p in pts] for k in ("t_stddev", "loss", "loss_std"))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, color="tab:blue")
    for p in pts:
        ax.annotate(p["aug"], (p["t_stddev"], p["loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(set(x)) > 1:
        slope, icept = _fit(x, y)
        xs = [min(x), max(x)]
        ax.plot(xs, [icept + slope * v for v in xs], "--", color="tab:gray", lw=1)
    ax.set_xlabel("T. stddev (teacher)")
    ax.set_ylabel(f"student test {study['metric']}")
    ax.set_title(" · ".join(f"{n.capitalize()} {study[n]['r']:.3f} (p {_p(study[n]['p'])})"
                            for n in ("pearson", "spearman", "kendall")), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fit(x: list[float], y: list[float]) -> tuple[float, float]:
    mx, my = statistics.mean(x), statistics.mean(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return slope, my - slope * mx
