"""Host input pipeline: the conventional torchvision-style loader vs peerdistill's streaming loader.

    python benchmarks/make_imagenet_like.py /tmp/il1k --train 1000
    python benchmarks/make_imagenet_like.py /tmp/il10k --train 10000
    peerdistill pack /tmp/il10k/train /tmp/il10k-s256 --shard-size 1000 --max-side 256
    peerdistill pack /tmp/il10k/train /tmp/il10k-raw --shard-size 1000
    python benchmarks/input_pipeline.py --folder /tmp/il10k/train --shards /tmp/il10k-raw /tmp/il10k-s256 \\
        --workers 1 2 --repeat 3 --json /tmp/pipeline.json

The conventional pipeline is what research code does with torchvision, written with Pillow alone:
``ImageFolder`` (Pillow open + RGB convert), ``RandomResizedCrop(224)`` (crop, then bilinear resize),
``RandomHorizontalFlip``, ``ToTensor`` (float CHW), in a ``DataLoader(batch_size=64, shuffle=True)`` with
the same number of workers. peerdistill's: the same crops and flips (``HostTransform(flip=True)``), uint8
batches, from the folder and from shards. Each measurement runs in a fresh process; it reports images/s
(wall clock, after the first batch), CPU time per image (the worker processes', and with the main
process's), peak RSS of the main process and of the largest worker, and the load average around it --
the CPU time per image is the number that stays meaningful on a busy machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from peerdistill.data.samplers import Sampler
from peerdistill.data.stream import HostTransform, StreamDataset, StreamLoader, open_shards, scan_folder

BATCH = 64
SIZE = 224


# ------------------------------------------------------------------------------- the conventional one
class Conventional(torch.utils.data.Dataset):
    """torchvision's ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor, in Pillow."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def get_params(width: int, height: int) -> tuple[int, int, int, int]:
        area, log_ratio = width * height, torch.log(torch.tensor((3 / 4, 4 / 3)))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(0.08, 1.0).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return torch.randint(0, height - h + 1, size=(1,)).item(), \
                    torch.randint(0, width - w + 1, size=(1,)).item(), h, w
        return 0, 0, height, width

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        top, left, h, w = self.get_params(*img.size)
        img = img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        if torch.rand(1) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(SIZE, SIZE, 3)
        return t.permute(2, 0, 1).contiguous().to(torch.float32).div(255), label


def conventional_batches(folder: str, workers: int, n_images: int):  # noqa: ANN201 - an iterator
    files = scan_folder(folder)
    samples = [(str(files.path(i)), int(files.labels[i])) for i in range(len(files))]
    loader = torch.utils.data.DataLoader(Conventional(samples), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, drop_last=True)
    return loader, _take(loader, n_images, lambda b: len(b[1]))


# ------------------------------------------------------------------------------------------ peerdistill
def ours_batches(source: str, workers: int, n_images: int, kind: str):  # noqa: ANN201 - an iterator
    samples = scan_folder(source) if kind == "folder" else open_shards(source)
    loader = StreamLoader(StreamDataset(samples, HostTransform(image_size=SIZE, flip=True)), workers=workers,
                          prefetch=2)
    rows = Sampler().epoch(samples.labels, BATCH, 1, 0, 0)
    return loader, _take(loader.batches(rows, 0), n_images, lambda b: len(b.labels))


