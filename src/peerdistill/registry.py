"""One small registry type shared by models, methods, datasets and mixers."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import PeerdistillError, nearest

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a lowercase key to a constructor (class or factory function).

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("resnet20")
        ... def resnet20(num_classes: int = 10, in_channels: int = 3): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            raise PeerdistillError(
                f"unknown {self.kind} {name!r}{nearest(name, self._items)}; "
                f"run `peerdistill list` for all {self.kind}s"
            )
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Construct ``name`` after validating ``kwargs`` against its signature."""
        ctor = self.get(name)
        check_kwargs(ctor, kwargs, f"{self.kind} {name!r}", skip=len(args))
        return ctor(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def params(self, name: str) -> dict[str, Any]:
        """Hyper-parameters of ``name`` and their defaults (``inspect.Parameter.empty`` if required)."""
        return {p.name: p.default for p in _user_params(self.get(name))}


def _user_params(ctor: Callable[..., Any]) -> list[inspect.Parameter]:
    sig = inspect.signature(ctor)
    return [p for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_kwargs(ctor: Callable[..., Any], kwargs: dict[str, Any], what: str, skip: int = 0) -> None:
    """Raise a one-line :class:`PeerdistillError` for an unknown key or a wrongly typed value.

    Values are checked against the parameter's default type (bool, int, float, str, tuple/list),
    which is how every hyper-parameter in this library is declared. ``int`` is accepted for float.
    """
    params = {p.name: p for p in _user_params(ctor)[skip:]}
    for key, value in kwargs.items():
        if key not in params:
            raise PeerdistillError(f"unknown parameter {key!r} for {what}{nearest(key, params)}; "
                                   f"valid: {', '.join(params) or 'none'}")
        default = params[key].default
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        if not _type_ok(value, default):
            raise PeerdistillError(f"parameter {key!r} of {what} must be {type(default).__name__}, "
                                   f"got {value!r}")


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))
