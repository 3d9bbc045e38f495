"""``peerdistill eval RUN``: re-evaluate a saved run (or checkpoint) on its validation and test sets,
or, with ``--robustness`` (or ``--adversarial`` / ``--corruptions`` / ``--ood``), its robustness:
accuracy under FGSM/PGD, under CIFAR-C corruptions, and OOD detection (see docs, robustness)."""
from __future__ import annotations

import argparse
import json
import sys
import typing
from typing import Any

from ..errors import PeerdistillError
from ..params import Option, PositiveInt, parse_fraction, parse_list, parse_value


def _hints() -> dict[str, Any]:
    from ..robust_options import RobustOptions

    return typing.get_type_hints(RobustOptions, include_extras=True)


def _opt(name: str, parse: Any = parse_value, note: str = "") -> Option:
    """The argparse type of the :class:`~peerdistill.robust_options.RobustOptions` field ``name``: its annotation is
    the option's valid range, so ``--eps 8`` is refused before anything is loaded or written."""
    return Option(_hints()[name], parse, note)


FIELDS = ("eps", "attacks", "pgd_steps", "pgd_step_size", "authors_eps", "families", "severities", "ood_data",
          "scores", "odin_temperature", "odin_eps", "energy_temperature", "heads", "batch_size", "seed",
          "corruption_source", "corruptions_npy", "odin_space", "ood_root", "fpr_rule")  # option dest = field name
EPS_NOTE = " (a fraction of the [0, 1] pixel range: 8/255 is 8 of 255 levels)"


