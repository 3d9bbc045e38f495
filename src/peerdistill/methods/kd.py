"""KD: offline knowledge distillation from a frozen teacher (Hinton et al., 2015)."""
from __future__ import annotations

from torch import Tensor

from ..errors import PeerdistillError
from ..params import NonNegative, NonNegativeInt, Positive
from .base import METHODS, Method, Needs, StepRecord
from .functional import kd_kl


@METHODS.register("kd")
class KD(Method):
    """Each student peer minimises ``gamma * CE + alpha * T^2 KL(p_teacher || p_student)``.

    The teacher is one peer of another run (its directory or a checkpoint file), loaded frozen by the
    engine (eval mode, no gradient, never in the optimizer or this run's checkpoint) and evaluated on
    exactly the input each student sees, so under a mixer it scores the same mixed images; the CE term
    uses the mixed labels. The defaults are the Good-DA-in-KD / CRD setting (methods.md §7):
    ``gamma = 0.1, alpha = 0.9, T = 4``; the CE term is always against the (possibly mixed) true labels.

    ``peers=1`` is the usual single-student setting; with more peers every student distils from the
    teacher independently (their ensemble is still evaluated).

    Args:
        teacher: run directory (its ``checkpoints/best.pt``, else ``last.pt``) or checkpoint file. Required.
        teacher_peer: which peer of the teacher run is the teacher.
        teacher_model: if set, the teacher run must be this architecture (a guard against wrong paths).
        temperature: T.
        alpha: weight of the KD term (which already carries the T^2 factor).
        gamma: weight of the cross-entropy term.
    """

    def __init__(self, teacher: str = "", teacher_peer: NonNegativeInt = 0, teacher_model: str = "",
                 temperature: Positive = 4.0, alpha: NonNegative = 0.9, gamma: NonNegative = 0.1) -> None:
        super().__init__()
        if not teacher:
            raise PeerdistillError("method 'kd' needs a teacher: set method.teacher=<run directory or checkpoint>")
        self.temperature, self.alpha, self.gamma = temperature, alpha, gamma
        self.needs = Needs(teacher=teacher, teacher_peer=teacher_peer, teacher_model=teacher_model or None)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        if rec.teacher is None or len(rec.teacher) != len(rec.outputs):
            raise PeerdistillError("method 'kd' got no teacher outputs from the engine")
        terms: dict[str, Tensor] = {}
        for i, (o, t) in enumerate(zip(rec.outputs, rec.teacher)):
            terms[f"ce{i}"] = self.gamma * rec.ce(o.logits, i)
            terms[f"kd{i}"] = self.alpha * kd_kl(o.logits, t.logits, self.temperature)
        return terms
