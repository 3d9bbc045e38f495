"""Shared fixtures: tiny synthetic configs that train in well under a second per epoch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peerdistill.config import Config, load

FMNIST = Path("/usr/share/datasets/fashion-mnist")

TINY = ["data.name=synthetic", "data.size=96", "data.image_size=16", "data.channels=3", "data.num_classes=4",
        "model=resnet8", "batch_size=16", "epochs=2", "progress=false", "tensorboard=false",
        "data.eval_batch_size=64"]


def tiny_cfg(*overrides: str) -> Config:
    """A config small enough for unit tests (4 classes, 16x16, ResNet-8)."""
    return load(None, [*TINY, *overrides])


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def have_fmnist() -> bool:
    return (FMNIST / "t10k-labels-idx1-ubyte.gz").exists()
