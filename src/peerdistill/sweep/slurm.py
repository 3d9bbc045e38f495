"""Slurm through submitit: one job per run, submitted as one job array (``--launcher submitit``).

submitit is an optional extra (``pip install 'peerdistill[sweep]'``). Each job runs
:func:`~peerdistill.sweep.launch.execute`: the same command, log, lock and attempt record as a local slot.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import PeerdistillError
from .launch import Job, Outcome, Plan, execute

SLURM_KEYS = {  # study `slurm:` key -> submitit AutoExecutor parameter
    "partition": "slurm_partition", "time": "timeout_min", "gpus": "gpus_per_node", "cpus": "cpus_per_task",
    "mem_gb": "mem_gb", "array_parallelism": "slurm_array_parallelism", "account": "slurm_account",
    "qos": "slurm_qos", "constraint": "slurm_constraint", "cluster": None, "setup": "slurm_setup",
}


def _minutes(value: Any) -> int:
    """Slurm's ``--time`` forms as whole minutes: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``."""
    text = str(value).strip()
    days, sep, rest = text.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        if len(parts) > 3 or min(parts) < 0 or (sep and not days):
            raise ValueError
        if sep:  # with days the fields are hours[:minutes[:seconds]]
            h, m, sec = (parts + [0, 0])[:3]
        else:    # without: minutes, minutes:seconds, hours:minutes:seconds
            h, m, sec = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, *(parts + [0])[:2])
        total = (int(days or 0) * 24 + h) * 3600 + m * 60 + sec
    except ValueError:
        raise PeerdistillError(f"slurm time {value!r}: give minutes or Slurm's [D-]HH:MM:SS forms") from None
    return -(-total // 60)


class SubmititLauncher:
    """One Slurm job per run, submitted as one job array through submitit (``--launcher submitit``).

    ``slurm`` holds the study's ``slurm:`` keys (:data:`SLURM_KEYS`); ``cluster="local"`` uses submitit's
    local executor (every job a process on this machine), as the tests do.
    """

    def __init__(self, plan: Plan, slurm: dict[str, Any], folder: Path) -> None:
        try:
            import submitit
        except ImportError:
            raise PeerdistillError("--launcher submitit needs submitit: pip install 'peerdistill[sweep]'") from None
        cluster = str(slurm.get("cluster") or "slurm")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise PeerdistillError("--launcher submitit found no Slurm (sbatch is not on PATH); use --cluster local "
                                   "to run the jobs on this machine")
        self.executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
        params: dict[str, Any] = {"name": folder.parent.name, "cpus_per_task": plan.threads * plan.nproc,
                                  "tasks_per_node": 1, "nodes": 1, "timeout_min": 60}
        for key, value in slurm.items():
            if SLURM_KEYS[key] is not None and value is not None:
                params[SLURM_KEYS[key]] = _minutes(value) if key == "time" else value
        try:
            self.executor.update_parameters(**params)
        except (NameError, ValueError, AssertionError) as e:
            raise PeerdistillError(f"bad slurm options: {' '.join(str(e).split())[:200]}") from None
        self.capacity = 1 << 30  # Slurm queues them (``array_parallelism`` caps how many run at once)
        self.plan, self.jobs, self.started = plan, {}, {}

    def start(self, jobs: list[Job]) -> list[Job]:
        with self.executor.batch():  # one job array
            handles = [self.executor.submit(execute, job) for job in jobs]
        now = time.time()
        for job, handle in zip(jobs, handles):
            self.jobs[job.name], self.started[job.name] = handle, now
        return []

    def poll(self) -> dict[str, Outcome]:
        done = {}
        for name, handle in list(self.jobs.items()):
            if not handle.done():
                continue
            del self.jobs[name]
            try:
                res = handle.result()
            except Exception as e:  # noqa: BLE001 - the job died outside the run (time limit, node failure)
                res = {"returncode": None, "wall_s": time.time() - self.started[name],
                       "tail": " ".join(str(e).split())[-2000:]}
            rc = res["returncode"] if res["returncode"] is not None else -1
            done[name] = Outcome(rc, res["wall_s"], res["tail"])
        return done

    def running_count(self) -> int:
        return len(self.jobs)

    def elapsed(self) -> dict[str, float]:
        now = time.time()
        return {n: now - self.started[n] for n in self.jobs}

    def stop(self, grace_s: float = 60.0) -> None:
        """Cancel the study's jobs: a re-run resumes them (their last checkpoints are kept)."""
        for handle in self.jobs.values():
            handle.cancel(check=False)
        self.jobs.clear()
