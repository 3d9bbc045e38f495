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
    """Accumulates one head's predictions over an evaluation pass as sums: top-1 and top-5 hits, the summed
    NLL, and per confidence bin the summed confidence, hits and count.

    Sums make the metrics exactly reducible: under torchrun each process evaluates its shard and the
    processes add their :meth:`totals` (:meth:`add_totals`), which gives the same counts as one process
    evaluating everything (and the float sums up to their summation order). Everything stays on the
    logits' device until :meth:`compute`, so an evaluation pass on a GPU reads back once per head.
    """

    ece_bins: int = 15
    n: int = 0
    _sums: Tensor | None = None  # (3,) float64: top-1 hits, top-5 hits, summed NLL
    _bins: Tensor | None = None  # (3, ece_bins) float64: per-bin confidence sum, hits, count

    def update(self, logits: Tensor, labels: Tensor) -> None:
        logp = F.log_softmax(logits.float(), dim=1)
        k = min(5, logp.shape[1])
        top = logp.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums = torch.stack([hit[:, 0].sum().double(), hit.any(1).sum().double(),
                            F.nll_loss(logp, labels, reduction="sum").double()])
        bins = _bin_sums(logp.max(1).values.exp(), hit[:, 0], self.ece_bins)
        self._sums = sums if self._sums is None else self._sums + sums
        self._bins = bins if self._bins is None else self._bins + bins
        self.n += labels.numel()

    def totals(self, device: torch.device | str = "cpu") -> Tensor:
        """(4 + 3 * ece_bins,) float64: n, the three sums and the bin sums (zeros before any update)."""
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64, device=device)
        bins = self._bins if self._bins is not None else torch.zeros(3, self.ece_bins, dtype=torch.float64,
                                                                     device=sums.device)
        return torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=sums.device), sums,
                          bins.reshape(-1)])

    def add_totals(self, t: Tensor) -> HeadMetrics:
        """Replace the state by ``t`` (what :meth:`totals` gives, e.g. summed over processes)."""
        self.n = int(round(float(t[0])))
        self._sums, self._bins = t[1:4], t[4:].reshape(3, self.ece_bins)
        return self

    def compute(self) -> dict[str, float]:
        top1, top5, nll = self._sums.tolist()
        conf_sum, acc_sum, _ = self._bins.cpu()
        ece = float((conf_sum - acc_sum).abs().sum() / self.n) if self.n else float("nan")
        return {"top1": 100.0 * top1 / self.n, "top5": 100.0 * top5 / self.n, "nll": nll / self.n,
                "ece": 100.0 * ece}

    def reliability(self) -> dict[str, list[float]]:
        conf_sum, acc_sum, count = self._bins.cpu()
        per = count.clamp_min(1)
        return {"confidence": (conf_sum / per).tolist(), "accuracy": (acc_sum / per).tolist(),
                "count": count.tolist()}
