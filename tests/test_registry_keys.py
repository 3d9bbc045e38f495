"""Registry keys follow one rule; the older spellings stay aliases accepted wherever a key is."""
from __future__ import annotations

import json

import pytest
import yaml

import peerdistill.config as C
from peerdistill.cli import main
from peerdistill.data import DATASETS
from peerdistill.data.augmentations import AUGMENTATIONS, CropFlip, aug_label, build_augmentation
from peerdistill.data.mix import MIXERS
from peerdistill.engine.build import validate_config
from peerdistill.errors import PeerdistillError
from peerdistill.methods import ADDONS, METHODS
from peerdistill.models import MODELS
from peerdistill.registry import KEY_RULE, Registry
from peerdistill.report.configs import resolve
from peerdistill.report.correlation import canonical_label
from peerdistill.run import check_resume, train
from peerdistill.sweep.study import config_change

from .conftest import TINY

OLD = {"fashion-mnist": (DATASETS, "fashion_mnist"), "tiny-imagenet": (DATASETS, "tiny_imagenet"),
       "crop+flip": (AUGMENTATIONS, "crop_flip")}


@pytest.mark.parametrize("registry", [METHODS, ADDONS, MODELS, DATASETS, MIXERS, AUGMENTATIONS],
                         ids=lambda r: r.kind)
def test_every_key_is_lower_case_words_joined_by_underscores(registry):
    bad = [name for name in registry if not KEY_RULE.fullmatch(name)]
    assert not bad, f"{registry.kind} keys breaking registry.KEY_RULE: {bad}"


@pytest.mark.parametrize("old", sorted(OLD))
def test_old_spellings_resolve_to_the_same_component(old):
    registry, key = OLD[old]
    assert old in registry and registry.canonical(old) == key and registry.aliases(key) == [old]
    assert registry.get(old) is registry.get(key) and registry.params(old) == registry.params(key)
    assert old not in list(registry)  # listed once, under its key


def test_aliases_are_accepted_by_config_augmentations_and_labels():
    cfg = C.load(None, ["data.name=fashion-mnist", "model=resnet8", "method=dml"])
    validate_config(cfg)
    assert cfg.data.name == "fashion_mnist"  # a new run records the key
    assert C.Config().data.name == "fashion_mnist"
    assert isinstance(build_augmentation("crop+flip", {"padding": 2}), CropFlip)
    assert aug_label("crop+flip", {"padding": 2}) == aug_label("crop_flip", {"padding": 2}) == "crop_flip:padding=2"
    assert canonical_label("crop+flip:padding=2") == "crop_flip:padding=2"
    with pytest.raises(PeerdistillError, match="unknown dataset 'fashion-mnst'"):
        DATASETS.get("fashion-mnst")


def test_an_alias_cannot_shadow_a_key():
    reg: Registry[object] = Registry("thing")
    reg.register("a_b", aliases=("a-b",))(object)
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("a-b")(object)


def test_list_shows_keys_and_notes_aliases(capsys):
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "\n  fashion_mnist " in out and "(also accepted: fashion-mnist)" in out
    assert "\n  fashion-mnist " not in out and "\n  tiny_imagenet " in out


def test_a_run_written_with_the_old_spelling_compares_equal(tmp_path):
    """--resume's check and sweep's check of an existing folder compare canonically (no data is read here)."""
    new = C.load(None, ["data.name=fashion_mnist", "model=resnet8", "method=dml", "data.train_subset=100"])
    validate_config(new)
    raw = new.to_dict()
    raw["data"]["name"] = "fashion-mnist"  # as a run written before the rename stored it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    check_resume(new, tmp_path)  # the given config, in the key's spelling
    again = C.load(tmp_path / "config.yaml", stored=True)  # what `train --resume` reads
    validate_config(again)
    check_resume(again, tmp_path)
    assert config_change(raw, new) is None
    assert resolve(raw)["data"]["name"] == "fashion_mnist"
    other = C.load(None, ["data.name=mnist", "model=resnet8", "method=dml", "data.train_subset=100"])
    validate_config(other)
    with pytest.raises(PeerdistillError, match="data.name would change"):
        check_resume(other, tmp_path)


def test_a_killed_run_written_with_an_old_spelling_resumes_to_the_same_result(tmp_path, monkeypatch):
    """End to end through the CLI: the stored config.yaml names its model by an alias (a spelling the registry
    had before a rename; the tiny synthetic run needs no dataset files); ``train --resume`` accepts it and
    finishes with the uninterrupted run's numbers."""
    monkeypatch.setitem(MODELS._aliases, "res-net8", "resnet8")
    over = [*TINY, "epochs=2", "data.val_split=0"]
    full = train(C.load(None, over), tmp_path / "full", echo=False)
    from peerdistill.report.logger import RunLogger

    real = RunLogger.epoch

    def killed(self, record):
        real(self, record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunLogger, "epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        train(C.load(None, over), tmp_path / "cut", echo=False)
    monkeypatch.setattr(RunLogger, "epoch", real)
    stored = tmp_path / "cut" / "config.yaml"
    raw = yaml.safe_load(stored.read_text())
    assert raw["model"]["name"] == "resnet8"
    raw["model"]["name"] = "res-net8"
    stored.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["train", "--resume", str(tmp_path / "cut")]) == 0
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert resumed["final"] == full["final"]
