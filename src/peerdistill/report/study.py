"""A study's document: mean ± std over seeds per row, the difference to a baseline row, and plots.

Everything here reads what runs leave (``summary.json``, ``metrics.jsonl`` and any extra result file a
study names), so ``peerdistill sweep STUDY --report-only`` regenerates the document from the run folders.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .logger import read_jsonl  # noqa: E402
from .plots import epoch_axis  # noqa: E402

PEERS = "peers"  # a virtual head: the mean over the peer heads (peer0, peer1, ...) of each run
_DECIMALS = {"nll": 3}  # NLL is in nats (small differences matter); top-1/top-5/ECE are percentages
_LABEL_CHARS = 40  # longer row labels are cut in plots (the table keeps them whole)


@dataclass
class StudyRow:
    """One table row: runs of one configuration with different seeds.

    Attributes:
        id: unique row id (the run names without their seed).
        label: the row's overrides that differ between rows, e.g. ``method=dml · model=resnet8``.
        runs: seed -> run folder (finished or not).
        baseline: id of the row this one is compared to, if any.
        definitions: its named rows as ``name: overrides`` (listed once under the table).
    """

    id: str
    label: str
    runs: dict[int, Path]
    baseline: str | None = None
    definitions: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """One finished run as the study reads it."""

    seed: int
    dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # file name -> parsed JSON


@dataclass
class Column:
    """A table column: a head and a metric of summary.json, or an extra result (``file``, dotted ``key``)."""

    title: str
    head: str = ""
    metric: str = ""
    file: str = ""
    key: str = ""

    def value(self, run: RunResult, which: str) -> float | None:
        if self.file:
            return _number(dig(run.extra.get(self.file), self.key.split(".")))
        return head_value(run.summary, self.head, self.metric, which)


def head_value(summary: dict[str, Any], head: str, metric: str, which: str) -> float | None:
    """One head's metric on the test set: at the last epoch (``final``) or at its best validation epoch."""
    if which == "final":
        test = (summary.get("final") or {}).get("test") or {}
    else:
        test = {h: (b or {}).get("test") or {} for h, b in (summary.get("best") or {}).items() if isinstance(b, dict)}
    if head == PEERS:
        vals = [_number(dig(m, [metric])) for h, m in test.items() if _is_peer(h)]
        vals = [v for v in vals if v is not None]
        return statistics.mean(vals) if vals else None
    return _number(dig(test.get(head), [metric]))


def _is_peer(head: str) -> bool:
    return head.startswith("peer") and head[4:].isdigit()


def dig(obj: Any, path: list[str]) -> Any:
    """``obj[path[0]][path[1]]...``, or ``None`` where a key is missing."""
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


# ------------------------------------------------------------------------------------------ reading
def load_results(rows: list[StudyRow], extra_files: list[str] = ()) -> dict[str, list[RunResult]]:
    """The finished runs of every row (summary.json with final test metrics), by row id."""
    out: dict[str, list[RunResult]] = {}
    for row in rows:
        out[row.id] = [r for seed, d in sorted(row.runs.items()) if (r := _read(seed, d, extra_files)) is not None]
    return out


def _read(seed: int, d: Path, extra_files: list[str]) -> RunResult | None:
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not (summary.get("final") or {}).get("test"):
        return None
    extra = {}
    for name in extra_files:
        try:
            extra[name] = json.loads((d / name).read_text())
        except (OSError, ValueError):
            pass
    return RunResult(seed, d, summary, read_jsonl(d / "metrics.jsonl"), extra)


def default_heads(results: dict[str, list[RunResult]]) -> list[str]:
    """Every head some run reports, in first-seen order (``peers_mean`` is ``peers``' top-1 only: left out)."""
    heads = (h for runs in results.values() for r in runs for h in ((r.summary.get("final") or {}).get("test") or {}))
    return [h for h in dict.fromkeys(heads) if h != "peers_mean"]


def make_columns(heads: list[str], metrics: list[str], extra: list[dict[str, str]] = ()) -> list[Column]:
    cols = [Column(f"{h} {m}", head=h, metric=m) for h in heads for m in metrics]
    return cols + [Column(c["name"], file=c["file"], key=c["key"]) for c in extra]


