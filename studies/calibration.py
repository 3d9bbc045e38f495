"""Over- or under-confident? The calibration of a study's runs beyond ECE.

    python studies/calibration.py runs/self_kd [--rows ce,sd_dropout] [--head peer0]
                                  [--out runs/self_kd/calibration.json]

ECE says how far confidence is from accuracy, not in which direction. For the last checkpoint of each finished
run of the named rows (``<row>_s<seed>``; default: every row of the study's study.json) this reports, on the
test set: top-1, mean confidence, the signed gap (mean confidence - accuracy, in points: > 0 over-confident,
< 0 under-confident), ECE, NLL and the logits' mean norm; and the temperature T* that minimises the NLL on
the run's validation split (temperature scaling, Guo et al. 2017: T* > 1 means the network was over-confident,
T* < 1 under-confident) with the test ECE and NLL after dividing the logits by T*. A calibration error that
temperature scaling removes is a matter of the logits' scale, not of the ranking of the classes. Logits are
computed in float32 without autocast (as `peerdistill eval --robustness` does), so top-1 can differ from
summary.json's bf16 evaluation in the last digit.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def head_logits(ev: Any, images: Tensor, head: str, batch: int = 1000) -> Tensor:
    """(N, K) float32 logits of ``head`` for float [0, 1] NCHW images."""
    return torch.cat([ev.heads_of(images[i:i + batch])[head].float() for i in range(0, len(images), batch)])


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) (scipy's bounded scalar search on log T)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    return math.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x)


def calibration(logits: Tensor, labels: Tensor) -> dict[str, float]:
    from peerdistill.metrics.classification import expected_calibration_error

    p = logits.softmax(1)
    conf, pred = p.max(1)
    correct = pred == labels
    centred = logits - logits.mean(1, keepdim=True)
    return {"top1": 100.0 * float(correct.double().mean()), "confidence": 100.0 * float(conf.double().mean()),
            "gap": 100.0 * float(conf.double().mean() - correct.double().mean()),
            "ece": 100.0 * expected_calibration_error(conf, correct),
            "nll": float(F.cross_entropy(logits, labels)), "logit_norm": float(centred.norm(dim=1).mean())}


def evaluate_run(run: Path, head: str) -> dict[str, Any]:
    from peerdistill.evaluation.robust import Evaluated

    ev = Evaluated(run, "last.pt", threads=torch.get_num_threads())
    val = ev.run.data.val
    if val is None:
        raise SystemExit(f"{run}: no validation split to fit the temperature on (data.val_split is 0)")
    z_val = head_logits(ev, val.images.float() / 255, head)
    t_star = fit_temperature(z_val, val.labels)
    y_test = torch.from_numpy(ev.test.labels).to(z_val.device)
    z_test = head_logits(ev, ev.tensor(ev.test.images), head)
    scaled = calibration(z_test / t_star, y_test)
    return {"run": run.name, **calibration(z_test, y_test), "t_star": t_star,
            "ece_scaled": scaled["ece"], "nll_scaled": scaled["nll"]}


KEYS = ("top1", "confidence", "gap", "ece", "nll", "logit_norm", "t_star", "ece_scaled", "nll_scaled")
HEADER = ("| row | n | top-1 | mean confidence | gap (conf − acc) | ECE | NLL | logit norm | T* (val) "
          "| ECE after T* | NLL after T* |")


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: mean ± std over seeds per row."""
    def ms(vals: list[float], d: int) -> str:
        return f"{statistics.mean(vals):.{d}f} ± {statistics.stdev(vals):.{d}f}" if len(vals) > 1 else f"{vals[0]:.{d}f}"

    lines = [HEADER, "|" + "---|" * 11]
    for name, runs in rows.items():
        cells = [ms([r[k] for r in runs], 3 if k in ("nll", "nll_scaled", "t_star") else 2) for k in KEYS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="a study's run directory (runs/<study>)")
    ap.add_argument("--rows", help="row names, comma-separated (default: every row of STUDY/study.json)")
    ap.add_argument("--head", default="peer0")
    ap.add_argument("--out", type=Path, help="default: STUDY/calibration.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.out or args.study / "calibration.json"
    t0 = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {}
    if args.rows:
        names = [r.strip() for r in args.rows.split(",") if r.strip()]
    else:
        try:
            names = list(dict.fromkeys(r["row"] for r in json.loads((args.study / "study.json").read_text())["runs"]))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"{args.study}: no readable study.json ({e}); name the rows with --rows") from None
    for name in names:
        runs = sorted(d for d in args.study.glob(f"{name}_s*")
                      if re.fullmatch(re.escape(name) + r"_s\d+", d.name) and (d / "summary.json").is_file())
        if runs:
            rows[name] = [evaluate_run(d, args.head) for d in runs]
    if not rows:
        raise SystemExit(f"no finished runs of rows {', '.join(names)} in {args.study}")
    out.write_text(json.dumps({"study": str(args.study), "head": args.head, "seconds": time.perf_counter() - t0,
                               "rows": rows}, indent=2))
    print(table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
