"""``peerdistill sweep``: study expansion and names, run states, local slots, submitit, killed studies, report.

Most runner tests use a stand-in interpreter (``--python SHIM``): a tiny script that records the command
line and thread environment it was given and writes a run's summary, so the runner's bookkeeping is
tested in milliseconds. One test trains for real: it kills a study with ``kill -9`` mid-way, re-runs it
and compares its table with that of an uninterrupted study.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peerdistill import config as C
from peerdistill.cli import main
from peerdistill.errors import PeerdistillError
from peerdistill.report.study import RunResult, StudyRow, _curve, load_results, make_columns, study_table
from peerdistill.sweep import load_study, plan_slots, run_study, usable_cores
from peerdistill.sweep.launch import Plan, attempts, train_command
from peerdistill.sweep.runner import run_state

TINY = {"data.name": "synthetic", "data.size": 64, "data.test_size": 64, "data.image_size": 16, "model": "resnet8",
        "epochs": 1, "batch_size": 16, "data.val_split": 0, "progress": False, "tensorboard": False,
        "precision": "fp32", "data.eval_batch_size": 64}


def _study(path: Path, **keys: object) -> Path:
    keys.setdefault("config", TINY)
    path.write_text(yaml.safe_dump(keys, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ expansion
def test_grid_names_are_stable_short_and_independent_of_order(tmp_path):
    a = load_study(_study(tmp_path / "a.yaml", grid={"method": ["independent", "dml"], "optim.lr": [0.1, 0.05]},
                          seeds=2))
    assert [r.name for r in a.runs] == [  # seed-major: a full table of one seed comes first
        "method-independent_lr-0.1_s0", "method-independent_lr-0.05_s0", "method-dml_lr-0.1_s0",
        "method-dml_lr-0.05_s0", "method-independent_lr-0.1_s1", "method-independent_lr-0.05_s1",
        "method-dml_lr-0.1_s1", "method-dml_lr-0.05_s1"]
    cfg = {r.name: r.config for r in a.runs}["method-dml_lr-0.05_s1"]
    assert (cfg.method.name, cfg.optim.lr, cfg.seed, cfg.model.name, cfg.epochs) == ("dml", 0.05, 1, "resnet8", 1)
    # the same study written in another key order: the same runs with the same configs
    b = load_study(_study(tmp_path / "b.yaml", seeds=[0, 1], grid={"optim.lr": [0.1, 0.05],
                                                                   "method": ["independent", "dml"]}))
    assert {r.name: r.config.to_dict() for r in a.runs} == {r.name: r.config.to_dict() for r in b.runs}
    assert [r.name for r in load_study(tmp_path / "a.yaml").runs] == [r.name for r in a.runs]


def test_named_rows_combine_with_the_grid(tmp_path):
    study = load_study(_study(tmp_path / "s.yaml", grid={
        "model": "resnet8",
        "variant": {"plain": {}, "t4": {"method.temperature": 4}},   # a named-rows axis inside the grid
    }, rows=[{"name": "dml", "method": "dml"},
             {"mixer": "cutmix", "method": "dml"},                   # unnamed: named by its overrides
             {"name": "one", "method": "one", "peers": 3}]))
    names = sorted(r.name for r in study.runs)
    assert names == ["dml_plain_model-resnet8_s0", "dml_t4_model-resnet8_s0",
                     "method-dml_mixer-cutmix_plain_model-resnet8_s0", "method-dml_mixer-cutmix_t4_model-resnet8_s0",
                     "one_plain_model-resnet8_s0", "one_t4_model-resnet8_s0"]
    cfgs = {r.name: r.config for r in study.runs}
    assert cfgs["method-dml_mixer-cutmix_t4_model-resnet8_s0"].mixer.name == "cutmix"
    # `method=one` is applied before `method.temperature=4`: the name resets the arguments, never after
    # (the resolved config holds one's other arguments at their defaults)
    from peerdistill.methods import METHODS

    assert cfgs["one_t4_model-resnet8_s0"].method.args == {**METHODS.resolve("one", {}), "temperature": 4.0}
    assert cfgs["one_plain_model-resnet8_s0"].peers == 3


def test_long_names_are_cut_with_a_stable_hash(tmp_path):
    long = {f"r{i}": {"name": "x" * 30 + str(i), "optim.lr": 0.01 * (i + 1)} for i in range(2)}
    study = load_study(_study(tmp_path / "s.yaml", rows=list(long.values()), grid={"optim.weight_decay": [1e-4]}))
    names = [r.name for r in study.runs]
    assert all(len(n) <= 80 and n.endswith("_s0") for n in names) and len(set(names)) == 2
    assert names == [r.name for r in load_study(tmp_path / "s.yaml").runs]


@pytest.mark.parametrize("keys, expected", [
    ({"grid": {"method": "dml"}, "seed": [1]}, "unknown study key 'seed' (did you mean: seeds"),
    ({"grid": {"method": "dml"}, "config": {**TINY, "epoch": 2}}, "base config: unknown config key 'epoch'"),
    ({"grid": {"metod": ["dml", "one"]}}, "unknown config key 'metod' in grid (did you mean: method"),
    ({"rows": [{"name": "a", "optim.lrr": 0.1}]}, "run a_s0: unknown config key 'optim.lrr' (did you mean: optim.lr"),
    ({"rows": [{"name": "a", "mixr": "cutmix"}]}, "unknown config key 'mixr' in rows row 'a' (did you mean: mixer"),
    ({"grid": {"method": "dml", "method.temprature": [2]}}, "unknown parameter 'temprature' for method 'dml'"),
    ({"grid": {}}, "empty grid"),
    ({"rows": ["dml", "one"]}, "rows must be a list of override mappings"),
    ({"grid": {"method": []}}, "grid entry 'method' is empty"),
    ({"rows": [{"name": "a", "method": "dml"}, {"name": "b", "method": {"name": "dml", "temperature": 1.0}}]},
     "duplicate runs: a_s0 and b_s0 expand to the same config"),
    ({"rows": [{"name": "a b", "epochs": 1}, {"name": "a-b", "epochs": 2}]}, "two different rows get the run name a-b_s0"),
    ({"grid": {"seed": [0, 1]}}, "grid key 'seed' is set by the runner"),
    ({"grid": {"method": "dml"}, "baseline": {"method": "one"}}, "baseline method='one' is not one of the grid's"),
    ({"grid": {"method": "dml"}, "metrics": ["top1", "acc"]}, "unknown metric 'acc'"),
])
def test_bad_study_files_are_one_line_errors(capsys, tmp_path, keys, expected):
    path = _study(tmp_path / "bad.yaml", **keys)
    code = main(["sweep", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected in err
    assert not (tmp_path / "out").exists()  # nothing started


# ------------------------------------------------------------------------------------------ slots
def test_slot_plan_shares_the_cores():
    assert (plan_slots(8, cores=2).slots, plan_slots(8, cores=2).threads) == (2, 1)
    assert (plan_slots(1, cores=2).slots, plan_slots(1, cores=2).threads) == (1, 2)  # spare cores become threads
    assert (plan_slots(8, cores=2, slots=1).threads, plan_slots(8, cores=2, threads=2).slots) == (2, 1)
    assert (plan_slots(8, cores=4, nproc=2).slots, plan_slots(8, cores=4, nproc=2).threads) == (2, 1)
    with pytest.raises(PeerdistillError, match="2 slots × 2 threads .* exceed the 2 usable cores"):
        plan_slots(8, cores=2, slots=2, threads=2)
    gpu = plan_slots(8, cores=16, nproc=2, gpus=["0", "1", "2", "3"])
    assert (gpu.slots, gpu.threads, gpu.gpus) == (2, 4, ["0,1", "2,3"])
    assert plan_slots(8, cores=16, gpus=["0", "1"], runs_per_gpu=2).gpus == ["0", "0", "1", "1"]


def test_torchrun_command():
    cmd = train_command("py", Path("runs/s/r"), resume=True, threads=3, nproc=2)
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "peerdistill",
                   "train", "--resume", "runs/s/r", "threads=3"]


# ------------------------------------------------------------------------------------------ runner (stand-in)
SHIM = r'''#!{python}
"""Stands in for `python -m peerdistill train`: records what it was given, writes a run's files."""
import json, os, shutil, sys, time
argv = sys.argv[1:]
torchrun = []
if argv[:2] == ["-m", "torch.distributed.run"]:  # torchrun per run: record its options, run the train command
    torchrun, argv = argv[2:argv.index("-m", 2)], argv[argv.index("-m", 2):]
