"""Write docs/RESULTS.md from the studies' runs: every number is read from a run, never typed in.

    python studies/results.py [--runs runs] [--out docs/RESULTS.md]

For each of the five papers: its claim in one line, the rows that test it (the table :data:`CLAIMS`: claim, study,
rows compared, metric, claimed direction, significance level), and a verdict from a Welch t-test over seeds
(scipy.stats), all claims evaluated by :func:`verdicts`: **reproduced** when the difference has the claimed sign with p < 0.05,
**contradicted** when it has the opposite sign with p < 0.05, **inconclusive at this budget** otherwise, with
the difference, its standard error and p printed so the reader sees what decides it. The studies' own tables
(runs/<study>/study.md) are embedded, and the wall time of each study comes from its study.json.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerdistill.report.study import dig, head_value
from peerdistill.text import format_duration

ALPHA = 0.05  # significance level of every verdict
STUDIES = ("mixed_samples", "online_kd", "good_da", "self_kd", "budget")


# ------------------------------------------------------------------------------------------ reading runs
@dataclass
class Row:
    """The finished runs of one study row."""

    study: str
    name: str
    runs: list[Path]

    def values(self, get: Any) -> list[float]:
        out = []
        for d in self.runs:
            try:
                v = get(d)
            except (KeyError, TypeError, ValueError, OSError, IndexError):
                v = None
            if v is not None and math.isfinite(v):
                out.append(float(v))
        return out


def load_rows(runs: Path, study: str) -> dict[str, Row]:
    """Rows of a study from its study.json (finished runs only)."""
    path = runs / study / "study.json"
    if not path.is_file():
        return {}
    rows: dict[str, Row] = {}
    for r in json.loads(path.read_text())["runs"]:
        d = runs / study / r["name"]
        if r.get("state") == "finished" or (d / "summary.json").is_file():
            rows.setdefault(r["row"], Row(study, r["row"], [])).runs.append(d)
    return rows


def vals(rows: dict[str, Row], name: str, get: Any) -> list[float]:
    """A row's values, or none when the row has no finished run yet."""
    return rows[name].values(get) if name in rows else []


def summary(d: Path) -> dict[str, Any]:
    return json.loads((d / "summary.json").read_text())


def final(head: str, metric: str = "top1"):
    """Getter: a head's final test metric; ``peers`` (:data:`~peerdistill.report.study.PEERS`) = the mean over
    the run's peer heads, as every study table reads it (:func:`~peerdistill.report.study.head_value`)."""
    return lambda d: head_value(summary(d), head, metric, "final")


def eval_key(*path: str):
    """Getter: a value of the run's eval.json."""
    return lambda d: dig(json.loads((d / "eval.json").read_text()), list(path))


def study_wall(runs: Path, study: str) -> str:
    path = runs / study / "study.json"
    if not path.is_file():
        return "not run"
    d = json.loads(path.read_text())
    return (f"{format_duration(d.get('total_wall_s', 0))} wall on 2 cores "
            f"({format_duration(d.get('runs_wall_s', 0))} summed over its {len(d['runs'])} runs)")


def fmt_p(p: float, prefix: bool = True) -> str:
    """``p < 0.001`` / ``p = 0.004`` in a sentence; ``< 0.001`` / ``0.004`` in a table cell (``prefix=False``)."""
    if p < 0.001:
        return "p < 0.001" if prefix else "< 0.001"
    return f"p = {p:.3f}" if prefix else f"{p:.3f}"


# ------------------------------------------------------------------------------------------ verdicts
@dataclass
class Test:
    """One comparison: ``a`` is claimed to be higher (``higher=True``) or lower than ``b`` (significance ``alpha``)."""

    label: str
    a: list[float]
    b: list[float]
    higher: bool = True
    unit: str = "points"
    alpha: float = ALPHA

    def verdict(self) -> tuple[str, str]:
        from scipy import stats

        if len(self.a) < 2 or len(self.b) < 2:
            return "not run yet", f"{len(self.a)} vs {len(self.b)} finished runs"
        diff = statistics.mean(self.a) - statistics.mean(self.b)
        se = math.sqrt(statistics.variance(self.a) / len(self.a) + statistics.variance(self.b) / len(self.b))
        p = float(stats.ttest_ind(self.a, self.b, equal_var=False).pvalue) if se > 0 else (0.0 if diff else 1.0)
        right = diff > 0 if self.higher else diff < 0
        word = ("reproduced" if right else "contradicted") if p < self.alpha else "inconclusive at this budget"
        digits = 3 if self.unit == "nats" else 2
        return word, (f"Δ = {diff:+.{digits}f} ± {se:.{digits}f} {self.unit} (difference of means ± its standard "
                      f"error), Welch {fmt_p(p)}, n = {len(self.a)} vs {len(self.b)} seeds")


