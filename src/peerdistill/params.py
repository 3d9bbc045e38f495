"""Declarative parameter constraints, stated once where a parameter is declared (DESIGN §5).

A hyper-parameter's valid range lives in its type annotation, and the registry (for components) or the
config (for config keys) checks it before anything is built::

    def __init__(self, temperature: Positive = 1.0, variant: Literal["both", "forward"] = "both"): ...

``Annotated[float, Interval(gt=0)]`` bounds a number, ``Literal[...]`` lists the allowed strings, and the
plain type (``int``, ``float``, ``bool``, ``str``, ``list[...]``) is checked for every value. Every method,
mixer, model and dataset added later is covered without new code, and the fuzz test reads the same
annotations to generate invalid values.
"""
from __future__ import annotations

import argparse
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction as _Fraction
from typing import Annotated, Any, Literal

import yaml

from .errors import PeerdistillError


@dataclass(frozen=True)
class Interval:
    """Bounds of a number: any of ``gt``, ``ge``, ``lt``, ``le``; non-finite values are always refused."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def ok(self, v: float) -> bool:
        return (math.isfinite(v) and (self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def describe(self) -> str:
        lo = f"> {self.gt:g}" if self.gt is not None else f">= {self.ge:g}" if self.ge is not None else ""
        hi = f"< {self.lt:g}" if self.lt is not None else f"<= {self.le:g}" if self.le is not None else ""
        return " and ".join(p for p in (lo, hi) if p) or "finite"


Positive = Annotated[float, Interval(gt=0)]
NonNegative = Annotated[float, Interval(ge=0)]
Probability = Annotated[float, Interval(ge=0, le=1)]
Fraction = Annotated[float, Interval(ge=0, lt=1)]  # e.g. a dropout rate or a split share
PositiveInt = Annotated[int, Interval(ge=1)]
NonNegativeInt = Annotated[int, Interval(ge=0)]
Decay = Annotated[float, Interval(ge=0, lt=1)]  # EMA decays, momenta

__all__ = ["Interval", "Positive", "NonNegative", "Probability", "Fraction", "PositiveInt", "NonNegativeInt",
           "Decay", "Literal", "check_value", "describe_type", "Option", "parse_value", "parse_fraction", "parse_list"]


def _split(hint: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` -> ``(T, [m1, m2])``; anything else -> ``(hint, [])``."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, meta
    return hint, []


def describe_type(hint: Any) -> str:
    """A short human name of a hint: ``float > 0``, ``one of a, b``, ``int or none``."""
    base, meta = _split(hint)
    origin = typing.get_origin(base)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(base)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(base))
    if origin is list:
        return f"a list of {describe_type(typing.get_args(base)[0])}"
    name = "none" if base is type(None) else getattr(base, "__name__", str(base))
    bounds = [m.describe() for m in meta if isinstance(m, Interval)]
    return f"{name} {bounds[0]}" if bounds else name


def check_value(value: Any, hint: Any, what: str) -> Any:
    """Return ``value`` (ints widened to float where a float is declared) or raise a one-line error.

    Args:
        value: the value as parsed from YAML or the command line.
        hint: the parameter's annotation (resolved, with extras).
        what: how to name the parameter in the message, e.g. ``"parameter 'alpha' of mixer 'mixup'"``.
    """
    try:
        return _check(value, hint)
    except _Invalid:
        raise PeerdistillError(f"{what} must be {describe_type(hint)}, got {value!r}") from None


class _Invalid(Exception):
    pass


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check(value: Any, hint: Any) -> Any:
    base, meta = _split(hint)
    origin = typing.get_origin(base)
    if base is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(base):
            try:
                return _check(value, option)
            except _Invalid:
                pass
        raise _Invalid
    if origin is Literal:
        if value not in typing.get_args(base) or isinstance(value, bool):
            raise _Invalid
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Invalid
        inner = typing.get_args(base)[0] if typing.get_args(base) else Any
        return [_check(v, inner) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid
        return value
    value = _check_plain(value, base)
    for m in meta:
        if isinstance(m, Interval) and not m.ok(value):
            raise _Invalid
    return value


def _check_plain(value: Any, base: Any) -> Any:
    if base is type(None):
        if value is not None:
            raise _Invalid
        return None
    if base is bool:
        if not isinstance(value, bool):
            raise _Invalid
        return value
    if base is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-5` (no dot) as a string
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Invalid
        return float(value)
    if base is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid
        return value
    if isinstance(base, type) and not isinstance(value, base):
        raise _Invalid
    return value


# ------------------------------------------------------------------------------ command-line options
def parse_value(text: str) -> Any:
    """A command-line value read as YAML reads it (``3`` is an int, ``0.5`` a float, ``[1, 2]`` a list)."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def parse_fraction(text: str) -> Any:
    """A number or a fraction (``8/255``) as a float; anything else is returned as typed."""
    try:
        return float(_Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        return parse_value(text)


def parse_list(item: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """Comma-separated items, each read by ``item`` (e.g. ``1/255,2/255`` with :func:`parse_fraction`)."""
    def parse(text: str) -> list[Any]:
        return [item(t.strip()) for t in text.split(",") if t.strip()]
    return parse


class Option:
    """An ``argparse`` ``type`` that reads a command-line option and checks it against an annotation.

    Every numeric or listed option of every command declares its range the way parameters do, so a bad
    value is one line naming the option (``argument --steps: must be int >= 1, got '0'``) and the fuzz test
    reads the same annotation to generate invalid values.

    Args:
        hint: the annotation, e.g. ``PositiveInt`` or ``list[Annotated[float, Interval(gt=0, le=1)]]``.
        parse: turns the typed text into a value (default: as YAML reads it).
        note: appended to the message, e.g. how to write the value correctly.
    """

    def __init__(self, hint: Any, parse: Callable[[str], Any] = parse_value, note: str = "") -> None:
        self.hint, self.parse, self.note = hint, parse, note
        self.__name__ = describe_type(hint)  # argparse names a type by it

    def __call__(self, text: str) -> Any:
        try:
            return _check(self.parse(text), self.hint)
        except _Invalid:
            raise argparse.ArgumentTypeError(f"must be {describe_type(self.hint)}{self.note}, got {text!r}") from None
