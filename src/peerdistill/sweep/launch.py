"""Where a study's runs execute: local slots sharing the cores, torchrun per run, or Slurm through submitit.

Every run is the same command, ``python -m peerdistill train ... threads=<k>`` (or ``--resume``), started
with ``OMP_NUM_THREADS=<k>``, its output appended to ``<run>/train.log``. Local slots are the only
scheduling done here: ``slots × threads × nproc_per_node`` never exceeds the cores this process may use.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PeerdistillError
from ..fileio import write_json
from ..text import plural

RECORD = "sweep-run.json"  # per run: one entry per attempt (start, wall time, exit status, where)
LOG = "train.log"
LOCK = ".sweep-lock"
CONFIG = "sweep-config.yaml"  # the config the study asked for; `train -c` reads it
LOG_TAIL = 20


@dataclass
class Plan:
    """How many runs at once and with how many threads (and GPUs) each.

    Attributes:
        slots: concurrent runs (local launchers).
        threads: intra-op threads per training process (``threads=`` and ``OMP_NUM_THREADS``).
        nproc: processes per run under torchrun (1 = a plain ``python -m peerdistill train``).
        gpus: per slot, the ``CUDA_VISIBLE_DEVICES`` it owns; empty on CPU.
    """

    slots: int
    threads: int
    nproc: int = 1
    gpus: list[str] = field(default_factory=list)

    def describe(self) -> str:
        per = f"{self.nproc} processes × " if self.nproc > 1 else ""
        dev = f", GPUs {' | '.join(self.gpus)}" if self.gpus else ""
        return f"{plural(self.slots, 'slot')} × {per}{plural(self.threads, 'thread')}{dev}"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: what ``taskset`` or a Slurm allocation grants)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def plan_slots(todo: int, cores: int, slots: int | None = None, threads: int | None = None, nproc: int = 1,
               gpus: list[str] | None = None, runs_per_gpu: int = 1) -> Plan:
    """Choose slots and threads for ``todo`` runs on ``cores`` cores (and ``gpus`` devices, if any).

    Defaults, from the measurement in docs/studies.md: one thread per run and as many runs as cores
    (small CPU models scale better across processes than across intra-op threads); with fewer runs than
    that, the spare cores become threads. On GPUs, each slot owns ``nproc`` devices (shared by
    ``runs_per_gpu`` runs) and the cores are split between the slots.

    Raises:
        PeerdistillError: if the requested slots × threads × nproc oversubscribe the cores.
    """
    if gpus:
        per_run = max(nproc, 1)
        if len(gpus) < per_run:
            raise PeerdistillError(f"a run needs {per_run} GPUs (nproc_per_node) but only {len(gpus)} are visible")
        sets = [",".join(gpus[i:i + per_run]) for i in range(0, len(gpus) - per_run + 1, per_run)]
        sets = [s for s in sets for _ in range(runs_per_gpu)]
        slots = min(slots or len(sets), len(sets))
    n = max(1, min(slots or max(cores // (nproc * (threads or 1)), 1), max(todo, 1)))
    k = threads or max(cores // (n * nproc), 1)
    if n * k * nproc > cores:
        raise PeerdistillError(f"{plural(n, 'slot')} × {plural(nproc * k, 'thread')} "
                               f"({plural(nproc, 'process', 'processes')} × {k}) = {n * k * nproc} "
                               f"exceed the {cores} usable cores; lower --slots or --threads")
    return Plan(n, k, nproc, sets[:n] if gpus else [])


def train_command(python: str, run_dir: Path, resume: bool, threads: int, nproc: int = 1) -> list[str]:
    """The command that trains (or resumes) one run."""
    head = [python, "-m", "peerdistill"] if nproc <= 1 else [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "peerdistill"]
    where = ["--resume", str(run_dir)] if resume else ["-c", str(run_dir / CONFIG), "--out", str(run_dir)]
    return [*head, "train", *where, f"threads={threads}"]


def run_env(threads: int) -> dict[str, str]:
    """Environment of a run: thread pools capped at ``threads`` (OpenMP and MKL read these at start-up)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


@dataclass
class Job:
    """One run to execute: everything a launcher (or a Slurm job, pickled) needs."""

    name: str
    dir: Path
    command: list[str]
    env: dict[str, str]
    mode: str  # "new" | "resume"
    launcher: str


# ------------------------------------------------------------------------------------------ per-run files
def try_lock(run_dir: Path) -> int | None:
    """An exclusive lock on the run folder, or ``None`` if another process holds it.

    The training process inherits the descriptor, so the lock lasts as long as the run does, even if this
    process is killed: a second sweep never trains the same run twice at once.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def is_busy(run_dir: Path) -> bool:
    if not (run_dir / LOCK).exists():
        return False
    fd = try_lock(run_dir)
    if fd is not None:
        os.close(fd)
    return fd is None


def attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The run's recorded attempts; one a killed sweep never closed gets its log's last write as its end."""
    try:
        recs = json.loads((run_dir / RECORD).read_text()).get("attempts", [])
    except (OSError, ValueError):
        return []
    for rec in recs:
        if rec.get("wall_s") is None and (run_dir / LOG).is_file():
            rec["wall_s"], rec["interrupted"] = max((run_dir / LOG).stat().st_mtime - rec["start"], 0.0), True
    return recs


