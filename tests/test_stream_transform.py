"""The streaming path's host side: ImageNet protocol geometry, the per-sample transform against Pillow
references, the worker loader's batches (determinism across worker counts, views, samplers) and decoding
without simplejpeg."""
from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from peerdistill.data.samplers import MPerClassSampler, Sampler  # noqa: E402
from peerdistill.data.stream import (HostTransform, StreamDataset, StreamLoader, central_box,  # noqa: E402
                                     eval_geometry, resize_size, rrc_box, sample_rng, scan_folder,
                                     sequential_rows)
from peerdistill.data.stream import codec as dec  # noqa: E402
from peerdistill.data.stream.transform import empty_views  # noqa: E402

from .imagenet_like import make_image, make_imagenet_like  # noqa: E402


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("il")
    make_imagenet_like(root, n_train=24, n_val=9, n_classes=3, sides=(40, 80), target_kb=None)
    return root


def _garment(i: int = 0) -> np.ndarray:
    g = np.zeros((28, 28), np.uint8)
    g[4 + i % 5:24, 6:22] = 200
    return g


def _jpeg(sides: tuple[int, int], seed: int = 0) -> bytes:
    return make_image(_garment(seed), np.random.default_rng(seed), sides, None)


# ------------------------------------------------------------------------------------------- geometry
def test_rrc_boxes_inside_with_scale_and_ratio_in_range() -> None:
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    areas, logr = [], []
    for k in range(3000):
        w0, h0 = 200 + (k * 37) % 400, 200 + (k * 91) % 400
        x, y, w, h = rrc_box(w0, h0, sample_rng(1, 0, k, 0), scale, ratio)
        assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= w0 and y + h <= h0
        areas.append(w * h / (w0 * h0))
        logr.append(math.log(w / h))
    areas, logr = np.array(areas), np.array(logr)
    # Rounding to whole pixels moves the area and ratio by at most ~1 % at these sizes.
    assert areas.min() > 0.08 * 0.97 and areas.max() <= 1.0
    assert np.all(np.abs(logr) <= math.log(4 / 3) + 0.02)
    # The draws cover the ranges (uniform area, log-uniform ratio; the draws that do not fit are redrawn).
    assert areas.min() < 0.1 and areas.max() > 0.95 and logr.min() < -0.25 and logr.max() > 0.25
    assert abs(np.mean(logr)) < 0.02


def test_rrc_falls_back_to_the_central_crop() -> None:
    # No square of the whole area fits a 300x200 image: 10 failed attempts, then the central crop,
    # cut to the largest allowed ratio (1) and centred.
    assert rrc_box(300, 200, sample_rng(0, 0, 0, 0), (1.0, 1.0), (1.0, 1.0)) == (50, 0, 200, 200)
    assert central_box(1000, 10, (3 / 4, 4 / 3)) == (493, 0, 13, 10)
    assert central_box(10, 1000, (3 / 4, 4 / 3)) == (0, 493, 10, 13)
    assert central_box(400, 300, (3 / 4, 4 / 3)) == (0, 0, 400, 300)


def test_sample_rng_is_a_function_of_its_arguments() -> None:
    a = sample_rng(3, 1, 7, 0).random(4)
    np.testing.assert_array_equal(a, sample_rng(3, 1, 7, 0).random(4))
    for other in ((4, 1, 7, 0), (3, 2, 7, 0), (3, 1, 8, 0), (3, 1, 7, 1)):
        assert not np.array_equal(a, sample_rng(*other).random(4))


def test_eval_geometry_is_resize_then_centre_crop() -> None:
    assert resize_size(224, 0.875) == 256 and resize_size(224, 1.0) == 224
    # Landscape 500x375: shorter side to 256, longer int(256 * 500 / 375) = 341; offsets rounded.
    assert eval_geometry(500, 375, 224, 0.875) == ((341, 256), (58, 16, 224, 224))
    assert eval_geometry(375, 500, 224, 0.875) == ((256, 341), (16, 58, 224, 224))
    assert eval_geometry(300, 300, 224, 1.0) == ((224, 224), (0, 0, 224, 224))


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _run(t: HostTransform, data: bytes, epoch: int = 0, index: int = 0) -> np.ndarray:
    out = empty_views(1, t)[0]
    t.apply(data, epoch, index, out)
    return out.numpy().astype(int)