assert argv[:3] == ["-m", "peerdistill", "train"], argv
rest = argv[3:]
d = rest[rest.index("--resume" if "--resume" in rest else "--out") + 1]
start = time.time()
name = os.path.basename(d)
open(os.path.join(d, "shim.pid"), "w").write(str(os.getpid()))
time.sleep(float(os.environ.get("SHIM_SLEEP", "0.4")))
if name == os.environ.get("SHIM_FAIL"):
    print("shim: this run fails on purpose", flush=True)
    sys.exit(3)
if "--resume" not in rest:
    shutil.copy(os.path.join(d, "sweep-config.yaml"), os.path.join(d, "config.yaml"))
seed = int(name.rsplit("_s", 1)[1])
test = {{"peer0": {{"top1": 80.0 + seed, "nll": 0.5, "ece": 2.0}}, "ensemble": {{"top1": 82.0 + seed}}}}
with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump({{"epochs": 1, "final": {{"val": {{}}, "test": test}}, "best": {{}}}}, f)
with open(os.environ["SHIM_LOG"], "a") as f:
    f.write(json.dumps({{"run": name, "argv": rest, "omp": os.environ.get("OMP_NUM_THREADS"), "torchrun": torchrun,
                        "start": start, "end": time.time()}}) + "\n")
