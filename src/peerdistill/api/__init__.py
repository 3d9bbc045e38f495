"""The public API for one's own training loop (docs/api.md): a :class:`Distiller` built from one's own
models and a method name, the adapter that makes any ``nn.Module`` a peer, a torch ``Dataset`` of one's own
as a data source, and the loss functions alone."""
from ..data.torch_source import from_torch
from ..models.adapt import Adapted, adapt
from . import losses
from .distiller import Distiller, ce_term

__all__ = ["Adapted", "Distiller", "adapt", "ce_term", "from_torch", "losses"]
