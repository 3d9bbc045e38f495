"""Every bad input is a one-line error with exit status 2, never a traceback."""
from __future__ import annotations

import gzip

import pytest

from peerdistill.cli import main
from peerdistill import run as run_mod

from .conftest import TINY, tiny_cfg


def run_cli(capsys, *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("override, expected", [
    ("method=dmll", "unknown method 'dmll' (did you mean: dml"),
    ("model=resnet33", "unknown model 'resnet33' (did you mean: resnet34, resnet32"),
    ("data.name=cifar1000", "unknown dataset 'cifar1000' (did you mean: cifar100"),
    ("mixer=cutmx", "unknown mixer 'cutmx' (did you mean: cutmix"),
    ("epoch=3", "unknown config key 'epoch' (did you mean: epochs"),
    ("data.val_splt=0.2", "unknown config key 'data.val_splt' (did you mean: data.val_split"),
    ("method.temprature=2", "unknown parameter 'temprature' for method 'dml' (did you mean: temperature"),
    ("epochs=three", "config key 'epochs' must be int >= 1, got 'three'"),
    ("method.temperature=hot", "parameter 'temperature' of method 'dml' must be float"),
    ("precision=fp8", "config key 'precision' must be one of auto, fp32, bf16, fp16"),
    ("optim.schedule=linear", "config key 'optim.schedule' must be one of cosine, multistep, constant"),
    ("peers=1", "method 'dml' needs at least 2 peers"),
])
def test_bad_config_is_one_line(capsys, tmp_path, override, expected):
    err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), *TINY, override)
    assert expected in err


def test_missing_dataset_says_where_and_how(capsys, tmp_path):
    err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), "data.name=fashion-mnist",
                  f"data.root={tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere") in err and "apt-get install dataset-fashion-mnist" in err


def test_truncated_idx_file(capsys, tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    for split, n in (("train", 2), ("t10k", 2)):
        with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + bytes(28 * 28 * n - (5 if split == "train" else 0)))
        with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(n))
    err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), "data.name=fashion-mnist", f"data.root={root}")
    assert "train-images-idx3-ubyte.gz is truncated or corrupt" in err


def test_broken_yaml_and_bad_override_syntax(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [dml\n")
    err = run_cli(capsys, "train", "-c", str(bad))
    assert "cannot parse config" in err and "at line 2, column 1" in err  # PyYAML's position is kept
    assert "must look like key=value" in run_cli(capsys, "train", "--out", str(tmp_path / "r"), "epochs")


def test_resume_without_run(capsys, tmp_path):
    assert "is not a run directory" in run_cli(capsys, "train", "--resume", str(tmp_path))
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    assert "no checkpoint" in run_cli(capsys, "train", "--resume", str(tmp_path))


def test_branched_method_rejects_heterogeneous_cohort():
    from peerdistill.errors import PeerdistillError
    from peerdistill.models.cohort import build_cohort

    with pytest.raises(PeerdistillError, match="same model"):
        build_cohort(["resnet8", "resnet14"], 2, 10, 3, {}, "branched")
    with pytest.raises(PeerdistillError, match="cannot split model 'resnet8' after 'stage3'"):
        build_cohort(["resnet8"], 2, 10, 3, {}, "branched", "stage3")


def test_corrupt_checkpoint_is_one_line(capsys, tmp_path):
    out = tmp_path / "r"
    run_mod.train(tiny_cfg("epochs=1"), out, echo=False)
    (out / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in run_cli(capsys, "eval", str(out))


def test_teacher_with_other_class_count(capsys, tmp_path):
    teacher = tmp_path / "t"
    run_mod.train(tiny_cfg("epochs=1", "method=independent", "peers=1"), teacher, echo=False)
    err = run_cli(capsys, "train", "--out", str(tmp_path / "s"), *TINY, "data.num_classes=5",
                  "method=kd", f"method.teacher={teacher}")
    assert "trained for 4 classes" in err and "this run has 5" in err
