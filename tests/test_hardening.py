"""No finished result is ever lost, every bad input is one clear line, and what a user reads is right.

One test per defect of the hardening issue (each fails on the code before the fix), the fuzz test over
every registered parameter and config key, and kill -9 tests of the data-loss class.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import json
import os
import random
import signal
import subprocess
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerdistill import config as C
from peerdistill.cli import main
from peerdistill.data import DATASETS
from peerdistill.data.mix import MIXERS
from peerdistill import run as run_mod
from peerdistill.engine.checkpoint import load_checkpoint
from peerdistill.errors import PeerdistillError
from peerdistill.methods import ADDONS, METHODS
from peerdistill.params import Interval

from .conftest import TINY, one_line_error, tiny_cfg, tree_digest

ROOT = Path(__file__).resolve().parents[1]


def digest(run: Path) -> dict[str, str]:
    """Hashes of a run's results: summary, checkpoints, config."""
    files = [run / "summary.json", run / "config.yaml", *sorted((run / "checkpoints").glob("*.pt"))]
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("h") / "done"
    run_mod.train(tiny_cfg("epochs=2"), out, echo=False)
    return out


# ------------------------------------------------------------------ data loss and silent surprises
def test_a_new_run_over_a_dead_first_attempt_keeps_none_of_its_records(tmp_path):
    first, out = tmp_path / "first", tmp_path / "retry"
    run_mod.train(tiny_cfg("epochs=1", "log_every=1"), first, echo=False)
    out.mkdir()
    for name in ("metrics.jsonl", "steps.jsonl"):  # an attempt killed before its first checkpoint
        shutil.copy(first / name, out / name)
    run_mod.train(tiny_cfg("epochs=1", "log_every=1"), out, echo=False)
    for name in ("metrics.jsonl", "steps.jsonl"):
        assert (out / name).read_text().count("\n") == (first / name).read_text().count("\n") > 0, name


def test_resume_of_a_finished_run_trains_and_rewrites_nothing(finished, capsys):
    before = digest(finished)
    assert main(["train", "--resume", str(finished)]) == 0
    err = capsys.readouterr().err
    assert "already finished" in err and "epoch 1/" not in err
    assert digest(finished) == before
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["final"]["test"]
    assert main(["table", str(finished)]) == 0


def test_resume_refuses_changes_that_alter_results_and_accepts_harmless_ones(finished, capsys):
    before = digest(finished)
    err = one_line_error(capsys, "train", "--resume", str(finished), "epochs=3")
    assert "epochs would change (2 -> 3)" in err and "threads" in err
    assert "optim.lr would change" in one_line_error(capsys, "train", "--resume", str(finished), "optim.lr=0.5")
    assert main(["train", "--resume", str(finished), "threads=1", "progress=false"]) == 0  # cannot change results
    assert digest(finished) == before


def test_resume_into_another_out_is_refused(finished, capsys, tmp_path):
    err = one_line_error(capsys, "train", "--resume", str(finished), "--out", str(tmp_path / "elsewhere"))
    assert "--out cannot move it" in err and not (tmp_path / "elsewhere").exists()


BAD_STARTS = ["batch_size=-1", "batch_size=0", "optim.lr=-0.1", "mixer=mixup mixer.alpha=-1",
              "method.temperature=-1", "method.temperature=0", "mixer=cutmix mixer.prob=2",
              "optim.betas=[0.9]", "data.holdout_classes=[7]", "model=resnet8 model.depth=3"]


@pytest.mark.parametrize("bad", BAD_STARTS)
def test_bad_input_is_one_line_and_creates_no_run_directory(capsys, tmp_path, bad):
    out = tmp_path / "run"
    one_line_error(capsys, "train", "--out", str(out), *TINY, *bad.split())
    assert not out.exists()


def test_truncated_checkpoint_names_the_cause_and_the_other_checkpoint(capsys, tmp_path):
    out = tmp_path / "r"
    run_mod.train(tiny_cfg("epochs=1"), out, echo=False)
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    err = one_line_error(capsys, "eval", str(out))
    assert "truncated or corrupt" in err and "--checkpoint best.pt" in err
    assert main(["eval", str(out), "--checkpoint", "best.pt", "--json"]) == 0


def test_overrides_are_accepted_after_the_options(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), *TINY, "epochs=1", "threads=1"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["threads"] == 1


def test_without_a_terminal_progress_lines_are_printed(capsys, tmp_path):
    cfg = tiny_cfg("epochs=1", "progress=true", "progress_every=0.000001", "data.size=160")
    run_mod.train(cfg, tmp_path / "r", echo=True)
    err = capsys.readouterr().err
    assert "epoch 1/1  step 1/" in err and "img/s" in err


