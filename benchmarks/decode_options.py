"""Cost and accuracy of the decoding choices of the host pipeline, one process, no loader.

    python benchmarks/decode_options.py /tmp/il1k/train --images 300

For each image one RandomResizedCrop box (seeded) to 224 px. Times are CPU milliseconds per image (the
best of 3 passes); the accuracy of each shortcut is the PSNR (dB) and mean absolute difference (grey
levels) of its 224-px output against the accurate path (full-size libjpeg-turbo decode with the accurate
IDCT and fancy chroma upsampling, then antialiased bilinear resize of the crop):

- decoders: Pillow (``open`` + ``convert("RGB")``), simplejpeg, simplejpeg with ``fastdct`` and
  ``fastupsample``, Pillow with ``draft``;
- resize of the crop: Pillow ``crop().resize(BILINEAR)`` (the conventional pipeline), Pillow
  ``resize(box=...)`` in one pass, torch's uint8 antialiased bilinear kernel;
- reduced-size DCT decoding (1/2, 1/4) of crops at least 2x the output, on large photos (shorter side
  800-1200 px, generated here), against the full decode;
- the bound on what a region (partial) decode could save: decoding a JPEG holding only the crop;
- shards with a bounded shorter side (256, 320 px): the same relative crop from the re-encoded image, and
  the evaluation view (resize to 256, centre 224), against the original.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peerdistill.data.stream import HostTransform, rrc_box, sample_rng, scan_folder  # noqa: E402
from peerdistill.data.stream.codec import decode, resize  # noqa: E402
from peerdistill.data.stream.pack import bounded  # noqa: E402
from peerdistill.data.stream.transform import empty_views  # noqa: E402
from tests.imagenet_like import make_image  # noqa: E402

OUT = (224, 224)


def cpu_ms(fn, items: list, reps: int = 3) -> float:  # noqa: ANN001
    best = math.inf
    for _ in range(reps):
        t = time.process_time()
        for it in items:
            fn(*it)
        best = min(best, time.process_time() - t)
    return 1e3 * best / len(items)


def accuracy(name: str, outs: list[np.ndarray], refs: list[np.ndarray]) -> None:
    """PSNR of the pooled squared error (dB), the mean absolute difference and the worst image's."""
    d = [o.astype(np.float64) - r.astype(np.float64) for o, r in zip(outs, refs)]
    mse = float(np.mean([np.mean(x ** 2) for x in d]))
    worst = max(float(np.mean(np.abs(x))) for x in d)
    db = math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
    print(f"  {name:62s} PSNR {db:5.1f} dB, mean |diff| {np.mean([np.mean(np.abs(x)) for x in d]):.3f} "
          f"(worst image {worst:.2f}) grey levels")


def pil_decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def pil_crop_resize(im: Image.Image, b: tuple[int, int, int, int]) -> Image.Image:
    return im.crop((b[0], b[1], b[0] + b[2], b[1] + b[3])).resize(OUT, Image.Resampling.BILINEAR)


def pil_box_resize(im: Image.Image, b: tuple[int, int, int, int]) -> Image.Image:
    return im.resize(OUT, Image.Resampling.BILINEAR, box=(b[0], b[1], b[0] + b[2], b[1] + b[3]))


