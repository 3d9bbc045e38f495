"""Run a study: skip finished runs, resume interrupted ones, start the rest; progress, study.json, report.

A run folder is *finished* when its summary.json holds final test metrics, *partial* when it has a
checkpoint but no such summary (``train --resume``), *new* otherwise, and *running* while a live training
process holds its lock (started by another sweep of the same study).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from .. import config as C
from ..errors import PeerdistillError
from ..fileio import write_json
from ..report.study import StudyRow, head_value, write_report
from ..run import ROBUST_PENDING
from ..text import format_duration, plural
from .launch import CONFIG, Job, LocalLauncher, Outcome, Plan, is_busy, run_env, train_command
from .launch import attempts as read_attempts
from .slurm import SubmititLauncher
from .study import RunSpec, Study, config_change, value_text

STATES = ("finished", "partial", "new", "running")


def run_dir(study: Study, run: RunSpec) -> Path:
    return study.out / run.name


def run_state(d: Path) -> str:
    """One of :data:`STATES` for the run folder ``d``."""
    if is_busy(d):
        return "running"
    try:
        summary = json.loads((d / "summary.json").read_text())
        if isinstance(summary, dict) and (summary.get("final") or {}).get("test"):
            return "partial" if (d / ROBUST_PENDING).exists() else "finished"  # resume runs the evaluation
    except (OSError, ValueError):
        pass
    return "partial" if (d / "checkpoints" / "last.pt").is_file() else "new"


def check_folders(study: Study) -> dict[str, str]:
    """Each run's state; a folder holding a run of another config is a one-line error (before any work)."""
    states = {}
    for run in study.runs:
        d = run_dir(study, run)
        stored = d / "config.yaml"
        states[run.name] = run_state(d)
        if stored.is_file() and states[run.name] in ("finished", "partial"):  # a new one's is rewritten
            try:
                raw = yaml.safe_load(stored.read_text()) or {}
            except (OSError, yaml.YAMLError):
                raw = None
            change = config_change(raw, run.config) if isinstance(raw, dict) else "unreadable config.yaml"
            if change:
                raise PeerdistillError(f"{d} holds a run of a different config than the study's {run.name} "
                                       f"({change}; was the study edited?); move it away or give the study another out:")
    return states


# ------------------------------------------------------------------------------------------ report
def study_rows(study: Study) -> list[StudyRow]:
    """The table rows: labels show only the choices that differ between rows."""
    varying = [axis for axis, choices in study.axes if len(choices) > 1]
    rows = []
    for row in study.rows:
        label = " · ".join(c.label for c in row.choices if c.axis in varying or not varying)
        named = [c for c in row.choices if c.named and c.overrides]
        definitions = [f"**{c.label}**: " + ", ".join(f"{k}={value_text(v)}" for k, v in c.overrides) for c in named]
        base = study.baseline_of(row)
        rows.append(StudyRow(row.id, label, {r.seed: run_dir(study, r) for r in study.row_runs(row)},
                             base.id if base is not None else None, definitions))
    return rows


def common_lines(study: Study) -> list[str]:
    """What every row shares: the preset, the inline keys, the one-valued grid keys, the seeds."""
    fixed = [f"{c.label}" for axis, choices in study.axes if len(choices) == 1 for c in choices]
    inline = [f"{k}={value_text(v)}" for k, v in study.base_config.items()]
    parts = ([f"base `{study.base}`"] if study.base else []) + inline + fixed
    lines = [study.description] if study.description else []
    lines.append(f"Common to all rows: {', '.join(parts) or 'the default config'}; seeds "
                 f"{', '.join(map(str, study.seeds))}.")
    if study.baseline:
        axes = dict(study.axes)
        base = ", ".join(c.label for a, t in study.baseline.items() for c in axes[a] if c.token == t)
        lines.append(f"Δ: difference to the baseline row ({base}) with the same other choices; ± is the std of one "
                     f"seed's difference (per-seed differences where both rows have the same seeds).")
    return lines


def report(study: Study, timing: str = "", plots: bool = True) -> str:
    """Write and return the study's markdown (``<out>/study.md``) and plots."""
    study.out.mkdir(parents=True, exist_ok=True)
    return write_report(study.out, f"Study {study.name}", study_rows(study), study.heads, study.metrics,
                        study.which, study.columns, common_lines(study), timing, plots)


# ------------------------------------------------------------------------------------------ running
@dataclass
class Progress:
    """Counts and durations of this session; prints one line per event and a periodic status line."""

    total: int
    finished: int
    capacity: int
    stream: TextIO | None = None  # None: sys.stdout at the time of printing
    durations: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[sweep {time.strftime('%H:%M:%S')}] {text}", file=self.stream or sys.stdout, flush=True)

    def eta(self, left: int, elapsed: list[float]) -> str:
        if not self.durations:
            return "ETA –"
        mean = statistics.mean(self.durations)
        work = left * mean + sum(max(mean - e, 0.0) for e in elapsed)
        return f"ETA {format_duration(work / max(min(self.capacity, left + len(elapsed)), 1), fine=True)}"

    def status(self, left: int, elapsed: list[float]) -> None:
        self.say(f"status: {self.finished}/{self.total} finished · {len(elapsed)} running · {left} left"
                 + (f" · {len(self.failed)} failed" if self.failed else "") + f" · {self.eta(left, elapsed)}")