def test_what_a_user_reads_names_things_right(capsys, tmp_path):
    run_mod.train(tiny_cfg("epochs=1"), tmp_path / "r", echo=True)
    err = capsys.readouterr().err
    assert "train loss" in err and "sum of all terms, 2 peers" in err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "test top-1 at best val (epoch)" in run_mod.format_table(summary["final"]["test"], summary["best"])
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    line = next(ln for ln in listing.splitlines() if ln.strip().startswith("independent"))
    assert line.rstrip().endswith("is plain supervised training.")  # the whole first paragraph


def test_bench_says_what_data_size_its_projection_assumes(capsys):
    assert main(["bench", *TINY, "--steps", "2", "--warmup", "1", "--epoch-size", "50000"]) == 0
    out = capsys.readouterr().out
    assert "50000 training images per epoch" in out
    assert main(["bench", *TINY, "data.val_split=0", "--steps", "2", "--warmup", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["epoch_size"] == 96 and report["method_state_mb"] == 0.0


def test_adamw_and_gradient_clipping_are_configurable():
    from peerdistill.engine.trainer import Trainer

    tr = Trainer(tiny_cfg("optim.name=adamw", "optim.lr=0.001", "optim.betas=[0.8, 0.99]",
                          "optim.grad_clip=1.0"), None)
    assert isinstance(tr.optimizer, torch.optim.AdamW)
    assert tr.optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    terms = tr.train_step(next(iter(tr.train_loader)))
    assert all(torch.isfinite(v) for v in terms.values())


# ------------------------------------------------------------------ faults of the machine
def test_disk_full_during_a_save_is_one_line_naming_file_reason_and_resume(monkeypatch, tmp_path):
    from peerdistill.engine import checkpoint as ck

    out = tmp_path / "r"
    real = ck.torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # epoch 1's last.pt and best.pt are written, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 512")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: SimpleNamespace(free=1024))
    with pytest.raises(PeerdistillError) as e:
        run_mod.train(tiny_cfg("epochs=3"), out, echo=False)
    msg = str(e.value)
    assert "\n" not in msg and "last.pt" in msg and "no space left on device" in msg
    assert f"--resume {out} continues from epoch 1" in msg
    assert load_checkpoint(out)["epoch"] == 1  # the previous checkpoint is intact


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_then_resume_finishes_the_run(tmp_path, capsys):
    """On a 3.5 MB tmpfs (where the machine lets us mount one): one line, and --resume finishes."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "3500k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated test above covers the message")
    try:
        out = mnt / "r"
        args = ["train", "--out", str(out), *TINY, "model=resnet14", "epochs=3", "data.size=64"]
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err.startswith("error: could not write") and "no space left" in err
        epoch = load_checkpoint(out)["epoch"] if (out / "checkpoints" / "last.pt").exists() else 0
        moved = tmp_path / "moved"
        subprocess.run(["cp", "-r", str(out), str(moved)], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    assert main(["train", "--resume", str(moved)]) == 0 or epoch == 0
    if epoch:
        assert json.loads((moved / "summary.json").read_text())["epochs"] == 3


def test_an_unwritable_run_directory_is_refused_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = one_line_error(capsys, "train", "--out", str(blocker / "run"), *TINY)
    assert "cannot write to run directory" in err and "not a directory" in err


# ------------------------------------------------------------------ fuzz: every parameter, every key
def _invalid(hint) -> st.SearchStrategy:
    """Values that violate ``hint`` (type, declared range or choices)."""
    base, meta = (typing.get_args(hint)[0], typing.get_args(hint)[1:]) if typing.get_origin(hint) is typing.Annotated \
        else (hint, ())
    origin = typing.get_origin(base)
    wrong_type = st.sampled_from(["abc", "[1, 2]", "{a: 1}"])
    if origin is typing.Literal:
        return st.text("xyzq", min_size=1, max_size=6).filter(lambda s: s not in typing.get_args(base))
    if origin in (typing.Union, __import__("types").UnionType):
        options = [a for a in typing.get_args(base) if a is not type(None)]
        return _invalid(options[0]) if len(options) == 1 else st.just("{a: 1}")
    if origin is list:
        inner = typing.get_args(base)[0]
        return _invalid(inner).map(lambda v: f"[{v}]") if _has_range(inner) else st.just("{a: 1}")
    if base is bool:
        return st.sampled_from(["maybe", "3", "[true]"])
    if base in (int, float):
        bounds = [m for m in meta if isinstance(m, Interval)]
        outside = []
        for b in bounds:
            if b.gt is not None:
                outside.append(st.floats(b.gt - 100, b.gt).map(lambda v: v if base is float else int(v) - 1))
            if b.ge is not None:
                outside.append(st.floats(b.ge - 100, b.ge - 1e-3).map(lambda v: v if base is float else int(v) - 1))
            if b.lt is not None:
                outside.append(st.floats(b.lt, b.lt + 100).map(lambda v: v if base is float else int(v) + 1))
            if b.le is not None:
                outside.append(st.floats(b.le + 1e-3, b.le + 100).map(lambda v: v if base is float else int(v) + 1))
        if base is int:
            outside.append(st.sampled_from(["1.5", "two"]))
        return st.one_of(*outside, st.sampled_from([".nan", ".inf"]) if base is float else wrong_type, wrong_type)
    return st.sampled_from(["[1, 2]", "{a: 1}"])  # free strings: a list or a mapping is never a string


def _has_range(hint) -> bool:
    return typing.get_origin(hint) is typing.Annotated or hint in (int, float, bool)


def _config_keys(obj=None, prefix: str = "") -> list[tuple[str, object]]:
    obj = obj or C.Config()
    hints = typing.get_type_hints(type(obj), include_extras=True)
    out = []
    for f in fields(obj):
        if f.name in C.COMPONENTS:
            continue
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out += _config_keys(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


NOT_SYNTHETIC = [a for a in TINY if not a.startswith("data.")]  # TINY without the synthetic source's parameters


def _component_params() -> list[tuple[list[str], str, object]]:
    """(overrides selecting the component, its parameter key, the parameter's hint) for every registered one,
    the data sources' parameters (``data.<parameter>``) included."""
    out = []
    for reg, key, base in ((METHODS, "method", ["peers=4"]), (MIXERS, "mixer", []), (ADDONS, "addon", [])):
        for name in reg:
            if name.startswith("_"):
                continue
            for param, hint in reg.hints(name).items():
                out.append(([*base, f"{key}={name}"], f"{key}.{param}", hint))
    from peerdistill.models import MODELS

    for name in MODELS:
        for param, hint in MODELS.hints(name).items():
            if param not in C.ENGINE_ARGS["model"]:
                out.append(([f"model={name}"], f"model.{param}", hint))
    for name in DATASETS:
        for param, hint in DATASETS.hints(name).items():
            if param not in C.ENGINE_ARGS["data"]:
                out.append(([*NOT_SYNTHETIC, f"data.name={name}"], f"data.{param}", hint))
    return out


CASES = [(TINY, key, hint) for key, hint in _config_keys()] + [(TINY + sel if sel[0] != NOT_SYNTHETIC[0] else sel,
                                                                  key, hint) for sel, key, hint in _component_params()]


def test_fuzz_covers_every_registered_component_and_key():
    keys = {k for _, k, _ in CASES}
    assert {"batch_size", "optim.lr", "data.val_split", "precision", "mixer.alpha", "method.temperature",
            "data.image_size", "data.grayscale", "data.size"} <= keys
    covered = {sel[-1] for sel, _, _ in CASES}
    for reg, key in ((METHODS, "method"), (MIXERS, "mixer"), (ADDONS, "addon"), (DATASETS, "data.name")):
        assert {f"{key}={n}" for n in reg if set(reg.hints(n)) - {"root"} and not n.startswith("_")} <= covered


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), data=st.data())
def test_fuzz_invalid_values_are_one_line_and_create_nothing(case, data, capsys, tmp_path_factory):
    select, key, hint = case
    value = data.draw(_invalid(hint), label=key)
    out = tmp_path_factory.mktemp("fuzz") / "run"
    code = main(["train", "--out", str(out), *select, f"{key}={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{key}={value} accepted"
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------ fuzz: every option of every command
def _constrained(hint) -> bool:
    """Whether a hint refuses some text (a range, choices, a number or a flag), i.e. is not a free string."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    if typing.get_origin(base) in (typing.Union, __import__("types").UnionType, list):
        return any(_constrained(a) for a in typing.get_args(base) if a is not type(None))
    return typing.get_origin(hint) is typing.Annotated or typing.get_origin(base) is typing.Literal or \
        base in (int, float, bool)


def _command_options() -> list[tuple[str, str, object]]:
    """(command, option, what is valid) for every option of every command: an annotated type or choices."""
    from peerdistill.cli import build_parser
    from peerdistill.params import Option

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    out = []
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.nargs == 0 or isinstance(action, argparse._SubParsersAction):
                continue
            flag = max(action.option_strings, key=len) if action.option_strings else None  # None: a positional
            if flag is None and action.choices:
                out.append((command, None, typing.Literal[tuple(action.choices)]))
            elif flag is None:
                continue
            elif isinstance(action.type, Option) and _constrained(action.type.hint):
                out.append((command, flag, action.type.hint))
            elif action.choices:
                out.append((command, flag, typing.Literal[tuple(action.choices)]))
    return out


OPTIONS = _command_options()


def test_every_numeric_option_of_every_command_declares_its_range():
    """The cause of `bench --steps 0` crashing: an option typed int or float without a range."""
    from peerdistill.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    loose = [(c, a.option_strings) for c, p in sub.choices.items() for a in p._actions if a.type in (int, float)]
    assert loose == []
    commands = {c for c, _, _ in OPTIONS}
    assert {"eval", "bench", "tstddev", "correlate", "sweep", "table", "list"} <= commands
    assert {("eval", "--eps"), ("eval", "--limit"), ("bench", "--steps"), ("tstddev", "--epochs"),
            ("correlate", "--metric"), ("sweep", "--slots")} <= {(c, f) for c, f, _ in OPTIONS}


@pytest.fixture(scope="module")
def workspace(finished, tmp_path_factory) -> Path:
    """A folder with what every command needs: a finished run, T. stddev results, a study file."""
    ws = tmp_path_factory.mktemp("cmds")
    shutil.copytree(finished, ws / "run")
    (ws / "ts.json").write_text(json.dumps({"teacher": "run", "results": [{"aug": "flip", "t_stddev": 0.1}]}))
    study = {"name": "fz", "config": dict(a.split("=", 1) for a in TINY), "grid": {"method": ["dml"]}}
    (ws / "study.yaml").write_text(yaml.safe_dump(study))
    return ws


POSITIONALS = {"eval": ["run"], "tstddev": ["run"], "correlate": ["ts.json", "run"], "sweep": ["study.yaml"],
               "table": ["run"], "bench": TINY, "list": [], "train": TINY, "pack": ["images", "shards"]}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(OPTIONS), data=st.data())
def test_fuzz_command_options_are_one_line_and_touch_nothing(case, data, capsys, workspace, monkeypatch):
    command, flag, hint = case
    value = data.draw(_invalid(hint), label=f"{command} {flag}")
    monkeypatch.chdir(workspace)  # a command that wrongly wrote runs/ or a result would write it here
    before = tree_digest(workspace)
    code = main([command, *POSITIONALS[command], f"{flag}={value}" if flag else value])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{command} {flag}={value} accepted"
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert tree_digest(workspace) == before


# ------------------------------------------------------------------ kill -9 at random points
def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "peerdistill", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill_after(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _readable(run: Path) -> None:
    json.loads((run / "summary.json").read_text())
    for ckpt in (run / "checkpoints").glob("*.pt"):
        torch.load(ckpt, weights_only=True)


@pytest.mark.slow
def test_kill_9_never_damages_a_finished_run_and_resume_is_exact(finished, tmp_path):
    rng = random.Random(0)
    before = digest(finished)
    budget = [*TINY, "epochs=4", "data.size=512", "precision=fp32", "threads=1"]
    args = [*budget, "--out"]
    reference = tmp_path / "reference"
    run_mod.train(C.load(None, budget), reference, echo=False)
    victim = tmp_path / "victim"
    proc = _cli("train", *args, str(victim))
    readers = [_cli("eval", str(finished)), _cli("table", str(finished), str(victim)),
               _cli("train", "--resume", str(finished))]
    _kill_after(proc, rng.uniform(3, 8))
    for r in readers:
        _kill_after(r, rng.uniform(0.5, 3))
    for _ in range(8):  # resume, killed at random points, until it finishes
        if (victim / "summary.json").exists():
            break
        if not (victim / "checkpoints" / "last.pt").exists():
            proc = _cli("train", *args, str(victim))  # killed before its first checkpoint: start again
        else:
            proc = _cli("train", "--resume", str(victim))
        _kill_after(proc, rng.uniform(3, 8))
    if not (victim / "summary.json").exists():  # finish it; on a loaded machine no attempt may have checkpointed
        resume = (victim / "checkpoints" / "last.pt").exists()
        assert main(["train", "--resume", str(victim)] if resume else ["train", *args, str(victim)]) == 0
    assert digest(finished) == before
    _readable(finished)
    _readable(victim)
    got = json.loads((victim / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    assert got["final"] == want["final"] and got["best"] == want["best"]