def verdict_lines(tests: list[Test]) -> list[str]:
    out = []
    for t in tests:
        word, detail = t.verdict()
        out.append(f"- {t.label}: **{word}** — {detail}.")
    return out


# ------------------------------------------------------------------------------------------ the claims, as data
Metric = tuple[str, ...]  # ("final", head, metric): a head's final test metric; ("eval", *keys): a value of eval.json


@dataclass(frozen=True)
class Claim:
    """One claim of a paper: in ``study``, row ``a`` has a higher (``higher``) or lower ``metric`` than row ``b``,
    judged by a Welch t-test over seeds at significance ``alpha``."""

    label: str
    study: str
    a: str
    b: str
    metric: Metric
    higher: bool = True
    unit: str = "points"
    alpha: float = ALPHA


def getter(metric: Metric) -> Any:
    """The run reader of a claim's metric."""
    kind, *path = metric
    if kind == "final":
        return final(*path)
    if kind == "eval":
        return eval_key(*path)
    raise ValueError(f"unknown metric kind {kind!r}")


def verdicts(runs: Path, claims: list[Claim]) -> list[str]:
    """The one evaluation of claims: each claim's rows read from its study's runs, tested, one line each."""
    rows: dict[str, dict[str, Row]] = {}
    tests = []
    for c in claims:
        study = rows.setdefault(c.study, load_rows(runs, c.study))
        get = getter(c.metric)
        tests.append(Test(c.label, vals(study, c.a, get), vals(study, c.b, get), c.higher, c.unit, c.alpha))
    return verdict_lines(tests)


def top1(head: str) -> Metric:
    return ("final", head, "top1")


def nll(head: str) -> Metric:
    return ("final", head, "nll")


def ece(head: str) -> Metric:
    return ("final", head, "ece")


PEERS, EMA0, ENSEMBLE, PEER0 = top1("peers"), top1("ema0"), top1("ensemble"), top1("peer0")
FGSM2 = ("eval", "latest", "adversarial", "fgsm", "peer0", "2/255")
FGSM8 = ("eval", "latest", "adversarial", "fgsm", "peer0", "8/255")
MCA = ("eval", "latest", "corruptions", "mca", "peer0")
AUROC = ("eval", "latest", "ood", "holdout", "peer0", "msp", "auroc")

