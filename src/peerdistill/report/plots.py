"""PNG plots of a run: accuracy per head, loss terms, reliability diagram."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_history(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write ``accuracy.png`` (test and val top-1 of every head) and ``losses.png``."""
    if not history:
        return []
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    heads = [h for h in history[-1]["test"] if not h.startswith("_") and h != "peers_mean"]
    for i, head in enumerate(heads):
        color = f"C{i % 10}"
        ax.plot(epochs, [r["test"].get(head, {}).get("top1") for r in history], color=color, marker="o", ms=3,
                label=f"{head} test")
        if history[-1].get("val"):
            ax.plot(epochs, [r["val"].get(head, {}).get("top1") for r in history], color=color, ls="--", marker="o", ms=3,
                    label=f"{head} val")
    ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy per head")
    acc = _save(fig, ax, out_dir / "accuracy.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for term in history[-1]["loss"]:
        ax.plot(epochs, [r["loss"].get(term) for r in history], label=term, marker="o", ms=3,
                lw=2.2 if term == "loss" else 1.2)
    ax.set(xlabel="epoch", ylabel="mean loss", title="Loss terms", yscale="log")
    return [acc, _save(fig, ax, out_dir / "losses.png")]


def _save(fig: plt.Figure, ax: plt.Axes, path: Path) -> Path:
    if ax.get_xlabel() == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(bins: dict[str, dict[str, list[float]]], out_dir: Path) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) of every head on the test set."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    for i, (head, b) in enumerate(bins.items()):
        pts = [(c, a) for c, a, n in zip(b["confidence"], b["accuracy"], b["count"]) if n > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i % 10}", label=head)
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability (test)", xlim=(0, 1), ylim=(0, 1))
    return _save(fig, ax, out_dir / "reliability.png")
