"""The sub-commands of ``peerdistill``, one module each (``train``, ``list``, ``eval``, ...).

A module here defines ``add_parser(sub)``: it adds its sub-parser to ``sub`` (the ``argparse`` sub-parsers
of ``peerdistill``) and sets ``fn`` to the handler, which raises :class:`~peerdistill.errors.PeerdistillError`
for bad input. ``peerdistill.cli`` discovers every module, so a new command touches no other file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil


FIRST = ("train", "list", "bench", "table")  # the everyday commands lead ``peerdistill --help``


def add_all(sub: argparse._SubParsersAction) -> None:
    """Add every command module's sub-parser: :data:`FIRST`, then the others in name order."""
    names = sorted((m.name for m in pkgutil.iter_modules(__path__)), key=lambda n: (n not in FIRST,
                                                                                  FIRST.index(n) if n in FIRST else 0, n))
    for name in names:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
