"""The scripts of studies/: the verdict rule of results.py, the calibration diagnostics and the document's
SD-Dropout calibration answer, on hand-made numbers and runs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "studies"))
import calibration  # noqa: E402
import results  # noqa: E402


def test_verdict_reproduced_contradicted_inconclusive_and_not_run():
    assert results.Test("a > b", [2.0, 2.1, 2.2], [1.0, 1.1, 1.2]).verdict()[0] == "reproduced"
    assert results.Test("a > b", [1.0, 1.1, 1.2], [2.0, 2.1, 2.2]).verdict()[0] == "contradicted"
    assert results.Test("a < b", [1.0, 1.1, 1.2], [2.0, 2.1, 2.2], higher=False).verdict()[0] == "reproduced"
    assert results.Test("a > b", [1.0, 3.0, 2.0], [2.0, 1.0, 3.0]).verdict()[0] == "inconclusive at this budget"
    assert results.Test("a > b", [1.0], [2.0, 3.0]).verdict()[0] == "not run yet"
    word, detail = results.Test("a > b", [2.0, 2.2], [1.0, 1.2]).verdict()
    assert "Δ = +1.00 ± 0.14" in detail and "n = 2 vs 2" in detail  # se = sqrt(0.02/2 + 0.02/2)


def test_fit_temperature_recovers_the_scale_of_overconfident_logits(one_thread):
    g = torch.Generator().manual_seed(0)
    true = torch.randn(20000, 10, generator=g) * 2
    labels = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)  # labels drawn from softmax(true)
    assert calibration.fit_temperature(true * 3, labels) == pytest.approx(3.0, rel=0.05)
    assert calibration.fit_temperature(true / 2, labels) == pytest.approx(0.5, rel=0.05)


def test_calibration_gap_has_the_sign_of_over_or_under_confidence(one_thread):
    labels = torch.tensor([0, 0, 1, 1])
    sharp = torch.tensor([[9.0, 0.0], [9.0, 0.0], [9.0, 0.0], [0.0, 9.0]])  # 75 % right, confidence ~1
    # 100 % right, confidence ~0.52; float64: checked against math.exp to float64 precision on any CPU
    flat = torch.tensor([[0.1, 0.0], [0.1, 0.0], [0.0, 0.1], [0.0, 0.1]], dtype=torch.float64)
    over, under = calibration.calibration(sharp, labels), calibration.calibration(flat, labels)
    assert over["top1"] == 75.0 and over["gap"] == pytest.approx(25.0, abs=0.1) and over["ece"] == pytest.approx(25.0, abs=0.1)
    p = math.exp(0.1) / (1 + math.exp(0.1))
    assert under["gap"] == pytest.approx(100 * (p - 1), rel=1e-12)
    assert under["confidence"] == pytest.approx(100 * p, rel=1e-12)
    assert under["logit_norm"] == pytest.approx(0.1 / math.sqrt(2), rel=1e-12)


def _fake_run(root: Path, name: str, eces: list[float]) -> Path:
    d = root / "self_kd" / name
    d.mkdir(parents=True)
    lines = [{"epoch": 5 * (i + 1), "loss": {"ce0": 1.0}, "test": {"peer0": {"ece": e, "nll": 0.4, "top1": 80.0}}}
             for i, e in enumerate(eces)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return d


def test_sdd_calibration_answer_is_read_from_the_runs(tmp_path):
    rows = {}
    curves = {"ce": [1.0, 2.0], "sd_dropout": [20.0, 12.0], "sd_dropout-lam0.1": [3.0, 2.5]}
    cal = {"ce": (2.0, 2.5, 1.2, 1.0, 10.0), "sd_dropout": (-12.0, 12.0, 0.4, 1.5, 3.0),
           "sd_dropout-lam0.1": (-2.0, 2.5, 0.9, 1.2, 8.0)}  # gap, ece, T*, ece after T*, logit norm
    for name, eces in curves.items():
        rows[name] = results.Row("self_kd", name, [_fake_run(tmp_path, f"{name}_s{s}", eces) for s in range(2)])
    keys = ("gap", "ece", "t_star", "ece_scaled", "logit_norm")
    entry = {k: 0.0 for k in calibration.KEYS}
    data = {n: [entry | dict(zip(keys, v)) for _ in range(2)] for n, v in cal.items()}
    (tmp_path / "self_kd" / "calibration.json").write_text(json.dumps({"rows": data}))
    text = "\n".join(results.sdd_calibration(tmp_path, rows))
    assert "**the weight**; no defect was found." in text
    assert "CE's gap is +2.00 (over-confident)" in text and "over-confident by only 2.00 points" in text
    assert "λ = 1 -12.00 (under-confident, T* = 0.40)" in text
    assert "the weight explains most of it" in text and "3.00 vs 10.00 for CE" in text
    assert "from 20.00 at epoch 5 to 12.00 at epoch 10" in text and "it shrinks with training" in text
    assert "takes SD-Dropout's ECE from 12.00 to 1.50" in text and "the logits' scale" in text
    assert "| 10 | 2.00 | 12.00 | 2.50 |" in text  # the per-epoch ECE table


def test_sdd_calibration_waits_for_its_runs(tmp_path):
    assert "not run yet" in "\n".join(results.sdd_calibration(tmp_path, {}))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_study_file_expands_to_valid_runs(path, tmp_path, monkeypatch):
    from peerdistill.sweep.study import load_study

    monkeypatch.setenv("HOME", str(tmp_path))  # the weights files users bring (imagenet.yaml's teachers)
    (tmp_path / "weights").mkdir()
    for name in ("resnet34-b627a593.pth", "resnet50-0676ba61.pth"):
        (tmp_path / "weights" / name).write_bytes(b"")

    study = load_study(path)
    assert study.runs and len({r.name for r in study.runs}) == len(study.runs)


def test_verdict_prints_small_p_values_as_a_bound():
    assert "Welch p < 0.001" in results.Test("a > b", [5.0, 5.01, 5.02], [1.0, 1.01, 1.02]).verdict()[1]
    assert (results.fmt_p(0.0004), results.fmt_p(0.0004, prefix=False)) == ("p < 0.001", "< 0.001")
    assert (results.fmt_p(0.0042), results.fmt_p(0.0042, prefix=False)) == ("p = 0.004", "0.004")


def _study_with_curve(root: Path, study: str, row: str, nlls: list[float]) -> None:
    d = root / study / f"{row}_s0"
    d.mkdir(parents=True)
    lines = [{"epoch": 10 * (i + 1), "loss": {"ce0": 1.0 / (i + 1), "ce1": 1.0 / (i + 1)},
              "test": {"peer0": {"nll": v, "ece": 2.0, "top1": 80.0}}} for i, v in enumerate(nlls)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (d / "summary.json").write_text("{}")
    (root / study / "study.json").write_text(json.dumps({"runs": [{"name": d.name, "row": row, "state": "finished"}]}))


def test_budget_section_tells_a_rising_test_loss_from_a_falling_one(tmp_path):
    _study_with_curve(tmp_path, "online_kd", "independent", [0.9, 0.7, 0.6, 0.55])  # still falling at the end
    _study_with_curve(tmp_path, "budget", "independent", [0.9, 0.6, 0.5, 0.58])  # lowest at epoch 30, then up
    text = "\n".join(results.budget_section(tmp_path))
    facts = [ln for ln in text.splitlines() if ln.startswith("- ") and "(independent): from epoch" in ln]
    assert len(facts) == 2, facts
    assert facts[0].startswith("- online_kd (independent)") and "does not overfit" in facts[0]
    assert facts[1].startswith("- budget (independent)") and "rose by 0.080 after its lowest point" in facts[1]
    assert "(lowest 0.500 at epoch 30)" in facts[1] and "train CE fell by 50 %" in facts[1]  # 1/2 -> 1/4
    assert "| budget, independent | 40 | 0.250 | 0.580 | 2.00 | 80.00 |" in text
    assert "_Study `budget` has not been run yet._" in text  # no study.md: the table waits for the sweep
    assert "- DML > independent peers (top-1): **not run yet** — 0 vs 0 finished runs." in text


def test_tstddev_table_marks_a_cutout_row_measured_per_image(tmp_path):
    """tstddev files from before cutout recorded its parameters cut one hole per image: the document says so."""
    rows = [{"aug": "cutout", "t_stddev": 0.01, "entropy": 0.2, "groups": 3}, {"aug": "flip", "t_stddev": 0.02,
                                                                              "entropy": 0.1, "groups": 3}]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"results": rows}))
    new.write_text(json.dumps({"results": [{**rows[0], "params": {"length": 0, "same_on_batch": True}}, rows[1]]}))
    marked = results._tstddev_table(old, {})
    assert "| cutout (per image)¹ |" in marked and "`cutout:same_on_batch=false`" in marked
    assert "¹" not in results._tstddev_table(new, {}) and "| cutout |" in results._tstddev_table(new, {})


def test_imagenet_study_runs_each_preset_under_torchrun_through_submitit(tmp_path, monkeypatch):
    from peerdistill import config as C
    from peerdistill.sweep.study import load_study

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    for name in ("resnet34-b627a593.pth", "resnet50-0676ba61.pth"):
        (tmp_path / "weights" / name).write_bytes(b"")
    root = Path(__file__).parents[1]
    study = load_study(root / "studies" / "imagenet.yaml")
    assert study.launch == {"launcher": "submitit", "nproc_per_node": 4} and study.slurm["gpus"] == 4
    assert len(study.runs) == 12
    for run in study.runs:
        preset = C.load(root / "studies" / run.row.overrides["preset"])
        assert (run.config.method.name, run.config.model.name, run.config.epochs, run.config.batch_size) == \
            (preset.method.name, preset.model.name, preset.epochs, preset.batch_size), run.name
        assert all(run.config.method.args[k] == v for k, v in preset.method.args.items()), run.name
        assert run.config.data.name == "imagefolder" and run.config.data.root == "~/data/imagenet"


def test_the_claims_table_writes_the_document_the_code_wrote_before(tmp_path, monkeypatch):
    """Every paper's claims are data (``results.CLAIMS``) evaluated by one function (``results.verdicts``): on a
    complete made-up runs tree the document is byte for byte the one written when the claims were code
    (tests/data/results_fixture.md, written by that code from the same tree)."""
    from .studies_fixture import write_runs

    runs = write_runs(tmp_path / "runs")
    out = tmp_path / "docs" / "RESULTS.md"
    out.parent.mkdir()
    monkeypatch.setattr(sys, "argv", ["results.py", "--runs", str(runs), "--out", str(out)])
    results.main()
    data = Path(__file__).parent / "data"
    assert out.read_text() == (data / "results_fixture.md").read_text()
    assert (out.parent / "results-fmnist.md").read_text() == (data / "results_fmnist_fixture.md").read_text()
    text = out.read_text()
    for word in ("reproduced", "contradicted", "inconclusive at this budget", "not run yet"):
        assert f"**{word}** —" in text  # the fixture exercises every verdict
    claims = [c for section in results.CLAIMS.values() for c in section]
    assert len(claims) == text.count("** — ") - 3  # one line per claim, plus the three correlation verdicts
    assert {c.study for c in claims} <= set(results.STUDIES)


def test_a_claim_names_its_rows_metric_direction_and_threshold(tmp_path):
    from .studies_fixture import write_runs

    runs = write_runs(tmp_path / "runs")
    rows = ("mixed_samples", "dml+cutnmix", "dml+cutmix")  # far apart in the fixture (p = 0.002)
    up = results.Claim("cutnmix > cutmix", *rows, results.PEERS)
    down = results.Claim("cutnmix < cutmix", *rows, results.PEERS, higher=False)
    strict = results.Claim("cutnmix > cutmix at 1e-6", *rows, results.PEERS, alpha=1e-6)
    a, b, c = results.verdicts(runs, [up, down, strict])
    words = [line.split("**")[1] for line in (a, b, c)]
    assert words == ["reproduced", "contradicted", "inconclusive at this budget"], words
    with pytest.raises(ValueError, match="unknown metric kind"):
        results.getter(("best", "peer0", "top1"))
