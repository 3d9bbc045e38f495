"""``peerdistill eval RUN``: re-evaluate a saved run (or checkpoint) on its validation and test sets,
or, with ``--robustness`` (or ``--adversarial`` / ``--corruptions`` / ``--ood``), its robustness:
accuracy under FGSM/PGD, under CIFAR-C corruptions, and OOD detection (see docs, robustness)."""
from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from typing import Any

from ..errors import PeerdistillError


def _floats(text: str, what: str) -> list[float]:
    """``"1/255,2/255,0.01"`` -> floats; a bad item is a one-line error."""
    try:
        return [float(Fraction(t.strip())) for t in text.split(",") if t.strip()]
    except (ValueError, ZeroDivisionError):
        raise PeerdistillError(f"{what} takes numbers or fractions separated by commas (e.g. 1/255,8/255), "
                               f"got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    values = _floats(text, what)
    if any(v != int(v) for v in values):
        raise PeerdistillError(f"{what} takes whole numbers, got {text!r}")
    return [int(v) for v in values]


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~peerdistill.engine.robust.RobustOptions` the command line asks for."""
    from ..engine.robust import RobustOptions

    every = args.robustness
    o = RobustOptions(adversarial=every or args.adversarial, corruptions=every or args.corruptions,
                      ood=every or args.ood, fgsm_authors=args.fgsm_authors, seed=args.seed,
                      pgd_random_start=not args.no_random_start, plots=not args.no_plots,
                      corruption_source=args.corruption_source, corruptions_npy=args.corruptions_npy,
                      odin_space=args.odin_space, ood_root=args.ood_root, fpr_rule=args.fpr_rule)
    if args.fgsm_authors and not (o.adversarial or o.corruptions or o.ood):
        o.adversarial = True
    for name in ("adv_limit", "corruption_limit", "ood_limit"):
        value = getattr(args, name) if getattr(args, name) is not None else args.limit
        if value is not None:
            setattr(o, name, value)
    _lists(o, args)
    return o


def _lists(o: Any, args: argparse.Namespace) -> None:
    if args.eps:
        o.eps = _floats(args.eps, "--eps")
    if args.attacks:
        o.attacks = _names(args.attacks)
    if args.pgd_steps is not None:
        o.pgd_steps = args.pgd_steps
    if args.pgd_step_size:
        o.pgd_step_size = _floats(args.pgd_step_size, "--pgd-step-size")[0]
    if args.authors_eps:
        o.authors_eps = _floats(args.authors_eps, "--authors-eps")[0]
    if args.families:
        o.families = _names(args.families)
    if args.severities:
        o.severities = _ints(args.severities, "--severities")
    if args.ood_data:
        o.ood_data = _names(args.ood_data)
    if args.scores:
        o.scores = _names(args.scores)
    for flag, attr in (("odin_temperature", "odin_temperature"), ("odin_eps", "odin_eps"),
                       ("energy_temperature", "energy_temperature")):
        if getattr(args, flag):
            setattr(o, attr, _floats(getattr(args, flag), "--" + flag.replace("_", "-"))[0])
    if args.heads:
        o.heads = _names(args.heads)
    if args.batch_size is not None:
        o.batch_size = args.batch_size


PARTS = ("robustness", "adversarial", "corruptions", "ood", "fgsm_authors")  # flags that start an evaluation


def run(args: argparse.Namespace) -> None:
    if any(getattr(args, part) for part in PARTS):
        return _robust(args)
    given = [k for k, default in args.robust_only.items() if getattr(args, k) != default]
    if given:
        raise PeerdistillError(f"--{given[0].replace('_', '-')} shapes a robustness evaluation: add --robustness "
                               f"(or --adversarial, --corruptions, --ood)")
    from ..engine.run import evaluate, format_table

    res = evaluate(args.path, args.checkpoint)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['checkpoint']} (epoch {res['epoch']})")
    for split in ("val", "test"):
        if res[split]:
            print(f"\n{split}:\n{format_table(res[split])}")


def _robust(args: argparse.Namespace) -> None:
    from ..engine.robust import robust_evaluate
    from ..report.robust_tables import format_robust

    opts = options_from_args(args)
    opts.check()  # before the run is loaded: a bad option costs nothing
    echo = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    res = robust_evaluate(args.path, opts, args.checkpoint, args.threads, echo)
    if args.json:
        print(json.dumps(res))
        return
    print(format_robust(res))


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="re-evaluate a saved run or checkpoint (accuracy, or robustness)",
                       description="Re-evaluate a run on its validation and test sets; with --robustness (or "
                       "a part of it) its adversarial, corruption and OOD robustness, recorded in eval.json.")
    e.add_argument("path", help="run directory or checkpoint file")
    e.add_argument("--checkpoint", default="last.pt", help="last.pt or best.pt when PATH is a directory")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    g = e.add_argument_group("robustness (results in <run>/eval.json)")
    g.add_argument("--robustness", action="store_true", help="adversarial + corruptions + OOD")
    g.add_argument("--adversarial", action="store_true", help="accuracy under FGSM / PGD (L-inf)")
    g.add_argument("--corruptions", action="store_true", help="accuracy under CIFAR-C corruptions, mCA")
    g.add_argument("--ood", action="store_true", help="OOD detection: AUROC, AUPR-in/out, FPR95")
    g.add_argument("--limit", type=int, metavar="N", help="test images per part (default: 500 attacks, "
                   "500 corruptions, 1000 OOD; a fixed seeded subset)")
    for part in ("adv", "corruption", "ood"):
        g.add_argument(f"--{part}-limit", type=int, metavar="N", help=f"test images for the {part} part alone")
    g.add_argument("--seed", type=int, default=0, help="seed of the subsets, PGD starts, corruptions, noise")
    g.add_argument("--batch-size", type=int, metavar="B", help="images per forward pass (default 250)")
    g.add_argument("--heads", metavar="H,..", help="heads to evaluate (default: every head of the method)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: the run's own setting)")
    g.add_argument("--no-plots", action="store_true", help="skip robust_accuracy_eps.png / ood_scores.png")
    a = e.add_argument_group("adversarial")
    a.add_argument("--eps", metavar="E,..", help="L-inf budgets on [0, 1] images (default 1/255,2/255,4/255,8/255)")
    a.add_argument("--attacks", metavar="A,..", help="fgsm, pgd (default both)")
    a.add_argument("--pgd-steps", type=int, metavar="K", help="PGD steps (default 10)")
    a.add_argument("--pgd-step-size", metavar="S", help="PGD step (default 2.5*eps/steps)")
    a.add_argument("--no-random-start", action="store_true", help="PGD starts at the clean image")
    a.add_argument("--fgsm-authors", action="store_true", help="also the SD-Dropout authors' setting: IBM ART "
                   "FGSM eps=0.2 on normalised inputs, clipped to (0, 1), against predicted labels")
    a.add_argument("--authors-eps", metavar="E", help="eps of --fgsm-authors (default 0.2)")
    c = e.add_argument_group("corruptions")
    c.add_argument("--families", metavar="F,..", help="default (14 families, no extra), common (15), all (19), "
                   "or names (gaussian_noise,fog,...)")
    c.add_argument("--severities", metavar="S,..", help="1..5 (default all)")
    c.add_argument("--corruption-source", choices=("builtin", "imagecorruptions"), default="builtin",
                   help="builtin: CIFAR-C definitions; imagecorruptions: that package's ImageNet-C ones (>= 32 px)")
    c.add_argument("--corruptions-npy", metavar="DIR", help="a published CIFAR-10-C / CIFAR-100-C folder "
                   "(<family>.npy + labels.npy); CIFAR runs find one under the data roots by themselves")
    o = e.add_argument_group("out-of-distribution")
    o.add_argument("--ood-data", metavar="SET,..", help="auto (default: held-out classes, the paired dataset "
                   "if installed, gaussian, uniform), holdout, a dataset name (mnist, cifar100, ...), gaussian, uniform")
    o.add_argument("--ood-root", metavar="DIR", help="data.root of an OOD dataset")
    o.add_argument("--scores", metavar="S,..", help="msp, odin, energy (default all)")
    o.add_argument("--odin-temperature", metavar="T", help="ODIN temperature (default 1000)")
    o.add_argument("--odin-eps", metavar="E", help="ODIN input perturbation (default 0.0014; 0 = none)")
    o.add_argument("--odin-space", choices=("pixel", "normalised"), default="pixel",
                   help="pixel: eps on [0, 1] images, as ODIN's code; normalised: on the normalised tensor")
    o.add_argument("--energy-temperature", metavar="T", help="energy temperature (default 1)")
    o.add_argument("--fpr-rule", choices=("highest", "odin"), default="highest",
                   help="FPR95's threshold: highest (the highest keeping 95%% of the in-distribution scores) or "
                        "odin (ODIN's: the mean FPR over the thresholds whose TPR is 95%% +- 0.05 points)")
    shaping = [act for group in (g, a, c, o) for act in group._group_actions if act.dest not in PARTS]
    e.set_defaults(fn=run, robust_only={act.dest: act.default for act in shaping})  # alone, they would do nothing
