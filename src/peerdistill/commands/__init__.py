"""Sub-commands beyond ``train | list | bench | table``, one module each (``eval``, ...).

A module here defines ``add_parser(sub)``: it adds its sub-parser to ``sub`` (the ``argparse`` sub-parsers
of ``peerdistill``) and sets ``fn`` to the handler, which raises :class:`~peerdistill.errors.PeerdistillError`
for bad input. ``peerdistill.cli`` discovers every module, so a new command touches no other file.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil


def add_all(sub: argparse._SubParsersAction) -> None:
    """Add every command module's sub-parser, in name order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").add_parser(sub)