# ------------------------------------------------------------------------------------------ table
def study_table(rows: list[StudyRow], results: dict[str, list[RunResult]], columns: list[Column],
                which: str = "final") -> str:
    """A markdown table: per row its seeds, mean ± std of every column, and the Δ to its baseline.

    Δ (for each head on the first metric) is the mean difference to the baseline row; its ± is the std of
    one seed's difference: of the per-seed differences when both rows ran the same seeds (paired), else
    √(s_row² + s_base²).
    """
    deltas = [c for c in columns if c.head and c.metric == columns[0].metric] if any(r.baseline for r in rows) else []
    head = ["row", "seeds", *(c.title for c in columns), *(f"Δ {c.title}" for c in deltas)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_id = {r.id: r for r in rows}
    for row in rows:
        runs = results.get(row.id, [])
        cells = [_seeds_cell(row, runs)]
        cells += [mean_std([v for r in runs if (v := c.value(r, which)) is not None], c.metric) for c in columns]
        base = by_id.get(row.baseline) if row.baseline else None
        for c in deltas:
            if base is None:
                cells.append("–")
            else:
                cells.append("baseline" if base is row else _delta(runs, results.get(base.id, []), c, which))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seeds_cell(row: StudyRow, runs: list[RunResult]) -> str:
    return f"{len(runs)}" if len(runs) == len(row.runs) else f"{len(runs)}/{len(row.runs)}"


def mean_std(values: list[float], metric: str = "") -> str:
    """``mean ± std`` (sample std, n − 1) over seeds; one value alone; ``–`` for none."""
    if not values:
        return "–"
    if metric:
        d = _DECIMALS.get(metric, 2)
    else:  # extra columns, of unknown scale: 4 significant digits of the mean, the std to the same decimals
        big = abs(statistics.mean(values))
        d = max(0, 3 - math.floor(math.log10(big))) if big > 0 and math.isfinite(big) else 2
    fmt = lambda v: f"{v:.{d}f}"  # noqa: E731
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def _delta(runs: list[RunResult], base: list[RunResult], col: Column, which: str) -> str:
    mine = {r.seed: v for r in runs if (v := col.value(r, which)) is not None}
    theirs = {r.seed: v for r in base if (v := col.value(r, which)) is not None}
    if not mine or not theirs:
        return "–"
    d = _DECIMALS.get(col.metric, 2)
    if set(mine) == set(theirs):  # paired by seed: the same data order, init and augmentation per seed
        diffs = [mine[s] - theirs[s] for s in mine]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else None
    else:
        a, b = list(mine.values()), list(theirs.values())
        var = [statistics.variance(x) for x in (a, b) if len(x) > 1]
        diffs, spread = [statistics.mean(a) - statistics.mean(b)], math.sqrt(sum(var)) if var else None
    text = f"{statistics.mean(diffs):+.{d}f}"
    return text + (f" ± {spread:.{d}f}" if spread is not None else "")


# ------------------------------------------------------------------------------------------ plots
def plot_bars(rows: list[StudyRow], results: dict[str, list[RunResult]], heads: list[str], metric: str,
              which: str, path: Path) -> Path:
    """One panel per head: a bar per row (mean over seeds), error bars the seeds' std."""
    return _save(_bars_figure(rows, results, heads, metric, which), path)


def _bars_figure(rows: list[StudyRow], results: dict[str, list[RunResult]], heads: list[str], metric: str,
                which: str) -> plt.Figure:
    """The figure of :func:`plot_bars`. Every y axis starts at 0: a bar's height is its value, so the eye
    compares the rows in proportion (a cut axis makes a 1-point difference look like a doubling)."""
    fig, axes = plt.subplots(1, len(heads), figsize=(max(3.2 * len(heads), 5), 4), squeeze=False)
    for ax, head in zip(axes[0], heads):
        vals = [[v for r in results.get(row.id, []) if (v := head_value(r.summary, head, metric, which)) is not None]
                for row in rows]
        means = [statistics.mean(v) if v else math.nan for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=3, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), [_short(r.label) for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylim(bottom=0.0)
        ax.set(title=head, ylabel=f"test {metric}")
    return fig


def plot_curves(rows: list[StudyRow], results: dict[str, list[RunResult]], heads: list[str], path: Path) -> Path:
    """One panel per head: test top-1 per epoch of every row, mean over seeds (band: ± std).

    Epochs without evaluation (no ``test`` in the record) are skipped; an epoch's mean uses the seeds that
    evaluated it.
    """
    return _save(_curves_figure(rows, results, heads), path)


def _curves_figure(rows: list[StudyRow], results: dict[str, list[RunResult]], heads: list[str]) -> plt.Figure:
    """The figure of :func:`plot_curves`."""
    fig, axes = plt.subplots(1, len(heads), figsize=(max(3.6 * len(heads), 5), 3.8), squeeze=False)
    for ax, head in zip(axes[0], heads):
        epochs: list[float] = []
        for i, row in enumerate(rows):
            xs, means, stds = _curve(results.get(row.id, []), head)
            if not xs:
                continue
            ax.plot(xs, means, color=f"C{i % 10}", marker="o" if len(xs) < 30 else None, ms=3, label=_short(row.label))
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=f"C{i % 10}", alpha=0.2, lw=0)
            epochs += xs
        ax.set(title=head, xlabel="epoch", ylabel="test top-1 (%)")
        epoch_axis(ax, epochs)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=6, loc="lower right")
    return fig


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve(runs: list[RunResult], head: str) -> tuple[list[float], list[float], list[float]]:
    per_epoch: dict[float, list[float]] = {}
    for run in runs:
        for rec in run.history:
            test = rec.get("test")
            if not isinstance(test, dict) or _number(rec.get("epoch")) is None:
                continue
            v = head_value({"final": {"test": test}}, head, "top1", "final")
            if v is not None:
                per_epoch.setdefault(float(rec["epoch"]), []).append(v)
    xs = sorted(per_epoch)
    return (xs, [statistics.mean(per_epoch[x]) for x in xs],
            [statistics.stdev(per_epoch[x]) if len(per_epoch[x]) > 1 else 0.0 for x in xs])


