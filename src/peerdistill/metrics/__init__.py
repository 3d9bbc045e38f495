"""Evaluation metrics: accuracy, NLL and calibration per head."""
from .classification import HeadMetrics, expected_calibration_error, reliability_bins

__all__ = ["HeadMetrics", "expected_calibration_error", "reliability_bins"]
