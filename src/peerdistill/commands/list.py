"""``peerdistill list``: the registries (methods, add-ons, models, datasets, mixers, augmentations) with
their parameters, and the config keys. Names are the canonical keys; an older spelling still accepted is noted."""
from __future__ import annotations

import argparse
import inspect

from ..errors import PeerdistillError


def _fmt_params(params: dict[str, object]) -> str:
    items = [f"{k}={'<required>' if v is inspect.Parameter.empty else v!r}" for k, v in params.items()]
    return ", ".join(items) or "-"


def run(args: argparse.Namespace) -> None:
    from ..config_keys import config_markdown, config_text
    from ..data import DATASETS
    from ..data.augmentations import AUGMENTATIONS
    from ..data.mix import MIXERS
    from ..methods import ADDONS, METHODS
    from ..models import MODELS

    if args.what == "config":
        print(config_markdown() if args.markdown else config_text(), end="" if args.markdown else "\n")
        return
    if args.markdown:
        raise PeerdistillError("--markdown is for `peerdistill list config`")
    sections = {"methods": ("methods", METHODS, ()), "add-ons": ("add-ons", ADDONS, ()),
                "models": ("models", MODELS, ("num_classes", "in_channels")),
                "datasets": ("datasets (data.name; their parameters are data.<parameter>)", DATASETS, ("root",)),
                "mixers": ("mixers", MIXERS, ()),
                "augmentations": ("augmentations (kd method.extra_aug, tstddev)", AUGMENTATIONS, ())}
    for key, (title, reg, skip) in sections.items():
        if args.what not in (None, key):
            continue
        print(f"{title}:")
        for name in reg:
            params = {k: v for k, v in reg.params(name).items() if k not in skip}
            doc = " ".join((inspect.getdoc(reg.get(name)) or "").split("\n\n")[0].split())
            aliases = reg.aliases(name)
            also = f" (also accepted: {', '.join(aliases)})" if aliases else ""
            print(f"  {name:<16} {doc}{also}")
            if params:
                print(f"  {'':<16}   {_fmt_params(params)}")
        print()
    if args.what is None:
        print("the general config keys (optim.*, data.*, epochs, ...): peerdistill list config")


def add_parser(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("list", help="methods, models, datasets, mixers with their parameters; the config keys")
    ls.add_argument("what", nargs="?", choices=("methods", "add-ons", "models", "datasets", "mixers", "augmentations",
                                                "config"), help="one section (default: every registry)")
    ls.add_argument("--markdown", action="store_true", help="config keys as the Markdown of docs/config.md")
    ls.set_defaults(fn=run)
