"""Every shipped preset parses, validates, and names a method/model/dataset that exist."""
from __future__ import annotations

from pathlib import Path

import pytest

from peerdistill import config as C
from peerdistill.data import DATASETS
from peerdistill.engine.build import validate_config
from peerdistill.models.pretrained import split_weights_spec
from peerdistill.models import MODELS

PRESETS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_presets_exist():
    assert len(PRESETS) >= 8


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_preset_validates(path, tmp_path):
    cfg = C.load(path)
    spec = split_weights_spec(str(cfg.method.args.get("teacher", "")))
    if spec is not None and not Path(spec[1]).expanduser().is_file():  # a MODEL:WEIGHTS teacher users bring
        (tmp_path / "weights.pth").write_bytes(b"")  # its existence is what validation checks; read at build time
        cfg.method.args["teacher"] = f"{spec[0]}:{tmp_path / 'weights.pth'}"
    validate_config(cfg)  # every component's hyper-parameters and the method's needs against the config
    for name in cfg.model_names:
        MODELS.build(name, num_classes=10, in_channels=3, **cfg.model.args)
    assert cfg.data.name in DATASETS


def test_default_config_is_the_fmnist_dml_preset():
    preset, default = C.load(Path(__file__).parent.parent / "configs" / "fmnist" / "dml.yaml"), C.Config()
    validate_config(default)  # resolves the cohort size: dml's default of 2 peers, as the preset says
    assert preset.to_dict() == default.to_dict() | {"method": {"name": "dml", "temperature": 1.0}}


def test_resolved_config_roundtrips(tmp_path):
    cfg = C.load(None, ["method=dml", "method.temperature=3", "mixer=cutmix", "optim.milestones=[2, 4]"])
    C.save(cfg, tmp_path / "c.yaml")
    assert C.load(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


def test_one_ships_the_official_recipe_and_the_pcl_table_recipe():
    """ONE's code (scripts/ONE_ResNet32.sh, cifar_one.py): ramp-up 80, no Nesterov, wd 1e-4, lr steps at
    0-based epochs 151 and 225. The PCL table re-ran ONE with the PCL recipe and no ramp-up."""
    root = Path(__file__).parent.parent / "configs" / "one"
    official, table = C.load(root / "cifar100_resnet32_official.yaml"), C.load(root / "cifar100_resnet32.yaml")
    assert official.method.args["rampup_epochs"] == 80 and not official.optim.nesterov
    assert (official.optim.weight_decay, official.optim.milestones, official.epochs) == (1e-4, [151, 225], 300)
    assert table.method.args["rampup_epochs"] == 0 and table.optim.nesterov and table.optim.weight_decay == 5e-4
    assert "OFFICIAL" in (root / "cifar100_resnet32_official.yaml").read_text()
    assert "PCL TABLE" in (root / "cifar100_resnet32.yaml").read_text()
