"""One small registry type shared by models, methods, datasets and mixers."""
from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import PeerdistillError, nearest
from .params import check_value

T = TypeVar("T")


#: The rule every built-in key follows: lower-case words (letters and digits) joined by ``_``
#: (``fashion_mnist``, ``cs_kd``, ``crop_flip``, ``wrn_16_1``). A ``+`` or ``-`` is never part of a key: where a
#: key used one, the old spelling is registered as an alias of the canonical one.
KEY_RULE = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")


class Registry(Generic[T]):
    """Maps a lowercase key to a constructor (class or factory function).

    A key may have aliases (older spellings): every method of the registry accepts them, ``canonical`` turns
    one into the key, and iteration yields canonical keys only.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("resnet20")
        ... def resnet20(num_classes: int = 10, in_channels: int = 3): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register a constructor under ``name`` (and ``aliases``, older spellings that keep working)."""
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            for key in (name, *aliases):
                if key in self._items or key in self._aliases:
                    raise KeyError(f"{self.kind} {key!r} registered twice")
            self._items[name] = obj
            self._aliases.update(dict.fromkeys(aliases, name))
            return obj

        return deco

    def canonical(self, name: str) -> str:
        """The key ``name`` stands for: the key itself, or the key an alias names (anything else: unchanged)."""
        return self._aliases.get(name, name)

    def canonical_list(self, names: str) -> str:
        """A comma-separated list of names (a heterogeneous cohort's ``resnet8,resnet14``) with each name
        canonical; the text itself when every name already is (its spacing kept)."""
        parts = [p.strip() for p in names.split(",")]
        if all(self.canonical(p) == p for p in parts):
            return names
        return ",".join(self.canonical(p) for p in parts)

    def aliases(self, name: str) -> list[str]:
        """The older spellings of key ``name``."""
        return sorted(a for a, key in self._aliases.items() if key == name)

    def get(self, name: str) -> Callable[..., T]:
        name = self.canonical(name)
        if name not in self._items:
            raise PeerdistillError(
                f"unknown {self.kind} {name!r}{nearest(name, self._items)}; "
                f"run `peerdistill list` for all {self.kind}s"
            )
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Construct ``name`` after validating ``kwargs`` against its signature."""
        ctor = self.get(name)
        kwargs = check_kwargs(ctor, kwargs, f"{self.kind} {name!r}", skip=len(args))
        return ctor(*args, **kwargs)

    def check(self, name: str, kwargs: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """Validate ``kwargs`` for ``name`` without building it (``skip``: parameters the engine supplies)."""
        ctor = self.get(name)
        for key in skip:
            if key in kwargs:
                raise PeerdistillError(f"parameter {key!r} of {self.kind} {name!r} is set by the engine, not the config")
        return check_kwargs(ctor, kwargs, f"{self.kind} {name!r}")

    def resolve(self, name: str, kwargs: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """``kwargs`` validated as by :meth:`check`, plus the default of every parameter not given, in signature
        order: the arguments a run records, so that its config names every value it was built with."""
        checked = self.check(name, kwargs, skip)
        params = {k: v for k, v in self.params(name).items() if k not in skip}
        return {k: checked[k] if k in checked else plain(v) for k, v in params.items()
                if k in checked or v is not inspect.Parameter.empty}

    def hints(self, name: str) -> dict[str, Any]:
        """Annotated types (with constraints) of ``name``'s parameters."""
        return param_hints(self.get(name))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def params(self, name: str) -> dict[str, Any]:
        """Hyper-parameters of ``name`` and their defaults (``inspect.Parameter.empty`` if required)."""
        return {p.name: p.default for p in _user_params(self.get(name))}


def with_defaults(ctor: Callable[..., Any], then: Callable[[Any], T] | None = None, doc: str | None = None,
                  **defaults: Any) -> Callable[..., T]:
    """One definition, another use: ``ctor`` with other documented defaults, its result passed to ``then``.

    The returned constructor has ``ctor``'s parameters, annotations (so the same checks) and body; only the
    defaults named here differ. A registry can register it beside ``ctor`` (a mixer used as an augmentation).

    Args:
        ctor: the one definition (a class or factory function).
        then: wraps what ``ctor`` built (``None``: returned as is).
        doc: the docstring of this use (default: ``ctor``'s).
        defaults: parameter name -> this use's default; each must be a parameter of ``ctor``.
    """
    sig = inspect.signature(ctor)
    unknown = sorted(set(defaults) - set(sig.parameters))
    if unknown:
        raise KeyError(f"{getattr(ctor, '__name__', ctor)} has no parameter {', '.join(unknown)}")
    new_sig = sig.replace(parameters=[p.replace(default=defaults[p.name]) if p.name in defaults else p
                                      for p in sig.parameters.values()], return_annotation=inspect.Signature.empty)

    def build(*args: Any, **kwargs: Any) -> T:
        bound = new_sig.bind(*args, **kwargs)
        bound.apply_defaults()
        obj = ctor(*bound.args, **bound.kwargs)
        return then(obj) if then is not None else obj

    build.__signature__ = new_sig  # type: ignore[attr-defined]
    build.__annotations__ = param_hints(ctor)
    build.__doc__ = doc if doc is not None else inspect.getdoc(ctor)
    build.__name__ = build.__qualname__ = getattr(ctor, "__name__", "build")
    build.__module__ = getattr(ctor, "__module__", __name__)
    return build


def plain(value: Any) -> Any:
    """A default as YAML writes it (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return {k: plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def _user_params(ctor: Callable[..., Any]) -> list[inspect.Parameter]:
    sig = inspect.signature(ctor)
    return [p for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def param_hints(ctor: Callable[..., Any]) -> dict[str, Any]:
    """Resolved annotations (with their constraints) of a constructor's parameters.

    Unannotated parameters get the type of their default, which is how older components declare them.
    """
    fn = ctor.__init__ if inspect.isclass(ctor) else ctor
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except (NameError, TypeError):  # an annotation that does not resolve: fall back to the defaults
        hints = {}
    out: dict[str, Any] = {}
    for p in _user_params(ctor):
        if p.name in hints:
            out[p.name] = hints[p.name]
        elif p.default is not inspect.Parameter.empty and p.default is not None:
            out[p.name] = type(p.default) if not isinstance(p.default, tuple) else list
    return out


def check_kwargs(ctor: Callable[..., Any], kwargs: dict[str, Any], what: str, skip: int = 0) -> dict[str, Any]:
    """Validate ``kwargs`` against the constructor's signature; return them with ints widened to floats.

    An unknown key, a wrongly typed value or a value outside the declared range (:mod:`peerdistill.params`)
    is a one-line :class:`PeerdistillError` naming the parameter and, for a typo, the nearest valid names.
    """
    params = {p.name: p for p in _user_params(ctor)[skip:]}
    hints = param_hints(ctor)
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key not in params:
            raise PeerdistillError(f"unknown parameter {key!r} for {what}{nearest(key, params)}; "
                                   f"valid: {', '.join(params) or 'none'}")
        if key in hints:
            out[key] = check_value(value, hints[key], f"parameter {key!r} of {what}")
    return out
