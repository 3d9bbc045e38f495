"""Aggregate finished runs into a mean ± std table, grouping runs that differ only in their seed."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from ..errors import PeerdistillError


def _label(cfg: dict[str, Any]) -> str:
    method = cfg["method"]
    args = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    mixer = f" + {cfg['mixer']['name']}" if cfg.get("mixer") else ""
    return (f"{method['name']}{f'({args})' if args else ''}{mixer} · {cfg['model']['name']} x{cfg['peers']} · "
            f"{cfg['data']['name']} · {cfg['epochs']} ep")


_NOT_GROUPED = ("seed", "name", "progress", "tensorboard", "log_every")


def load_runs(dirs: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Group run directories (each with config.yaml and summary.json) by everything but the seed."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in dirs:
        if not (d / "summary.json").is_file() or not (d / "config.yaml").is_file():
            raise PeerdistillError(f"{d} is not a finished run (no summary.json / config.yaml)")
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        summary = json.loads((d / "summary.json").read_text())
        history = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        seconds = statistics.mean(r["seconds"] for r in history) if history else float("nan")
        key = json.dumps({k: v for k, v in cfg.items() if k not in _NOT_GROUPED}, sort_keys=True)
        groups[key].append({"dir": str(d), "seed": cfg["seed"], "summary": summary, "epoch_s": seconds})
    return groups


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(groups: dict[str, list[dict[str, Any]]], which: str = "final") -> str:
    """One row per group: peer mean / best peer / ensemble test top-1, peer ECE, seconds per epoch.

    ``which="final"`` reads the last epoch; ``"best"`` the epoch of best validation top-1 per head.
    """
    rows = ["| run | seeds | peer top-1 (mean of peers) | best peer top-1 | ensemble top-1 | peer ECE (%) | s/epoch |",
            "|---|---|---|---|---|---|---|"]
    for key, runs in groups.items():
        label = _label(json.loads(key))
        peer_mean, peer_best, ens, ece = [], [], [], []
        for r in runs:
            test = _test_metrics(r["summary"], which)
            peers = [m for h, m in test.items() if h.startswith("peer") and h != "peers_mean"]
            peer_mean.append(statistics.mean(m["top1"] for m in peers))
            peer_best.append(max(m["top1"] for m in peers))
            ece.append(statistics.mean(m["ece"] for m in peers))
            if "ensemble" in test:
                ens.append(test["ensemble"]["top1"])
        seeds = ",".join(str(r["seed"]) for r in runs)
        secs = statistics.mean(r["epoch_s"] for r in runs)
        rows.append(f"| {label} | {seeds} | {_ms(peer_mean)} | {_ms(peer_best)} | {_ms(ens)} | {_ms(ece)} | {secs:.0f} |")
    return "\n".join(rows)


def _test_metrics(summary: dict[str, Any], which: str) -> dict[str, Any]:
    if which == "final":
        return summary["final"]["test"]
    return {h: b["test"] for h, b in summary["best"].items()}
