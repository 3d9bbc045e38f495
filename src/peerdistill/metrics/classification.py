"""Per-head classification metrics: top-1/top-5 accuracy, NLL and expected calibration error."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)| over equal-width confidence bins (Guo et al. 2017).

    Bins are (lo, hi], so a confidence of exactly 1/bins falls in the first bin.
    """
    n = confidence.numel()
    if n == 0:
        return float("nan")
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    conf = confidence.double()
    ids = torch.bucketize(conf, edges[1:-1], right=False)  # bin b holds (edges[b], edges[b+1]]
    conf_sum = torch.bincount(ids, weights=conf, minlength=bins)
    acc_sum = torch.bincount(ids, weights=correct.double(), minlength=bins)
    return float((conf_sum - acc_sum).abs().sum() / n)


def reliability_bins(confidence: Tensor, correct: Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ids = torch.bucketize(confidence.double(), edges[1:-1])
    count = torch.bincount(ids, minlength=bins).double()
    conf = torch.bincount(ids, weights=confidence.double(), minlength=bins) / count.clamp_min(1)
    acc = torch.bincount(ids, weights=correct.double(), minlength=bins) / count.clamp_min(1)
    return {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": count.tolist()}


@dataclass
class HeadMetrics:
    """Accumulates one head's predictions over an evaluation pass."""

    ece_bins: int = 15
    n: int = 0
    top1: float = 0.0
    top5: float = 0.0
    nll: float = 0.0
    conf: list[Tensor] = field(default_factory=list)
    correct: list[Tensor] = field(default_factory=list)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        logp = F.log_softmax(logits.float(), dim=1)
        k = min(5, logp.shape[1])
        top = logp.topk(k, dim=1).indices
        hit = top == labels[:, None]
        self.top1 += float(hit[:, 0].sum())
        self.top5 += float(hit.any(1).sum())
        self.nll += float(F.nll_loss(logp, labels, reduction="sum"))
        self.conf.append(logp.max(1).values.exp().cpu())
        self.correct.append(hit[:, 0].cpu())
        self.n += labels.numel()

    def compute(self) -> dict[str, float]:
        conf, correct = torch.cat(self.conf), torch.cat(self.correct)
        return {"top1": 100.0 * self.top1 / self.n, "top5": 100.0 * self.top5 / self.n,
                "nll": self.nll / self.n, "ece": 100.0 * expected_calibration_error(conf, correct, self.ece_bins)}

    def reliability(self) -> dict[str, list[float]]:
        return reliability_bins(torch.cat(self.conf), torch.cat(self.correct), self.ece_bins)
