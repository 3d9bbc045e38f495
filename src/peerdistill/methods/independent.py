"""Independent training: N peers with cross-entropy only, the baseline every table needs."""
from __future__ import annotations

from torch import Tensor

from ..params import Fraction
from .base import METHODS, Method, StepRecord


@METHODS.register("independent")
class Independent(Method):
    """Each peer minimises its own cross-entropy; the peers never interact (their ensemble is still
    evaluated). With ``peers=1`` this is plain supervised training.

    Args:
        label_smoothing: epsilon of label smoothing (0 disables; 0.1 is the usual baseline).
    """

    def __init__(self, label_smoothing: Fraction = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        return {f"ce{i}": rec.ce(o.logits, i, self.label_smoothing) for i, o in enumerate(rec.outputs)}
