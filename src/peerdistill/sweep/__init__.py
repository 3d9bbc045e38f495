"""Studies: a grid of runs (methods × models × ... × seeds) run on local slots, torchrun or Slurm.

``peerdistill sweep STUDY.yaml`` (:mod:`peerdistill.commands.sweep`) expands a study file
(:mod:`.study`), runs what is not finished (:mod:`.runner`, :mod:`.launch`) and writes the study's table
and plots (:mod:`peerdistill.report.study`).
"""
from .launch import Plan, plan_slots, usable_cores
from .runner import dry_run, report_only, run_state, run_study
from .study import RunSpec, Study, load_study, run_name

__all__ = ["Plan", "plan_slots", "usable_cores", "dry_run", "report_only", "run_state", "run_study", "RunSpec",
           "Study", "load_study", "run_name"]
