"""PNG plots of a robustness evaluation: accuracy vs attack budget per head, OOD score histograms.

Same look as :mod:`peerdistill.report.plots` (colour = head, grid, 110 dpi).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..report.plots import save_figure, plt

_ATTACK_STYLE = {"fgsm": {"ls": "--", "marker": "s", "mfc": "none"}, "pgd": {"ls": "-", "marker": "o"}}


def _eps_value(key: str) -> float:
    """``"8/255"`` -> 8.0 (the x axis is in 1/255 units)."""
    return float(key.split("/")[0])


def plot_accuracy_eps(adv: dict[str, Any], path: Path) -> Path:
    """Top-1 under FGSM (dashed) and PGD (solid) against eps, one colour per head; eps 0 is the clean
    accuracy."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    heads = list(adv.get("clean", {}))
    for i, head in enumerate(heads):
        for attack, style in _ATTACK_STYLE.items():
            per_eps = adv.get(attack, {}).get(head)
            if not per_eps:
                continue
            xs = [0.0] + [_eps_value(k) for k in per_eps]
            ys = [adv["clean"][head]] + list(per_eps.values())
            ax.plot(xs, ys, color=f"C{i % 10}", ms=4, label=f"{head} {attack.upper()}", **style)
    ax.set(xlabel="ε (1/255 of the [0, 1] pixel range)", ylabel="top-1 accuracy (%)",
           title="Accuracy under L∞ attacks", ylim=(0, 100))
    if heads:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, ax, path)


def plot_ood_scores(raw: dict[str, Any], path: Path, head: str | None = None) -> Path:
    """Histograms of each score, in-distribution vs each OOD set, for one head (default: the first)."""
    head = head or next(iter(raw["in"]))
    sets = list(raw["out"])
    scores = [s for s in raw["in"][head] if np.isfinite(raw["in"][head][s]).all()]
    fig, axes = plt.subplots(len(scores), max(len(sets), 1), figsize=(3.2 * max(len(sets), 1), 2.6 * len(scores)),
                             squeeze=False)
    for r, score in enumerate(scores):
        for c, name in enumerate(sets):
            ax = axes[r][c]
            s_in, s_out = raw["in"][head][score], raw["out"][name][head][score]
            lo, hi = float(min(s_in.min(), s_out.min())), float(max(s_in.max(), s_out.max()))
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 40)
            ax.hist(s_in, bins=bins, alpha=0.55, color="C0", label="in", density=True)
            ax.hist(s_out, bins=bins, alpha=0.55, color="C3", label=name, density=True)
            ax.set_title(f"{score} · {name}", fontsize=8)
            ax.set_yticks([])  # densities: only the shapes matter
            # ODIN at T = 1000 lives just above 1/K: its ticks need every digit (no offset), so few of them
            ax.ticklabel_format(axis="x", useOffset=False)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=3, min_n_ticks=2))
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
    fig.suptitle(f"OOD scores of head {head} (higher = in-distribution)", fontsize=9)
    return save_figure(fig, axes[0][0], path)
