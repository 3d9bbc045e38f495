"""Streamed data in the engine: config keys, the auto decision, per-peer host views, samplers, determinism
across worker counts, exact resume, sharded evaluation under torchrun (gloo), bench's input-pipeline rate,
and the ImageNet models trained on streamed JPEGs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from peerdistill.config import load
from peerdistill.data import streamed
from peerdistill.data.streamed import StreamSet
from peerdistill import run as run_mod
from peerdistill.engine.trainer import Trainer
from peerdistill.errors import PeerdistillError
from peerdistill.models import MODELS

from .conftest import killed_and_resumed
from .imagenet_like import make_imagenet_like

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """48 training and 16 test JPEGs of 4 classes, shorter side 20-28 px."""
    root = tmp_path_factory.mktemp("stream-engine")
    make_imagenet_like(root, 48, 16, n_classes=4, sides=(20, 28), target_kb=None)
    return root


def stream_cfg(folder: Path, *overrides: str):
    return load(None, ["data.name=imagefolder", f"data.root={folder}", "data.stream=true", "data.image_size=16",
                       "data.workers=0", "data.val_split=0.25", "model=resnet8", "batch_size=8", "epochs=1",
                       "precision=fp32", "device=cpu", "tensorboard=false", "progress=false", "optim.lr=0.05",
                       *overrides])


@pytest.mark.parametrize("override, words", [
    ("data.stream=maybe", "data.stream"), ("data.crop_pct=1.5", "data.crop_pct"),
    ("data.rrc_scale=[0.5,2]", "data.rrc_scale"), ("data.workers=-1", "data.workers"),
    ("data.image_size=4", "data.image_size")])
def test_stream_keys_are_typed(override, words):
    with pytest.raises(PeerdistillError, match=words.replace(".", r"\.")):
        load(None, [override])


def test_stream_mismatches_are_one_line_errors(folder):
    with pytest.raises(PeerdistillError, match="read into memory only"):
        Trainer(load(None, ["data.name=synthetic", "data.stream=true", "model=resnet8", "device=cpu"]))
    with pytest.raises(PeerdistillError, match="fixed size"):
        run_mod.validate_config(load(None, ["data.name=fashion-mnist", "data.image_size=32"]))
    with pytest.raises(PeerdistillError, match="rrc_scale"):
        Trainer(stream_cfg(folder, "data.rrc_scale=[0.9,0.2]"))
    with pytest.raises(PeerdistillError, match="holdout_classes"):
        Trainer(stream_cfg(folder, "data.holdout_classes=[3]"))


def test_auto_streams_when_the_decoded_set_exceeds_free_memory(folder, monkeypatch):
    monkeypatch.setattr(streamed, "free_memory", lambda device: 10**9)
    t = Trainer(stream_cfg(folder, "data.stream=auto"))
    assert not isinstance(t.data.train, StreamSet)  # 64 x 16 x 16 x 3 bytes fit
    assert t.data.train.shape == (3, 16, 16)
    # 64 images x 768 B = 49 kB > half of 60 kB: streamed
    monkeypatch.setattr(streamed, "free_memory", lambda device: 60_000)
    t = Trainer(stream_cfg(folder, "data.stream=auto"))
    assert isinstance(t.data.train, StreamSet) and t.data.train.shape == (3, 16, 16)
    assert t.augment.padding == 0 and not t.augment.flip  # the host crops and flips
    assert t.augment.mean.flatten().tolist() == pytest.approx(list(streamed.IMAGENET_MEAN))


@pytest.mark.parametrize("cores, threads, world, device, expected", [
    (2, 2, 1, "cpu", 0),    # the compute threads take both cores: decode between steps
    (32, 8, 1, "cpu", 24),  # threads=8 leaves 24 cores to the workers
    (32, 8, 2, "cpu", 8),   # two processes share the 32 cores
    (2, 2, 1, "cuda", 1),   # on a GPU the host cores serve the workers, at least one
    (16, 16, 2, "cuda", 7),
])
def test_default_workers_leave_the_cpu_step_its_cores(monkeypatch, cores, threads, world, device, expected):
    monkeypatch.setattr(streamed.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(streamed.torch, "get_num_threads", lambda: threads)
    assert streamed.default_workers(world, device) == expected


def test_an_unset_worker_count_follows_the_training_device(folder, monkeypatch):
    monkeypatch.setattr(streamed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(streamed.torch, "get_num_threads", lambda: 3)
    t = Trainer(stream_cfg(folder, "data.workers=null"))
    assert t.data.train.workers == 1  # the CPU rule (4 cores - 3 threads), not the GPU one (4 - 1)
    assert Trainer(stream_cfg(folder, "data.stream=true", "data.workers=2")).data.train.workers == 2


def test_per_peer_views_are_independent_crops_of_the_same_image(folder):
    t = Trainer(stream_cfg(folder, "method=kdcl", "peers=3"))
    batch = next(iter(t.train_loader))
    assert batch.views.shape == (8, 3, 3, 16, 16) and batch.images.data_ptr() == batch.views.data_ptr()
    v = batch.views.float()
    assert (v[:, 0] - v[:, 1]).abs().mean() > 5 and (v[:, 1] - v[:, 2]).abs().mean() > 5
    views = t.method.make_views(batch, t.view_context(t.gen, batch))
    xs = [p.x for p in views.peers]
    assert len({id(x) for x in xs}) == 3
    expect = [t.augment.normalize(batch.views[:, k]) for k in range(3)]
    for x, e in zip(xs, expect):
        torch.testing.assert_close(x, e)
    # a shared-view method gets one crop; augmenting it twice is a contract error, not a silent repeat
    t = Trainer(stream_cfg(folder, "method=dml"))
    batch = next(iter(t.train_loader))
    assert batch.views.shape[1] == 1
    ctx = t.view_context(t.gen, batch)
    ctx.augment(batch.images)
    with pytest.raises(PeerdistillError, match="host_views"):
        ctx.augment(batch.images)


def test_ddgsd_gets_two_crops(folder):
    t = Trainer(stream_cfg(folder, "method=ddgsd"))
    batch = next(iter(t.train_loader))
    assert batch.views.shape[1] == 2
    rec = t.step_record(batch)
    assert rec.views[0].x.shape[0] == 16  # both distortions of the 8 images


@pytest.mark.parametrize("method, check", [("mcl", "m_per_class"), ("cs_kd", "pairs")])
def test_samplers_compose_streamed_batches(folder, method, check):
    t = Trainer(stream_cfg(folder, f"method={method}"))
    batches = list(t.train_loader)
    assert len(batches) == len(t.train_loader) > 0
    for b in batches:
        labels = b.labels.tolist()
        assert labels == t.data.train.host_labels[b.index.numpy()].tolist()
        if check == "pairs":
            half = len(labels) // 2
            assert labels[:half] == labels[half:]
        else:
            assert all(labels.count(c) % 2 == 0 for c in set(labels))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["cohort"]


def test_streamed_run_is_the_same_for_any_worker_count_and_resumes_exactly(folder, tmp_path, monkeypatch):
    args = ("method=kdcl", "epochs=2")
    full = run_mod.train(stream_cfg(folder, *args), tmp_path / "w0", echo=False)
    two = run_mod.train(stream_cfg(folder, *args, "data.workers=2"), tmp_path / "w2", echo=False)
    for k, v in _weights(tmp_path / "w0").items():
        torch.testing.assert_close(_weights(tmp_path / "w2")[k], v, rtol=0, atol=0)
    assert two["final"] == full["final"]
    resumed = killed_and_resumed(lambda: stream_cfg(folder, *args, "data.workers=1"), tmp_path / "cut", monkeypatch)
    assert resumed["final"] == full["final"] and resumed["best"] == full["best"]
    for k, v in _weights(tmp_path / "w0").items():
        torch.testing.assert_close(_weights(tmp_path / "cut")[k], v, rtol=0, atol=0)


def test_shards_stream_like_the_folder_they_were_packed_from(folder, tmp_path):
    from peerdistill.data.stream.pack import PackOptions, pack

    pack(folder, tmp_path / "p", PackOptions(shard_size=16))
    args = ("data.name=shards", f"data.root={tmp_path / 'p'}", "data.stream=auto")
    t = Trainer(stream_cfg(folder, *args))
    f = Trainer(stream_cfg(folder))
    assert isinstance(t.data.train, StreamSet) and t.data.train.shape == (3, 16, 16)
    assert t.data.splits.classes == f.data.splits.classes and len(t.data.test) == len(f.data.test) == 16
    batch = next(iter(t.train_loader))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 3, 16, 16)
    with pytest.raises(PeerdistillError, match="always streamed"):
        Trainer(stream_cfg(folder, *args, "data.stream=false"))


def test_streamed_evaluation_is_resize_and_centre_crop(folder):
    t = Trainer(stream_cfg(folder, "data.crop_pct=0.5"))
    batch = next(iter(t.data.test.loader(4, False)))
    assert batch.images.shape == (4, 3, 16, 16) and batch.index.tolist() == [0, 1, 2, 3]
    from peerdistill.data.stream import decode, eval_geometry
    from peerdistill.data.stream.codec import resize

    data = t.data.test.samples.read(0)
    pixels, _ = decode(data)
    (nw, nh), (x, y, w, h) = eval_geometry(pixels.shape[1], pixels.shape[0], 16, 0.5)
    assert min(nw, nh) == 32
    expect = resize(pixels, (nw, nh))[y:y + h, x:x + w].permute(2, 0, 1)
    torch.testing.assert_close(batch.images[0], expect, rtol=0, atol=0)


def test_bench_reports_the_input_pipeline_alone(folder, capsys):
    from peerdistill.cli import main

    for extra in (["data.stream=true", "data.workers=1"], ["data.stream=false"]):
        code = main(["bench", "--json", "--steps", "2", "--warmup", "1", "data.name=imagefolder",
                     f"data.root={folder}", "data.image_size=16", "model=resnet8", "batch_size=8", "device=cpu",
                     *extra])
        assert code in (0, None)
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["data_images_per_s"] > 0
        assert report["data_workers"] == (1 if "data.stream=true" in extra else None)


IMAGENET_MODELS = sorted(name for name in MODELS if name.endswith("_imagenet"))


def test_every_imagenet_model_trains_and_evaluates_on_streamed_jpegs(tmp_path):
    """Each ImageNet model of the zoo through the streaming path (host crops of JPEG files, 32 px): one
    optimizer step on the one batch of 8 training images, then the evaluation of 4 test images."""
    assert {"resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet", "mobilenetv1_imagenet",
            "mobilenetv2_imagenet", "shufflenetv2_imagenet"} <= set(IMAGENET_MODELS)
    make_imagenet_like(tmp_path / "jpeg", 8, 4, n_classes=2, sides=(20, 28), target_kb=None)
    for model in IMAGENET_MODELS:
        out = tmp_path / model
        summary = run_mod.train(stream_cfg(tmp_path / "jpeg", f"model={model}", "data.image_size=32", "data.val_split=0",
                                           "method=independent", "peers=1", "batch_size=8", "data.eval_batch_size=4"),
                                out, echo=False)
        steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
        m = summary["final"]["test"]["peer0"]
        assert [r["step"] for r in steps] == [1] and np.isfinite(list(steps[0]["loss"].values())).all(), model
        assert 0 <= m["top1"] <= 100 and np.isfinite(m["nll"]), model  # evaluated


# ------------------------------------------------------------------------------------------ torchrun
def _eval_report(args: list[str]) -> dict:
    """Every head's test metrics of the seeded, untrained cohort (evaluation only)."""
    t = Trainer(load(None, args))
    out = t.evaluate(t.data.test)
    t.release()
    return out


