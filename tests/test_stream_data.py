"""The streaming path's inputs: class folders, webdataset shards (index, cache, bad shards) and
``peerdistill pack`` (round trip, bounded sides, resume), with their one-line errors."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from peerdistill.cli import main  # noqa: E402
from peerdistill.data.stream import (HostTransform, StreamDataset, StreamLoader, open_shards,  # noqa: E402
                                     scan_folder, sequential_rows)
from peerdistill.data.stream.codec import image_size  # noqa: E402
from peerdistill.data.stream.pack import PackOptions, pack  # noqa: E402
from peerdistill.data.stream.shards import PLAN  # noqa: E402
from peerdistill.errors import PeerdistillError  # noqa: E402

from .imagenet_like import make_imagenet_like  # noqa: E402


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("il")
    make_imagenet_like(root, n_train=30, n_val=9, n_classes=3, sides=(40, 90), target_kb=None)
    return root


@pytest.fixture
def copy(tree: Path, tmp_path: Path) -> Path:
    shutil.copytree(tree, tmp_path / "data")
    return tmp_path / "data"


def _eval_pixels(samples: object, workers: int = 0) -> torch.Tensor:
    ds = StreamDataset(samples, HostTransform(image_size=24, train=False))
    return torch.cat([b.pixels for b in StreamLoader(ds, workers=workers).batches(sequential_rows(len(ds), 7))])


# -------------------------------------------------------------------------------------------- folders
def test_folder_listing(tree: Path) -> None:
    s = scan_folder(tree / "train")
    assert s.classes == ["0_t-shirt-top", "1_trouser", "2_pullover"] and len(s) == len(s.labels) > 0
    assert s.describe(0).startswith(str(tree / "train" / s.classes[s.labels[0]]))
    assert np.all(np.diff(s.labels) >= 0) and not s.notes
    sub = s.subset(np.array([5, 0]))
    assert sub.read(0) == s.read(5) and sub.labels.tolist() == [s.labels[5], s.labels[0]]
    relabelled = s.with_labels(np.zeros(len(s)), ["all"])
    assert relabelled.labels.sum() == 0 and relabelled.classes == ["all"] and s.labels.sum() > 0
    assert relabelled.read(3) == s.read(3)
    with pytest.raises(ValueError):
        s.with_labels(np.zeros(2))


def test_non_image_files_are_skipped_and_counted(copy: Path) -> None:
    before = len(scan_folder(copy / "train"))
    (copy / "train" / "1_trouser" / "README.txt").write_text("not an image")
    (copy / "train" / "1_trouser" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored silently
    s = scan_folder(copy / "train")
    assert len(s) == before
    assert s.notes == [f"skipped 1 file(s) under {copy / 'train'} that are not images "
                       f"(.jpg, .jpeg, .png, .webp, .bmp), e.g. {copy / 'train' / '1_trouser' / 'README.txt'}"]


def test_empty_class_folder(copy: Path) -> None:
    (copy / "train" / "3_dress").mkdir()
    with pytest.raises(PeerdistillError, match=f"class folder {copy / 'train' / '3_dress'} holds no images"):
        scan_folder(copy / "train")
    (copy / "val" / "3_dress").mkdir()  # an evaluation split may lack a class
    classes = [*scan_folder(copy / "val", require_all=False).classes]
    assert "3_dress" in classes
    with pytest.raises(PeerdistillError, match="not among the 3 classes: 3_dress"):
        scan_folder(copy / "val", ["0_t-shirt-top", "1_trouser", "2_pullover"])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_image_is_one_line_naming_it(copy: Path, workers: int, damage: str) -> None:
    s = scan_folder(copy / "val", scan_folder(copy / "train").classes, require_all=False)
    bad = s.path(4)
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(2000), "empty": b""}[damage])
    with pytest.raises(PeerdistillError) as e:
        _eval_pixels(s, workers)
    msg = str(e.value)
    assert msg.startswith(f"cannot decode image {bad} (sample 4): ") and "\n" not in msg


def test_a_vanished_file_is_one_line_naming_it(copy: Path) -> None:
    s = scan_folder(copy / "val", require_all=False)
    s.path(2).unlink()
    with pytest.raises(PeerdistillError, match=rf"^cannot read {s.path(2)} \(sample 2\): No such file"):
        _eval_pixels(s)


# --------------------------------------------------------------------------------------------- shards
def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_shards_read_the_same_pixels_as_the_folder(tree: Path, tmp_path: Path) -> None:
    folder = scan_folder(tree / "val", scan_folder(tree / "train").classes, require_all=False)
    shard_dir = tmp_path / "s"
    shard_dir.mkdir()
    for k in range(2):  # a foreign webdataset: no meta.json, keys in folders, labels as text
        idx = range(k, len(folder), 2)
        _tar(shard_dir / f"part-{k}.tar", [m for i in idx for m in (
            (f"{folder.relpath(i)}", folder.read(i)),
            (f"{folder.relpath(i).rsplit('.', 1)[0]}.cls", f"{folder.labels[i]}\n".encode()),
            (f"{folder.relpath(i).rsplit('.', 1)[0]}.json", b"{}"))])
    s = open_shards(shard_dir)
    order = np.r_[0:len(folder):2, 1:len(folder):2]
    assert s.classes == [str(c) for c in range(int(folder.labels.max()) + 1)]
    np.testing.assert_array_equal(s.labels, folder.labels[order])
    assert s.read(1) == folder.read(2)
    assert torch.equal(_eval_pixels(s, workers=2), _eval_pixels(folder)[order])
    assert s.describe(1) == f"{shard_dir / 'part-0.tar'}:{folder.relpath(2)}"
    assert len(list(shard_dir.glob(".peerdistill-shards-*.npz"))) == 1  # the index, cached beside them


def test_the_index_cache_follows_the_shards(tmp_path: Path) -> None:
    _tar(tmp_path / "a.tar", [("x.jpg", b"1"), ("x.cls", b"0"), ("y.png", b"22"), ("y.cls", b"1")])
    assert open_shards(tmp_path).labels.tolist() == [0, 1]
    cache = next(tmp_path.glob(".peerdistill-*.npz"))
    mtime = cache.stat().st_mtime_ns
    assert open_shards(tmp_path).labels.tolist() == [0, 1] and cache.stat().st_mtime_ns == mtime  # reused
    _tar(tmp_path / "a.tar", [("x.jpg", b"1"), ("x.cls", b"2"), ("z.webp", b"333"), ("z.cls", b"0")])
    with pytest.warns(UserWarning, match="stale"):
        s = open_shards(tmp_path)
    assert s.labels.tolist() == [2, 0] and s.read(1) == b"333"


@pytest.mark.parametrize("members, message", [
    ([("a.jpg", b"1"), ("a.cls", b"0"), ("b.jpg", b"2")], r"sample 'b' \(b.jpg\) has no b.cls label"),
    ([("a.jpg", b"1"), ("a.cls", b"0"), ("b.cls", b"1")], r"sample 'b' has a label but no image"),
    ([("a.jpg", b"1"), ("a.cls", b"cat")], r"a.cls does not hold a class index"),
    ([("a.jpg", b"1"), ("a.png", b"1"), ("a.cls", b"0")], r"sample 'a' has two images"),
])
def test_bad_shards_are_one_line_naming_the_shard(tmp_path: Path, members: list, message: str) -> None:
    _tar(tmp_path / "bad.tar", members)
    with pytest.raises(PeerdistillError, match=rf"^shard {tmp_path / 'bad.tar'}: {message}"):
        open_shards(tmp_path)


def test_truncated_shard_and_corrupt_member(tree: Path, tmp_path: Path) -> None:
    folder = scan_folder(tree / "train")
    good = [m for i in range(3) for m in ((f"k{i}.jpg", folder.read(i)), (f"k{i}.cls", b"0"))]
    _tar(tmp_path / "t.tar", good)
    with tarfile.open(tmp_path / "t.tar") as tf:
        cut = tf.getmember("k2.jpg").offset_data + 100
    (tmp_path / "t.tar").write_bytes((tmp_path / "t.tar").read_bytes()[:cut])  # cut inside the last image
    with pytest.raises(PeerdistillError, match=rf"^shard {tmp_path / 't.tar'} is truncated: member k2.jpg"):
        open_shards(tmp_path)
    _tar(tmp_path / "t.tar", [*good[:4], ("k2.jpg", folder.read(2)[:300]), ("k2.cls", b"0")])
    s = open_shards(tmp_path)
    with pytest.raises(PeerdistillError, match=rf"^cannot decode image {tmp_path / 't.tar'}:k2.jpg \(sample 2\)"):
        _eval_pixels(s)


def test_no_shards(tmp_path: Path) -> None:
    with pytest.raises(PeerdistillError, match="no shards"):
        open_shards(tmp_path)


# ----------------------------------------------------------------------------------------------- pack
def test_pack_round_trip_and_bounded_sides(tree: Path, tmp_path: Path) -> None:
    out = pack(tree, tmp_path / "p", PackOptions(shard_size=8, max_side=50, quality=85), workers=2)
    train, val = scan_folder(tree / "train"), scan_folder(tree / "val", require_all=False)
    assert set(out) == {"train", "val"} and out["train"]["samples"] == len(train)
    st = open_shards(tmp_path / "p" / "train")
    sv = open_shards(tmp_path / "p" / "val", st.classes)
    assert st.classes == train.classes and len(list((tmp_path / "p" / "train").glob("*.tar"))) == 4
    # Same samples, same labels: match members to source files by their key.
    by_key = {train.relpath(i).rsplit(".", 1)[0]: train.labels[i] for i in range(len(train))}
    keys = [st.describe(i).split(":", 1)[1].rsplit(".", 1)[0] for i in range(len(st))]
    assert sorted(keys) == sorted(by_key) and [by_key[k] for k in keys] == st.labels.tolist()
    assert sorted(sv.labels.tolist()) == sorted(val.labels.tolist())
    sizes = [image_size(st.read(i)) for i in range(len(st))]
    assert max(min(s) for s in sizes) == 50
    # Images already within the bound are stored byte for byte; the others keep their aspect ratio.
    for i, k in enumerate(keys):
        src = train.read(_source_index(train, k))
        w, h = image_size(src)
        if min(w, h) <= 50:
            assert st.read(i) == src
        else:
            assert abs(sizes[i][0] / sizes[i][1] - w / h) < 0.03


def _source_index(files: object, key: str) -> int:
    return next(i for i in range(len(files)) if files.relpath(i).rsplit(".", 1)[0] == key)


def test_pack_resumes_after_a_crash_and_refuses_other_settings(tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "p"
    opts = PackOptions(shard_size=7)
    pack(tree / "train", dst, opts)
    first = {p.name: p.read_bytes() for p in dst.glob("*.tar")}
    assert len(first) == 5
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in [*dst.glob("*.tar"), dst / "meta.json"]} == {0o666 & ~mask}
    # A crash: the plan is back, meta.json and two shards are gone, a temp file of a shard is left.
    (dst / "meta.json").rename(tmp_path / "meta.json")
    (dst / PLAN).write_text(json.dumps({"plan": json.loads((tmp_path / "meta.json").read_text())["plan"]}))
    (dst / "shard-000001.tar").unlink()
    (dst / "shard-000004.tar").rename(dst / "shard-000004.tar.x1y2.tmp")
    with pytest.raises(PeerdistillError, match="unfinished pack"):
        open_shards(dst)
    pack(tree / "train", dst, opts)
    assert {p.name: p.read_bytes() for p in dst.glob("*.tar")} == first and not list(dst.glob("*.tmp"))
    assert not (dst / PLAN).exists() and len(open_shards(dst)) == sum(1 for _ in tree.glob("train/*/*.jpg"))
    with pytest.raises(PeerdistillError, match="already holds a pack of other files or settings"):
        pack(tree / "train", dst, PackOptions(shard_size=7, max_side=30))


def test_pack_names_a_corrupt_source_file(copy: Path, tmp_path: Path) -> None:
    s = scan_folder(copy / "train")
    s.path(3).write_bytes(s.read(3)[:100])
    with pytest.raises(PeerdistillError, match=rf"^cannot decode image {s.path(3)}: "):
        pack(copy / "train", tmp_path / "p", PackOptions(shard_size=100))


def test_pack_command(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pack", str(tree / "val"), str(tmp_path / "v"), "--shard-size", "4", "--max-side", "48",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out == f"{tmp_path / 'v'}: 9 images of 3 classes in 3 shards, shorter side at most 48 px\n"
    assert main(["pack", str(tree), str(tmp_path / "w"), "--shard-size", "0"]) == 2
    assert capsys.readouterr().err == ("error: peerdistill pack: argument --shard-size: must be int >= 1, got '0' "
                                       "(see peerdistill pack --help)\n")
    assert main(["pack", str(tmp_path / "nope"), str(tmp_path / "w"), "--shard-size", "4"]) == 2
    assert "is not a folder" in capsys.readouterr().err
