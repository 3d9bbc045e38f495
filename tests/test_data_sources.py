"""On-disk dataset sources: CIFAR pickles, Tiny-ImageNet and class-per-folder images.

Every test writes a tiny dataset in the dataset's real on-disk format into ``tmp_path``.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peerdistill.data import DATASETS
from peerdistill.data import cache as cache_mod
from peerdistill.data import tiny_imagenet as tiny_mod
from peerdistill.data.base import channel_stats
from peerdistill.errors import PeerdistillError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the default search roots and the fallback cache away from the real home and cwd.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PEERDISTILL_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.delenv("PEERDISTILL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------- CIFAR

class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str/bytes as Python 2 ``str`` opcodes, like the pickles on the CIFAR website."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2str(self, obj: str | bytes) -> None:
        b = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(b) < 256:
            head = pickle.SHORT_BINSTRING + bytes([len(b)])
        else:
            head = pickle.BINSTRING + struct.pack("<i", len(b))
        self.write(head + b)
        self.memoize(obj)

    dispatch[str] = save_py2str
    dispatch[bytes] = save_py2str


def dump(path: Path, obj: dict, py2: bool = False) -> None:
    if py2:
        f = io.BytesIO()
        Py2Pickler(f, protocol=2).dump({k.decode(): v for k, v in obj.items()})
        # numpy 1.x, which wrote the real files, lived at numpy.core.
        path.write_bytes(f.getvalue().replace(b"numpy._core.", b"numpy.core."))
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


def rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> CIFAR's (N, 3072) channel-major rows."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(parent: Path, py2: bool = False, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    d = parent / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ytr, yte = [0, 3, 9, 1, 2, 9], [5, 0, 9, 7]
    for i in (0, 1):
        dump(d / f"data_batch_{i + 1}", {b"batch_label": b"training batch", b"labels": ytr[3 * i:3 * i + 3],
                                         b"data": rows(train[3 * i:3 * i + 3]),
                                         b"filenames": [b"x.png"] * 3}, py2)
    dump(d / "test_batch", {b"batch_label": b"testing batch", b"labels": yte, b"data": rows(test)}, py2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 3, b"num_vis": 3072}, py2)
    return train, np.array(ytr), test, np.array(yte)


@pytest.mark.parametrize("py2", [False, True])
def test_cifar10_roundtrip(tmp_path: Path, py2: bool) -> None:
    train, ytr, test, yte = write_cifar10(tmp_path / "data", py2=py2)
    for root in (tmp_path / "data", tmp_path / "data" / "cifar-10-batches-py"):  # parent or folder
        s = DATASETS.build("cifar10", root=str(root))
        assert s.train.images.shape == (6, 32, 32, 3) and s.test.images.shape == (4, 32, 32, 3)
        assert s.train.images.dtype == np.uint8 and s.train.labels.dtype == np.int64
        np.testing.assert_array_equal(s.train.images, train)
        np.testing.assert_array_equal(s.test.images, test)
        np.testing.assert_array_equal(s.train.labels, ytr)
        np.testing.assert_array_equal(s.test.labels, yte)
        assert s.classes[0] == "airplane" and s.classes[9] == "truck" and s.num_classes == 10
        assert s.mean == (0.4914, 0.4822, 0.4465) and s.crop_padding == 4 and s.flip


def test_cifar10_default_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path / "data")  # ./data is a default root (cwd is tmp_path)
    assert len(DATASETS.build("cifar10").train) == 6
    other = tmp_path / "elsewhere"
    write_cifar10(other, seed=1)
    monkeypatch.setenv("PEERDISTILL_DATA", str(other))  # searched first
    s = DATASETS.build("cifar10")
    assert s.meta["path"] == str(other / "cifar-10-batches-py")


def test_cifar100_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    dump(d / "train", {b"data": rows(train), b"fine_labels": [0, 99, 42, 1, 7],
                       b"coarse_labels": [0, 19, 3, 1, 2]})
    dump(d / "test", {b"data": rows(test), b"fine_labels": [99, 0, 5], b"coarse_labels": [19, 0, 1]})
    dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                      b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    s = DATASETS.build("cifar100", root=str(tmp_path))
    np.testing.assert_array_equal(s.train.images, train)
    np.testing.assert_array_equal(s.test.images, test)
    assert s.train.labels.tolist() == [0, 99, 42, 1, 7] and s.num_classes == 100 and s.classes[42] == "c42"
    assert s.std == (0.2673, 0.2564, 0.2762)


def test_cifar_missing_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(PeerdistillError, match="cifar-10-batches-py/ not found") as e:
        DATASETS.build("cifar10")
    msg = str(e.value)
    assert "data" in msg and ".cache/peerdistill" in msg and "cs.toronto.edu" in msg and "\n" not in msg
    with pytest.raises(PeerdistillError, match=str(tmp_path / "nowhere")):
        DATASETS.build("cifar100", root=str(tmp_path / "nowhere"))


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(PeerdistillError, match="data_batch_2") as e:
        DATASETS.build("cifar10", root=str(tmp_path))
    assert "\n" not in str(e.value)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what an attacker would put in a pickle
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_forbidden_class_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": Evil(marker), b"labels": [0]})
    with pytest.raises(PeerdistillError, match=r"test_batch.*refusing to load \w+\.system"):
        DATASETS.build("cifar10", root=str(tmp_path))
    assert not marker.exists()
    # Object arrays could carry anything; they are refused too.
    dump(tmp_path / "cifar-10-batches-py" / "test_batch",
         {b"data": np.array([None, 1], dtype=object), b"labels": [0]})
    with pytest.raises(PeerdistillError, match="object arrays are not allowed"):
        DATASETS.build("cifar10", root=str(tmp_path))


@pytest.mark.parametrize("bad, match", [
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]},
     r"labels span 0\.\.10, expected 0\.\.9"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, -1, 2, 3]}, "labels span -1"),
    ({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0, 1, 2, 3]}, r"must be uint8 \(N, 3072\)"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}, "4 images but 2 labels"),
    ({b"pixels": np.zeros((4, 3072), np.uint8), b"labels": [0]}, "lacks the key 'data'"),
])
def test_cifar_bad_contents(tmp_path: Path, bad: dict, match: str) -> None:
    write_cifar10(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", bad)
    with pytest.raises(PeerdistillError, match=match) as e:
        DATASETS.build("cifar10", root=str(tmp_path))
    assert "test_batch" in str(e.value)


# -------------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted, as in the real wnids.txt


def smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth image, so that JPEG round-trips it closely."""
    base = rng.integers(30, 220, 3)
    grad = np.linspace(-20, 20, w)[None, :, None]
    return np.clip(base + grad + np.zeros((h, 1, 1)), 0, 255).astype(np.uint8)