def run_study(study: Study, plan: Plan, launcher: str = "local", slurm: dict[str, Any] | None = None,
              python: str = sys.executable, status_every: float = 60.0, stream: TextIO | None = None,
              plots: bool = True, only: set[str] | None = None) -> bool:
    """Run every unfinished run of ``study`` (of the runs named in ``only``, if given); returns whether all
    runs of the study are finished.

    Runs that fail are reported with the tail of their train.log and do not stop the others. Ctrl-C (or
    SIGTERM) stops the runs, which keep their last checkpoints: running the study again resumes them.
    """
    states = check_folders(study)
    runner = make_launcher(launcher, plan, slurm or {}, study.out)  # a missing extra fails before any write
    study.out.mkdir(parents=True, exist_ok=True)
    lock = _lock_study(study)
    if study.path.resolve() != (study.out / "study.yaml").resolve():  # the study beside its runs
        shutil.copyfile(study.path, study.out / "study.yaml")
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    restore = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    try:
        session = _Session(study, runner, states, Progress(len(study.runs), 0, runner.capacity, stream),
                           {"start": time.time(), "launcher": launcher, "plan": plan.describe(), "started": 0,
                            "failed": 0})
        session.open(_jobs(study, states, plan, launcher, python, only))
        session.loop(status_every)
        return session.close(plots)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, restore)
        os.close(lock)


