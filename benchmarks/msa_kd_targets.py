"""Per-step cost of the three ways to mix a cohort's inputs and make its KD targets (docs/methods.md, "Per-view mixing and the KD targets"):
(a) one shared mixing draw, (b) a draw per peer with peer targets re-run on the student's image, (c) a draw
per peer with targets mixed from a pass over the unmixed batch. Times `peerdistill bench` for each and
prints one table (ms per step and the per-phase breakdown).

    python benchmarks/msa_kd_targets.py [--method dml|msa] [--steps 20] [key=value ...]

Default: 2-peer ResNet-14 on Fashion-MNIST with Cut^2Mix on every batch. Extra overrides apply to every
mode, e.g. ``peers=3 model=resnet32 data.name=synthetic data.image_size=32 threads=1``. The same numbers
from the command line, one mode at a time:

    peerdistill bench method=dml mixer=cutnmix mixer.prob=1 [method.mix=per_view method.kd_target=rerun|components]
"""
from __future__ import annotations

import argparse

from peerdistill import config as C
from peerdistill.engine.bench import PHASES, run_bench

MODES = {
    "(a) shared": [],
    "(b) per_view + rerun": ["method.mix=per_view", "method.kd_target=rerun"],
    "(c) per_view + components": ["method.mix=per_view", "method.kd_target=components"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="dml", choices=("dml", "msa"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = [f"method={args.method}", "mixer=cutnmix", "mixer.prob=1.0", *args.overrides]
    if args.method == "msa":  # feature ML is refused with components; time the logit terms alone
        base.append("method.feat_weight=0")
    rows = []
    for name, over in MODES.items():
        r = run_bench(C.load(None, [*base, *over]), steps=args.steps, warmup=args.warmup, as_json=True)
        rows.append((name, r))
    print(f"\n{args.method}, {rows[0][1]['peers']} x {rows[0][1]['model']}, batch {rows[0][1]['batch_size']}, "
          f"{rows[0][1]['device']} ({rows[0][1]['threads']} threads)\n")
    print("| mode | ms/step | vs (a) | " + " | ".join(PHASES) + " |")
    print("|---|---|---|" + "---|" * len(PHASES))
    ref = rows[0][1]["step_ms"]
    for name, r in rows:
        phases = " | ".join(f"{r['breakdown_ms'][ph]:.1f}" for ph in PHASES)
        print(f"| {name} | {r['step_ms']:.1f} | ×{r['step_ms'] / ref:.2f} | {phases} |")


if __name__ == "__main__":
    main()
