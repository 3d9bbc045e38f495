"""Per-head classification metrics: top-1/top-5 accuracy, NLL and expected calibration error."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def _bin_sums(confidence: Tensor, correct: Tensor, bins: int) -> Tensor:
    """(3, bins) per-bin sums of confidence, of correct predictions and of samples, in float64 on the
    inputs' device. Bins are (lo, hi], so a confidence of exactly 1/bins falls in the first bin."""
    conf = confidence.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=conf.device)
    ids = torch.bucketize(conf, edges[1:-1], right=False)  # bin b holds (edges[b], edges[b+1]]
    rows = torch.stack([conf, correct.double(), torch.ones_like(conf)])  # (3, n)
    # index_add_ rather than a weighted bincount: deterministic on CUDA (deterministic=true allows it).
    return conf.new_zeros(3, bins).index_add_(1, ids, rows)


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)| over equal-width confidence bins (Guo et al. 2017),
    for inputs on any device."""
    n = confidence.numel()
    if n == 0:
        return float("nan")
    conf_sum, acc_sum, _ = _bin_sums(confidence, correct, bins)
    return float((conf_sum - acc_sum).abs().sum() / n)


def reliability_bins(confidence: Tensor, correct: Tensor, bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram."""
    conf_sum, acc_sum, count = _bin_sums(confidence, correct, bins)
    per = count.clamp_min(1)
    return {"confidence": (conf_sum / per).tolist(), "accuracy": (acc_sum / per).tolist(), "count": count.tolist()}


@dataclass
class HeadMetrics:
    """Accumulates one head's predictions over an evaluation pass.

    Everything stays on the logits' device until :meth:`compute`, so an evaluation pass on a GPU reads
    back to the host once per head, not once per batch.
    """

    ece_bins: int = 15
    n: int = 0
    sums: list[Tensor] = field(default_factory=list)  # per batch: (top-1 hits, top-5 hits, summed NLL)
    conf: list[Tensor] = field(default_factory=list)
    correct: list[Tensor] = field(default_factory=list)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        logp = F.log_softmax(logits.float(), dim=1)
        k = min(5, logp.shape[1])
        top = logp.topk(k, dim=1).indices
        hit = top == labels[:, None]
        self.sums.append(torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(),
                                      F.nll_loss(logp, labels, reduction="sum").double()]))
        self.conf.append(logp.max(1).values.exp())
        self.correct.append(hit[:, 0])
        self.n += labels.numel()

    def compute(self) -> dict[str, float]:
        top1, top5, nll = torch.stack(self.sums).sum(0).tolist()
        conf, correct = torch.cat(self.conf).cpu(), torch.cat(self.correct).cpu()
        return {"top1": 100.0 * top1 / self.n, "top5": 100.0 * top5 / self.n,
                "nll": nll / self.n, "ece": 100.0 * expected_calibration_error(conf, correct, self.ece_bins)}

    def reliability(self) -> dict[str, list[float]]:
        return reliability_bins(torch.cat(self.conf).cpu(), torch.cat(self.correct).cpu(), self.ece_bins)
