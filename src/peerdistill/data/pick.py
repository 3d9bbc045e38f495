"""CutMixPick (Good-DA-in-KD, Wang et al. NeurIPS 2022; spec §5.3) as a picker over any mixer.

The picker draws ``mix_n_run`` independent mixes of the batch with a base mixer (CutMix by default:
each run has its own lambda, box and derangement), scores every pooled image without gradient, and
keeps the ``n_pick`` highest-scoring ones [CODE helper/loops.py ``cutmix_pick``, ``DA_pick``,
``get_entropy_batch``]. The record of the kept images still mixes labels correctly: picked row j is
``sum_k pixel_weights[k, j] * x[perms[k, j]]``, so ``perms[0, j]`` is the batch row it was built on,
not ``j`` (the identity ``perms[0]`` of plain MixUp / CutMix does not hold for picked rows).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PeerdistillError
from ..params import NonNegativeInt, Positive, PositiveInt
from .mix import MIXERS, Mixer, MixRecord

if TYPE_CHECKING:
    from .views import ViewContext

Criterion = Literal["teacher_entropy", "student_entropy", "kld", "dissimilarity"]


def identity_record(b: int, device: torch.device) -> MixRecord:
    """The record of an unmixed batch (a base mixer that skipped this draw)."""
    return MixRecord(torch.arange(b, device=device)[None], torch.ones(1, b, device=device),
                     torch.ones(1, b, 1, 1, 1, device=device))


def concat_records(recs: list[MixRecord]) -> MixRecord:
    """One record for the pool ``[mix_1(x); mix_2(x); ...]``: columns concatenated; records with fewer
    components are padded with zero-weight ones."""
    k = max(r.perms.shape[0] for r in recs)
    tail = torch.broadcast_shapes(*(tuple(r.pixel_weights.shape[2:]) for r in recs))
    perms, weights, pixels = [], [], []
    for r in recs:
        kr, b = r.perms.shape
        pad = k - kr
        perms.append(torch.cat([r.perms, r.perms[:1].expand(pad, b)]))
        weights.append(torch.cat([r.weights, r.weights.new_zeros(pad, b)]))
        pw = r.pixel_weights.expand(kr, b, *tail)
        pixels.append(torch.cat([pw, pw.new_zeros(pad, b, *tail)]))
    return MixRecord(torch.cat(perms, 1), torch.cat(weights, 1), torch.cat(pixels, 1))


def select_rows(rec: MixRecord, idx: Tensor) -> MixRecord:
    """The record of rows ``idx`` of a mixed batch."""
    return MixRecord(rec.perms[:, idx], rec.weights[:, idx], rec.pixel_weights[:, idx])


def top_rows(scores: Tensor, n: int) -> Tensor:
    """(min(n, N),) indices of the highest scores (the code sorts ascending and keeps the last n)."""
    return torch.topk(scores.float(), min(n, scores.numel())).indices


def _entropy(logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)  # (N,) at T = 1, as the code (no temperature)


@MIXERS.register("cutmixpick")
class CutMixPick(Mixer):
    """CutMixPick: keep the ``n_pick`` highest-scoring of ``mix_n_run`` independent draws of a base mixer.

    Scores (no gradient): ``teacher_entropy`` (teacher in eval mode) or ``student_entropy`` (peer
    ``peer`` in its current train mode, as the code), both at T = 1; ``kld``: per-sample
    KL(teacher || student) at ``temperature``; ``dissimilarity``: the smallest squared L2 distance
    between the teacher's probabilities on a pooled image and on any original image. Needs the
    teacher or the peers through the view context (method ``kd`` gives both).

    Args:
        base: any registered mixer (``cutmix``: Good-DA's CutMix-with-picking).
        base_args: its parameters; ``prob`` defaults to 1 and ``derangement`` to true where the base
            mixer has them (Good-DA mixes every batch, never pairing an image with itself).
        mix_n_run: draws in the pool (2: a pool of 2B images).
        n_pick: images kept of the global batch; 0 = the batch size (the code's 64 with batch 64). Under
            torchrun each of the N processes keeps ``n_pick / N`` of its own pool. Methods that read hard
            labels (``rec.labels``) need the batch size.
        criterion: the score.
        temperature: T of ``kld`` (the code's ``kd_T``, 4).
        peer: the peer whose predictions ``student_entropy`` / ``kld`` use.
    """

    def __init__(self, base: str = "cutmix", base_args: dict[str, Any] | None = None, mix_n_run: PositiveInt = 2,
                 n_pick: NonNegativeInt = 0, criterion: Criterion = "teacher_entropy",
                 temperature: Positive = 4.0, peer: NonNegativeInt = 0) -> None:
        if base == "cutmixpick":
            raise PeerdistillError("mixer 'cutmixpick' cannot pick over itself; choose another base mixer")
        known = MIXERS.params(base)
        defaults = {k: v for k, v in (("prob", 1.0), ("derangement", True)) if k in known}
        self.base = MIXERS.build(base, **{**defaults, **(base_args or {})})
        self.mix_n_run, self.n_pick, self.criterion = mix_n_run, n_pick, criterion
        self.temperature, self.peer = temperature, peer

    def check(self, world: int) -> None:
        if self.n_pick % world:
            raise PeerdistillError(f"mixer 'cutmixpick': n_pick={self.n_pick} (images kept of the global batch) "
                                   f"is not divisible by {world} processes")

    def draw(self, x: Tensor, gen: torch.Generator | None = None, ctx: object = None) -> MixRecord:
        return self.pick(x, gen, ctx)[0]

    def pick(self, x: Tensor, gen: torch.Generator | None, ctx: Any) -> tuple[MixRecord, Tensor | None]:
        """The record of the kept images and, when the score used the teacher, its (n, K) logits on them."""
        b, world = x.shape[0], getattr(ctx, "shard", (0, 1))[1]
        self.check(world)
        pool_rec = concat_records([self.base.draw(x, gen, ctx) or identity_record(b, x.device)
                                   for _ in range(self.mix_n_run)])
        pool = pool_rec.mix_images(x)  # (R*B, C, H, W)
        with torch.no_grad():
            scores, t_logits = self.scores(pool, x, ctx)
        idx = top_rows(scores, self.n_pick // world or b)  # this process's share of the kept images
        return select_rows(pool_rec, idx), None if t_logits is None else t_logits[idx]

    def scores(self, pool: Tensor, x: Tensor, ctx: ViewContext) -> tuple[Tensor, Tensor | None]:
        """(N,) score of every pooled image and the teacher's (N, K) logits on the pool (if it ran)."""
        c = self.criterion
        t = self._teacher(ctx)(pool).float() if c != "student_entropy" else None
        s = self._student(ctx)(self.peer, pool).float() if c in ("student_entropy", "kld") else None
        if c == "teacher_entropy":
            return _entropy(t), t
        if c == "student_entropy":
            return _entropy(s), None
        if c == "kld":
            log_pt, log_ps = (F.log_softmax(z / self.temperature, dim=1) for z in (t, s))
            return (log_pt.exp() * (log_pt - log_ps)).sum(1), t
        p_pool = F.softmax(t, dim=1)  # (N, K)
        p_orig = F.softmax(self._teacher(ctx)(x).float(), dim=1)  # (B, K)
        return (p_pool[:, None] - p_orig[None]).square().sum(2).amin(1), t  # (N,)

    def _teacher(self, ctx: Any) -> Any:
        if ctx is None or getattr(ctx, "teacher", None) is None:
            raise PeerdistillError(f"mixer 'cutmixpick' with criterion {self.criterion} scores with a teacher; "
                                   f"use a method that has one (kd) or criterion=student_entropy")
        return ctx.teacher

    def _student(self, ctx: Any) -> Any:
        if ctx is None or getattr(ctx, "peer", None) is None:
            raise PeerdistillError(f"mixer 'cutmixpick' with criterion {self.criterion} scores with a student, "
                                   f"but none is available here")
        if self.peer >= ctx.n_peers:
            raise PeerdistillError(f"mixer 'cutmixpick': peer={self.peer} is out of range ({ctx.n_peers} peers)")
        return ctx.peer