'''


@pytest.fixture
def shim(tmp_path, monkeypatch):
    path = tmp_path / "shim.py"
    path.write_text(SHIM.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("SHIM_LOG", str(tmp_path / "shim.jsonl"))
    return path


def _calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "shim.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _fake_finished(d: Path, cfg: C.Config, partial: bool = False) -> None:
    (d / "checkpoints").mkdir(parents=True)
    C.save(cfg, d / "config.yaml")
    (d / "checkpoints" / "last.pt").write_bytes(b"x")
    if not partial:
        test = {"peer0": {"top1": 80.0 + cfg.seed}, "ensemble": {"top1": 82.0 + cfg.seed}}
        (d / "summary.json").write_text(json.dumps({"epochs": 1, "final": {"test": test}, "best": {}}))


def test_runner_skips_finished_resumes_partial_and_shares_threads(tmp_path, shim, capsys):
    path = _study(tmp_path / "s.yaml", grid={"method": ["independent", "dml"]}, seeds=2)
    out = tmp_path / "out"
    study = load_study(path, out)
    runs = {r.name: r for r in study.runs}
    _fake_finished(out / "method-dml_s0", runs["method-dml_s0"].config)
    _fake_finished(out / "method-independent_s1", runs["method-independent_s1"].config, partial=True)
    assert main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    for name, state in (("method-dml_s0", "finished"), ("method-independent_s1", "partial"),
                        ("method-independent_s0", "new")):
        assert any(line.split()[:2] == [name, state] for line in listing.splitlines()), listing
    assert not _calls(tmp_path)

    code = main(["sweep", str(path), "--out", str(out), "--slots", "2", "--threads", "1", "--python", str(shim),
                 "--no-plots"])
    assert code == 0
    calls = {c["run"]: c for c in _calls(tmp_path)}
    assert set(calls) == {"method-independent_s0", "method-independent_s1", "method-dml_s1"}  # finished: skipped
    assert calls["method-independent_s1"]["argv"][:2] == ["--resume", str(out / "method-independent_s1")]
    assert calls["method-dml_s1"]["argv"][:2] == ["-c", str(out / "method-dml_s1" / "sweep-config.yaml")]
    assert all(c["argv"][-1] == "threads=1" and c["omp"] == "1" for c in calls.values())
    spans = sorted((c["start"], c["end"]) for c in calls.values())
    overlap = [max(0, min(a[1], b[1]) - max(a[0], b[0])) for a in spans for b in spans if a < b]
    assert max(overlap) > 0  # two slots ran at once ...
    at_once = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert at_once <= 2      # ... and never more
    text = capsys.readouterr().out
    assert "| method=dml | 2 | 80.50 ± 0.71 | 82.50 ± 0.71 |" in text  # seeds 0, 1 -> 80 and 81
    record = json.loads((out / "study.json").read_text())
    assert [r["state"] for r in record["runs"]] == ["finished"] * 4 and record["total_wall_s"] > 0
    assert all(r["wall_s"] > 0.3 for r in record["runs"] if r["name"] != "method-dml_s0")

    # one thread-hungry slot: every process is told k=2, by argument and by environment
    assert main(["sweep", str(path), "--out", str(tmp_path / "two"), "--slots", "1", "--python", str(shim),
                 "--no-plots"]) == 0
    k = usable_cores()
    assert {(c["argv"][-1], c["omp"]) for c in _calls(tmp_path)[3:]} == {(f"threads={k}", str(k))}
    assert main(["sweep", str(path), "--out", str(out), "--python", str(shim), "--no-plots"]) == 0  # runs nothing
    assert len(_calls(tmp_path)) == 7


def test_failed_run_is_reported_and_others_go_on(tmp_path, shim, capsys, monkeypatch):
    path = _study(tmp_path / "s.yaml", grid={"method": ["independent", "dml"]})
    monkeypatch.setenv("SHIM_FAIL", "method-independent_s0")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--python", str(shim), "--no-plots"]) == 1
    text = capsys.readouterr().out
    assert "FAILED  method-independent_s0 (exit 3)" in text and "| shim: this run fails on purpose" in text
    assert [c["run"] for c in _calls(tmp_path)] == ["method-dml_s0"]
    assert "Unfinished (1): method-independent_s0" in text
    assert (tmp_path / "out" / "method-independent_s0" / "train.log").read_text().count("fails on purpose") == 1


def test_only_runs_the_selected_rows_and_reports_the_rest_unfinished(tmp_path, shim, capsys):
    path = _study(tmp_path / "s.yaml", grid={"method": ["independent", "dml", "one"]}, seeds=2)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--only", "*dml,method-one_s1", "--dry-run"]) == 0
    listing = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert listing["method-dml_s0"] == "new" and listing["method-independent_s0"] == "skipped"
    assert listing["method-one_s1"] == "new" and listing["method-one_s0"] == "skipped"
    assert main(["sweep", str(path), "--out", str(out), "--only", "*dml,method-one_s1", "--python", str(shim),
                 "--no-plots"]) == 1  # the study is not complete
    assert sorted(c["run"] for c in _calls(tmp_path)) == ["method-dml_s0", "method-dml_s1", "method-one_s1"]
    assert "| method=dml | 2 | 80.50 ± 0.71 |" in capsys.readouterr().out
    assert main(["sweep", str(path), "--out", str(out), "--only", "pcl"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_sigterm_stops_the_runs_and_leaves_none_behind(tmp_path, shim, monkeypatch):
    path = _study(tmp_path / "s.yaml", grid={"method": ["independent", "dml"]})
    out = tmp_path / "out"
    monkeypatch.setenv("SHIM_SLEEP", "60")
    proc = subprocess.Popen([sys.executable, "-m", "peerdistill", "sweep", str(path), "--out", str(out),
                             "--slots", "2", "--threads", "1", "--python", str(shim), "--no-plots"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = [out / name / "shim.pid" for name in ("method-independent_s0", "method-dml_s0")]
    deadline = time.time() + 120
    while not all(p.is_file() and p.read_text() for p in pids):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "slow start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # e.g. Slurm ending the allocation the sweep runs in
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "interrupted: stopping the runs" in text, text
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)
        rec = attempts(p.parent)[-1]
        assert rec["returncode"] not in (None, 0) and rec["wall_s"] < 60


def test_config_changed_under_a_finished_run_is_an_error(tmp_path, capsys):
    path = _study(tmp_path / "s.yaml", grid={"method": "dml"})
    study = load_study(path, tmp_path / "out")
    other = study.runs[0].config
    other.epochs = 7
    _fake_finished(tmp_path / "out" / study.runs[0].name, other)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "holds a run of a different config than the study's method-dml_s0 (epochs: 7 -> 1;" in \
        capsys.readouterr().err


def test_submitit_local_executor(tmp_path, shim, capsys):
    pytest.importorskip("submitit")
    path = _study(tmp_path / "s.yaml", grid={"method": ["independent", "dml"]}, slurm={"time": "0:05:00"})
    out = tmp_path / "out"
    code = main(["sweep", str(path), "--out", str(out), "--launcher", "submitit", "--cluster", "local",
                 "--python", str(shim), "--threads", "1", "--no-plots"])
    assert code == 0, capsys.readouterr()
    assert sorted(c["run"] for c in _calls(tmp_path)) == ["method-dml_s0", "method-independent_s0"]
    assert {c["omp"] for c in _calls(tmp_path)} == {"1"}
    recs = attempts(out / "method-dml_s0")
    assert [(r["launcher"], r["returncode"]) for r in recs] == [("submitit", 0)]
    assert any((out / "submitit").iterdir())  # submitit's own job folders and logs


def test_submitit_jobs_run_torchrun_per_run(tmp_path, shim, capsys):
    """nproc_per_node > 1: each job's command is torchrun with that many processes, threads split between them."""
    pytest.importorskip("submitit")
    path = _study(tmp_path / "s.yaml", grid={"method": ["independent", "dml"]}, nproc_per_node=2,
                  slurm={"time": "5", "cpus": 4})
    out = tmp_path / "out"
    code = main(["sweep", str(path), "--out", str(out), "--launcher", "submitit", "--cluster", "local",
                 "--python", str(shim), "--no-plots"])
    assert code == 0, capsys.readouterr()
    calls = _calls(tmp_path)
    assert sorted(c["run"] for c in calls) == ["method-dml_s0", "method-independent_s0"]
    assert all(c["torchrun"] == ["--standalone", "--nproc_per_node=2"] for c in calls), calls
    assert all("threads=2" in c["argv"] for c in calls)  # cpus 4 / 2 processes
    assert [r["launcher"] for r in attempts(out / "method-dml_s0")] == ["submitit"]


def test_a_row_may_name_its_own_preset(tmp_path):
    (tmp_path / "a.yaml").write_text("method: {name: dml, temperature: 2.0}\nepochs: 3\n")
    (tmp_path / "b.yaml").write_text("method: {name: kdcl}\nepochs: 5\n")
    path = _study(tmp_path / "s.yaml", config={**TINY, "data.size": 64},
                  rows=[{"name": "a", "preset": "a.yaml"}, {"name": "b", "preset": "b.yaml", "epochs": 1},
                        {"name": "plain"}])
    runs = {r.row.id: r.config for r in load_study(path).runs}
    assert (runs["a"].method.name, runs["a"].method.args["temperature"], runs["a"].epochs) == ("dml", 2.0, 1)
    assert (runs["b"].method.name, runs["b"].epochs) == ("kdcl", 1)  # the study's config, then the row's keys
    assert runs["plain"].method.name == C.Config().method.name and runs["plain"].epochs == 1
    _study(path, config=TINY, rows=[{"name": "x", "preset": "missing.yaml"}])
    with pytest.raises(PeerdistillError, match="missing.yaml not found"):
        load_study(path)


def test_submitit_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    path = _study(tmp_path / "s.yaml", grid={"method": "dml"})
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--launcher", "submitit"]) == 2
    assert "pip install 'peerdistill[sweep]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ killed study
def _table(out: Path) -> str:
    return "\n".join(line for line in (out / "study.md").read_text().splitlines() if line.startswith("|"))


@pytest.mark.slow
def test_killed_study_resumes_to_the_same_table(tmp_path):
    """kill -9 the study (and its runs) once one run finished and one is mid-way; re-running it gives the
    table of a study that was never interrupted (fp32 on CPU with one thread: resume is exact)."""
    path = _study(tmp_path / "s.yaml", config={**TINY, "epochs": 3}, grid={"method": "dml"}, seeds=2)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    first, second = killed / "method-dml_s0", killed / "method-dml_s1"
    proc = subprocess.Popen([sys.executable, "-m", "peerdistill", "sweep", str(path), "--out", str(killed),
                             "--slots", "1", "--threads", "1", "--no-plots"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_state(first) == "finished" and (second / "checkpoints" / "last.pt").is_file()):
        assert proc.poll() is None and time.time() < deadline, "the study ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while run_state(second) == "running":  # the killed training process (not our child) is still exiting
        assert time.time() < deadline
        time.sleep(0.02)
    assert run_state(second) == "partial"

    log = io.StringIO()
    assert run_study(load_study(path, killed), Plan(2, 1), status_every=1e9, stream=log, plots=False), log.getvalue()
    modes = [a["mode"] for a in attempts(second)]
    assert modes == ["new", "resume"] and attempts(second)[0]["interrupted"]
    # the reference: the same study never interrupted (the first run finished before the kill: reused)
    shutil.copytree(first, ref / first.name)
    assert run_study(load_study(path, ref), Plan(2, 1), status_every=1e9, stream=log, plots=False), log.getvalue()
    assert [a["mode"] for a in attempts(ref / second.name)] == ["new"]
    assert _table(killed) == _table(ref) and " ± " in _table(ref)
    got, want = (json.loads((d / "method-dml_s1" / "summary.json").read_text())["final"] for d in (killed, ref))
    assert got == want
    assert C.load(second / "config.yaml").threads == 1


# ------------------------------------------------------------------------------------------ report
def _run_dir(d: Path, seed: int, top1: float, nll: float, history: list[dict] | None = None,
             extra: dict | None = None) -> Path:
    d.mkdir(parents=True)
    test = {"peer0": {"top1": top1, "nll": nll, "ece": 1.0}, "peer1": {"top1": top1 - 2, "nll": nll, "ece": 3.0},
            "ensemble": {"top1": top1 + 1, "nll": nll - 0.1, "ece": 2.0}, "peers_mean": {"top1": top1 - 1}}
    best = {"peer0": {"epoch": 1, "test": {"top1": top1 - 5}}}
    (d / "summary.json").write_text(json.dumps({"epochs": 2, "final": {"test": test}, "best": best}))
    lines = history or [{"epoch": 1}, {"epoch": 2, "test": test}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if extra is not None:
        (d / "eval.json").write_text(json.dumps(extra))
    return d


def test_study_table_mean_std_and_paired_delta(tmp_path):
    base = StudyRow("ind", "method=independent", {0: _run_dir(tmp_path / "i0", 0, 78.0, 0.60),
                                                  1: _run_dir(tmp_path / "i1", 1, 79.0, 0.70)}, "ind")
    dml = StudyRow("dml", "method=dml", {0: _run_dir(tmp_path / "d0", 0, 80.0, 0.50, extra={"r": {"top1": 40}}),
                                         1: _run_dir(tmp_path / "d1", 1, 82.0, 0.40, extra={"r": {"top1": 44}}),
                                         2: tmp_path / "unfinished"}, "ind")
    rows = [base, dml]
    results = load_results(rows, ["eval.json"])
    cols = make_columns(["peer0", "peers"], ["top1", "nll"], [{"name": "robust", "file": "eval.json", "key": "r.top1"}])
    table = study_table(rows, results, cols).splitlines()
    assert table[0] == ("| row | seeds | peer0 top1 | peer0 nll | peers top1 | peers nll | robust | Δ peer0 top1 "
                        "| Δ peers top1 |")
    # by hand: mean(80, 82) = 81, sample std = sqrt(2) = 1.41; paired Δ = [2, 3] -> 2.50 ± 0.71;
    # peers = mean(peer0, peer1) = top1 - 1; nll std of (0.5, 0.4) = 0.0707
    assert table[2] == "| method=independent | 2 | 78.50 ± 0.71 | 0.650 ± 0.071 | 77.50 ± 0.71 | 0.650 ± 0.071 | – | baseline | baseline |"
    assert table[3] == "| method=dml | 2/3 | 81.00 ± 1.41 | 0.450 ± 0.071 | 80.00 ± 1.41 | 0.450 ± 0.071 | 42.00 ± 2.83 | +2.50 ± 0.71 | +2.50 ± 0.71 |"
    best = study_table(rows, results, make_columns(["peer0"], ["top1"]), which="best").splitlines()
    assert best[3].startswith("| method=dml | 2/3 | 76.00 ± 1.41 |")
    # unpaired (different seeds): Δ ± sqrt(s_row² + s_base²)
    one = StudyRow("one", "method=one", {5: _run_dir(tmp_path / "o5", 5, 90.0, 0.3)}, "ind")
    cells = study_table([base, one], load_results([base, one]), make_columns(["peer0"], ["top1"])).splitlines()[3]
    assert cells.endswith(f"| +{90 - 78.5:.2f} ± {math.sqrt(0.5):.2f} |")


def test_curves_average_seeds_over_evaluated_epochs(tmp_path):
    hist = [[{"epoch": 1}, {"epoch": 2, "test": {"peer0": {"top1": 50.0}}}],
            [{"epoch": 1, "test": {"peer0": {"top1": 30.0}}}, {"epoch": 2, "test": {"peer0": {"top1": 60.0}}}]]
    runs = [RunResult(i, tmp_path, {}, h) for i, h in enumerate(hist)]
    xs, means, stds = _curve(runs, "peer0")
    assert xs == [1.0, 2.0] and means == [30.0, 55.0]
    assert stds[0] == 0.0 and stds[1] == pytest.approx(math.sqrt(50.0))


def test_report_only_regenerates_the_document(tmp_path, capsys):
    path = _study(tmp_path / "s.yaml", grid={"method": ["independent", "dml"]}, seeds=2, heads=["peer0", "ensemble"],
                  metrics=["top1", "ece"], baseline={"method": "independent"},
                  columns=[{"name": "robust", "file": "eval.json", "key": "r.top1"}])
    out = tmp_path / "out"
    study = load_study(path, out)
    for i, run in enumerate(study.runs):
        _run_dir(out / run.name, run.seed, 70.0 + i, 0.5, extra={"r": {"top1": i}})
        C.save(run.config, out / run.name / "config.yaml")
    assert main(["sweep", str(path), "--out", str(out), "--report-only"]) == 0
    text = (out / "study.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "| row | seeds | peer0 top1 | peer0 ece | ensemble top1 | ensemble ece | robust | Δ peer0 top1 |" in text
    assert "Δ: difference to the baseline row (method=independent)" in text
    assert (out / "plots" / "bars.png").stat().st_size > 0 and (out / "plots" / "curves.png").stat().st_size > 0
    assert json.loads((out / "study.json").read_text())["runs"][0]["state"] == "finished"


def test_example_study_expands():
    study = load_study(Path(__file__).parents[1] / "studies" / "example.yaml")
    assert len(study.runs) == 8 and study.baseline == {"method": "method-independent"}
    assert {r.name for r in study.runs} >= {"plain_method-independent_s0", "cutmix_method-dml_s1"}


@pytest.mark.parametrize("text, minutes", [(90, 90), ("1:30:00", 90), ("30:30", 31), ("2-12", 3600),
                                           ("2-12:30", 3630), ("1-00:00:00", 1440)])
def test_slurm_time_forms(text, minutes):
    from peerdistill.sweep.slurm import _minutes

    assert _minutes(text) == minutes


def test_bad_slurm_time_is_one_line():
    from peerdistill.sweep.slurm import _minutes

    with pytest.raises(PeerdistillError, match="slurm time '1h'"):
        _minutes("1h")


def test_extra_columns_print_mean_and_std_to_the_same_decimals():
    from peerdistill.report.study import mean_std

    assert mean_std([70.77, 68.0, 73.5]) == "70.76 ± 2.75"  # 4 significant digits of the mean
    assert mean_std([0.0123, 0.0130]) == "0.01265 ± 0.00049"
    assert mean_std([54.0, 60.0, 47.0]) == "53.67 ± 6.51"
    assert mean_std([85.1, 85.2], "top1") == "85.15 ± 0.07" and mean_std([], "top1") == "–"
