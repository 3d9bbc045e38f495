"""T. stddev (Good-DA-in-KD, Wang et al., NeurIPS 2022; spec §5.4): the stddev of the teacher's
mean probability, a teacher-only proxy for how good an augmentation is for KD (lower is better).

Exactly as the authors' ``check_ce_var`` loop [CODE helper/loops.py]: every iteration appends the
teacher's softmax at T = 1 on the original batch and on its augmented copy (batch 64 each); every
5 iterations the buffered 640 probabilities are averaged into one group mean p̄^(n) in R^C; then

    T. stddev = (1/C) sum_c std_n(p̄_c^(n))     (unbiased std over the N group means)

The statistic and its accumulator live here; the driver that runs a teacher over a dataset to feed them
is :mod:`peerdistill.evaluation.tstddev`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import PeerdistillError


def t_stddev(prob_groups: Tensor) -> float:
    """T. stddev of (N, C) group-mean probabilities: the mean over classes of the unbiased std over groups."""
    if prob_groups.dim() != 2 or prob_groups.shape[0] < 2:
        raise PeerdistillError(f"T. stddev needs at least 2 groups of probabilities, got shape "
                               f"{tuple(prob_groups.shape)}"
                               f" (train on more batches: more epochs or a smaller group)")
    return float(prob_groups.double().std(0, unbiased=True).mean())


class GroupMeans:
    """Accumulates an augmentation's teacher probabilities into group means of ``group_iters`` iterations."""

    def __init__(self, group_iters: int) -> None:
        self.group_iters = group_iters
        self.means: list[Tensor] = []
        self._sum: Tensor | None = None  # (C,) float64 sum of the open group's probabilities
        self._rows, self._iters = 0, 0
        self.entropy_sum: Tensor | None = None
        self.samples = 0

    def add(self, *probs: Tensor) -> None:
        """One iteration's probabilities: each (B_i, C) (the original half, then the augmented half)."""
        p = torch.cat(probs).double()
        s, ent = p.sum(0), -(p * p.clamp_min(1e-30).log()).sum()
        self._sum = s if self._sum is None else self._sum + s
        self.entropy_sum = ent if self.entropy_sum is None else self.entropy_sum + ent
        self._rows, self.samples, self._iters = self._rows + p.shape[0], self.samples + p.shape[0], self._iters + 1
        if self._iters == self.group_iters:
            self.means.append(self._sum / self._rows)
            self._sum, self._rows, self._iters = None, 0, 0

    def result(self) -> dict[str, float]:
        return {"t_stddev": t_stddev(torch.stack(self.means)), "entropy": float(self.entropy_sum) / self.samples,
                "groups": len(self.means)}
