"""Plugins: modules of the user's that register models, methods, mixers, add-ons or dataset sources.

Two ways to name them, both seen by every command (``train``, ``eval``, ``--resume``, ``sweep``, ``list``):

* the config key ``plugins: [mypkg.models, path/to/models.py]``: imported when the config is read; a run
  stores the list in its ``config.yaml`` (file paths made absolute), so every later command on the run
  imports them again;
* the entry-point group ``peerdistill.plugins`` of installed packages (``[project.entry-points.
  "peerdistill.plugins"] mypkg = "mypkg.models"`` in their pyproject.toml), and the environment variable
  ``PEERDISTILL_PLUGINS`` (comma-separated modules or files, e.g. for ``peerdistill list``): imported once per
  process.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .errors import PeerdistillError

GROUP = "peerdistill.plugins"
ENV = "PEERDISTILL_PLUGINS"
_entry_points_loaded = False


def normalize(spec: str) -> str:
    """A plugin as a config stores it: a module name as given, a ``.py`` file as an absolute path."""
    if not isinstance(spec, str) or not spec.strip():
        raise PeerdistillError(f"a plugin is a module name or a .py file, got {spec!r}")
    spec = spec.strip()
    return str(Path(spec).expanduser().resolve()) if spec.endswith(".py") else spec


def load(specs: list[str] = ()) -> None:
    """Import the installed packages' entry points (once) and every plugin named in ``specs``."""
    load_entry_points()
    for spec in specs:
        _import(normalize(spec))


def load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for spec in os.environ.get(ENV, "").split(","):
        if spec.strip():
            _import(normalize(spec))
    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken installed plugin: say which
            raise PeerdistillError(f"plugin {ep.name!r} ({ep.value}, entry point {GROUP}) cannot be loaded: "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _import(spec: str) -> None:
    try:
        if not spec.endswith(".py"):
            importlib.import_module(spec)
            return
        path = Path(spec)
        if not path.is_file():
            raise PeerdistillError(f"plugin file {spec} does not exist")
        name = f"peerdistill_plugin_{path.stem}_{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
        if name in sys.modules or any(getattr(m, "__file__", None) == spec for m in list(sys.modules.values())):
            return  # imported already (perhaps by the user's script, under its own module name)
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    except PeerdistillError:
        raise
    except Exception as e:
        raise PeerdistillError(f"plugin {spec!r} cannot be imported: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