def test_sharded_evaluation_and_streamed_training_match_one_process(folder, tmp_path, monkeypatch):
    """Under torchrun each process evaluates its share and the sums are added: the same counts (and the
    same NLL and ECE to float rounding) as one process evaluating everything; with BatchNorm frozen a
    streamed 2-process run is the 1-process run with the same global batch."""
    from .test_distributed import _frozen_batch_norm, _result, _torchrun

    mem = ["data.name=synthetic", "data.size=64", "data.test_size=50", "data.image_size=16", "model=resnet8",
           "device=cpu", "precision=fp32", "data.eval_batch_size=8", "batch_size=8"]
    stream = [f"data.name=imagefolder", f"data.root={folder}", "data.stream=true", "data.image_size=16",
              "data.workers=1", "model=resnet8", "device=cpu", "precision=fp32", "batch_size=8", "data.eval_batch_size=5"]
    for name, args in (("mem", mem), ("stream", stream)):
        one = _eval_report(args)
        proc = _torchrun_module([json.dumps(args), str(tmp_path / f"{name}.json")])
        two = [json.loads((tmp_path / f"{name}.json.{r}").read_text()) for r in range(2)]
        assert two[0] == two[1], proc.stdout  # every rank gets the reduced numbers
        for head, m in one.items():
            if "nll" not in m:
                continue
            assert two[0][head]["top1"] == m["top1"] and two[0][head]["top5"] == m["top5"], (name, head)
            assert two[0][head]["nll"] == pytest.approx(m["nll"], rel=1e-6), (name, head)
            assert two[0][head]["ece"] == pytest.approx(m["ece"], rel=1e-5, abs=1e-6), (name, head)

    train = [*stream[:-1], "data.val_split=0.25", "epochs=1", "optim.lr=0.05",
             "tensorboard=false", "progress=false"]
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "batch_norm", _frozen_batch_norm)
        run_mod.train(load(None, train), tmp_path / "one", echo=False)
    _torchrun([*train, "--out", str(tmp_path / "two")], script=str(ROOT / "tests" / "test_distributed.py"),
              env={"PD_TEST_FREEZE_BN": "1"})
    (t1, l1), (t2, l2) = _result(tmp_path / "one"), _result(tmp_path / "two")
    assert l1 == pytest.approx(l2, rel=1e-5)
    for head in t1:
        assert t1[head][1] == pytest.approx(t2[head][1], rel=1e-5), head


def _torchrun_module(args: list[str]):
    """This module's :func:`_eval_launch` in 2 gloo processes."""
    import os
    import subprocess

    from .test_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "tests.test_stream_engine", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _eval_launch() -> int:
    """torchrun entry: ``ARGS_JSON OUT``: evaluate and write this rank's numbers to ``OUT.<rank>``."""
    import os

    from peerdistill.engine.distributed import teardown

    args, out = json.loads(sys.argv[1]), sys.argv[2]
    report = _eval_report(args)
    Path(f"{out}.{os.environ['RANK']}").write_text(json.dumps(report))
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(_eval_launch())