#: The claims each section of RESULTS.md tests, in the order it prints them.
CLAIMS: dict[str, list[Claim]] = {
    # the online study's subset for 200 epochs (studies/budget.yaml)
    "budget": [
        Claim("DML > independent peers (top-1)", "budget", "dml", "independent", PEERS),
        Claim("DML NLL < independent peers", "budget", "dml", "independent", nll("peers"), False, "nats"),
        Claim("DML ECE < independent peers", "budget", "dml", "independent", ece("peers"), False),
        Claim("DML ensemble > independent ensemble (top-1)", "budget", "dml", "independent", ENSEMBLE),
        Claim("MCL > independent peers (top-1)", "budget", "mcl", "independent", PEERS),
        Claim("MCL > DML (top-1)", "budget", "mcl", "dml", PEERS),
        Claim("PCL > DML (top-1)", "budget", "pcl", "dml", PEERS),
        Claim("DKEL > PCL (peers top-1)", "budget", "dkel", "pcl", PEERS),
        Claim("DKEL > PCL (teacher head ema0 top-1)", "budget", "dkel", "pcl", EMA0),
    ],
    # 1. Mixed Sample Augmentation for Online Distillation
    "msa": [
        Claim("DML + CutMix > DML", "mixed_samples", "dml+cutmix", "dml", PEERS),
        Claim("DML + Cut^nMix > DML + CutMix", "mixed_samples", "dml+cutnmix", "dml+cutmix", PEERS),
        Claim("+ feature-level mutual learning > DML + Cut^nMix", "mixed_samples", "+feature-ml", "dml+cutnmix", PEERS),
        Claim("+ self-ensemble teacher (the framework) > + feature ML", "mixed_samples", "+self-ensemble", "+feature-ml",
              PEERS),
        Claim("per-view mixes, peer re-run targets > one shared mix", "mixed_samples", "per-view-rerun", "dml+cutnmix",
              PEERS),
        Claim("per-view mixes, component targets > one shared mix", "mixed_samples", "per-view-components",
              "dml+cutnmix", PEERS),
    ],
    # 2. MCL
    "mcl": [
        Claim("MCL > independent peers", "online_kd", "mcl", "independent", PEERS),
        Claim("MCL > DML", "online_kd", "mcl", "dml", PEERS),
        Claim("MCL ×4 > MCL ×2", "online_kd", "mcl4", "mcl", PEERS),
        Claim("L-MCL > MCL", "online_kd", "lmcl", "mcl", PEERS),
    ],
    # 3. DKEL (on PCL), and PCL against the online baselines
    "dkel": [
        Claim("DKEL > PCL (peers)", "online_kd", "dkel", "pcl", PEERS),
        Claim("DKEL > PCL (teacher head ema0)", "online_kd", "dkel", "pcl", EMA0),
        Claim("DKEL with its initialisation > without (peers)", "online_kd", "dkel", "dkel-noinit", PEERS),
        Claim("DKEL init 1+1 steps > init 20+1 steps (peers)", "online_kd", "dkel", "dkel-init20", PEERS),
        Claim("DKEL fast decay (k = 3.75/epoch) > slow (0.75) (peers)", "online_kd", "dkel", "dkel-slowk", PEERS),
        Claim("DKEL fixed EMA > the code's mean-teacher EMA (peers)", "online_kd", "dkel", "dkel-meanteacher", PEERS),
        *(Claim(f"PCL > {label}", "online_kd", "pcl", row, PEERS)
          for row, label in (("dml", "DML"), ("cl_ilr", "CL-ILR"), ("one", "ONE"), ("ffl", "FFL"),
                             ("okddip", "OKDDIP"), ("kdcl", "KDCL"))),
    ],
    # 4. Good-DA: CutMixPick against CutMix (the T. stddev correlation is read from correlation.json)
    "good_da": [
        Claim("CutMixPick gives a lower student test loss than CutMix", "good_da", "extra_aug-cutmixpick",
              "extra_aug-cutmix", nll("peer0"), False, "nats"),
        Claim("CutMixPick gives a higher student top-1 than CutMix", "good_da", "extra_aug-cutmixpick",
              "extra_aug-cutmix", PEER0),
    ],
    # 5. SD-Dropout, alone and added to other self-KD methods
    "sdd": [
        Claim("SD-Dropout top-1 > CE", "self_kd", "sd_dropout", "ce", PEER0),
        Claim("SD-Dropout NLL < CE", "self_kd", "sd_dropout", "ce", nll("peer0"), False, "nats"),
        Claim("SD-Dropout ECE < CE", "self_kd", "sd_dropout", "ce", ece("peer0"), False),
        Claim("SD-Dropout FGSM 2/255 > CE", "self_kd", "sd_dropout", "ce", FGSM2),
        Claim("SD-Dropout FGSM 8/255 > CE", "self_kd", "sd_dropout", "ce", FGSM8),
        Claim("SD-Dropout mCA > CE", "self_kd", "sd_dropout", "ce", MCA),
        Claim("SD-Dropout OOD AUROC > CE", "self_kd", "sd_dropout", "ce", AUROC),
        Claim("SD-Dropout at λ = 0.1 ECE < CE", "self_kd", "sd_dropout-lam0.1", "ce", ece("peer0"), False),
        Claim("SD-Dropout at λ = 0.1 top-1 > CE", "self_kd", "sd_dropout-lam0.1", "ce", PEER0),
        *(claim for m in ("cs_kd", "ddgsd", "byot", "dml")
          for claim in (Claim(f"{m} + SD-Dropout top-1 > {m}", "self_kd", f"{m}+sdd", m, PEER0),
                        Claim(f"{m} + SD-Dropout ECE < {m}", "self_kd", f"{m}+sdd", m, ece("peer0"), False))),
    ],
}


def table(runs: Path, study: str) -> str:
    """The study's own table and its named rows' overrides (from study.md), and its bar chart."""
    path = runs / study / "study.md"
    if not path.is_file():
        return f"_Study `{study}` has not been run yet._"
    lines = path.read_text().splitlines()
    rows = [ln for ln in lines if ln.startswith("|")]
    notes = [ln for ln in lines if ln.startswith("- **")]  # the named rows' overrides
    bars = [f"![{study}](figures/{study}_bars.png)"] if (runs / study / "plots" / "bars.png").is_file() else []
    return "\n".join(rows + [""] + notes + [""] + bars)


# ------------------------------------------------------------------------------------------ the document
def _train_ce(loss: dict[str, float]) -> float:
    """The peers' mean cross-entropy term of an epoch record (``ce0``, ``ce1``, ...), else its total loss."""
    ce = [v for k, v in loss.items() if k.startswith("ce") and k[2:].isdigit()]
    return statistics.mean(ce) if ce else loss["loss"]


