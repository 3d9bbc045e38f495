"""``peerdistill bench``: the report's fields are consistent with each other and the CLI prints them."""
from __future__ import annotations

import json

import pytest

from peerdistill.cli import main
from peerdistill.engine.bench import bare_step_throughput, rss_growth, run_bench

from .conftest import TINY, tiny_cfg


def _cfg(*extra: str):
    return tiny_cfg("method=dml", "peers=2", *extra)


def test_bench_json_report_is_self_consistent(capsys):
    code = main(["bench", *TINY, "method=dml", "peers=2", "--steps", "3", "--warmup", "1", "--json"])
    assert code in (0, None)
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["method"] == "dml" and r["peers"] == 2 and r["batch_size"] == 16 and r["steps"] == 3
    assert r["images_per_s"] == pytest.approx(16 * 1000.0 / r["step_ms"])
    assert r["images_per_s_per_peer"] == pytest.approx(r["images_per_s"] / 2)
    assert set(r["breakdown_ms"]) == {"data", "forward", "losses", "backward", "optimizer", "update", "other"}
    assert sum(r["breakdown_pct"].values()) == pytest.approx(100.0)
    assert all(r["breakdown_ms"][p] > 0 for p in ("data", "forward", "losses", "backward", "optimizer"))
    assert r["peak_rss_mb"] > 50 and r["gpu_peak_mb"] is None and r["host_syncs_per_step"] is None
    assert r["fused"] is False and r["epochs"] == 2
    assert r["projected_run_s"] == pytest.approx(2 * (r["train_epoch_s"] + r["eval_s"]))
    # 86 training images (96 minus the 10 % validation split) in batches of 16: 5 steps per epoch
    assert r["train_epoch_s"] == pytest.approx(5 * r["step_ms"] / 1000.0)
    assert r["projected_device_hours"] == pytest.approx(r["projected_run_s"] / 3600)  # one process


def test_bench_projects_another_data_size_in_device_hours(capsys):
    """ImageNet's 1 281 167 images from a small benchmark: epochs x (steps of that epoch x step time + eval)."""
    main(["bench", *TINY, "method=dml", "peers=2", "--steps", "2", "--warmup", "1", "--epoch-size", "1281167", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["epoch_size"] == 1281167 and r["train_epoch_s"] == pytest.approx(1281167 // 16 * r["step_ms"] / 1000.0)
    assert r["projected_device_hours"] == pytest.approx(2 * (r["train_epoch_s"] + r["eval_s"]) / 3600)
    run_bench(_cfg(), steps=2, warmup=1, epoch_size=1281167)
    assert "projected CPU-hours" in capsys.readouterr().out


def test_bench_human_report_names_the_settings(capsys):
    run_bench(_cfg("fused=true"), steps=2, warmup=1)
    out = capsys.readouterr().out
    assert "dml x2 resnet8" in out and "fused cohort" in out and "projected run" in out
    for phase in ("data", "forward", "losses", "backward", "optimizer"):
        assert f"  {phase}" in out


def test_bare_step_reports_its_settings():
    r = bare_step_throughput(_cfg("precision=fp32", "channels_last=false"), steps=2, warmup=1)
    assert r["images_per_s"] > 0 and r["peers"] == 2 and r["precision"] == "fp32" and not r["channels_last"]


def test_rss_growth_compares_quarter_means():
    assert rss_growth([100.0] * 4 + [110.0] * 4) == pytest.approx(10.0)
    assert rss_growth([100.0, 140.0, 100.0, 140.0]) == pytest.approx(40.0)
    assert rss_growth([5.0]) == 0.0
