"""PNG plots of a run: accuracy per head, loss terms, reliability diagram.

Every plot takes histories as they really are: epochs without evaluation (no ``val``/``test`` keys),
NaN or missing values, a single epoch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Colour says which head, line style which split: val is dashed with open markers, so the two stay
# distinct in the legend and where the curves overlap.
_SPLITS = {"test": {"ls": "-", "marker": "o", "ms": 3},
           "val": {"ls": "--", "marker": "o", "ms": 3, "mfc": "none"}}
_MARKED = 60  # draw point markers only on series this short: more would hide the line


def plot_history(history: list[dict[str, Any]], out_dir: Path,
                 steps: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write ``accuracy.png`` (val and test top-1 of every head) and ``losses.png`` (every loss term).

    Args:
        history: the epoch records (``metrics.jsonl``).
        out_dir: where the PNGs go.
        steps: the per-step records (``steps.jsonl``); ``losses.png`` falls back to the epoch means
            when there are none.
    """
    if not history:
        return []
    return [_plot_accuracy(history, out_dir / "accuracy.png"),
            _plot_losses(steps or history, out_dir / "losses.png", per_step=bool(steps))]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict[str, Any]], path: tuple[str, ...]) -> tuple[list[float], list[float]]:
    """``(epochs, values)`` of the records holding a finite number at ``path``, e.g. ("test", "peer0", "top1")."""
    xs, ys = [], []
    for r in records:
        value: Any = r
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if _is_number(value) and _is_number(r.get("epoch")):
            xs.append(r["epoch"])
            ys.append(value)
    return xs, ys


def _keys(records: list[dict[str, Any]], field: str) -> list[str]:
    """Keys of ``record[field]`` over all records, in first-seen order (heads, loss terms)."""
    found = (k for r in records if isinstance(r.get(field), dict) for k in r[field])
    return [k for k in dict.fromkeys(found) if not k.startswith("_")]


def _plot_accuracy(history: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    heads = [h for h in _keys(history, "test") if h != "peers_mean"]
    splits, xs_all = [], []
    for i, head in enumerate(heads):
        for split, style in _SPLITS.items():
            xs, ys = _series(history, (split, head, "top1"))
            if xs:
                ax.plot(xs, ys, color=f"C{i % 10}", **style)
                splits.append(split)
                xs_all += xs
    ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy per head")
    if heads:
        ax.add_artist(ax.legend([Line2D([], [], color=f"C{i % 10}", lw=2) for i in range(len(heads))], heads,
                                title="head", loc="lower right", fontsize=7, title_fontsize=7))
        shown = [s for s in _SPLITS if s in splits]
        ax.legend([Line2D([], [], color="black", **_SPLITS[s]) for s in shown], shown, loc="upper left",
                  fontsize=7, handlelength=3)  # long handles so the dashes show
    epoch_axis(ax, xs_all)
    return save_figure(fig, ax, path)


def _with_total(loss: dict[str, Any]) -> dict[str, Any]:
    """The loss terms with their sum as ``loss`` (epoch records carry it; step records need not)."""
    if "loss" in loss:
        return loss
    return {**loss, "loss": sum(v for v in loss.values() if isinstance(v, (int, float)))}


def _plot_losses(records: list[dict[str, Any]], path: Path, per_step: bool) -> Path:
    rows = [{"epoch": r.get("epoch"), "loss": _with_total(r["loss"])} for r in records
            if isinstance(r.get("loss"), dict)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs_all, ys_all = [], []
    for term in [t for t in _keys(rows, "loss") if t != "loss"] + ["loss"]:  # the sum last: drawn on top
        xs, ys = _series(rows, ("loss", term))
        style = {"label": "loss (sum)", "lw": 2.4, "color": "black", "zorder": 3} if term == "loss" else \
            {"label": term, "lw": 1.1}
        ax.plot(xs, ys, marker="o" if len(xs) <= _MARKED else None, ms=3, **style)
        xs_all += xs
        ys_all += ys
    # log scale shows terms of different magnitude together, but only holds positive values
    scale = "log" if ys_all and min(ys_all) > 0 else "linear"
    ax.set(xlabel="epoch", ylabel="loss", yscale=scale,
           title=f"Loss terms ({'logged steps' if per_step else 'epoch means'})")
    if xs_all:
        ax.legend(fontsize=7, ncol=2)
    epoch_axis(ax, xs_all)
    return save_figure(fig, ax, path)


def epoch_axis(ax: plt.Axes, epochs: list[float]) -> None:
    """Whole-epoch ticks on a view at least one epoch wide (one epoch would otherwise read 0.945…1.055): the
    x axis of every per-epoch plot (a run's curves, a study's)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs and max(epochs) - min(epochs) < 1:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)


def save_figure(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(bins: dict[str, dict[str, list[float]]], out_dir: Path) -> Path:
    """Reliability diagram of every head on the test set: accuracy vs confidence per bin.

    Each bin's sample count is drawn as a histogram on a twin axis, so that a point resting on a
    handful of samples is seen as such.
    """
    fig, ax = plt.subplots(figsize=(5.5, 5))
    counts_ax = ax.twinx()
    ax.set_zorder(counts_ax.get_zorder() + 1)  # the curves above the count histogram
    ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    top = 0.0
    for i, (head, b) in enumerate(bins.items()):
        counts = [c if _is_number(c) else 0.0 for c in b["count"]]
        edges = [j / max(len(counts), 1) for j in range(len(counts) + 1)]  # equal-width bins on [0, 1]
        counts_ax.stairs(counts, edges, color=f"C{i % 10}", alpha=0.6)
        top = max([top, *counts])
        pts = [(c, a) for c, a, n in zip(b["confidence"], b["accuracy"], counts) if n > 0 and _is_number(c)
               and _is_number(a)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i % 10}", label=head)
    counts_ax.set(ylabel="samples per bin", ylim=(0, 3 * top or 1))  # histogram kept to the lower third
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability (test)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, ax, out_dir / "reliability.png")
