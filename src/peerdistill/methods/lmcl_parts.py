"""The trainable parts L-MCL adds to each network (spec §3.2): auxiliary feature-refinement
branches, the stage aggregator and the meta-learned layer-matching weight network."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import init_weights
from .functional import f32

WEIGHT_DIM = 128  # width of the weight network's per-(network, stage) projections (code ``LossWeightNetwork``)


class AuxBranch(nn.Module):
    """Auxiliary feature-refinement branch: fresh copies of a network's later stages, GAP, FC."""

    def __init__(self, stages: list[nn.Module], width: int, num_classes: int) -> None:
        super().__init__()
        self.stages = nn.Sequential(*(copy.deepcopy(s) for s in stages))
        for m in self.stages.modules():  # a fresh network part, not the backbone's weights
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        init_weights(self.stages)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.stages(fmap).mean((2, 3))  # (B, d): global average pool, as StagedNet.pool
        return emb, self.fc(emb)


class StageAggregator(nn.Module):
    """Stage weights ``g = softmax(MLP(cat_k h_k))``, MLP = Linear(S d -> d) -> ReLU -> Linear(d -> S);
    aggregated logits ``sum_k g_k z_k`` (code ``models/aggregator.py``)."""

    def __init__(self, dim: int, stages: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(stages * dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, stages))

    def forward(self, feats: list[Tensor], logits: list[Tensor]) -> Tensor:
        g = F.softmax(f32(self.mlp(torch.cat(feats, 1))), dim=1)  # (B, S)
        return (g.unsqueeze(2) * torch.stack([f32(z) for z in logits], 1)).sum(1)  # (B, K)


class PairWeights(nn.Module):
    """The meta-learned weight network: per (network, stage) Linear(d -> 128); for each pair (p, q)
    the per-sample weight ``sigmoid(cos(P_p h_p, P_q h_q))`` (code ``models/meta_network.py``)."""

    def __init__(self, dims: list[int], pairs: Tensor) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, WEIGHT_DIM) for d in dims)
        self.register_buffer("pairs", pairs, persistent=False)

    def forward(self, feats: list[Tensor]) -> Tensor:
        u = torch.stack([F.normalize(f32(p(h)), dim=1) for p, h in zip(self.proj, feats)])  # (M, B, 128)
        return torch.sigmoid((u[self.pairs[:, 0]] * u[self.pairs[:, 1]]).sum(-1))  # (P, B)
