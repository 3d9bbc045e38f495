"""A made-up but complete ``runs/`` tree for studies/results.py: every row its claims compare, with seeded numbers.

Each study row gets three finished runs (``summary.json`` with peer, ensemble and EMA heads; ``metrics.jsonl``
with test curves; ``eval.json`` with FGSM, mCA and OOD AUROC), each study its ``study.json`` and ``study.md``,
and the good_da study its T. stddev, stability and correlation files. The numbers are drawn so that the
verdicts take every value (reproduced, contradicted, inconclusive, not run yet).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ROWS = {
    "mixed_samples": ["dml", "dml+cutmix", "dml+cutnmix", "+feature-ml", "+self-ensemble", "per-view-rerun",
                      "per-view-components"],
    "online_kd": ["independent", "dml", "mcl", "mcl4", "lmcl", "dkel", "pcl", "dkel-noinit", "dkel-init20", "dkel-slowk",
                  "cl_ilr", "one", "ffl", "okddip", "kdcl"],  # no dkel-meanteacher: a claim not run yet
    "good_da": ["extra_aug-identity", "extra_aug-flip", "extra_aug-cutmix", "extra_aug-cutmixpick"],
    "self_kd": ["ce", "sd_dropout", "sd_dropout-lam0.1", "cs_kd", "cs_kd+sdd", "ddgsd", "ddgsd+sdd", "byot", "byot+sdd",
                "dml", "dml+sdd"],
    "budget": ["independent", "dml", "mcl", "pcl", "dkel"],
}
SEEDS = 3
EPOCHS = (10, 20, 30, 40)


def _run(d: Path, rng: random.Random, level: float) -> None:
    d.mkdir(parents=True)
    heads = {}
    for h in ("peer0", "peer1", "ensemble", "ema0"):
        top1 = level + rng.gauss(0, 0.4)
        heads[h] = {"top1": round(top1, 4), "nll": round(0.3 + (90 - top1) / 50 + rng.gauss(0, 0.01), 5),
                    "ece": round(abs(2 + rng.gauss(0, 0.8)), 4)}
    (d / "summary.json").write_text(json.dumps({"epochs": EPOCHS[-1], "final": {"test": heads}}))
    lines = []
    for i, e in enumerate(EPOCHS):
        test = {h: {k: (v - (len(EPOCHS) - 1 - i) * 0.5 if k == "top1" else v + 0.02 * (i - 2) ** 2)
                    for k, v in m.items()} for h, m in heads.items()}
        lines.append({"epoch": e, "loss": {"loss": 1.0 / (i + 1), "ce0": 0.9 / (i + 1), "ce1": 1.1 / (i + 1)},
                      "test": test})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    adv = {"fgsm": {"peer0": {"2/255": round(level - 20 + rng.gauss(0, 1), 3), "8/255": round(level - 50 + rng.gauss(0, 1), 3)}}}
    ev = {"latest": {"adversarial": adv, "corruptions": {"mca": {"peer0": round(level - 10 + rng.gauss(0, 0.5), 3)}},
                     "ood": {"holdout": {"peer0": {"msp": {"auroc": round(0.8 + rng.gauss(0, 0.01), 4)}}}}}}
    (d / "eval.json").write_text(json.dumps(ev))


def write_runs(root: Path, seed: int = 0) -> Path:
    """The tree under ``root`` (returned); the same ``seed`` gives the same bytes."""
    rng = random.Random(seed)
    for study, rows in ROWS.items():
        runs = []
        for row in rows:
            level = 85 + rng.choice([-2.0, -0.3, 0.0, 0.3, 2.0])  # far apart or close: every verdict occurs
            for s in range(SEEDS):
                name = f"{row}_s{s}"
                _run(root / study / name, rng, level)
                runs.append({"name": name, "row": row, "seed": s, "state": "finished"})
        (root / study / "study.json").write_text(json.dumps({"runs": runs, "total_wall_s": 3600 + 17 * len(runs),
                                                             "runs_wall_s": 7000 + 31 * len(runs)}))
        table = ["| row | runs | top-1 |", "|---|---|---|"] + [f"| {r} | {SEEDS} | 85.00 |" for r in rows]
        (root / study / "study.md").write_text("\n".join([f"# Study {study}", "", *table, "",
                                                          f"- **{rows[0]}**: method={rows[0]}", ""]))
    gd = root / "good_da"
    augs = ["identity", "flip", "cutmix", "cutmixpick", "cutout"]
    (gd / "tstddev.json").write_text(json.dumps({"seconds": 812.5, "results": [
        {"aug": a, "t_stddev": 0.015 - 0.001 * i, "entropy": 0.2 + 0.1 * i, "groups": 10} for i, a in enumerate(augs)]}))
    (gd / "tstddev_stability.json").write_text(json.dumps({"rows": [
        {"epochs": e, "kendall_tau": 0.5 + 0.1 * e, "spearman_rho": 0.6 + 0.05 * e, "same_place": e, "augmentations": 5,
         "top1_agrees": e > 1, "seconds": 100.0 * e} for e in (1, 2, 5)]}))
    (gd / "correlation.json").write_text(json.dumps({"points": augs[:4], **{
        name: {"r": r, "p": p} for name, r, p in (("pearson", 0.91, 0.03), ("spearman", 0.4, 0.5), ("kendall", -0.8, 0.0004))}}))
    (root / "good_da_teacher").mkdir()
    (root / "good_da_teacher" / "study.json").write_text(json.dumps({"runs": [{"name": "teacher_s0"}],
                                                                     "total_wall_s": 1234, "runs_wall_s": 1200}))
    return root