def crop_resize_torch(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return resize(pixels[y:y + h, x:x + w], OUT).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--images", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)
    files = scan_folder(a.folder)
    step = max(1, len(files) // a.images)
    datas = [files.read(i) for i in range(0, len(files), step)][: a.images]
    dims = [simplejpeg.decode_jpeg_header(d)[1::-1] for d in datas]
    boxes = [rrc_box(w, h, sample_rng(0, 0, i, 0)) for i, (w, h) in enumerate(dims)]
    items = list(zip(datas, boxes))
    full = [simplejpeg.decode_jpeg(d, "RGB") for d in datas]
    refs = [crop_resize_torch(f, b) for f, b in zip(full, boxes)]
    print(f"{len(datas)} images, mean {np.mean([len(d) for d in datas]) / 1024:.1f} KB, "
          f"mean {np.mean([w * h for w, h in dims]) / 1e3:.0f} kpixels, mean crop "
          f"{np.mean([b[2] * b[3] for b in boxes]) / 1e3:.0f} kpixels")

    print("decode (CPU ms/image):")
    print(f"  Pillow open + convert RGB      {cpu_ms(lambda d, b: pil_decode(d), items):.3f}")
    print(f"  simplejpeg                     {cpu_ms(lambda d, b: simplejpeg.decode_jpeg(d, 'RGB'), items):.3f}")
    print(f"  simplejpeg fastdct+fastupsample "
          f"{cpu_ms(lambda d, b: simplejpeg.decode_jpeg(d, 'RGB', fastdct=True, fastupsample=True), items):.3f}")
    fast = [simplejpeg.decode_jpeg(d, "RGB", fastdct=True, fastupsample=True) for d in datas]
    accuracy("fastdct + fastupsample", [crop_resize_torch(f, b) for f, b in zip(fast, boxes)], refs)
    pil = [np.array(pil_decode(d)) for d in datas]
    accuracy("Pillow's decode (its own libjpeg-turbo build)", [crop_resize_torch(f, b) for f, b in zip(pil, boxes)],
             refs)

    print("crop + resize to 224 (CPU ms/image, decoded pixels given):")
    pil_imgs = [Image.fromarray(f) for f in full]
    conv, box = pil_crop_resize, pil_box_resize
    print(f"  Pillow crop().resize()         {cpu_ms(conv, list(zip(pil_imgs, boxes))):.3f}")
    print(f"  Pillow resize(box=)            {cpu_ms(box, list(zip(pil_imgs, boxes))):.3f}")
    print(f"  torch uint8 antialiased        {cpu_ms(crop_resize_torch, list(zip(full, boxes))):.3f}")
    accuracy("Pillow crop().resize() (the conventional pipeline)",
             [np.asarray(conv(im, b)) for im, b in zip(pil_imgs, boxes)], refs)
    accuracy("Pillow resize(box=)", [np.asarray(box(im, b)) for im, b in zip(pil_imgs, boxes)], refs)

    region_bound(datas, full, boxes)
    reduced_dct(a.images // 3)
    bounded_shards(datas, refs, boxes, dims)


def region_bound(datas: list[bytes], full: list[np.ndarray], boxes: list) -> None:  # noqa: ANN001
    crops = [simplejpeg.encode_jpeg(np.ascontiguousarray(f[y:y + h, x:x + w]), 90, "RGB", "420")
             for f, (x, y, w, h) in zip(full, boxes)]
    whole = cpu_ms(lambda d: simplejpeg.decode_jpeg(d, "RGB"), [(d,) for d in datas])
    part = cpu_ms(lambda d: simplejpeg.decode_jpeg(d, "RGB"), [(c,) for c in crops])
    print(f"region decode, upper bound: a JPEG of the crop alone decodes in {part:.3f} ms vs {whole:.3f} ms for "
          f"the image ({part / whole:.0%}); a partial decode still entropy-decodes every row above the crop")


def reduced_dct(n: int) -> None:
    """DCT-scaled decode vs full decode, on large photos where crops are >= 2x the output."""
    rng = np.random.default_rng(1)
    garments = (rng.random((n, 28, 28)) * 255).astype(np.uint8)
    big = [make_image(g, np.random.default_rng(i), (800, 1200), (250, 400)) for i, g in enumerate(garments)]
    t = HostTransform(image_size=224)
    outs, refs, reds = [], [], []
    for i, d in enumerate(big):
        h, w = simplejpeg.decode_jpeg_header(d)[:2]
        (box, _), = t.boxes(w, h, 0, i)
        out = empty_views(1, t)[0]
        t.apply(d, 0, i, out)
        outs.append(out.numpy())
        refs.append(crop_resize_torch(simplejpeg.decode_jpeg(d, "RGB"), box))
        reds.append(min(box[2], box[3]) // 448)
    reduced = [k for k, r in enumerate(reds) if r >= 1]
    print(f"reduced-size DCT decode: {len(reduced)} of {len(big)} crops of 800-1200 px photos are >= 2x 224")
    accuracy("DCT-reduced decode + resize vs full decode + resize", [outs[k] for k in reduced],
             [refs[k] for k in reduced])
    items = [(d,) for d in big]
    for r in (2, 4):
        print(f"  decode at 1/{r}: {cpu_ms(lambda d, r=r: decode(d, reduce=r), items, 2):.3f} ms vs full "
              f"{cpu_ms(lambda d: decode(d), items, 2):.3f} ms (photos of {len(big[0]) // 1024}+ KB)")


def bounded_shards(datas: list[bytes], refs: list[np.ndarray], boxes: list, dims: list) -> None:  # noqa: ANN001
    ev = HostTransform(image_size=224, train=False)
    ev_ref = []
    for d in datas:
        out = empty_views(1, ev)[0]
        ev.apply(d, 0, 0, out)
        ev_ref.append(out.numpy())
    for side, quality in ((256, 90), (256, 95), (320, 90)):
        changed = [k for k, (w, h) in enumerate(dims) if min(w, h) > side]  # the others are stored as they are
        small = [bounded(datas[k], side, quality)[0] for k in changed]
        outs, evs = [], []
        for s, (w, h), (x, y, bw, bh) in zip(small, [dims[k] for k in changed], [boxes[k] for k in changed]):
            px = decode(s)[0]
            fx, fy = px.shape[1] / w, px.shape[0] / h  # the same relative crop in the smaller image
            box = (round(x * fx), round(y * fy), max(1, round(bw * fx)), max(1, round(bh * fy)))
            outs.append(crop_resize_torch(px, box))
            out = empty_views(1, ev)[0]
            ev.apply(s, 0, 0, out)
            evs.append(out.numpy())
        stored = [bounded(d, side, quality)[0] for d in datas]
        kb = np.mean([len(s) for s in stored]) / 1024
        dec = cpu_ms(lambda d: simplejpeg.decode_jpeg(d, "RGB"), [(s,) for s in stored])
        print(f"shards with shorter side <= {side}, quality {quality}: {kb:.1f} KB/image, decode {dec:.3f} ms; "
              f"{len(changed)} of {len(datas)} images re-encoded, compared on those:")
        accuracy(f"training crop from the bounded image ({side})", outs, [refs[k] for k in changed])
        accuracy(f"evaluation view (resize 256, centre 224) from the bounded image ({side})", evs,
                 [ev_ref[k] for k in changed])


if __name__ == "__main__":
    main()
