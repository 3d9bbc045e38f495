"""OKDDip: online knowledge distillation with diverse peers (Chen et al., AAAI 2020)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import PeerdistillError
from ..params import NonNegative, Positive, PositiveInt
from .base import METHODS, DataInfo, Method, Needs, PeerOutput, StepRecord
from .functional import ensemble_log_probs, f32, kd_kl, mean_logits, sigmoid_rampup


@METHODS.register("okddip")
class OKDDip(Method):
    """m - 1 auxiliary peers and one group leader on a shared trunk: each peer distils from its own
    attention-weighted mix of the peers' logits (first level), the leader from the peers' mean (second).

    The leader is the cohort's last peer. Attention (official ``models/model_cifar/resnet_GL.py``): two
    bias-free ``Linear(d -> d // factor)`` layers shared by the peers, applied to each peer's pooled
    embedding h_i: ``q_i = W_q h_i``, ``k_j = W_k h_j``, ``a_ij = softmax_j(q_i . k_j)`` over the m - 1 peers
    *including* j = i, without 1/sqrt(d) scaling; peer i's target is ``x_i = sum_j a_ij z_j``. The leader
    takes no part in the attention. Loss (official ``train_GL.py``):

        L = sum_i CE(z_i) + CE(z_L) + w(e) [sum_i KD_T(z_i, x_i) + KD_T(z_L, mean_i z_i)],  T = 3

    with the 80-epoch sigmoid ramp-up w(e) from epoch 0. As in both public codes the targets are **not
    detached** by default: W_q and W_k appear only inside x_i, so they learn only through the targets,
    and the leader's term also trains the peers. ``detach_targets=true`` stops both (the attention then
    stays at its initialisation). The official KL adds 1e-7 to the target probabilities; we do not.

    The official default is 4 networks (3 peers + the leader): set ``peers=4`` (the presets do); at
    least 3 are needed. Evaluated heads: ``peer0..peer{m-2}`` (the auxiliary peers), ``ensemble`` (their
    probability ensemble, leader excluded, the engine's convention), ``logit_ensemble`` (the mean of their
    logits: the ensemble the official ``train_GL.py`` logs) and ``leader`` (deployed).

    Args:
        temperature: T of both KD levels.
        weight: weight of the KD terms (the official ``alpha``).
        rampup_epochs: length of the sigmoid ramp-up of the KD weight; 0 disables it.
        factor: the projections map d to d // factor dimensions (8 in the official code).
        detach_targets: stop the gradient through x_i and the peers' mean.
        split_after: last shared stage; empty = all stages but the last (the official layout).
    """

    def __init__(self, temperature: Positive = 3.0, weight: NonNegative = 1.0, rampup_epochs: NonNegative = 80.0,
                 factor: PositiveInt = 8, detach_targets: bool = False, split_after: str = "") -> None:
        super().__init__()
        self.temperature, self.weight, self.rampup_epochs = temperature, weight, rampup_epochs
        self.factor, self.detach_targets = factor, detach_targets
        # 3 auxiliary peers + the leader by default, as the official code (m = 4).
        # Detached targets leave W_q and W_k without a gradient (they keep their initialisation).
        self.needs = Needs(default_peers=4, min_peers=3, topology="branched", split_after=split_after or None,
                           unused_params=detach_targets)
        self.query: nn.Linear | None = None
        self.key: nn.Linear | None = None

    def setup(self, cohort: nn.Module, data: DataInfo) -> None:
        if cohort.shared < 1:
            raise PeerdistillError("method 'okddip' needs a branched cohort with at least one shared stage")
        d = cohort.nets[0].num_features
        self.query = nn.Linear(d, max(d // self.factor, 1), bias=False)  # PyTorch's default init, as official
        self.key = nn.Linear(d, max(d // self.factor, 1), bias=False)

    def attention(self, peers: list[PeerOutput]) -> Tensor:
        """(B, m-1, m-1) weights ``a_ij = softmax_j(q_i . k_j)`` over the auxiliary peers."""
        h = torch.stack([o.embedding for o in peers], dim=1)  # (B, m-1, d)
        q, k = f32(self.query(h)), f32(self.key(h))  # (B, m-1, d')
        return torch.softmax(q @ k.transpose(1, 2), dim=2)

    def peer_targets(self, peers: list[PeerOutput]) -> Tensor:
        """(B, m-1, K) ``x_i = sum_j a_ij z_j``."""
        z = torch.stack([f32(o.logits) for o in peers], dim=1)  # (B, m-1, K)
        return self.attention(peers) @ z

    def losses(self, rec: StepRecord) -> dict[str, Tensor]:
        *peers, leader = rec.outputs
        x = self.peer_targets(peers)
        w = self.weight * sigmoid_rampup(rec.epoch, self.rampup_epochs)
        t, detach = self.temperature, self.detach_targets
        terms: dict[str, Tensor] = {}
        for i, o in enumerate(peers):
            terms[f"ce{i}"] = rec.ce(o.logits, i)
            terms[f"kl{i}"] = w * kd_kl(o.logits, x[:, i], t, detach_target=detach)
        terms["ce_leader"] = rec.ce(leader.logits, len(peers))
        terms["kl_leader"] = w * kd_kl(leader.logits, mean_logits([o.logits for o in peers]), t, detach_target=detach)
        return terms

    def eval_heads(self, outputs: list[PeerOutput], ema: list[PeerOutput] | None = None) -> dict[str, Tensor]:
        *peers, leader = outputs
        heads = {f"peer{i}": o.logits for i, o in enumerate(peers)}
        heads["ensemble"] = ensemble_log_probs([o.logits for o in peers])
        heads["logit_ensemble"] = mean_logits([o.logits for o in peers])  # the official code's ensemble
        heads["leader"] = leader.logits
        heads.update({f"ema{i}": o.logits for i, o in enumerate(ema or [])})
        return heads