def test_train_views_match_pillow_crop_and_resize() -> None:
    data = _jpeg((200, 300))
    t = HostTransform(image_size=160, views=3, seed=5)
    got = _run(t, data, epoch=2, index=11)
    im = _pil(data)
    boxes = t.boxes(*im.size, 2, 11)
    assert len({b for b, _ in boxes}) == 3  # per-view crops differ
    assert dec.reduction([(b[2], b[3]) for b, _ in boxes], (160, 160)) == 1
    for v, ((x, y, w, h), _) in enumerate(boxes):
        ref = np.asarray(im.crop((x, y, x + w, y + h)).resize((160, 160), Image.Resampling.BILINEAR)).astype(int)
        # torch's and Pillow's antialiased bilinear filters agree to rounding; the two libjpeg-turbo builds
        # (simplejpeg's, Pillow's) may differ by a grey level here and there.
        assert np.abs(got[v] - ref).mean() < 0.5, v


def test_reduced_dct_decode_stays_close_to_the_full_decode() -> None:
    # Crops of at least 2x the output are decoded at 1/2 (or less) in the DCT.
    data = _jpeg((600, 700))
    t = HostTransform(image_size=64, views=2, scale=(0.5, 1.0))
    w, h = dec.image_size(data)
    assert dec.reduction([(b[2], b[3]) for b, _ in t.boxes(w, h, 0, 0)], (64, 64)) >= 2
    got = _run(t, data)
    im = _pil(data)
    for v, ((x, y, bw, bh), _) in enumerate(t.boxes(w, h, 0, 0)):
        ref = np.asarray(im.crop((x, y, x + bw, y + bh)).resize((64, 64), Image.Resampling.BILINEAR)).astype(int)
        assert np.abs(got[v] - ref).mean() < 2.5


def test_eval_view_matches_pillow_resize_then_centre_crop() -> None:
    data = _jpeg((60, 90), seed=3)
    t = HostTransform(image_size=48, train=False)
    got = _run(t, data)[0]
    im = _pil(data)
    (nw, nh), (x, y, w, h) = eval_geometry(*im.size, 48, 0.875)
    ref = np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR).crop((x, y, x + w, y + h))).astype(int)
    assert got.shape == (48, 48, 3) and np.abs(got - ref).mean() < 0.5


def test_host_flip_mirrors_the_same_crop() -> None:
    data = _jpeg((60, 90))
    plain, flipped = HostTransform(image_size=32, views=8), HostTransform(image_size=32, views=8, flip=True)
    a, b = _run(plain, data), _run(flipped, data)
    mirrored = [m for _, m in flipped.boxes(*dec.image_size(data), 0, 0)]
    assert any(mirrored) and not all(mirrored)
    for v, m in enumerate(mirrored):
        np.testing.assert_array_equal(b[v], a[v][:, ::-1] if m else a[v])


def test_view_k_does_not_depend_on_the_number_of_views() -> None:
    data = _jpeg((60, 90))
    one, three = _run(HostTransform(image_size=32, views=1), data), _run(HostTransform(image_size=32, views=3), data)
    np.testing.assert_array_equal(one[0], three[0])
    assert not np.array_equal(three[0], three[1])


def test_grey_cmyk_rgba_and_png_in_a_jpg_decode_to_rgb() -> None:
    rgb = np.asarray(_pil(_jpeg((40, 50))))
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, fmt)
        arr, r = dec.decode(buf.getvalue())
        assert arr.shape == (*rgb.shape[:2], 3) and arr.dtype == np.uint8 and r == 1, mode
    grey, _ = dec.decode(_jpeg((40, 50)), channels=1)
    assert grey.shape == (*rgb.shape[:2], 1)
    assert _run(HostTransform(image_size=16, views=2, channels=1), _jpeg((40, 50))).shape == (2, 16, 16, 1)


