"""``peerdistill sweep STUDY.yaml``: run a study (grid × rows × seeds) and write its table and plots."""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import Any

from ..errors import PeerdistillError
from ..params import Option, Positive, PositiveInt


def _local_gpus(spec: str, study: Any) -> list[str]:
    """GPUs the local slots share: ``auto`` = every visible CUDA device when the runs train on CUDA."""
    if spec == "none":
        return []
    if spec != "auto":
        return [g.strip() for g in spec.split(",") if g.strip()]
    devices = {r.config.device for r in study.runs}
    if not devices <= {"auto", "cuda"}:  # a run pinned to a device (cpu, cuda:1) keeps it
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g for g in visible.split(",") if g] if visible else [str(i) for i in range(torch.cuda.device_count())]


def _plan(args: argparse.Namespace, study: Any, launcher: str, todo: int) -> Any:
    from ..sweep import Plan, plan_slots, usable_cores

    launch = {k: v for k, v in study.launch.items() if v != "auto"}  # validated by load_study
    nproc = args.nproc_per_node or launch.get("nproc_per_node") or (2 if launcher == "torchrun" else 1)
    threads = args.threads or launch.get("threads")
    if launcher == "submitit":  # Slurm gives each job its own cores: threads = the job's cpus per process
        cpus = args.cpus or study.slurm.get("cpus")
        return Plan(1, threads or max(int(cpus) // nproc, 1) if cpus else threads or 1, nproc)
    return plan_slots(todo, usable_cores(), args.slots or launch.get("slots"), threads, nproc,
                      _local_gpus(args.local_gpus, study), args.runs_per_gpu)


def _slurm(args: argparse.Namespace, study: Any) -> dict[str, Any]:
    cli = {"partition": args.partition, "time": args.time, "gpus": args.gpus, "cpus": args.cpus,
           "mem_gb": args.mem_gb, "array_parallelism": args.array_parallelism, "cluster": args.cluster}
    return study.slurm | {k: v for k, v in cli.items() if v is not None}


def select_runs(study: Any, patterns: str | None) -> set[str] | None:
    """The runs whose row (or run name) matches one of the comma-separated shell patterns; None = all."""
    if not patterns:
        return None
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = {r.name for r in study.runs if any(fnmatch.fnmatchcase(r.row.id, p) or fnmatch.fnmatchcase(r.name, p)
                                                for p in wanted)}
    if not chosen:
        rows = ", ".join(dict.fromkeys(r.row.id for r in study.runs))
        raise PeerdistillError(f"--only {patterns!r} matches no run of {study.name} (rows: {rows})")
    return chosen


def run(args: argparse.Namespace) -> int:
    from ..sweep import dry_run, load_study, report_only, run_study
    from ..sweep.runner import check_folders

    study = load_study(args.study, args.out)
    if args.report_only:
        report_only(study, plots=not args.no_plots)
        return 0
    launcher = args.launcher or str(study.launch.get("launcher", "local"))
    only = select_runs(study, args.only)
    todo = sum(s in ("new", "partial") and (only is None or n in only) for n, s in check_folders(study).items())
    plan = _plan(args, study, launcher, todo)
    if args.dry_run:
        dry_run(study, plan, launcher, only=only)
        return 0
    try:
        ok = run_study(study, plan, launcher, _slurm(args, study), args.python or sys.executable, args.status_every,
                       plots=not args.no_plots, only=only)
    except KeyboardInterrupt:  # the runner said what was stopped and how to go on
        return 130
    return 0 if ok else 1  # some run failed or is unfinished: the study's exit status says so


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="run a study (grid of runs × seeds) and write its mean ± std table",
                       description="Expand STUDY.yaml into runs under runs/<study>/, skip finished runs, resume "
                                   "interrupted ones, run the rest, and write study.md, study.json and plots. "
                                   "Exit status 0 when every run finished, 1 otherwise, 2 for a bad study file.")
    s.add_argument("study", help="study file (YAML; see docs: base, config, grid, rows, seeds, baseline, ...)")
    s.add_argument("--out", help="study folder (default: the study's out:, else runs/<name>)")
    s.add_argument("--only", metavar="ROWS", help="run only the rows (or runs) matching these comma-separated "
                                                "shell patterns, e.g. 'dml*,pcl' or '*_s0'; the table covers all")
    s.add_argument("--dry-run", action="store_true", help="list the runs and their state (finished/partial/new)")
    s.add_argument("--report-only", action="store_true", help="regenerate study.md, plots and study.json only")
    s.add_argument("--launcher", choices=("local", "torchrun", "submitit"),
                   help="local slots (default), local slots with torchrun per run, or Slurm via submitit")
    count = Option(PositiveInt)
    s.add_argument("--slots", type=count, help="runs at once (local; default: cores / threads, capped by the runs)")
    s.add_argument("--threads", type=count, help="threads per training process (default: 1 while runs fill the cores)")
    s.add_argument("--nproc-per-node", type=count, help="processes per run under torchrun (default 2 with "
                                                      "--launcher torchrun)")
    s.add_argument("--local-gpus", default="auto", help="GPUs for local slots: auto, none or a list like 0,1")
    s.add_argument("--runs-per-gpu", type=count, default=1, help="local runs sharing one GPU (small models)")
    s.add_argument("--status-every", type=Option(Positive), default=60.0, metavar="S",
                   help="seconds between status lines")
    s.add_argument("--python", help="interpreter for the runs (default: this one)")
    s.add_argument("--no-plots", action="store_true", help="write the table but not plots/*.png")
    g = s.add_argument_group("Slurm (--launcher submitit; default from the study's slurm: section)")
    g.add_argument("--partition")
    g.add_argument("--time", help="per run: minutes or [D-]HH:MM:SS")
    g.add_argument("--gpus", type=count, help="GPUs per run")
    g.add_argument("--cpus", type=count, help="CPUs per run")
    g.add_argument("--mem-gb", type=Option(Positive))
    g.add_argument("--array-parallelism", type=count, help="runs of the job array at once")
    g.add_argument("--cluster", choices=("slurm", "local"), help="local: submitit's local executor (testing)")
    s.set_defaults(fn=run)