def budget_section(runs: Path) -> list[str]:
    """Whether the baselines overfit at the studies' budgets: train loss vs test NLL and ECE per evaluation."""
    out = ["## The budget", "",
           "Fashion-MNIST at full size for a few epochs is too easy for a regulariser to show anything, so the "
           "studies train on a stratified subset for many epochs, meant to reach the regime where the baselines "
           "overfit. Whether they do is read from the baseline rows themselves (mean over seeds; train CE = the peers' mean cross-entropy on the "
           "augmented training batches, test NLL and ECE of peer 0 on the test set):", "",
           "| study, baseline | epoch | train CE | test NLL | test ECE (%) | test top-1 |", "|---|---|---|---|---|---|"]
    facts = []
    for study, row, head in (("online_kd", "independent", "peer0"), ("self_kd", "ce", "peer0"),
                             ("mixed_samples", "dml", "peer0"), ("budget", "independent", "peer0")):
        r = load_rows(runs, study).get(row)
        if not r:
            continue
        hist = _history(r)
        curve = []
        for e in sorted({rec["epoch"] for h in hist for rec in h if "test" in rec}):
            recs = [rec for h in hist for rec in h if rec["epoch"] == e and "test" in rec]
            m = [rec["test"][head] for rec in recs]
            curve.append((e, statistics.mean(_train_ce(rec["loss"]) for rec in recs),
                          *(statistics.mean(x[k] for x in m) for k in ("nll", "ece", "top1"))))
        half = min(curve, key=lambda c: abs(c[0] - curve[-1][0] / 2))
        best = min(curve, key=lambda c: c[2])
        # a long curve is shown every 20 epochs, with its lowest test NLL and its end
        shown = [c for c in curve if len(curve) <= 6 or c[0] % 20 == 0 or c in (best, curve[-1])]
        out += [f"| {study}, {row} | {e} | {loss:.3f} | {nll:.3f} | {ece:.2f} | {top1:.2f} |"
                for e, loss, nll, ece, top1 in shown]
        gap = (half[2] - half[1], curve[-1][2] - curve[-1][1])  # test NLL - train CE
        verdict = (f"the test NLL rose by {curve[-1][2] - best[2]:.3f} after its lowest point: the baseline overfits"
                   if best[0] < curve[-1][0] and curve[-1][2] - best[2] > 0.005 else
                   "the test NLL was still at its lowest at the end: by test loss the baseline does not overfit at "
                   "this budget")
        facts.append(f"{study} ({row}): from epoch {half[0]} to {curve[-1][0]} the train CE fell by "
                     f"{100 * (1 - curve[-1][1] / half[1]):.0f} %, the test NLL went from {half[2]:.3f} to "
                     f"{curve[-1][2]:.3f} (lowest {best[2]:.3f} at epoch {best[0]}), the gap between them from "
                     f"{gap[0]:+.3f} to {gap[1]:+.3f} and the test ECE from {half[3]:.2f} to {curve[-1][3]:.2f} %; "
                     f"{verdict}")
    out += [""] + [f"- {f}." for f in facts] + [
        "", "A training loss that keeps falling while the test loss stops following it (a widening gap, a rising "
        "test NLL, a growing calibration error) is the regime in which distillation and self-distillation are "
        "claimed to help; where the rows above do not show it, a regulariser has less room to help.", ""]
    return out + long_budget(runs)


def long_budget(runs: Path) -> list[str]:
    """The online study's budget against five times as many epochs: do online KD methods help where the baseline
    overfits?"""
    rows = load_rows(runs, "budget")
    out = ["### The same subset for 200 epochs", "",
           "`studies/budget.yaml` keeps the online study's subset, ResNet-8 peers and cosine schedule and trains for "
           "200 epochs instead of 40 (its independent row is the last curve above), with DML, MCL, PCL and DKEL: "
           f"{study_wall(runs, 'budget')}.", "", table(runs, "budget"), ""]
    if not rows:
        return out
    return out + ["**Verdicts at 200 epochs** (mean peer test metrics unless named):", ""] + verdicts(runs, CLAIMS["budget"]) + [""]


LONGER = ("The same subset trained for 200 epochs instead of 40 tests {} again, with the independent baseline's "
          "curve beside it: \"The same subset for 200 epochs\" above.")