def _short(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else label[:_LABEL_CHARS - 1] + "…"


# ------------------------------------------------------------------------------------------ document
def write_report(out: Path, title: str, rows: list[StudyRow], heads: list[str] | None, metrics: list[str],
                 which: str = "final", extra: list[dict[str, str]] = (), preamble: list[str] = (),
                 timing: str = "", plots: bool = True) -> str:
    """Write ``study.md`` and (unless ``plots`` is false) ``plots/{bars,curves}.png`` into ``out``; returns the
    markdown."""
    results = load_results(rows, [c["file"] for c in extra])
    heads = heads or default_heads(results) or ["peer0"]
    table = study_table(rows, results, make_columns(heads, metrics, extra), which)
    what = "last epoch" if which == "final" else "each head's best validation epoch"
    notes = [f"Test-set numbers at the {what}: mean ± std (n − 1) over seeds; `seeds` counts the finished runs."]
    notes += [f"- {d}" for d in dict.fromkeys(d for r in rows for d in r.definitions)]
    missing = [str(d) for r in rows for s, d in sorted(r.runs.items()) if s not in {x.seed for x in results[r.id]}]
    if missing:
        notes.append(f"Unfinished ({len(missing)}): " + ", ".join(Path(m).name for m in missing))
    md = [f"# {title}", "", *preamble, "", table, "", *notes]
    if plots and any(results.values()):
        plots = out / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        plot_bars(rows, results, heads, metrics[0], which, plots / "bars.png")
        plot_curves(rows, results, heads, plots / "curves.png")
        md += ["", f"![test {metrics[0]} per head](plots/bars.png)", "", "![test top-1 per epoch](plots/curves.png)"]
    if timing:
        md += ["", timing]
    text = "\n".join(md) + "\n"
    (out / "study.md").write_text(text)
    return text
