"""Pretrained weights from a file the user brings (``model.pretrained=PATH``; nothing is downloaded).

:func:`load_pretrained` reads a PyTorch state_dict (``torch.load(weights_only=True)``; a checkpoint
holding it under ``state_dict`` or ``model``, with or without DDP's ``module.`` prefix, is unwrapped) or a
``.safetensors`` file (the optional ``safetensors`` package), renames its keys to the zoo's with the
key maps each model registers (torchvision's names, timm's, a reference code's; peerdistill's own names
always work), and copies every tensor, BatchNorm running statistics included. Then:

* a classifier of another size (ImageNet weights, CIFAR classes) is left as initialised, with a
  one-line note: fine-tuning from ImageNet weights;
* a first convolution trained on RGB is summed over its input channels for 1-channel data (the same
  filters applied to a grey image copied to RGB), with a note; other channel counts are refused;
* anything else that does not fit (a file of another architecture or width, a missing or extra
  tensor, a truncated or unreadable file) is one :class:`~peerdistill.errors.PeerdistillError` line.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import PeerdistillError
from ..notices import note_once
from .base import MODELS

KeyMap = Callable[[str], "str | None"]
"""Maps a key of a weights file to the zoo's name of the same tensor (``None``: no such tensor here)."""

WEIGHT_NAMES: dict[str, dict[str, KeyMap]] = {}


def register_weight_names(model: str, names: dict[str, KeyMap]) -> None:
    """Declare how the weights files of other libraries name ``model``'s tensors (``{source: key map}``)."""
    WEIGHT_NAMES.setdefault(model, {}).update(names)


