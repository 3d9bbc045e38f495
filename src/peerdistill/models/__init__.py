"""Model zoo. Every module in this package registers its models on import."""
import importlib
import pkgutil

from .adapt import Adapted, adapt
from .base import MODELS, PeerOutput, StagedNet, build_model, init_weights

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Adapted", "adapt", "MODELS", "PeerOutput", "StagedNet", "build_model", "init_weights"]
