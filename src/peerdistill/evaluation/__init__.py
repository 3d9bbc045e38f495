"""Evaluation of saved runs, above the engine: robustness (adversarial, corruptions, OOD) on one
:func:`~peerdistill.evaluation.load.load_run`, the OOD sets, and the T. stddev driver."""