def _lock_study(study: Study) -> int:
    fd = os.open(study.out / ".sweep-study-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise PeerdistillError(f"another sweep of {study.out} is running; wait for it or stop it first") from None
    return fd


def _jobs(study: Study, states: dict[str, str], plan: Plan, launcher: str, python: str,
          only: set[str] | None = None) -> list[Job]:
    jobs = []
    for run in study.runs:
        if states[run.name] not in ("new", "partial") or (only is not None and run.name not in only):
            continue
        d = run_dir(study, run)
        d.mkdir(parents=True, exist_ok=True)
        C.save(run.config, d / CONFIG)
        resume = states[run.name] == "partial"
        jobs.append(Job(run.name, d, train_command(python, d, resume, plan.threads, plan.nproc),
                        run_env(plan.threads), "resume" if resume else "new", launcher))
    return jobs


@dataclass
class _Session:
    """One invocation of the runner: what waits, what runs, and the record it keeps in study.json."""

    study: Study
    runner: LocalLauncher | SubmititLauncher
    states: dict[str, str]
    prog: Progress
    record: dict[str, Any]
    pending: list[Job] = field(default_factory=list)

    def open(self, jobs: list[Job]) -> None:
        self.pending = jobs
        self.prog.finished = sum(s == "finished" for s in self.states.values())
        counts = ", ".join(f"{sum(s == k for s in self.states.values())} {k}" for k in STATES
                           if k in self.states.values())
        self.prog.say(f"study {self.study.name}: {plural(len(self.study.runs), 'run')} ({counts}) in {self.study.out}; "
                      f"{self.record['launcher']}: {self.record['plan']}")
        for name in (n for n, s in self.states.items() if s == "running"):
            self.prog.say(f"skip    {name}: running in another process")

    def loop(self, status_every: float) -> None:
        last = time.time()
        try:
            while self.pending or self.runner.running_count():
                self.start_free()
                for name, outcome in self.runner.poll().items():
                    _ended(self.study, self.prog, name, outcome, self.record)
                if time.time() - last >= status_every:
                    self.prog.status(len(self.pending), list(self.runner.elapsed().values()))
                    last = time.time()
                time.sleep(0.2)
        except BaseException:  # Ctrl-C, SIGTERM, or a bug here: never leave runs behind unsupervised
            self.prog.say("interrupted: stopping the runs (each keeps its last checkpoint; run the study again "
                          "to resume)")
            self.runner.stop()
            _write_json(self.study, self.record)
            raise

    def start_free(self) -> None:
        free = self.runner.capacity - self.runner.running_count()
        if not self.pending or free <= 0:
            return
        batch, self.pending = self.pending[:free], self.pending[free:]
        busy = {job.name for job in self.runner.start(batch)}
        for job in batch:
            if job.name in busy:
                self.prog.say(f"skip    {job.name}: running in another process")
            else:
                self.record["started"] += 1
                self.prog.say(f"start   {job.name} ({job.mode})")

    def close(self, plots: bool = True) -> bool:
        """Write study.json and study.md, print the table; whether every run of the study has finished."""
        study, prog = self.study, self.prog
        finished = sum(run_state(run_dir(study, r)) == "finished" for r in study.runs)
        print(report(study, _write_json(study, self.record), plots), file=prog.stream)
        failed = f"; failed: {', '.join(prog.failed)}" if prog.failed else ""
        prog.say(f"{finished}/{plural(len(study.runs), 'run')} finished{failed} · {study.out / 'study.md'}")
        return finished == len(study.runs)


def make_launcher(kind: str, plan: Plan, slurm: dict[str, Any], out: Path) -> LocalLauncher | SubmititLauncher:
    if kind in ("local", "torchrun"):
        return LocalLauncher(plan)
    if kind == "submitit":
        return SubmititLauncher(plan, slurm, out / "submitit")
    raise PeerdistillError(f"unknown launcher {kind!r} (local, torchrun, submitit)")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ended(study: Study, prog: Progress, name: str, outcome: Outcome, session: dict[str, Any]) -> None:
    d = study.out / name
    if outcome.returncode == 0 and run_state(d) == "finished":
        prog.finished += 1
        prog.durations.append(outcome.wall_s)
        prog.say(f"done    {name} in {format_duration(outcome.wall_s, fine=True)}{_headline(study, d)} "
                 f"({prog.finished}/{prog.total})")
    else:
        prog.failed.append(name)
        session["failed"] += 1
        tail = "\n".join(f"    | {line}" for line in outcome.tail.splitlines())
        prog.say(f"FAILED  {name} (exit {outcome.returncode}) after {format_duration(outcome.wall_s, fine=True)}; "
                 f"last lines of {d / 'train.log'}:\n{tail}")
    _write_json(study, session)


def _headline(study: Study, d: Path) -> str:
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        return ""
    head = (study.heads or ["ensemble", "peer0"])
    for h in head:
        v = head_value(summary, h, study.metrics[0], study.which)
        if v is not None:
            return f": {h} {study.metrics[0]} {v:.2f}"
    return ""


# ------------------------------------------------------------------------------------------ study.json
def _write_json(study: Study, session: dict[str, Any] | None = None) -> str:
    """Write ``<out>/study.json`` (each run's state and wall time, each session's); returns a summary line."""
    path = study.out / "study.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    sessions = [s for s in old.get("sessions", []) if session is None or s.get("start") != session["start"]]
    if session is not None:
        sessions.append(session | {"wall_s": time.time() - session["start"]})
    runs = []
    for run in study.runs:
        d = run_dir(study, run)
        recs = read_attempts(d)
        walls = [r["wall_s"] for r in recs if isinstance(r.get("wall_s"), (int, float))]
        runs.append({"name": run.name, "row": run.row.id, "seed": run.seed, "state": run_state(d),
                     "wall_s": sum(walls) if walls else None, "attempts": len(recs),
                     "overrides": {k: value_text(v) for k, v in run.row.overrides.items()}})
    total = sum(s["wall_s"] for s in sessions)
    run_total = sum(r["wall_s"] or 0.0 for r in runs)
    write_json(path, {"study": study.name, "file": str(study.path), "out": str(study.out), "runs": runs,
                      "sessions": sessions, "total_wall_s": total, "runs_wall_s": run_total})
    return (f"Wall time: {format_duration(total, fine=True)} for the study ({len(sessions)} session"
            f"{'s' * (len(sessions) != 1)}), {format_duration(run_total, fine=True)} summed over runs (per run: study.json).")


def report_only(study: Study, stream: TextIO | None = None, plots: bool = True) -> str:
    """Regenerate study.md, the plots and study.json from the run folders, running nothing."""
    check_folders(study)
    study.out.mkdir(parents=True, exist_ok=True)
    text = report(study, _write_json(study), plots)
    print(text, file=stream)
    return text


def dry_run(study: Study, plan: Plan, launcher: str, stream: TextIO | None = None,
            only: set[str] | None = None) -> dict[str, str]:
    """List the expanded runs with their state (``skipped``: not selected by ``only``)."""
    states = check_folders(study)
    print(f"study {study.name}: {plural(len(study.runs), 'run')} in {study.out}; {launcher}: {plan.describe()}",
          file=stream)
    width = max(len(r.name) for r in study.runs)
    for run in study.runs:
        label = ", ".join(f"{k}={value_text(v)}" for k, v in run.row.overrides.items())
        state = states[run.name] if only is None or run.name in only else "skipped"
        print(f"  {run.name:<{width}}  {state:<8}  seed={run.seed}  {label}", file=stream)
    shown = [s if only is None or n in only else "skipped" for n, s in states.items()]
    counts = ", ".join(f"{shown.count(k)} {k}" for k in (*STATES, "skipped") if k in shown)
    print(f"{counts}; nothing was run (--dry-run)", file=stream)
    return states
