"""End to end on real data: the CLI trains DML on a Fashion-MNIST subset and the peers learn."""
from __future__ import annotations

import json

import pytest

from peerdistill.cli import main

from .conftest import have_fmnist

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not have_fmnist(), reason="Fashion-MNIST not installed")]


def test_cli_dml_on_fashion_mnist_subset(tmp_path, capsys):
    out = tmp_path / "fm"
    code = main(["train", "--out", str(out), "model=resnet8", "epochs=3", "data.train_subset=6000", "batch_size=64",
                 "data.val_split=0.1", "progress=false", "tensorboard=false", "seed=0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "peer0" in printed and "ensemble" in printed and "ECE" in printed
    summary = json.loads((out / "summary.json").read_text())
    test = summary["final"]["test"]
    # 5400 training images, 3 short epochs (~76 % when measured): far above chance (10 %); a broken
    # pipeline, label mix-up or loss stays near chance.
    for head in ("peer0", "peer1", "ensemble"):
        assert test[head]["top1"] > 65.0, (head, test[head])
        assert 0.0 <= test[head]["ece"] < 15.0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["val"]["peer0"]["top1"] > 65.0
