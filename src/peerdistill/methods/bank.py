"""The memory bank of MCL's and L-MCL's ImageNet form (code ``ContrastMemory``): one N x f bank of
normalised embeddings per network, the per-sample index draws (own index, one same-class index,
``neg_k`` different-class indices) and the momentum update. A mixin, so both methods keep the bank
as their own buffer ``banks`` (checkpointed under that name)."""
from __future__ import annotations

import math

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor

from ..errors import PeerdistillError
from ..seeds import seed_stream
from .base import DataInfo, all_ranks, world_size


class MemoryBank:
    """Mixed into a :class:`~peerdistill.methods.base.Method` that sets ``feat_dim``, ``neg_k`` and
    ``bank_momentum``; :meth:`setup_bank` in its ``setup``, :meth:`draw_indices` in its losses,
    :meth:`update_bank` after the optimizer step."""

    feat_dim: int
    neg_k: int
    bank_momentum: float

    def setup_bank(self, n: int, data: DataInfo, method: str) -> None:
        """Banks U(-s, s), s = 1/sqrt(f/3) (code ``ContrastMemory``), and class-sorted index tables."""
        labels = data.train_labels.long()
        counts = torch.bincount(labels, minlength=data.num_classes)
        if int(counts[counts > 0].min()) < 2:
            raise PeerdistillError(f"method '{method}' with contrast=bank needs at least 2 training images per class")
        self.seed = torch.initial_seed()  # the run's seed (seed_everything ran before setup)
        g = torch.Generator().manual_seed(self.seed)
        s = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("banks", torch.rand(n, data.train_size, self.feat_dim, generator=g) * (2 * s) - s)
        order = torch.argsort(labels, stable=True)
        for name, t in (("labels", labels), ("order", order), ("start", torch.cumsum(counts, 0) - counts),
                        ("count", counts), ("rank", torch.empty_like(order).scatter_(0, order, torch.arange(len(order))))):
            self.register_buffer(f"cls_{name}", t, persistent=False)  # derived from the data, not saved

    def draw_indices(self, index: Tensor, step: int) -> Tensor:
        """(B, 2 + neg_k) bank indices: own, one same-class other index, ``neg_k`` different-class ones
        (with replacement), from a generator seeded by (run seed, step), so resume is exact. Under torchrun
        the draws are made for the global batch and this rank keeps rows ``rank::world`` (its rows of the
        global batch, as the augmentation draws): the same negatives as one process."""
        world = world_size()
        rank = tdist.get_rank() if world > 1 else 0
        g = torch.Generator(device=index.device).manual_seed(seed_stream(self.seed, step) % 2**63)
        y = self.cls_labels[index]
        start, cnt, n = self.cls_start[y], self.cls_count[y], self.cls_labels.numel()
        u = torch.rand(len(index) * world, 1 + self.neg_k, generator=g, device=index.device)[rank::world]
        pos = start + torch.minimum((u[:, 0] * (cnt - 1)).long(), cnt - 2)  # class positions but one
        pos = pos + (pos >= self.cls_rank[index]).long()  # ... skipping the anchor's own position
        span = (n - cnt).unsqueeze(1)
        neg = torch.minimum((u[:, 1:] * span).long(), span - 1)  # positions outside the class block
        neg = neg + cnt.unsqueeze(1) * (neg >= start.unsqueeze(1)).long()
        return torch.cat([index.unsqueeze(1), self.cls_order[pos].unsqueeze(1), self.cls_order[neg]], 1)

    @torch.no_grad()
    def update_bank(self, index: Tensor, v: Tensor) -> None:
        """``M_m[i] <- normalise(m M_m[i] + (1 - m) v_m,i)`` for the (n, B, f) embeddings ``v`` of the
        images ``index``; all ranks' rows under torchrun, so the banks agree."""
        (index,), (v,) = all_ranks(index), all_ranks(v.detach(), dim=1)
        mu = self.bank_momentum
        self.banks[:, index] = F.normalize(mu * self.banks[:, index] + (1 - mu) * v.to(self.banks.dtype), dim=2)