def _take(batches, n_images: int, count):  # noqa: ANN001, ANN202
    seen = 0
    for b in batches:
        yield b
        seen += count(b)
        if seen >= n_images:
            return


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def measure(pipeline: str, source: str, workers: int, n_images: int) -> dict:
    """One measurement in this process (call it in a fresh one)."""
    from PIL import Image  # noqa: F401 - imported before the clock starts, as in a training script

    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    self0, kids0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    if pipeline == "conventional":
        loader, it = conventional_batches(source, workers, n_images)
        count = lambda b: len(b[1])  # noqa: E731
    else:
        loader, it = ours_batches(source, workers, n_images, pipeline.split("-", 1)[1])
        count = lambda b: len(b.labels)  # noqa: E731
    total = count(next(it))
    t0, timed = time.perf_counter(), 0
    for b in it:
        timed += count(b)
    wall = time.perf_counter() - t0
    total += timed
    del b, it, loader  # shuts the workers down, so their CPU time and RSS are counted
    gc.collect()
    main_cpu, worker_cpu = _cpu(resource.RUSAGE_SELF) - self0, _cpu(resource.RUSAGE_CHILDREN) - kids0
    return {"pipeline": pipeline, "source": source, "workers": workers, "images": total,
            "images_per_s": timed / wall, "worker_cpu_ms": 1e3 * worker_cpu / total,
            "total_cpu_ms": 1e3 * (worker_cpu + main_cpu) / total,
            "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "load_before": load0, "load_after": os.getloadavg()[0]}


def warm_up(folder: str | None, shards: list[str]) -> None:
    """Read every file once (the page cache then holds them for every configuration alike) and build the
    shards' index, so no measurement pays for either."""
    sets = ([scan_folder(folder)] if folder else []) + [open_shards(s) for s in shards]
    for s in sets:
        for i in range(len(s)):
            s.read(i)


def _name(source: str) -> str:
    return "/".join(Path(source).parts[-2:])


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", help="a class-per-folder split (conventional and ours)")
    p.add_argument("--shards", nargs="*", default=[], help="shard folders (ours)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=2048, help="images per measurement")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", nargs="*", default=["conventional", "ours-folder", "ours-shards"])
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--one", nargs=4, metavar=("PIPELINE", "SOURCE", "WORKERS", "IMAGES"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], int(a.one[2]), int(a.one[3]))))
        return
    runs = [(pipe, src) for pipe, src in (("conventional", a.folder), ("ours-folder", a.folder))
            if src and pipe in a.only] + [("ours-shards", s) for s in a.shards if "ours-shards" in a.only]
    warm_up(a.folder, a.shards)
    results = []
    for rep in range(a.repeat):  # interleaved, so a change of load hits every configuration alike
        for w in a.workers:
            for pipe, src in runs:
                r = _child([pipe, src, str(w), str(a.images)])
                results.append(r)
                print(f"rep {rep} {pipe:13s} {_name(src):16s} w={w} {r['images_per_s']:7.1f} img/s "
                      f"worker {r['worker_cpu_ms']:5.2f} ms/img total {r['total_cpu_ms']:5.2f} ms/img "
                      f"rss main {r['rss_main_mb']:.0f} MB worker {r['rss_worker_mb']:.0f} MB "
                      f"load {r['load_before']:.2f}->{r['load_after']:.2f}", flush=True)
    summary(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def summary(results: list[dict]) -> None:
    """Medians per configuration, and each one against the conventional pipeline at the same workers."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["pipeline"], r["source"], r["workers"]), []).append(r)
    metrics = ("images_per_s", "worker_cpu_ms", "total_cpu_ms", "rss_main_mb", "rss_worker_mb")
    med = {k: {m: statistics.median(x[m] for x in v) for m in metrics} for k, v in groups.items()}
    print("\n| pipeline | source | workers | images/s | worker CPU ms/img | total CPU ms/img | x conv. "
          "(images/s) | x conv. (per CPU-s) | peak RSS main / worker MB | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for (pipe, src, w), m in med.items():
        conv = next((v for (p2, _, w2), v in med.items() if p2 == "conventional" and w2 == w), None)
        loads = [x["load_before"] for x in groups[(pipe, src, w)]]
        ratio = (f"{m['images_per_s'] / conv['images_per_s']:.2f} | {conv['total_cpu_ms'] / m['total_cpu_ms']:.2f}"
                 if conv else "- | -")
        print(f"| {pipe} | {_name(src)} | {w} | {m['images_per_s']:.0f} | {m['worker_cpu_ms']:.2f} | "
              f"{m['total_cpu_ms']:.2f} | {ratio} | {m['rss_main_mb']:.0f} / {m['rss_worker_mb']:.0f} | "
              f"{min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