def test_pillow_fallback_without_simplejpeg(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jpeg((200, 300))
    t = HostTransform(image_size=64, views=2)
    with_sj = _run(t, data)
    monkeypatch.setattr(dec, "_simplejpeg", lambda: None)
    np.testing.assert_allclose(_run(t, data), with_sj, atol=3)  # two builds of libjpeg-turbo
    assert dec.image_size(data) == _pil(data).size


def test_decode_errors_are_decode_errors() -> None:
    data = _jpeg((60, 90))
    for bad in (data[: len(data) // 2], b"\xff\xd8" + bytes(200), b"hello, not an image"):
        with pytest.raises(dec.DecodeError):
            dec.decode(bad) if bad[:2] == b"\xff\xd8" else dec.image_size(bad)


def test_core_imports_without_simplejpeg() -> None:
    # Pillow is a dependency of matplotlib, so only simplejpeg can be missing from a working install.
    code = ("import sys; sys.modules['simplejpeg'] = None; "
            "import peerdistill, peerdistill.data, peerdistill.cli; from peerdistill.data.stream import "
            "scan_folder, open_shards, StreamLoader; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------------------------- loader
def _all(loader: StreamLoader, rows: object, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bs = list(loader.batches(rows, epoch))
    return (torch.cat([b.pixels for b in bs]), torch.cat([b.labels for b in bs]), torch.cat([b.index for b in bs]))


def test_batches_are_identical_for_0_1_2_workers(tree: Path) -> None:
    s = scan_folder(tree / "train")
    ds = StreamDataset(s, HostTransform(image_size=32, views=2, seed=1))
    rows = Sampler().epoch(s.labels, 8, 1, 0, 1)
    ref = _all(StreamLoader(ds, workers=0), rows, 1)
    for w in (1, 2):
        loader = StreamLoader(ds, workers=w, prefetch=2)
        for _ in range(2):  # persistent workers: the second pass reuses them and gives the same batches
            got = _all(loader, rows, 1)
            for a, b in zip(ref, got):
                assert torch.equal(a, b), w
    other = _all(StreamLoader(ds, workers=0), rows, 2)
    assert not torch.equal(ref[0], other[0])  # another epoch, other crops


def test_batch_contract(tree: Path) -> None:
    s = scan_folder(tree / "train")
    ds = StreamDataset(s, HostTransform(image_size=24, views=2))
    rows = MPerClassSampler(2).epoch(s.labels, 6, 1, 0, 0)
    b = next(StreamLoader(ds).batches(rows, 0))
    assert b.images.shape == (6, 2, 3, 24, 24) and b.images.dtype == torch.uint8
    assert b.images.stride() == (2 * 24 * 24 * 3, 24 * 24 * 3, 1, 24 * 3, 3)  # channels-last storage
    np.testing.assert_array_equal(b.index.numpy(), rows[0].numpy())
    np.testing.assert_array_equal(b.labels.numpy(), s.labels[rows[0].numpy()])
    assert (b.labels.view(2, -1)[0] == b.labels.view(2, -1)[1]).all()  # pairs of a class stay pairs (member-major)


def test_evaluation_rows_cover_every_sample_once(tree: Path) -> None:
    s = scan_folder(tree / "val", scan_folder(tree / "train").classes, require_all=False)
    ds = StreamDataset(s, HostTransform(image_size=24, train=False))
    shares = [np.concatenate(sequential_rows(len(s), 4, r, 2)) for r in range(2)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(s)))
    px, labels, index = _all(StreamLoader(ds), sequential_rows(len(s), 4), 0)
    assert px.shape == (len(s), 1, 24, 24, 3) and index.tolist() == list(range(len(s)))
    assert torch.equal(px, _all(StreamLoader(ds), sequential_rows(len(s), 4), 5)[0])  # no draws in eval


def test_reused_draws_equal_fresh_generators() -> None:
    from peerdistill.data.stream.protocol import SampleDraws

    draws = SampleDraws()
    for key in [(0, 0, 0, 0), (3, 1, 7, 0), (3, 1, 7, 1), (2**40, 5, 10**9, 2)]:
        np.testing.assert_array_equal(draws.at(*key).random(30), sample_rng(*key).random(30))
    assert rrc_box(400, 300, draws.at(1, 2, 3, 0)) == rrc_box(400, 300, sample_rng(1, 2, 3, 0))