def options_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~peerdistill.robust_options.RobustOptions` the command line asks for."""
    from ..robust_options import RobustOptions

    every = args.robustness
    o = RobustOptions(adversarial=every or args.adversarial, corruptions=every or args.corruptions,
                      ood=every or args.ood, fgsm_authors=args.fgsm_authors,
                      pgd_random_start=not args.no_random_start, plots=not args.no_plots)
    if args.fgsm_authors and not (o.adversarial or o.corruptions or o.ood):
        o.adversarial = True
    for name in FIELDS:
        if getattr(args, name) is not None:
            setattr(o, name, getattr(args, name))
    for name in ("adv_limit", "corruption_limit", "ood_limit"):
        value = getattr(args, name) if getattr(args, name) is not None else args.limit
        if value is not None:
            setattr(o, name, value)
    return o


PARTS = ("robustness", "adversarial", "corruptions", "ood", "fgsm_authors")  # flags that start an evaluation


def run(args: argparse.Namespace) -> None:
    if any(getattr(args, part) for part in PARTS):
        return _robust(args)
    given = [k for k, default in args.robust_only.items() if getattr(args, k) != default]
    if given:
        raise PeerdistillError(f"--{given[0].replace('_', '-')} shapes a robustness evaluation: add --robustness "
                               f"(or --adversarial, --corruptions, --ood)")
    from ..run import evaluate, format_table

    res = evaluate(args.path, args.checkpoint)
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['checkpoint']} (epoch {res['epoch']})")
    for split in ("val", "test"):
        if res[split]:
            print(f"\n{split}:\n{format_table(res[split])}")


def _robust(args: argparse.Namespace) -> None:
    from ..evaluation.robust import robust_evaluate
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
    e.add_argument("--checkpoint", metavar="NAME", help="the checkpoint of a run directory: last.pt (default) or "
                   "best.pt; one that does not exist is an error")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    g = e.add_argument_group("robustness (results in <run>/eval.json)")
    g.add_argument("--robustness", action="store_true", help="adversarial + corruptions + OOD")
    g.add_argument("--adversarial", action="store_true", help="accuracy under FGSM / PGD (L-inf)")
    g.add_argument("--corruptions", action="store_true", help="accuracy under CIFAR-C corruptions, mCA")
    g.add_argument("--ood", action="store_true", help="OOD detection: AUROC, AUPR-in/out, FPR95")
    g.add_argument("--limit", type=Option(PositiveInt), metavar="N", help="test images per part (default: 500 "
                   "attacks, 500 corruptions, 1000 OOD; a fixed seeded subset)")
    for part in ("adv", "corruption", "ood"):
        g.add_argument(f"--{part}-limit", type=_opt(f"{part}_limit"), metavar="N",
                       help=f"test images for the {part} part alone")
    g.add_argument("--seed", type=_opt("seed"), help="seed of the subsets, PGD starts, corruptions, noise (default 0)")
    g.add_argument("--batch-size", type=_opt("batch_size"), metavar="B", help="images per forward pass (default 250)")
    g.add_argument("--heads", type=_opt("heads", parse_list()), metavar="H,..",
                   help="heads to evaluate (default: every head of the method)")
    g.add_argument("--threads", type=Option(PositiveInt), metavar="N",
                   help="CPU threads (default: the run's own setting)")
    g.add_argument("--no-plots", action="store_true", help="skip robust_accuracy_eps.png / ood_scores.png")
    a = e.add_argument_group("adversarial")
    a.add_argument("--eps", type=_opt("eps", parse_list(parse_fraction), EPS_NOTE), metavar="E,..",
                   help="L-inf budgets in (0, 1] on [0, 1] images, e.g. 8/255 (default 1/255,2/255,4/255,8/255)")
    a.add_argument("--attacks", type=_opt("attacks", parse_list()), metavar="A,..", help="fgsm, pgd (default both)")
    a.add_argument("--pgd-steps", type=_opt("pgd_steps"), metavar="K", help="PGD steps (default 10)")
    a.add_argument("--pgd-step-size", type=_opt("pgd_step_size", parse_fraction, EPS_NOTE), metavar="S",
                   help="PGD step (default 2.5*eps/steps)")
    a.add_argument("--no-random-start", action="store_true", help="PGD starts at the clean image")
    a.add_argument("--fgsm-authors", action="store_true", help="also the SD-Dropout authors' setting: IBM ART "
                   "FGSM eps=0.2 on normalised inputs, clipped to (0, 1), against predicted labels")
    a.add_argument("--authors-eps", type=_opt("authors_eps", parse_fraction), metavar="E",
                   help="eps of --fgsm-authors, on normalised inputs (default 0.2)")
    c = e.add_argument_group("corruptions")
    c.add_argument("--families", type=_opt("families", parse_list()), metavar="F,..", help="default (14 families, "
                   "no extra), common (15), all (19), or names (gaussian_noise,fog,...)")
    c.add_argument("--severities", type=_opt("severities", parse_list(parse_value)), metavar="S,..",
                   help="1..5 (default all)")
    c.add_argument("--corruption-source", choices=("builtin", "imagecorruptions"),
                   help="builtin (default): CIFAR-C definitions; imagecorruptions: that package's ImageNet-C ones "
                        "(>= 32 px)")
    c.add_argument("--corruptions-npy", metavar="DIR", help="a published CIFAR-10-C / CIFAR-100-C folder "
                   "(<family>.npy + labels.npy); CIFAR runs find one under the data roots by themselves")
    o = e.add_argument_group("out-of-distribution")
    o.add_argument("--ood-data", type=_opt("ood_data", parse_list()), metavar="SET,..",
                   help="auto (default: held-out classes, the paired dataset if installed, gaussian, uniform), "
                        "holdout, a dataset name (mnist, cifar100, ...), gaussian, uniform")
    o.add_argument("--ood-root", metavar="DIR", help="data.root of an OOD dataset")
    o.add_argument("--scores", type=_opt("scores", parse_list()), metavar="S,..",
                   help="msp, odin, energy (default all)")
    o.add_argument("--odin-temperature", type=_opt("odin_temperature", parse_fraction), metavar="T",
                   help="ODIN temperature (default 1000)")
    o.add_argument("--odin-eps", type=_opt("odin_eps", parse_fraction), metavar="E",
                   help="ODIN input perturbation in [0, 1] (default 0.0014; 0 = none)")
    o.add_argument("--odin-space", choices=("pixel", "normalised"),
                   help="pixel (default): eps on [0, 1] images, as ODIN's code; normalised: on the normalised tensor")
    o.add_argument("--energy-temperature", type=_opt("energy_temperature", parse_fraction), metavar="T",
                   help="energy temperature (default 1)")
    o.add_argument("--fpr-rule", choices=("highest", "odin"),
                   help="FPR95's threshold: highest (default: the highest keeping 95%% of the in-distribution scores) "
                        "or odin (ODIN's: the mean FPR over the thresholds whose TPR is 95%% +- 0.05 points)")
    shaping = [act for group in (g, a, c, o) for act in group._group_actions if act.dest not in PARTS]
    e.set_defaults(fn=run, robust_only={act.dest: act.default for act in shaping})  # alone, they would do nothing
