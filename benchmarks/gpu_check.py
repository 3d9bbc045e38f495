"""The first-GPU device check: everything the CPU-only test suite cannot prove, in one run, one report.

1. ``pytest -m cuda`` (tests/test_cuda.py: every method's step without host synchronisation, every
   method under ``deterministic=true``, exact kill-and-resume, fused vs loop, fp16 / bf16, device metrics);
2. ``peerdistill bench`` of DML, MCL, L-MCL, PCL, the fused cohort, ``precision=bf16``, ``precision=fp16``
   and ``deterministic=true``: images/s, host synchronisations per step, GPU peak memory;
3. a run killed after its first epoch and resumed, compared tensor by tensor with the uninterrupted run,
   under ``deterministic=true`` (each in a fresh process, the kill a hard ``os._exit``);
4. with two or more GPUs, one ``torchrun --nproc_per_node=2`` training epoch (NCCL).

Writes ``report.json`` and ``report.md`` into ``--out`` after every stage (an interrupted check keeps what
it measured). ``--quick`` shrinks every size (a smoke run; ``--device cpu --quick`` exercises the parts
that can run on a CPU). ``benchmarks/gpu_check.sh`` is the entry point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# CIFAR-100-shaped synthetic data (32x32x3, 100 classes), ResNet-32 peers, batch 128: the papers' setting.
SHAPE = ["model=resnet32", "batch_size=128", "data.name=synthetic", "data.size=10000", "data.test_size=2000",
         "data.num_classes=100", "data.image_size=32", "data.channels=3", "epochs=200"]
QUICK_SHAPE = ["model=resnet8", "batch_size=32", "data.name=synthetic", "data.size=256", "data.test_size=64",
               "data.num_classes=10", "data.image_size=16", "data.channels=3", "epochs=2"]
BENCHES = {  # name -> overrides on top of the shape
    "dml": ["method=dml"],
    "mcl": ["method=mcl"],
    "lmcl": ["method=lmcl"],
    "pcl": ["method=pcl"],
    "dml-fused": ["method=dml", "fused=true"],
    "dml-bf16": ["method=dml", "precision=bf16"],
    "dml-fp16": ["method=dml", "precision=fp16"],
    "dml-deterministic": ["method=dml", "deterministic=true"],  # the cost of deterministic=true
}
RESUME = ["method=dml", "addon=sd_dropout", "deterministic=true", "model=resnet8", "batch_size=128",
          "data.name=synthetic", "data.size=4096", "data.test_size=512", "data.num_classes=10", "data.image_size=32",
          "epochs=3", "progress=false", "tensorboard=false"]


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{path}" if path else src, "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Exit code (124 on timeout), the output's tail and the seconds taken."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout)
        code, out = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        code, out = 124, f"timed out after {timeout:.0f} s\n{(e.stdout or b'')[-2000:]!r}"
    return code, out[-4000:], time.perf_counter() - t0


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0],
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        from peerdistill.engine.precision import resolve_precision

        dev = torch.device("cuda")
        info.update(gpus=torch.cuda.device_count(), name=torch.cuda.get_device_name(dev),
                    capability=list(torch.cuda.get_device_capability(dev)), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), precision_auto=resolve_precision("auto", dev).name)
    return info


def cuda_tests(out: Path, timeout: float) -> dict[str, Any]:
    xml = out / "cuda-tests.xml"
    # Only the CUDA tests' module is collected: other test modules import packages of the test extra
    # (kornia, mlxtend, ...) that a GPU image may lack.
    # The tests set deterministic=true inside one process, after other tests created cuBLAS handles: the
    # workspace setting it needs must be there from the start (a CLI run sets it before any GPU work).
    env = {**_env(), "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}
    code, tail, secs = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                             "tests/test_cuda.py", f"--junitxml={xml}"], timeout, env)
    counts: dict[str, Any] = {"exit": code, "seconds": round(secs, 1)}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        bad = [(c, c.find("failure") if c.find("failure") is not None else c.find("error"))
               for c in suite.iter("testcase")]
        counts["failed"] = [f"{c.get('name')}: {(e.get('message') or '')[:300]}" for c, e in bad if e is not None]
    if code not in (0, 5):
        counts["tail"] = tail[-2000:]
    return counts


def bench(name: str, shape: list[str], steps: int, warmup: int, device: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "peerdistill", "bench", *shape, *BENCHES[name], f"device={device}",
           "--steps", str(steps), "--warmup", str(warmup), "--json"]
    code, tail, secs = _run(cmd, timeout)
    lines = [ln for ln in tail.strip().splitlines() if ln.startswith("{")]
    if code == 0 and lines:
        r = json.loads(lines[-1])
        keep = ("images_per_s", "images_per_s_per_peer", "step_ms", "host_syncs_per_step", "gpu_peak_mb",
                "peak_rss_mb", "precision", "channels_last", "fused", "peers", "breakdown_pct")
        return {"name": name, "seconds": round(secs, 1), **{k: r.get(k) for k in keep}}
    return {"name": name, "error": f"exit {code}: " + " | ".join(tail.strip().splitlines()[-3:])}


def resume_check(out: Path, device: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Straight run vs a run killed (os._exit) after epoch 1 and resumed: every checkpointed tensor and
    every logged number must be identical."""
    cfg = [*RESUME, *(QUICK_SHAPE[:-1] if quick else []), f"device={device}"]
    straight, cut = out / "resume-straight", out / "resume-cut"
    me = [sys.executable, str(Path(__file__).resolve())]
    steps = [("straight", [*me, "--child", "0", "train", *cfg, "--out", str(straight)]),
             ("killed", [*me, "--child", "1", "train", *cfg, "--out", str(cut)]),
             ("resumed", [*me, "--child", "0", "train", "--resume", str(cut)])]
    res: dict[str, Any] = {"config": " ".join(cfg)}
    for label, cmd in steps:
        code, tail, secs = _run(cmd, timeout)
        res[f"{label}_seconds"] = round(secs, 1)
        if (code != 0) != (label == "killed"):
            return {**res, "error": f"{label} run: exit {code}: {tail[-600:]}"}
    return {**res, **compare_runs(straight, cut)}


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    import torch

    ca = torch.load(a / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    differ = [f"{part}.{k}" for part in ("cohort", "method") for k, v in ca[part].items()
              if not torch.equal(v, cb[part][k])]
    logs = [(a / "metrics.jsonl").read_text().splitlines(), (b / "metrics.jsonl").read_text().splitlines()]
    strip = [[{k: v for k, v in json.loads(ln).items() if "seconds" not in k and k != "images_per_s"} for ln in log]
             for log in logs]
    return {"exact": not differ and strip[0] == strip[1], "tensors_differing": differ[:10],
            "logs_equal": strip[0] == strip[1], "epochs": len(logs[0])}


def torchrun_check(out: Path, shape: list[str], timeout: float) -> dict[str, Any]:
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): needs 2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "peerdistill", "train",
           *shape, "method=dml", "epochs=1", "progress=false", "tensorboard=false", "--out", str(out / "torchrun")]
    code, tail, secs = _run(cmd, timeout)
    res: dict[str, Any] = {"exit": code, "seconds": round(secs, 1)}
    summary = out / "torchrun" / "summary.json"
    if summary.is_file():
        res["test"] = {h: m.get("top1") for h, m in json.loads(summary.read_text())["final"]["test"].items()}
    if code:
        res["tail"] = tail[-1500:]
    return res


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env.get('name', 'no GPU')} ({env.get('gpus', 0)} GPU), torch {env['torch']}, "
             f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}", "",
             f"precision=auto resolves to **{env.get('precision_auto', '-')}** "
             f"(compute capability {env.get('capability')})", ""]
    t = report.get("cuda_tests")
    if t:
        lines += [f"## CUDA-marked tests: {t.get('tests', '?')} run, {t.get('failures', '?')} failed, "
                  f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped "
                  f"({t['seconds']} s, exit {t['exit']})",
                  *[f"- {f}" for f in t.get("failed", [])], ""]
    if report.get("bench"):
        lines += ["## peerdistill bench (" + " ".join(report["bench_shape"]) + ")", "",
                  "| config | precision | channels_last | images/s | per peer | step ms | host syncs/step "
                  "| GPU peak MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["bench"]:
            if "error" in r:
                lines.append(f"| {r['name']} | failed: {r['error'][:200]} |||||||")
                continue
            syncs = "-" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:.1f}"
            gpu = "-" if r["gpu_peak_mb"] is None else f"{r['gpu_peak_mb']:.0f}"
            lines.append(f"| {r['name']} | {r['precision']} | {r['channels_last']} | {r['images_per_s']:.0f} | "
                         f"{r['images_per_s_per_peer']:.0f} | {r['step_ms']:.1f} | {syncs} | {gpu} |")
        lines.append("")
    r = report.get("resume")
    if r:
        verdict = "error: " + r["error"] if "error" in r else ("**exact**" if r["exact"] else
                                                               f"**differs**: {r['tensors_differing']}")
        lines += [f"## Kill-and-resume under deterministic=true: {verdict}", "", f"`{r['config']}`", ""]
    if report.get("torchrun"):
        lines += [f"## torchrun, 2 processes: {json.dumps(report['torchrun'])[:600]}", ""]
    lines.append(f"Total {report.get('seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))


def child(exit_after: int, argv: list[str]) -> int:
    """``peerdistill`` with a hard exit right after epoch ``exit_after`` is checkpointed (0: none)."""
    from peerdistill.cli import main
    from peerdistill.report.logger import RunLogger

    if exit_after:
        real = RunLogger.epoch

        def epoch_then_die(self: RunLogger, record: dict[str, Any]) -> None:
            real(self, record)
            if record["epoch"] == exit_after:
                os._exit(9)  # like a SIGKILL after the checkpoint: no clean-up of any kind

        RunLogger.epoch = epoch_then_die  # type: ignore[method-assign]
    return main(argv)


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # a training process of the resume check: the rest is peerdistill's
        return child(int(sys.argv[2]), sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script itself")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "resume", "torchrun"])
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check: a stage gets what is "
                   "left (capped at its own limit) and is skipped under 30 s")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shape = QUICK_SHAPE if a.quick else SHAPE
    steps, warmup = (3, 1) if a.quick else (a.steps, a.warmup)
    report: dict[str, Any] = {"environment": environment(), "bench_shape": shape, "bench": []}
    write(a.out, report)
    def left(cap: float) -> float:
        return min(cap, a.budget - (time.perf_counter() - t0))

    def benches() -> None:
        for n in BENCHES:
            if left(60) < 30:
                report["bench"].append({"name": n, "error": "skipped: out of time budget"})
                continue
            report["bench"].append(bench(n, shape, steps, warmup, a.device, left(90)))
            write(a.out, report)

    stages = [("tests", lambda: report.update(cuda_tests=cuda_tests(a.out, left(210)))),
              ("bench", benches),
              ("resume", lambda: report.update(resume=resume_check(a.out, a.device, a.quick, left(60)))),
              ("torchrun", lambda: report.update(torchrun=torchrun_check(a.out, shape, left(120))))]
    for name, stage in stages:
        if name in a.skip:
            continue
        if left(60) < 30:
            report[f"{name}_skipped"] = "out of time budget"
            continue
        print(f"gpu check: {name} ...", file=sys.stderr, flush=True)
        stage()
        report["seconds"] = time.perf_counter() - t0
        write(a.out, report)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
