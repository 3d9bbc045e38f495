"""The options of a robustness evaluation: the type of a run config's ``robustness`` field and of
``peerdistill eval --robustness``'s options — their types, ranges and defaults, their check, and their
parsing from a mapping.

Below the config on purpose: :class:`~peerdistill.config.Config` types its ``robustness`` field with
:class:`RobustOptions`, so a config's section is parsed and checked when the config is read, and building
a run never imports the evaluation (which sits above the engine and builds runs itself). What it needs of
the metrics lives here with it: the corruption family names (``metrics.corruptions`` implements them) and
ODIN's defaults (``metrics.ood`` uses them).

**Stored as given, compared normalised.** A config's section keeps the mapping the user wrote
(:meth:`RobustOptions.mapping`), which is what a run's ``config.yaml`` stores — exactly as before the field
was typed, so the files of runs written before are unchanged. ``--resume`` and the run tables compare the
section by :meth:`RobustOptions.normalised` (every option's value, ``limit`` spread to its three limits, the
family groups resolved), so ``{adversarial: true}`` and ``{adversarial: true, pgd_steps: 10}`` are one
experiment.
"""
from __future__ import annotations

import copy
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal

from .errors import PeerdistillError, nearest
from .params import Interval, NonNegativeInt, Positive, PositiveInt, check_value

ATTACKS = ("fgsm", "pgd")
SCORES = ("msp", "odin", "energy")

# The 19 CIFAR-C files, in the reference order (15 "common" + 4 "extra"); the index seeds the streams
# (metrics.corruptions implements each family).
ALL = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
       "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
       "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")
COMMON = ALL[:15]
NEEDS_EXTRA = ("frost", "spatter")
DEFAULT = tuple(f for f in COMMON if f not in NEEDS_EXTRA)  # 14 families, no extra needed

# ODIN's defaults (Liang et al., ICLR 2018, §4: T = 1000 for every network; the released code's CIFAR
# DenseNet magnitude 0.0014).
ODIN_T = 1000.0
ODIN_EPS = 0.0014

Eps = Annotated[float, Interval(gt=0, le=1)]  # an L-inf budget: a fraction of the [0, 1] pixel range
Severity = Annotated[int, Interval(ge=1, le=5)]


def resolve_families(spec: str | list[str]) -> list[str]:
    """``default`` (14, no extra), ``common`` (the 15 of CIFAR-C's mean), ``all`` (19) or names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names if n.strip()):
        group = {"default": DEFAULT, "common": COMMON, "all": ALL}.get(name)
        if group is None and name not in ALL:
            raise PeerdistillError(f"unknown corruption {name!r}{nearest(name, [*ALL, 'default', 'common', 'all'])}")
        out += [f for f in (group or (name,)) if f not in out]
    if not out:
        raise PeerdistillError("no corruption family selected")
    return out


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
    families: list[str] = field(default_factory=lambda: list(DEFAULT))
    severities: list[Severity] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    corruption_limit: PositiveInt = 500
    corruption_source: Literal["builtin", "imagecorruptions"] = "builtin"  # imagecorruptions: ImageNet-C definitions
    corruptions_npy: str | None = None  # a folder of published <family>.npy + labels.npy
    ood_data: list[str] = field(default_factory=lambda: ["auto"])
    ood_root: str | None = None
    ood_limit: PositiveInt = 1000
    scores: list[Literal["msp", "odin", "energy"]] = field(default_factory=lambda: list(SCORES))
    odin_temperature: Positive = ODIN_T
    odin_eps: Annotated[float, Interval(ge=0, le=1)] = ODIN_EPS
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
        self.families = resolve_families(self.families)

    @classmethod
    def from_mapping(cls, d: Any) -> RobustOptions:
        """:func:`options_from_mapping`: how a config's ``robustness:`` section is read."""
        if not isinstance(d, dict):
            raise PeerdistillError(f"config key 'robustness' must be a mapping of robustness options (e.g. "
                                   f"{{adversarial: true, limit: 500}}) or none, got {d!r}")
        return options_from_mapping(d)

    def mapping(self) -> dict[str, Any]:
        """The options as a config stores them: the mapping they were read from (what the user gave), else
        (options built in code) the options that differ from their defaults."""
        given = getattr(self, "given", None)
        if given is not None:
            return copy.deepcopy(given)
        default = RobustOptions()
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def normalised(self) -> dict[str, Any]:
        """Every option's value as compared (``--resume``, run tables, sweeps): numbers as floats where the
        option is a float, family groups (``default``) resolved, nothing left implicit."""
        out = asdict(self)
        hints = typing.get_type_hints(RobustOptions, include_extras=True)
        for key, value in out.items():
            try:
                out[key] = check_value(value, hints[key], key)
            except PeerdistillError:
                pass  # compared as written; the run's check reports it
        try:
            out["families"] = resolve_families(self.families)
        except PeerdistillError:
            pass
        return out


def options_from_mapping(d: dict[str, Any]) -> RobustOptions:
    """:class:`RobustOptions` from a mapping (a config section), e.g. ``{"adversarial": True, "limit": 500}``;
    ``limit`` sets the three per-part limits. An unknown key is a one-line error naming the nearest. The
    options remember the mapping (:meth:`RobustOptions.mapping`)."""
    given = copy.deepcopy(d)
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
    opt.given = given  # type: ignore[attr-defined]  # not a field: what a config stores
    return opt


def normalised_section(value: Any) -> Any:
    """A stored ``robustness`` section (a mapping, or none) as compared: :meth:`RobustOptions.normalised`;
    a section no version could read is compared as written."""
    if not isinstance(value, dict):
        return value
    try:
        return options_from_mapping(value).normalised()
    except PeerdistillError:
        return value
