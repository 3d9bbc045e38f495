"""Run outputs: JSONL/TensorBoard logging, plots, result tables."""
