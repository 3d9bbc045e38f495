"""Dataset sources, the device-resident loader, batched augmentation and mixers."""
import importlib
import pkgutil

from .base import DATASETS, DatasetSplits, ImageSet

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["DATASETS", "DatasetSplits", "ImageSet"]