def paper_sections(runs: Path) -> list[str]:
    """The five papers: each one's claim in prose, its study and table, and the verdicts of its :data:`CLAIMS`."""
    sk = load_rows(runs, "self_kd")
    gd = load_rows(runs, "good_da")
    out: list[str] = []

    out += ["## 1. Mixed Sample Augmentation for Online Distillation (CutMix, Cut^nMix, the framework)", "",
            "**Claim.** CutMix inside online distillation helps significantly; Cut^nMix, made for online "
            "distillation, helps more; the framework on Cut^nMix with feature-level mutual learning and a "
            "self-ensemble teacher beats the state of the art. (No code or full text is available: `cutnmix` and "
            "`msa` are documented reconstructions, docs/methods.md.)", "",
            f"**Study** `studies/mixed_samples.yaml`: {study_wall(runs, 'mixed_samples')}.", "", table(runs, "mixed_samples"), "",
            "**Verdicts** (mean peer test top-1):", ""]
    out += verdicts(runs, CLAIMS["msa"])
    out += [""]

    out += ["## 2. MCL: Online Knowledge Distillation via Mutual Contrastive Learning", "",
            "**Claim.** Transferring contrastive distributions between peers (VCL, ICL and their soft forms) beats "
            "logit-only online KD; four networks beat two; the layer-wise version with meta-learned layer matching "
            "(L-MCL) improves further.", "",
            f"**Study** `studies/online_kd.yaml` (rows mcl, mcl4, lmcl, dml, independent): {study_wall(runs, 'online_kd')}.", "",
            "**Verdicts** (mean peer test top-1):", ""]
    out += verdicts(runs, CLAIMS["mcl"])
    out += ["", LONGER.format("MCL against independent peers and DML"), ""]

    out += ["## 3. DKEL: Decoupled Knowledge with Ensemble Learning (on PCL)", "",
            "**Claim.** An independent teacher (a copy of the student, initialised by a few SGD steps and averaged "
            "with a fixed decay) with a decaying ensemble beats PCL, whose temporal-mean teacher collapses onto the "
            "student; the initialisation, the decaying ensemble and the teacher's independence each matter. PCL "
            "itself is claimed to beat DML, CL-ILR, ONE, FFL-S, OKDDip and KDCL.", "",
            f"**Study** `studies/online_kd.yaml`: {study_wall(runs, 'online_kd')}. The whole online table:", "",
            table(runs, "online_kd"), "",
            "**Verdicts** (mean peer test top-1; `ema0` is the temporal-mean / teacher peer, the head the DKEL code "
            "evaluates):", ""]
    out += verdicts(runs, CLAIMS["dkel"]) + ["", LONGER.format("PCL against DML and DKEL against PCL"), ""]

    out += ["## 4. What makes a “good” data augmentation in knowledge distillation (T. stddev, CutMixPick)", "",
            "**Claim.** The teacher's mean-probability standard deviation (T. stddev) under an augmentation predicts "
            "the KD student's test loss (positive correlation); CutMixPick improves on CutMix.", "",
            f"**Study** `studies/good_da_teacher.yaml` ({study_wall(runs, 'good_da_teacher')}), `peerdistill tstddev` "
            f"and `studies/good_da.yaml` ({study_wall(runs, 'good_da')}), then `peerdistill correlate`.", ""]
    out += good_da_block(runs, gd)
    out += verdicts(runs, CLAIMS["good_da"])
    out += ["", table(runs, "good_da"), ""]

    out += ["## 5. SD-Dropout: Self-Knowledge Distillation via Dropout", "",
            "**Claim.** Distilling between dropout samples of the penultimate feature (forward + reverse KL) improves "
            "a single network's accuracy, calibration, adversarial robustness and OOD detection, and adds to other "
            "self-KD methods.", "",
            f"**Study** `studies/self_kd.yaml`: {study_wall(runs, 'self_kd')}.", "", table(runs, "self_kd"), "",
            "**Verdicts** (peer 0; FGSM accuracy with ε in [0, 1] pixel units, mCA = mean corruption accuracy, "
            "AUROC with the two held-out classes as the OOD set, MSP score):", ""]
    out += verdicts(runs, CLAIMS["sdd"]) + [""]
    out += sdd_calibration(runs, sk)
    return out


def _history(row: Row) -> list[list[dict[str, Any]]]:
    """Each run's epoch records (metrics.jsonl)."""
    return [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()] for d in row.runs]


def _test_curve(row: Row, head: str, metric: str) -> dict[int, float]:
    """Epoch -> mean over seeds of a head's test metric at that evaluation."""
    per_epoch: dict[int, list[float]] = {}
    for rec in (rec for h in _history(row) for rec in h):
        if head in rec.get("test", {}):
            per_epoch.setdefault(rec["epoch"], []).append(rec["test"][head][metric])
    return {e: statistics.mean(v) for e, v in sorted(per_epoch.items()) if len(v) == len(row.runs)}


