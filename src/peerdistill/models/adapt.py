"""Any ``nn.Module`` as a peer: an adapter presenting a model as a :class:`StagedNet` (DESIGN §3).

Three ways to read a model, chosen from what it offers:

* ``forward_features(x)`` -> (B, C, H, W) map and ``forward_head(fmap, pre_logits=False)`` (timm's
  convention): the map is the last stage ``"features"``; the embedding is ``forward_head(fmap,
  pre_logits=True)``; the classifier is ``get_classifier()`` or the linear layer named ``classifier``;
* ``forward_intermediates(x)`` -> ``(final map, [intermediate maps])`` (timm's newer API) together with
  ``forward_head``: the intermediate maps become stages ``"stage0"``, ``"stage1"``, ...;
* any other model: named layers tapped by forward hooks (``layers=["layer3", "layer4"]``, as torchdistill
  does); the last tapped layer's output, globally average-pooled (flattened if it is 2-D), must be what the
  model's classifier (``classifier="fc"``) reads.

With either of the first two, ``layers`` adds hooked maps before the final one. The adapter has no stem and
no separable stages, so it cannot be split into a shared trunk (branched methods refuse it). Whether the
model really is what the adapter reads it as is checked on a probe batch (:meth:`Adapted.check`) before
any run directory is made: the classifier applied to the embedding must give the model's own logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PeerdistillError
from .base import StagedNet

FEATURES = "features"


class Adapted(StagedNet):
    """A model of the user's seen through the :class:`StagedNet` contract (see the module docstring).

    Args:
        model: the module (its parameters are the peer's parameters; it is not copied).
        layers: names of submodules (``model.named_modules()``) whose outputs become stage maps.
        classifier: name of the ``nn.Linear`` that maps the embedding to the logits (default:
            ``model.get_classifier()``, else the module's ``head``, ``fc`` or ``classifier``).
    """

    splittable = False  # no stem and stages that could be shared between peers or copied

    def __init__(self, model: nn.Module, layers: Sequence[str] = (), classifier: str | None = None) -> None:
        nn.Module.__init__(self)
        if not isinstance(model, nn.Module):
            raise PeerdistillError(f"a peer must be a torch nn.Module, got {type(model).__name__}")
        self.model = model
        named = dict(model.named_modules())
        missing = [n for n in layers if n not in named or not n]
        if missing:
            raise PeerdistillError(f"{type(model).__name__} has no submodule {missing[0]!r} to tap; "
                                   f"its top-level modules: {', '.join(n for n, _ in model.named_children())}")
        if len(set(layers)) != len(layers):
            raise PeerdistillError(f"layers {list(layers)} name a submodule twice")
        self.mode = ("intermediates" if callable(getattr(model, "forward_intermediates", None)) and not layers
                     and callable(getattr(model, "forward_head", None)) and
                     not callable(getattr(model, "forward_features", None)) else
                     "features" if callable(getattr(model, "forward_features", None))
                     and callable(getattr(model, "forward_head", None)) else "hooks")
        if self.mode == "hooks" and not layers:
            raise PeerdistillError(f"{type(model).__name__} has neither forward_features/forward_head nor "
                                   f"forward_intermediates: name the layers to tap, e.g. layers=['layer4'] (the last "
                                   f"one is pooled into the classifier's input)")
        head = _classifier(model, classifier)
        self.layers = tuple(layers)
        self._head_name = head
        self.classifier = named[head]  # a registered child too: the same module, shared with the model
        self.num_features = self.classifier.in_features
        self.num_classes = self.classifier.out_features
        self.stem = nn.Identity()
        self.stages = nn.ModuleList()
        names = self.layers + ((FEATURES,) if self.mode != "hooks" else ())
        self.stage_names: tuple[str, ...] = names
        self._maps: dict[str, Tensor] | None = None
        for name in self.layers:
            named[name].register_forward_hook(_Tap(self, name))

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Every tapped map and, last, the map the head pools."""
        self._maps = {}
        try:
            if self.mode == "features":
                final = self.model.forward_features(x)
            elif self.mode == "intermediates":
                final, inter = self.model.forward_intermediates(x)
                if len(self.stage_names) == 1 and inter:  # names fixed on the first call (the probe)
                    self.stage_names = (*(f"stage{i}" for i in range(len(inter))), FEATURES)
                self._maps.update({f"stage{i}": t for i, t in enumerate(inter)})
            else:
                self.model(x)
                final = None
            maps = self._maps
        finally:
            self._maps = None
        if final is not None:
            if not isinstance(final, Tensor):
                raise PeerdistillError(f"{type(self.model).__name__}.forward_features returned a "
                                       f"{type(final).__name__}, not a tensor")
            maps[FEATURES] = final
        return {k: maps[k] for k in self.stage_names if k in maps}

    def pool(self, fmap: Tensor) -> Tensor:
        """The embedding the classifier reads: the model's own ``forward_head(pre_logits=True)``, else the
        global average of a 4-D map (a 2-D output is taken as it is)."""
        if self.mode != "hooks":
            return self.model.forward_head(fmap, pre_logits=True)
        return fmap.mean((2, 3)) if fmap.dim() == 4 else fmap.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.forward_features(x)[self.stage_names[-1]]))

    @torch.no_grad()
    def check(self, in_channels: int, image_size: Sequence[int]) -> None:
        """Run a probe batch (eval mode: no state changes) and check that the classifier applied to the
        embedding gives the model's own logits; one line saying what differs otherwise."""
        what = type(self.model).__name__
        p = next(self.model.parameters(), None)
        x = torch.randn(2, in_channels, *image_size, generator=torch.Generator().manual_seed(0))
        if p is not None:
            x = x.to(p.device, p.dtype)
        was = self.training
        self.eval()
        try:
            try:
                maps = self.forward_features(x)
                own = self.model(x)
            except PeerdistillError:
                raise
            except Exception as e:  # the user's model on this data's shape: say which call failed
                raise PeerdistillError(f"{what} fails on a {in_channels}x{'x'.join(map(str, image_size))} input: "
                                       f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
            missing = [k for k in self.stage_names if k not in maps]
            if missing:
                raise PeerdistillError(f"tapped layer {missing[0]!r} of {what} did not run in its forward pass")
            emb = self.pool(maps[self.stage_names[-1]])
            if emb.dim() != 2 or emb.shape[1] != self.num_features:
                raise PeerdistillError(f"{what}: the embedding from {self.stage_names[-1]!r} has shape "
                                       f"{tuple(emb.shape)}, but classifier {self._head_name!r} reads "
                                       f"{self.num_features} features; tap the layer that feeds it")
            logits = self.classifier(emb)
            if not isinstance(own, Tensor) or own.shape != logits.shape or not torch.allclose(
                    own, logits, rtol=1e-4, atol=1e-4 * (1 + float(own.abs().max()))):
                raise PeerdistillError(f"{what}: classifier {self._head_name!r} on the pooled "
                                       f"{self.stage_names[-1]!r} map does not give the model's own output; "
                                       f"tap the layer whose pooled output the classifier reads")
        finally:
            self.train(was)


class _Tap:
    """A forward hook storing a layer's output in its adapter's maps (an object, not a closure, so that a
    deep copy of the adapter -- the EMA copy -- gets hooks writing into the copy)."""

    def __init__(self, owner: Adapted, name: str) -> None:
        self.owner, self.name = owner, name

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if self.owner._maps is not None:
            self.owner._maps[self.name] = output


def _classifier(model: nn.Module, name: str | None) -> str:
    """The name of the model's final linear layer."""
    named = dict(model.named_modules())
    if name is None:
        get = getattr(model, "get_classifier", None)
        found = get() if callable(get) else None
        if isinstance(found, nn.Linear):
            name = next(n for n, m in named.items() if m is found)
        else:
            name = next((n for n in ("head", "fc", "classifier") if isinstance(named.get(n), nn.Linear)), None)
        if name is None:
            raise PeerdistillError(f"cannot tell which layer of {type(model).__name__} is its classifier: "
                                   f"name it (classifier='...'), an nn.Linear from embedding to logits")
    if not isinstance(named.get(name), nn.Linear):
        kind = type(named[name]).__name__ if name in named else "nothing"
        raise PeerdistillError(f"classifier {name!r} of {type(model).__name__} is {kind}, not an nn.Linear")
    return name


def adapt(model: nn.Module, layers: Sequence[str] = (), classifier: str | None = None) -> StagedNet:
    """``model`` as a peer: itself if it already is a :class:`StagedNet`, else an :class:`Adapted` view."""
    if isinstance(model, StagedNet) and not layers and classifier is None:
        return model
    if isinstance(model, StagedNet):
        raise PeerdistillError(f"{type(model).__name__} is a StagedNet already: its stages are its maps "
                               f"(layers and classifier apply to other modules)")
    return Adapted(model, layers, classifier)


def check_peers(nets: Sequence[nn.Module], in_channels: int, image_size: Sequence[int]) -> None:
    """Probe every adapted peer on this data's input shape (native StagedNets need no probe)."""
    for net in nets:
        if isinstance(net, Adapted):
            net.check(in_channels, image_size)