def rename_rules(*rules: tuple[str, str | Callable[[re.Match[str]], str]]) -> KeyMap:
    """A key map from ``(regex, replacement)`` rules matched at the start of the key; the first match wins."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(key: str) -> str | None:
        for pattern, repl in compiled:
            if pattern.match(key):
                return pattern.sub(repl, key, count=1)
        return None

    return rename


def chain(first: KeyMap, second: KeyMap) -> KeyMap:
    """A key map applying ``first`` (e.g. timm -> torchvision names) then ``second`` (torchvision -> ours)."""

    def rename(key: str) -> str | None:
        mid = first(key)
        return None if mid is None else second(mid)

    return rename


def sequence_position(index: int, starts: tuple[int, ...]) -> str:
    """Where item ``index`` of a flat ``nn.Sequential`` (e.g. torchvision's ``features``) lives in a
    :class:`StagedNet` whose stem holds items ``[0, starts[0])`` and stage ``s`` items ``[starts[s], starts[s+1])``."""
    if index < starts[0]:
        return f"stem.{index}"
    s = max(i for i, start in enumerate(starts) if start <= index)
    return f"stages.{s}.{index - starts[s]}"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, keyed by name, on the CPU."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PeerdistillError(f"weights file {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            state: Any = _read_safetensors(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except PeerdistillError:
        raise
    except Exception as e:  # torch / safetensors raise many types for a truncated or foreign file
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise PeerdistillError(f"cannot read weights file {path}: {detail} (truncated or not a weights file?)") from None
    return _unwrap(state, path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise PeerdistillError(f"reading {path} needs the safetensors package: "
                               f"pip install 'peerdistill[safetensors]'") from None
    return load_file(str(path), device="cpu")


def _unwrap(state: Any, path: str | Path) -> dict[str, Tensor]:
    """A bare state_dict from a checkpoint dict (``state_dict`` / ``model`` entry, DDP's ``module.`` prefix)."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise PeerdistillError(f"{path} holds no state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


@dataclass
class _Match:
    """A weights file read under one naming: the tensors that found a place, and the keys that did not."""

    naming: str
    tensors: dict[str, Tensor] = field(default_factory=dict)  # the zoo's name -> tensor
    origin: dict[str, str] = field(default_factory=dict)  # the zoo's name -> the file's name
    unknown: list[str] = field(default_factory=list)  # the file's keys with no place in the model


def load_pretrained(net: nn.Module, model: str, path: str | Path,
                    head: Literal["reinit", "require"] = "reinit") -> str:
    """Copy the weights in ``path`` into ``net`` (a freshly built ``model``); returns the naming it matched.

    Args:
        net: the network, as built (its classifier keeps its initialisation when the file's does not fit).
        model: its registry name, which selects the key maps.
        path: a ``.pth`` / ``.pt`` state_dict or checkpoint, or a ``.safetensors`` file.
        head: ``"reinit"``: a classifier of another size is re-initialised (with a note);
            ``"require"``: it is an error (a frozen teacher needs its trained classifier).
    """
    ours = net.state_dict()
    names = {"peerdistill": lambda k: k, **WEIGHT_NAMES.get(model, {})}
    match = _best_naming(read_state_dict(path), names, ours)
    missing = [k for k in ours if k not in match.tensors and not k.endswith("num_batches_tracked")
               and not k.startswith("classifier.")]
    if match.unknown or missing:
        raise PeerdistillError(
            f"{path} does not hold {model} weights: {len(match.unknown)} of its tensors have no place in it"
            f"{_first(match.unknown)} and {len(missing)} of the model's are missing{_first(missing)} "
            f"(closest naming: {match.naming}; known: {', '.join(names)})")
    _fit_shapes(match, ours, model, path)
    _fit_head(match.tensors, ours, path, head)
    net.load_state_dict(match.tensors, strict=False)
    return match.naming


def _best_naming(state: dict[str, Tensor], names: dict[str, KeyMap], ours: dict[str, Tensor]) -> _Match:
    """The naming that places the most of the file's tensors."""
    matches = []
    for naming, rename in names.items():
        match = _Match(naming)
        for key, value in state.items():
            new = rename(key)
            if new is None or new not in ours:
                match.unknown.append(key)
            else:
                match.tensors[new], match.origin[new] = value, key
        matches.append(match)
    return max(matches, key=lambda m: len(m.tensors))  # the first of equals: peerdistill's own names


def _fit_shapes(match: _Match, ours: dict[str, Tensor], model: str, path: str | Path) -> None:
    """Refuse tensors of another shape, except the classifier (see :func:`_fit_head`) and a first
    convolution trained on RGB when the data has one channel (summed over its input channels)."""
    first_conv = next(k for k, v in ours.items() if v.dim() == 4)
    for key, value in match.tensors.items():
        want = ours[key].shape
        if value.shape == want or key.startswith("classifier."):
            continue
        if key == first_conv and value.shape[:1] + value.shape[2:] == want[:1] + want[2:]:
            if want[1] != 1:
                raise PeerdistillError(f"{path} was trained on {value.shape[1]}-channel images; this data has "
                                       f"{want[1]} channels (only 1-channel data can reuse RGB filters)")
            match.tensors[key] = value.sum(1, keepdim=True)
            note_once(f"{path}: the first convolution's {value.shape[1]} input channels are summed for "
                      f"1-channel images")
            continue
        raise PeerdistillError(f"{path} does not hold {model} weights as configured: {match.origin[key]} has "
                               f"shape {tuple(value.shape)} in the file and {tuple(want)} in the model "
                               f"(another width or variant?)")


def _fit_head(mapped: dict[str, Tensor], ours: dict[str, Tensor], path: str | Path,
              head: Literal["reinit", "require"]) -> None:
    """Keep the file's classifier when it fits; otherwise keep the model's fresh one, or refuse."""
    keys = [k for k in ours if k.startswith("classifier.")]
    fits = all(k in mapped and mapped[k].shape == ours[k].shape for k in keys)
    if fits:
        return
    classes = ours["classifier.weight"].shape[0]
    theirs = mapped.get("classifier.weight")
    what = f"a {theirs.shape[0]}-class classifier" if theirs is not None else "no classifier"
    if head == "require":
        raise PeerdistillError(f"{path} has {what}; this run has {classes} classes, and a teacher needs "
                               f"its trained classifier")
    for k in keys:
        mapped.pop(k, None)
    note_once(f"{path} has {what}; the {classes}-class classifier is initialised afresh")


def _first(keys: list[str]) -> str:
    return f" (e.g. {keys[0]})" if keys else ""


def split_weights_spec(spec: str) -> tuple[str, str] | None:
    """``"MODEL:PATH"`` with a registered ``MODEL`` -> ``(MODEL, PATH)``; anything else (a run directory or
    checkpoint path) -> ``None``."""
    name, sep, path = spec.partition(":")
    return (name, path) if sep and path and name in MODELS else None
