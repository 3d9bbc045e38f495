"""The options of a robustness evaluation (``peerdistill eval --robustness`` and a config's ``robustness:``
section): their types and ranges, their check, and their parsing from a mapping.

Below the engine on purpose: building a run validates its config's ``robustness`` section here, without
importing the evaluation (which sits above the engine and builds runs itself).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal

from ..errors import PeerdistillError, nearest
from ..params import Interval, NonNegativeInt, Positive, PositiveInt, check_value
from . import corruptions as CR
from . import ood as OOD

ATTACKS = ("fgsm", "pgd")
SCORES = ("msp", "odin", "energy")


Eps = Annotated[float, Interval(gt=0, le=1)]  # an L-inf budget: a fraction of the [0, 1] pixel range
Severity = Annotated[int, Interval(ge=1, le=5)]


@dataclass
class RobustOptions:
    """What to evaluate and how (the ``peerdistill eval`` options; defaults fit 3 minutes on 2 CPU cores
    for a Fashion-MNIST ResNet-14). Each field's annotation is its valid range: the command line, the
    config's ``robustness:`` section and :meth:`check` all read it."""

    adversarial: bool = False
    corruptions: bool = False
    ood: bool = False
    eps: list[Eps] = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    attacks: list[Literal["fgsm", "pgd"]] = field(default_factory=lambda: list(ATTACKS))
    pgd_steps: PositiveInt = 10
    pgd_step_size: Eps | None = None  # None: 2.5 * eps / steps (Madry et al.)
    pgd_random_start: bool = True
    fgsm_authors: bool = False  # also the SD-Dropout authors' ART setting
    authors_eps: Positive = 0.2  # on normalised inputs, so it may exceed 1
    adv_limit: PositiveInt = 500
    families: list[str] = field(default_factory=lambda: list(CR.DEFAULT))
    severities: list[Severity] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    corruption_limit: PositiveInt = 500
    corruption_source: Literal["builtin", "imagecorruptions"] = "builtin"  # imagecorruptions: ImageNet-C definitions
    corruptions_npy: str | None = None  # a folder of published <family>.npy + labels.npy
    ood_data: list[str] = field(default_factory=lambda: ["auto"])
    ood_root: str | None = None
    ood_limit: PositiveInt = 1000
    scores: list[Literal["msp", "odin", "energy"]] = field(default_factory=lambda: list(SCORES))
    odin_temperature: Positive = OOD.ODIN_T
    odin_eps: Annotated[float, Interval(ge=0, le=1)] = OOD.ODIN_EPS
    odin_space: Literal["pixel", "normalised"] = "pixel"  # pixel: eps in [0, 1] units, as ODIN's code
    energy_temperature: Positive = 1.0
    fpr_rule: Literal["highest", "odin"] = "highest"  # FPR95's threshold rule: ours, or ODIN's calMetric
    heads: list[str] | None = None
    seed: NonNegativeInt = 0
    batch_size: PositiveInt = 250
    plots: bool = True

    def check(self) -> None:
        """One-line errors for values no run could use: each field against its annotation, then the
        options together."""
        hints = typing.get_type_hints(RobustOptions, include_extras=True)
        for f in fields(self):
            setattr(self, f.name, check_value(getattr(self, f.name), hints[f.name], f"robustness option {f.name!r}"))
        if not (self.adversarial or self.corruptions or self.ood):
            raise PeerdistillError("nothing to evaluate: give --robustness, --adversarial, --corruptions or --ood")
        if not self.eps or not self.severities:
            raise PeerdistillError("the lists of eps and severities cannot be empty")
        self.families = CR.resolve_families(self.families)


def options_from_mapping(d: dict[str, Any]) -> RobustOptions:
    """:class:`RobustOptions` from a mapping (a config section), e.g. ``{"adversarial": True, "limit": 500}``;
    ``limit`` sets the three per-part limits. An unknown key is a one-line error naming the nearest."""
    d = dict(d)
    limit = d.pop("limit", None)
    names = [f.name for f in fields(RobustOptions)]
    hints = typing.get_type_hints(RobustOptions, include_extras=True)
    for k, v in d.items():
        if k not in names:
            raise PeerdistillError(f"unknown robustness option {k!r}{nearest(k, [*names, 'limit'])}")
        d[k] = check_value(v, hints[k], f"robustness option {k!r}")
    opt = RobustOptions(**d)
    if limit is not None:
        opt.adv_limit = opt.corruption_limit = opt.ood_limit = check_value(limit, PositiveInt,
                                                                           "robustness option 'limit'")
    return opt
