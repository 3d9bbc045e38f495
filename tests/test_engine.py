"""The training loop: outputs of a run, exact resume, non-finite stop, evaluation and best tracking."""
from __future__ import annotations

import json

import pytest
import torch

from peerdistill.cli import main
from peerdistill import run as run_mod
from peerdistill.engine.trainer import NonFiniteLoss, Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.methods.independent import Independent

from .conftest import killed_and_resumed, tiny_cfg


def test_run_leaves_documented_outputs(tmp_path):
    out = tmp_path / "run"
    summary = run_mod.train(tiny_cfg(), out, echo=False)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt",
                 "accuracy.png", "losses.png", "reliability.png"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    rec = lines[-1]
    assert set(rec["test"]) >= {"peer0", "peer1", "ensemble", "peers_mean"}
    assert set(rec["test"]["peer0"]) == {"top1", "top5", "nll", "ece"}
    assert {"ce0", "ce1", "kl0", "kl1", "loss"} <= set(rec["loss"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["final"]["test"] == summary["final"]["test"] == rec["test"]
    for head, best in on_disk["best"].items():  # best-val selection, reported on test
        epoch_rec = lines[best["epoch"] - 1]
        assert best["test"] == epoch_rec["test"][head]
        assert best["val_top1"] == max(r["val"][head]["top1"] for r in lines[: best["epoch"]])


def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_cfg("epochs=3", "mixer=cutmix", "mixer.prob=1.0")
    full = run_mod.train(cfg, tmp_path / "full", echo=False)
    resumed = killed_and_resumed(lambda: tiny_cfg("epochs=3", "mixer=cutmix", "mixer.prob=1.0"), tmp_path / "cut",
                                 monkeypatch)
    assert resumed["final"] == full["final"]
    assert resumed["best"] == full["best"]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_existing_run_is_not_overwritten(tmp_path):
    run_mod.train(tiny_cfg("epochs=1"), tmp_path / "r", echo=False)
    with pytest.raises(PeerdistillError, match="already holds a run"):
        run_mod.train(tiny_cfg("epochs=1"), tmp_path / "r", echo=False)


def test_non_finite_loss_stops_and_names_term(tmp_path, monkeypatch):
    real = Independent.losses

    def poisoned(self, rec):
        terms = real(self, rec)
        if rec.epoch == 1 and rec.step % rec.steps_per_epoch == 2:
            terms["ce1"] = terms["ce1"] * float("nan")
        return terms

    monkeypatch.setattr(Independent, "losses", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match=r"'ce1' at step .*epoch 2.*last good checkpoint"):
        run_mod.train(tiny_cfg("method=independent"), out, echo=False)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["cohort"].values() if v.is_floating_point())


def test_cli_eval_reproduces_final_metrics(tmp_path, capsys):
    out = tmp_path / "r"
    run_mod.train(tiny_cfg("epochs=1"), out, echo=False)
    assert main(["eval", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    for head in ("peer0", "peer1", "ensemble"):
        assert res["test"][head]["top1"] == pytest.approx(summary["final"]["test"][head]["top1"])
        assert res["test"][head]["ece"] == pytest.approx(summary["final"]["test"][head]["ece"], abs=1e-6)


def test_gradients_reach_cohort_only_through_one_step():
    tr = Trainer(tiny_cfg("method=dml"), None)
    before = [p.detach().clone() for p in tr.cohort.parameters()]
    terms = tr.train_step(next(iter(tr.train_loader)))
    assert set(terms) == {"ce0", "ce1", "kl0", "kl1"}
    assert all(torch.isfinite(v) for v in terms.values())
    changed = [not torch.equal(a, b) for a, b in zip(before, tr.cohort.parameters())]
    assert all(changed)
    assert tr.step == 1


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in ("dml", "independent", "resnet32", "fashion_mnist", "synthetic", "cutmix", "mixup",
                 "temperature=1.0"):
        assert word in text
