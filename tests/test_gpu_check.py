"""benchmarks/gpu_check.sh is ready for a GPU session: the script parses, and the Python pieces that decide
its verdicts (the run comparison of the kill-and-resume check, the report) work on CPU runs."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import torch

from peerdistill.run import train

from .conftest import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_resume_comparison_sees_a_one_ulp_difference_and_the_report_says_so(tmp_path):
    gc = _gpu_check()
    train(tiny_cfg("epochs=1"), tmp_path / "a", echo=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert gc.compare_runs(tmp_path / "a", tmp_path / "b")["exact"]
    ckpt_path = tmp_path / "b" / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    w = next(k for k, v in ckpt["cohort"].items() if v.is_floating_point())
    ckpt["cohort"][w] = torch.nextafter(ckpt["cohort"][w], torch.full_like(ckpt["cohort"][w], float("inf")))
    torch.save(ckpt, ckpt_path)
    res = gc.compare_runs(tmp_path / "a", tmp_path / "b")
    assert not res["exact"] and res["tensors_differing"] == [f"cohort.{w}"]

    report = {"environment": {"torch": "x", "name": "GPU", "gpus": 1, "precision_auto": "bf16"},
              "bench_shape": ["model=resnet32"], "seconds": 1.0,
              "cuda_tests": {"tests": 3, "failures": 1, "errors": 0, "skipped": 0, "seconds": 2.0, "exit": 1,
                             "failed": ["test_x: boom"]},
              "bench": [{"name": "dml", "precision": "bf16", "channels_last": True, "images_per_s": 1000.0,
                         "images_per_s_per_peer": 500.0, "step_ms": 12.5, "host_syncs_per_step": 0.0,
                         "gpu_peak_mb": 900.0}, {"name": "dml-fp16", "error": "exit 1: oops"}],
              "resume": {"config": "c", **res}, "torchrun": {"skipped": "1 GPU(s): needs 2"}}
    md = gc.markdown(report)
    assert "1 failed" in md and "- test_x: boom" in md and "| dml | bf16 | True | 1000 | 500 | 12.5 | 0.0 | 900 |" in md
    assert "failed: exit 1: oops" in md and "**differs**" in md and "needs 2" in md
