"""``peerdistill pack SRC DST --shard-size N [--max-side S --quality Q]``: a class-per-folder image tree
into webdataset shards, optionally with every image's shorter side bounded (re-encoded)."""
from __future__ import annotations

import argparse
import os
import sys
import typing

from ..params import Option, PositiveInt


def _opt(name: str) -> Option:
    """The argparse type of a :class:`~peerdistill.data.stream.pack.PackOptions` field: its annotation."""
    from ..data.stream.pack import PackOptions

    return Option(typing.get_type_hints(PackOptions, include_extras=True)[name])


def run(args: argparse.Namespace) -> None:
    from ..data.stream.pack import PackOptions, pack

    opts = PackOptions(shard_size=args.shard_size, max_side=args.max_side, quality=args.quality, seed=args.seed)
    opts.check()

    def progress(split: str, done: int, total: int) -> None:
        if not args.quiet and sys.stderr.isatty():
            print(f"\r{split or 'shards'}: {done}/{total} shards", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

    result = pack(args.src, args.dst, opts, workers=args.workers, progress=progress)
    for split, meta in result.items():
        for note in meta.pop("notes", []):
            print(f"note: {note}", file=sys.stderr)
        where = os.path.join(args.dst, split) if split else args.dst
        print(f"{where}: {meta['samples']} images of {len(meta['classes'])} classes in {len(meta['shards'])} "
              f"shards" + (f", shorter side at most {opts.max_side} px" if opts.max_side else ""))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack a class-per-folder image tree into webdataset shards",
                       description="Pack SRC (train/<class>/ and val/<class>/ folders, or one split's class "
                                   "folders) into tar shards of <key>.jpg + <key>.cls in DST. Every image is "
                                   "decoded once (a corrupt file is reported by name). Interrupted? Run the "
                                   "same command again: finished shards are kept.")
    p.add_argument("src", help="the image folder")
    p.add_argument("dst", help="where the shards go (created; train/ and val/ below it for a dataset folder)")
    p.add_argument("--shard-size", type=_opt("shard_size"), required=True, metavar="N", help="images per shard")
    p.add_argument("--max-side", type=_opt("max_side"), default=None, metavar="S",
                   help="re-encode every image whose shorter side exceeds S pixels to a shorter side of S "
                        "(default: store every image as it is)")
    p.add_argument("--quality", type=_opt("quality"), default=90, metavar="Q",
                   help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--seed", type=_opt("seed"), default=0, help="seed of the order of the images across shards")
    p.add_argument("--workers", type=Option(PositiveInt), default=os.cpu_count() or 1,
                   help="processes writing shards (default: one per CPU core)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(fn=run)
