"""peerdistill: knowledge distillation without (and with) a pretrained teacher.

Python API::

    import peerdistill as pd
    cfg = pd.load_config(None, ["method=dml", "model=resnet14", "epochs=5"])
    summary = pd.train(cfg, out_dir="runs/dml")
    pd.evaluate("runs/dml")

Your own loop, your own models and data (docs/api.md): :class:`peerdistill.api.Distiller`,
:func:`peerdistill.api.adapt`, :func:`peerdistill.api.from_torch`, the ``plugins`` config key.

Extend it by registering a model (``@pd.MODELS.register``), a method (subclass :class:`Method`,
``@pd.METHODS.register``), a dataset source or a mixer.
"""
from .api import Distiller, adapt, from_torch
from .config import Component, Config, DataConfig, OptimConfig
from .config import load as load_config
from .data import DATASETS
from .data.mix import MIXERS, Mixer, MixRecord
from .run import evaluate, train
from .engine.trainer import Trainer
from .errors import PeerdistillError
from .methods import METHODS, Method, Needs, PeerOutput, StepRecord
from .models import MODELS, StagedNet, build_model

__version__ = "0.1.0"

__all__ = ["Component", "Config", "DataConfig", "OptimConfig", "load_config", "DATASETS", "MIXERS", "Mixer",
           "MixRecord", "evaluate", "train", "Trainer", "PeerdistillError", "METHODS", "Method", "Needs",
           "PeerOutput", "StepRecord", "MODELS", "StagedNet", "build_model", "Distiller", "adapt", "from_torch",
           "__version__"]
