"""Distillation methods. Every module in this package registers its method on import."""
import importlib
import pkgutil

from .base import (ADDONS, METHODS, AddOn, DataInfo, FeatureHead, Method, Needs, ParamGroup, PeerOutput,
                   PreTrainContext, StepRecord)

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["ADDONS", "METHODS", "AddOn", "DataInfo", "FeatureHead", "Method", "Needs", "ParamGroup", "PeerOutput",
           "PreTrainContext", "StepRecord"]