def _save_attempts(run_dir: Path, recs: list[dict[str, Any]]) -> None:
    write_json(run_dir / RECORD, {"attempts": recs})


@dataclass
class Started:
    """A training process this process started."""

    job: Job
    proc: subprocess.Popen[bytes]
    start: float
    log_offset: int
    lock: int
    slot: int = 0


def spawn(job: Job, slot: int = 0) -> Started | None:
    """Start ``job``'s process (``None`` if its folder is locked by a live run), logging to train.log."""
    lock = try_lock(job.dir)
    if lock is None:
        return None
    recs = attempts(job.dir)
    start = time.time()
    recs.append({"start": start, "mode": job.mode, "launcher": job.launcher, "host": socket.gethostname(),
                 "command": shlex.join(job.command), "env": job.env, "wall_s": None, "returncode": None})
    _save_attempts(job.dir, recs)
    log = open(job.dir / LOG, "ab")  # noqa: SIM115 - the child writes to it; closed after Popen
    offset = log.tell()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    env_text = " ".join(f"{k}={v}" for k, v in job.env.items())
    log.write(f"=== {stamp} attempt {len(recs)} ({job.mode}) on {socket.gethostname()}: {env_text} "
              f"{shlex.join(job.command)}\n".encode())
    log.flush()
    try:
        proc = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | job.env,
                                pass_fds=(lock,), stdin=subprocess.DEVNULL)
    except OSError as e:
        os.close(lock)
        raise PeerdistillError(f"cannot start {job.command[0]}: {e.strerror or e}") from None
    finally:
        log.close()
    return Started(job, proc, start, offset, lock, slot)


# Exit statuses of a run stopped from outside: 130 (the CLI's answer to Ctrl-C / SIGINT) and death by a signal.
_STOPPED = {130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGKILL}


def finish(run: Started, returncode: int, stopped: bool = False) -> float:
    """Record the attempt's end (``stopped``: this process stopped it); returns its wall time in seconds."""
    wall = time.time() - run.start
    recs = attempts(run.job.dir)
    if recs and recs[-1].get("start") == run.start:
        recs[-1].update(wall_s=wall, returncode=returncode, interrupted=stopped or returncode in _STOPPED)
        _save_attempts(run.job.dir, recs)
    os.close(run.lock)
    return wall


def log_tail(run_dir: Path, offset: int = 0, lines: int = LOG_TAIL) -> str:
    """The last ``lines`` lines that the attempt starting at ``offset`` wrote to train.log."""
    try:
        with open(run_dir / LOG, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no train.log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def execute(job: Job) -> dict[str, Any]:
    """Run ``job`` to its end in this process (the body of a Slurm job); returns its outcome."""
    started = spawn(job)
    if started is None:
        return {"returncode": None, "wall_s": 0.0, "tail": f"{job.dir} is locked by a live run"}
    try:
        rc = started.proc.wait()
    except BaseException:  # Slurm's time-limit signal, a cancel: let the run save and stop, then record it
        started.proc.send_signal(signal.SIGINT)
        rc = started.proc.wait()
        finish(started, rc, stopped=True)
        raise
    return {"returncode": rc, "wall_s": finish(started, rc), "tail": log_tail(job.dir, started.log_offset)}


# ------------------------------------------------------------------------------------------ launchers
@dataclass
class Outcome:
    """How a run ended."""

    returncode: int | None
    wall_s: float
    tail: str


class LocalLauncher:
    """Up to ``plan.slots`` runs at once as child processes of this one (``--launcher local|torchrun``)."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.capacity = plan, plan.slots
        self.running: dict[str, Started] = {}

    def start(self, jobs: list[Job]) -> list[Job]:
        """Start ``jobs`` on free slots; returns those that could not start (locked by another process)."""
        busy = []
        for job in jobs:
            slot = min(set(range(self.plan.slots)) - {r.slot for r in self.running.values()})
            if self.plan.gpus:
                job.env = job.env | {"CUDA_VISIBLE_DEVICES": self.plan.gpus[slot]}
            started = spawn(job, slot)
            if started is None:
                busy.append(job)
            else:
                self.running[job.name] = started
        return busy

    def poll(self) -> dict[str, Outcome]:
        """The runs that ended since the last poll."""
        done = {}
        for name, run in list(self.running.items()):
            rc = run.proc.poll()
            if rc is not None:
                wall = finish(run, rc)
                done[name] = Outcome(rc, wall, log_tail(run.job.dir, run.log_offset))
                del self.running[name]
        return done

    def running_count(self) -> int:
        return len(self.running)

    def elapsed(self) -> dict[str, float]:
        now = time.time()
        return {n: now - r.start for n, r in self.running.items()}

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every run: SIGINT (the trainer stops, its last epoch checkpoint kept), then SIGTERM for a run
        that ignores it (started from a background shell, SIGINT is ignored), then SIGKILL."""
        procs = [r.proc for r in self.running.values()]
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            alive = [p for p in procs if p.poll() is None]
            for p in alive:
                p.send_signal(sig)
            deadline = time.time() + wait
            while any(p.poll() is None for p in alive) and time.time() < deadline:
                time.sleep(0.1)
        for name in list(self.running):
            run = self.running.pop(name)
            finish(run, run.proc.wait(), stopped=True)