def write_tiny(parent: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    d = parent / "tiny-imagenet-200"
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    # words.txt covers more wnids than the dataset's, and here lacks n03.
    (d / "words.txt").write_text("n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\tbullfrog\n")
    pixels: dict[str, np.ndarray] = {}
    for w in WNIDS:
        (d / "train" / w / "images").mkdir(parents=True)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(4):
            pixels[f"{w}_{i}"] = img = smooth(rng, 64, 64)
            Image.fromarray(img).save(d / "train" / w / "images" / f"{w}_{i}.JPEG", quality=95)
    ann = []
    for j, w in enumerate(WNIDS * 2):
        pixels[f"val_{j}"] = img = smooth(rng, 64, 64)
        Image.fromarray(img).save(d / "val" / "images" / f"val_{j}.JPEG", quality=95)
        ann.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    # A greyscale JPEG, as some real Tiny-ImageNet images are: it must come back as RGB.
    Image.fromarray(pixels["val_0"][..., 0]).save(d / "val" / "images" / "val_0.JPEG", quality=95)
    pixels["val_0"] = np.repeat(pixels["val_0"][..., :1], 3, axis=2)
    (d / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return d, pixels


def test_tiny_imagenet_loads_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, pixels = write_tiny(tmp_path)
    s = DATASETS.build("tiny-imagenet", root=str(tmp_path))
    assert s.train.images.shape == (12, 64, 64, 3) and s.test.images.shape == (6, 64, 64, 3)
    assert s.train.images.dtype == np.uint8
    assert s.meta["wnids"] == ["n01", "n02", "n03"] and s.classes == ["goldfish", "bullfrog", "n03"]
    assert s.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert s.test.labels.tolist() == [1, 0, 2, 1, 0, 2]
    assert s.crop_padding == 8 and s.flip and s.mean == (0.485, 0.456, 0.406)
    expect = np.stack([pixels[f"n0{c}_{i}"] for c in (1, 2, 3) for i in range(4)])
    assert np.abs(s.train.images.astype(int) - expect).mean() < 3
    assert np.abs(s.test.images[0].astype(int) - pixels["val_0"]).max() < 12
    assert (d / ".peerdistill-tiny-imagenet-64.npz").is_file()

    # Second load comes from the cache: decoding would fail now.
    def no_decode(*a: object, **k: object) -> np.ndarray:
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(tiny_mod, "decode_images", no_decode)
    s2 = DATASETS.build("tiny-imagenet", root=str(d))
    np.testing.assert_array_equal(s2.train.images, s.train.images)
    np.testing.assert_array_equal(s2.test.labels, s.test.labels)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_tiny_imagenet_corrupt_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    d, _ = write_tiny(tmp_path)
    good = DATASETS.build("tiny-imagenet", root=str(d))
    cache = d / ".peerdistill-tiny-imagenet-64.npz"
    if damage == "truncate":
        cache.write_bytes(cache.read_bytes()[:1000])
    elif damage == "garbage":
        cache.write_bytes(b"not a zip file at all")
    else:  # a well-formed cache whose arrays disagree with the listing
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["train_x"] = arrays["train_x"][:5]
        np.savez(cache, **arrays)
    with pytest.warns(UserWarning, match="ignoring cache"):
        again = DATASETS.build("tiny-imagenet", root=str(d))
    np.testing.assert_array_equal(again.train.images, good.train.images)
    with np.load(cache) as z:  # and the cache on disk is whole again
        assert z["train_x"].shape == (12, 64, 64, 3)


def test_tiny_imagenet_stale_cache_and_readonly_fallback(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = write_tiny(tmp_path)
    real_save = cache_mod._save

    def save(path: Path, *a: object) -> None:  # the data folder is read-only
        if d.resolve() in path.parents:
            raise PermissionError(13, "Read-only file system", str(path))
        real_save(path, *a)

    monkeypatch.setattr(cache_mod, "_save", save)
    assert len(DATASETS.build("tiny-imagenet", root=str(d)).train) == 12
    assert not (d / ".peerdistill-tiny-imagenet-64.npz").exists()
    assert len(list((tmp_path / "user-cache").glob("tiny-imagenet-64-*.npz"))) == 1
    # Adding an image makes the cache stale: it is rebuilt with the new count.
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "train" / "n03" / "images" / "extra.JPEG")
    with pytest.warns(UserWarning, match="stale"):
        assert len(DATASETS.build("tiny-imagenet", root=str(d)).train) == 13


def test_tiny_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(PeerdistillError,
                       match=r"tiny-imagenet-200/ not found \(looked in .*tiny-imagenet-200"):
        DATASETS.build("tiny-imagenet", root=str(tmp_path))
    d, _ = write_tiny(tmp_path)
    (d / "val" / "images" / "val_3.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(PeerdistillError, match="cannot decode image .*val_3.JPEG"):
        DATASETS.build("tiny-imagenet", root=str(d))
    (d / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(PeerdistillError, match="line 1: expected"):
        DATASETS.build("tiny-imagenet", root=str(d))


# ---------------------------------------------------------------------------------- imagefolder

def write_folder(root: Path, test_name: str = "test", size: int = 32) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    made: dict[str, list[np.ndarray]] = {}
    layout = {"train": {"dog": 3, "cat": 2, "bird": 2}, test_name: {"cat": 2, "dog": 1}}
    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                made.setdefault(f"{split}/{c}", []).append(img)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return made


def test_imagefolder_roundtrip(tmp_path: Path) -> None:
    made = write_folder(tmp_path)
    s = DATASETS.build("imagefolder", root=str(tmp_path))
    assert s.classes == ["bird", "cat", "dog"]
    assert s.train.images.shape == (7, 32, 32, 3) and s.test.images.shape == (3, 32, 32, 3)
    assert s.train.labels.tolist() == [0, 0, 1, 1, 2, 2, 2] and s.test.labels.tolist() == [1, 1, 2]
    expect = np.stack(made["train/bird"] + made["train/cat"] + made["train/dog"])
    np.testing.assert_array_equal(s.train.images, expect)  # PNG at the target size: exact
    np.testing.assert_array_equal(s.test.images, np.stack(made["test/cat"] + made["test/dog"]))
    mean, std = channel_stats(expect)
    np.testing.assert_allclose(s.mean, mean)
    np.testing.assert_allclose(s.std, std)
    assert s.crop_padding == 4
    # Cached per decode setting; the cached copy gives the same result.
    assert (tmp_path / ".peerdistill-imagefolder-32-rgb.npz").is_file()
    np.testing.assert_array_equal(DATASETS.build("imagefolder", root=str(tmp_path)).train.images, expect)


def test_imagefolder_val_resize_grayscale(tmp_path: Path) -> None:
    write_folder(tmp_path, test_name="val", size=40)
    s = DATASETS.build("imagefolder", root=str(tmp_path), image_size=16, grayscale=True)
    assert s.train.images.shape == (7, 16, 16, 1) and s.test.images.shape == (3, 16, 16, 1)
    assert len(s.mean) == 1 and s.meta["test_split"] == "val"
    assert (tmp_path / ".peerdistill-imagefolder-16-gray.npz").is_file()


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(PeerdistillError, match="needs data.root"):
        DATASETS.build("imagefolder")
    with pytest.raises(PeerdistillError, match=f"{tmp_path} must hold train/"):
        DATASETS.build("imagefolder", root=str(tmp_path))
    write_folder(tmp_path)
    (tmp_path / "test" / "horse").mkdir()
    with pytest.raises(PeerdistillError, match="class folders missing from .*train: horse"):
        DATASETS.build("imagefolder", root=str(tmp_path))
    (tmp_path / "test" / "horse").rmdir()
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(PeerdistillError, match="empty holds no images"):
        DATASETS.build("imagefolder", root=str(tmp_path))