def sdd_calibration(runs: Path, sk: dict[str, Row]) -> list[str]:
    """Why SD-Dropout's calibration differs from its paper's: the weight, the budget or a defect, read from the
    ce / sd_dropout / sd_dropout-lam0.1 rows and from studies/calibration.py (runs/self_kd/calibration.json)."""
    path = runs / "self_kd" / "calibration.json"
    names = ("ce", "sd_dropout", "sd_dropout-lam0.1")
    cal = json.loads(path.read_text())["rows"] if path.is_file() else {}
    if not all(n in sk and n in cal for n in names):
        return ["### SD-Dropout's calibration: the weight, the budget or a defect?", "",
                "not run yet (`python studies/calibration.py runs/self_kd` after the study)", ""]
    from calibration import table as calibration_table

    m = {n: {k: statistics.mean(r[k] for r in cal[n]) for k in ("gap", "ece", "t_star", "ece_scaled", "logit_norm")}
         for n in names}
    curves = {n: _test_curve(sk[n], "peer0", "ece") for n in names}
    epochs = sorted(set.intersection(*(set(c) for c in curves.values())))
    label = {"ce": "CE", "sd_dropout": "SD-Dropout λ = 1", "sd_dropout-lam0.1": "SD-Dropout λ = 0.1"}

    def direction(gap: float) -> str:
        return "under-confident" if gap < -1 else "over-confident" if gap > 1 else "calibrated within 1 point"

    ce, s1, s01 = m["ce"], m["sd_dropout"], m["sd_dropout-lam0.1"]
    out = ["### SD-Dropout's calibration: the weight, the budget or a defect?", "",
           "ECE has no sign, so `python studies/calibration.py runs/self_kd` re-evaluates the last checkpoints of the "
           "rows below: the gap is mean confidence − accuracy on the test set (points; < 0 under-confident), T* the "
           "temperature that minimises the NLL on each run's validation split (T* < 1: the logits are too small), "
           "then the test ECE after dividing the logits by T*.", "", calibration_table(cal), "",
           "Test ECE (%) at each evaluation, mean over seeds:", "",
           "| epoch | " + " | ".join(label[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    out += [f"| {e} | " + " | ".join(f"{curves[n][e]:.2f}" for n in names) + " |" for e in epochs]
    weight = s01["ece"] < 0.5 * s1["ece"]
    first, last = epochs[0], epochs[-1]
    shrinks = curves["sd_dropout"][last] < curves["sd_dropout"][first]
    scale = s1["ece_scaled"] < 0.5 * s1["ece"]
    cause = ("the weight" if weight else "the budget" if shrinks else "neither the weight nor the budget")
    out += ["", f"**Answer** (from the numbers above): **{cause}**"
            + ("; no defect was found." if scale else "; see the last point.") + "", "",
            f"- Direction: CE's gap is {ce['gap']:+.2f} ({direction(ce['gap'])}), SD-Dropout's at λ = 1 "
            f"{s1['gap']:+.2f} ({direction(s1['gap'])}, T* = {s1['t_star']:.2f}), at λ = 0.1 {s01['gap']:+.2f} "
            f"({direction(s01['gap'])}, T* = {s01['t_star']:.2f}).",
            f"- The weight: λ = 0.1 gives ECE {s01['ece']:.2f} against {s1['ece']:.2f} at λ = 1 (CE {ce['ece']:.2f}): "
            + ("the weight explains most of it — at λ = 1 the symmetric KL between two dropout samples is minimised "
               "by shrinking the logits (mean centred-logit norm "
               f"{s1['logit_norm']:.2f} vs {ce['logit_norm']:.2f} for CE), more than this baseline's over-confidence "
               "needs." if weight else "lowering the weight does not remove it."),
            f"- The budget: SD-Dropout's (λ = 1) test ECE goes from {curves['sd_dropout'][first]:.2f} at epoch {first} to "
            f"{curves['sd_dropout'][last]:.2f} at epoch {last}, CE's from {curves['ce'][first]:.2f} to "
            f"{curves['ce'][last]:.2f}: "
            + ("it shrinks with training, so a short budget adds to it, " if shrinks else
               "it does not shrink with training, so a longer budget alone would not remove it, ")
            + (f"and CE is over-confident by only {ce['gap']:.2f} points at this budget, little for a "
               "confidence-lowering term to remove (for comparison, Guo et al. 2017 measured ECEs of about 16–21 % for "
               "CIFAR-100 ResNets, wide ResNets and DenseNets trained for hundreds of epochs)." if ce["gap"] > 1 else
               "and CE is not over-confident at this budget, so there is no over-confidence for SD-Dropout to remove."),
            f"- A defect? Temperature scaling takes SD-Dropout's ECE from {s1['ece']:.2f} to {s1['ece_scaled']:.2f} "
            f"(CE: {ce['ece']:.2f} → {ce['ece_scaled']:.2f}): "
            + ("the error is the logits' scale, not the ranking of the classes, which is what the SDD term does by "
               "construction; " if scale else "temperature scaling does not remove it; ")
            + "the loss is the authors' (`kl_div(log_softmax(z_u/T), softmax(z_v/T), batchmean)·T²` in both directions, "
            "no stop-gradient, CE on the un-dropped logits; `tests/test_methods.py::"
            "test_sd_dropout_loss_equals_hand_computed_value` checks it against an independent computation)"
            + (", so no defect was found." if scale else ", so the remaining error needs another explanation."), ""]
    return out


def good_da_block(runs: Path, gd: dict[str, Row]) -> list[str]:
    """The T. stddev table beside the students' results, the ranking's stability, the correlations and the
    scatter plot (RESULTS.md §4 and docs/results-fmnist.md)."""
    out: list[str] = []
    corr_path = runs / "good_da" / "correlation.json"
    tstd_path = runs / "good_da" / "tstddev.json"
    if tstd_path.is_file():
        out += ["T. stddev of the teacher (10 epochs) and the students' test loss:", "", _tstddev_table(tstd_path, gd), ""]
    stab_path = runs / "good_da" / "tstddev_stability.json"
    if stab_path.is_file():
        out += ["How many epochs the ranking needs (`studies/tstddev_stability.py`: each shorter run's ranking of the "
                "augmentations against the 10-epoch one):", "",
                "| epochs | Kendall τ | Spearman ρ | in the same place | lowest T. stddev agrees | wall time |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['epochs']} | {r['kendall_tau']:+.3f} | {r['spearman_rho']:+.3f} | {r['same_place']}/"
                f"{r['augmentations']} | {'yes' if r['top1_agrees'] else 'no'} | {r['seconds']:.0f} s |"
                for r in json.loads(stab_path.read_text())["rows"]]
        out += [""]
    if corr_path.is_file():
        c = json.loads(corr_path.read_text())
        out += ["| correlation with the student test loss | coefficient | p |", "|---|---|---|"]
        out += [f"| {name.title()} | {c[name]['r']:+.3f} | {fmt_p(c[name]['p'], prefix=False)} |"
                for name in ("pearson", "spearman", "kendall")]
        out += ["", "![T. stddev vs student test loss](figures/good_da_correlation.png)", ""]
        for name in ("pearson", "spearman", "kendall"):
            coef, p = c[name]["r"], c[name]["p"]
            word = ("reproduced" if coef > 0 else "contradicted") if p < ALPHA else "inconclusive at this budget"
            out += [f"- T. stddev predicts the student's test loss ({name.title()}): **{word}** — r = {coef:+.3f}, "
                    f"{fmt_p(p)}, {len(c['points'])} augmentations."]
    return out


def _tstddev_table(path: Path, gd: dict[str, Row]) -> str:
    """T. stddev and teacher entropy per augmentation (tstddev.json) beside the students' results."""
    lines = ["| augmentation | T. stddev | teacher entropy | student test loss (NLL) | student top-1 |", "|---|---|---|---|---|"]

    def ms(v: list[float], d: int) -> str:
        return f"{statistics.mean(v):.{d}f} ± {statistics.stdev(v):.{d}f}" if len(v) > 1 else "–"

    old_cutout = False
    for r in json.loads(path.read_text())["results"]:
        row = gd.get(f"extra_aug-{r['aug']}")
        nll, acc = (row.values(final("peer0", "nll")), row.values(final("peer0"))) if row else ([], [])
        # files written before cutout recorded its parameters cut one hole per image, the default then
        old = r["aug"] == "cutout" and "same_on_batch" not in r.get("params", {})
        old_cutout |= old
        label = f"{r['aug']}{' (per image)¹' if old else ''}"
        lines.append(f"| {label} | {r['t_stddev']:.6f} | {r['entropy']:.4f} | {ms(nll, 3)} | {ms(acc, 2)} |")
    if old_cutout:
        lines += ["", "¹ This row and the `method.extra_aug=cutout` students were measured with one cutout hole "
                  "per image, `cutout`'s default when the study ran. `cutout` now cuts one hole location for the whole "
                  "batch, as the authors' code; `cutout:same_on_batch=false` is the per-image one. Rerunning the study "
                  "measures the code's cutout; the other rows would not change."]
    return "\n".join(lines)


def _seconds(path: Path, get: Any) -> float | None:
    try:
        return float(get(json.loads(path.read_text())))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def times_section(runs: Path) -> list[str]:
    """How to regenerate, and the wall time of every step of the evidence as it was last run here."""
    out = ["## How to regenerate", "",
           "    make evidence        # = studies/run_all.sh: every study, tstddev, correlate, then this file", "",
           "Finished runs are skipped and interrupted ones resumed, so the command can be stopped and restarted. "
           "Each study alone: `peerdistill sweep studies/<name>.yaml` (its table: `runs/<name>/study.md`); this "
           "document alone: `python studies/results.py`.", ""]
    def sweep(name: str) -> tuple[str, Path, Any]:
        return f"`peerdistill sweep studies/{name}.yaml`", runs / name / "study.json", lambda d: d["total_wall_s"]

    good_da = runs / "good_da"
    records = [sweep("mixed_samples"), sweep("good_da_teacher"),
               ("`peerdistill tstddev` (10 epochs)", good_da / "tstddev.json", lambda d: d["seconds"]),
               ("`studies/tstddev_stability.py` (1, 2, 5 epochs)", good_da / "tstddev_stability.json",
                lambda d: sum(r["seconds"] for r in d["rows"])),
               sweep("good_da"), sweep("self_kd"),
               ("`studies/calibration.py runs/self_kd`", runs / "self_kd" / "calibration.json", lambda d: d["seconds"]),
               sweep("online_kd"), sweep("budget")]
    steps = [(label, _seconds(path, get)) for label, path, get in records]
    done = [(k, v) for k, v in steps if v is not None]
    if done:
        out += ["Wall time of each step as last run on this 2-core machine (a sweep's time sums its sessions; a pass "
                "that only skips finished runs takes seconds; `peerdistill correlate` and this script take seconds):",
                "", "| step | wall time |", "|---|---|"]
        out += [f"| {k} | {format_duration(v)} |" for k, v in done]
        missing = [k for k, v in steps if v is None]
        out += [f"| **the whole evidence set** | **{format_duration(sum(v for _, v in done))}**"
                + (f" (without {', '.join(missing)}: not run yet)" if missing else "") + " |", ""]
    return out


def copy_figures(runs: Path, figures: Path) -> None:
    """The plots the document shows, copied next to it (runs/ is not part of the repository)."""
    figures.mkdir(parents=True, exist_ok=True)
    for src, dst in [(runs / "good_da" / "correlation.png", "good_da_correlation.png"),
                     *((runs / s / "plots" / "bars.png", f"{s}_bars.png") for s in STUDIES)]:
        if src.is_file():
            shutil.copyfile(src, figures / dst)


def update_results_fmnist(runs: Path, path: Path) -> None:
    """Rewrite the studies section of docs/results-fmnist.md (between its markers) with the study tables."""
    begin, end = "<!-- studies: generated by studies/results.py -->", "<!-- /studies -->"
    text = path.read_text() if path.is_file() else ""
    parts = [begin, "", "## The studies (many epochs on subsets, 3 seeds)", "",
             "Each table is `runs/<study>/study.md` of `peerdistill sweep studies/<study>.yaml`; the claims they test "
             "and the verdicts are in [RESULTS.md](RESULTS.md). Regenerate everything with `make evidence`.", ""]
    for study in STUDIES:
        parts += [f"### `studies/{study}.yaml` ({study_wall(runs, study)})", "", table(runs, study), ""]
        if study == "good_da":
            parts += good_da_block(runs, load_rows(runs, "good_da"))
    parts.append(end)
    block = "\n".join(parts)
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs", type=Path)
    ap.add_argument("--out", default="docs/RESULTS.md", type=Path)
    args = ap.parse_args()
    lines = ["# Results: the claims of the five papers put to the test on Fashion-MNIST", "",
             "Generated by `python studies/results.py` from the runs of `studies/*.yaml` (never typed in). Verdict "
             f"rule: a Welch t-test over seeds; **reproduced** = the claimed sign with p < {ALPHA}, **contradicted** = "
             f"the opposite sign with p < {ALPHA}, **inconclusive at this budget** = neither (the Δ ± standard error "
             "shows what decides it). Fashion-MNIST is not CIFAR: a claim not reproduced here is not refuted on the "
             "paper's own benchmark, only not supported at this budget.", ""]
    lines += budget_section(args.runs) + paper_sections(args.runs) + times_section(args.runs)
    copy_figures(args.runs, args.out.parent / "figures")
    args.out.write_text("\n".join(lines) + "\n")
    update_results_fmnist(args.runs, args.out.parent / "results-fmnist.md")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
