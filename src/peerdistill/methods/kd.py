"""KD: offline knowledge distillation from a frozen teacher (Hinton et al., 2015), with Good-DA-in-KD's
extra-augmented-batch protocol as an option (Wang et al., NeurIPS 2022; spec §5.2)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..data.augmentations import Augmentation, build_augmentation
from ..data.loader import Batch
from ..data.views import Extra, View, ViewContext, Views
from ..errors import PeerdistillError
from ..params import NonNegative, NonNegativeInt, Positive
from .base import METHODS, DataInfo, Method, Needs, StepRecord
from .functional import kd_kl, soft_ce

AUG = "aug"  # the extra input: each student's augmented batch, run with gradient

# Good-DA's --lw_mix [1, 0, 1]: weights of KD on the original batch, CE on the augmented batch's
# (mixed) labels, KD on the augmented batch; all three inside alpha [CODE helper/loops.py train_distill].
LW_MIX = (1.0, 0.0, 1.0)


@METHODS.register("kd")
class KD(Method):
    """Each student peer minimises ``gamma * CE + alpha * T^2 KL(p_teacher || p_student)``; with
    ``extra_aug`` it also distils on an extra augmented batch of the same size (Good-DA-in-KD).

    The teacher is one peer of another run (its directory or a checkpoint file) or a network built from a
    weights file (``MODEL:WEIGHTS``), loaded frozen by the engine (eval mode, no gradient, never in the
    optimizer or this run's checkpoint) and evaluated on exactly the input each student sees, so under a
    mixer it scores the same mixed images; the CE term uses the mixed labels. The defaults are the
    Good-DA-in-KD / CRD setting (spec §7):
    ``gamma = 0.1, alpha = 0.9, T = 4``; the CE term is always against the (possibly mixed) true labels.

    With ``extra_aug`` (any name of :mod:`peerdistill.data.augmentations` or any mixer, e.g.
    ``cutmix``, ``autoaugment``, ``cutmixpick``) each step adds ``x_aug = DA(x)`` of the student's view
    ``x``, run through the student in a second forward (its own BN batch) and through the teacher:
    ``gamma * CE(s(x), y) + alpha * [w1 KD(s(x), t(x)) + w2 CE(s(x_aug), y_aug) + w3 KD(s(x_aug), t(x_aug))]``
    with ``(w1, w2, w3) = lw_mix = (1, 0, 1)``: the KD target on an augmented image is the teacher's
    output on that image, and there is no CE on mixed labels by default.

    ``peers=1`` is the usual single-student setting; with more peers every student distils from the
    teacher independently (their ensemble is still evaluated).

    Args:
        teacher: run directory (its ``checkpoints/best.pt``, else ``last.pt``) or checkpoint file, or
            ``MODEL:WEIGHTS`` (e.g. ``resnet34_imagenet:resnet34-b627a593.pth``: torchvision / timm weights
            whose classifier has this data's classes). Required.
        teacher_peer: which peer of the teacher run is the teacher.
        teacher_model: if set, the teacher run must be this architecture (a guard against wrong paths).
        temperature: T.
        alpha: weight of the KD terms (which already carry the T^2 factor).
        gamma: weight of the cross-entropy term on the original batch.
        extra_aug: the augmentation of the extra batch; ``""`` or ``none``: plain KD.
        extra_aug_args: its parameters, e.g. ``{criterion: student_entropy}`` for ``cutmixpick``.
        lw_mix: ``[w1, w2, w3]`` as above (Good-DA's ``--lw_mix``); only with ``extra_aug``.
    """

    def __init__(self, teacher: str = "", teacher_peer: NonNegativeInt = 0, teacher_model: str = "",
                 temperature: Positive = 4.0, alpha: NonNegative = 0.9, gamma: NonNegative = 0.1,
                 extra_aug: str = "", extra_aug_args: dict[str, Any] | None = None,
                 lw_mix: list[NonNegative] | None = None) -> None:
        super().__init__()
        if not teacher:
            raise PeerdistillError("method 'kd' needs a teacher: set method.teacher=<run directory or checkpoint> "
                                   "or method.teacher=<model>:<weights file>")
        self.temperature, self.alpha, self.gamma = temperature, alpha, gamma
        self.needs = Needs(teacher=teacher, teacher_peer=teacher_peer, teacher_model=teacher_model or None)
        plain = extra_aug in ("", "none")
        if plain and (extra_aug_args or lw_mix is not None):
            raise PeerdistillError("method.extra_aug_args and method.lw_mix need method.extra_aug=<augmentation>")
        if lw_mix is not None and len(lw_mix) != 3:
            raise PeerdistillError(f"method.lw_mix must hold 3 weights (KD original, CE augmented, KD augmented), "
                                   f"got {list(lw_mix)}")
        self.lw_mix = tuple(lw_mix) if lw_mix is not None else LW_MIX
        self.extra_aug: Augmentation | None = None if plain else build_augmentation(extra_aug, extra_aug_args)

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        if self.extra_aug is not None:  # size-dependent defaults (crop padding, cutout length, policy)
            self.extra_aug.setup(data.image_size, data.crop_padding)

    def make_views(self, batch: Batch, ctx: ViewContext) -> Views:
        views = super().make_views(batch, ctx)
        if self.extra_aug is None:
            return views
        done: dict[int, View] = {}  # students sharing a view share its augmented batch
        for v in views.peers:
            if id(v) not in done:
                done[id(v)] = self._augment(v, ctx)
        augmented = [done[id(v)] for v in views.peers]
        return Views(views.peers, {**views.extra, AUG: Extra(augmented, grad=True)})

    def _augment(self, view: View, ctx: ViewContext) -> View:
        """The augmented batch of one view; its ``mix`` is relative to the rows of ``view``."""
        out = self.extra_aug(view.x, ctx)
        return View(out.x, view.labels, view.index, out.mix)

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        if rec.teacher is None or len(rec.teacher) != len(rec.outputs):
            raise PeerdistillError("method 'kd' got no teacher outputs from the engine")
        if self.extra_aug is not None and (AUG not in rec.extra or AUG not in rec.teacher_extra):
            raise PeerdistillError("method 'kd' got no outputs on its augmented batch from the engine")
        terms: dict[str, Tensor] = {}
        for i, (o, t) in enumerate(zip(rec.outputs, rec.teacher)):
            terms[f"ce{i}"] = self.gamma * rec.ce(o.logits, i)
            if self.extra_aug is None:
                terms[f"kd{i}"] = self.alpha * kd_kl(o.logits, t.logits, self.temperature)
            else:
                terms.update(self._augmented_terms(rec, i))
        return terms

    def _augmented_terms(self, rec: StepRecord, i: int) -> dict[str, Tensor]:
        """Good-DA's three terms of student i, named after what they compare (zero weights omitted)."""
        w1, w2, w3 = self.lw_mix
        s, t = rec.outputs[i].logits, rec.teacher[i].logits
        s_aug, t_aug = rec.extra[AUG][i].logits, rec.teacher_extra[AUG][i].logits
        terms: dict[str, Tensor] = {}
        if w1:
            terms[f"kd{i}"] = self.alpha * w1 * kd_kl(s, t, self.temperature)
        if w2:
            q = rec.views[i].soft_targets(rec.num_classes)  # (B, K) the view's (possibly mixed) labels
            mix = rec.extra_views[AUG][i].mix
            terms[f"ce_aug{i}"] = self.alpha * w2 * soft_ce(s_aug, q if mix is None else mix.mix(q))
        if w3:
            terms[f"kd_aug{i}"] = self.alpha * w3 * kd_kl(s_aug, t_aug, self.temperature)
        return terms
