"""Every config key the user documentation names exists, and every ``key=value`` example in it is accepted.

README.md and docs/*.md show commands and inline snippets (``method.temperature=2``, ``peerdistill train
-c configs/... method=dml seed=1``). A key the config or the registries do not know is a user's first
error, so each example is validated here against the config and the registries, without building
anything: ``method.X=V`` against the method named in the same example (``method=NAME``, or the preset of
``-c``) or, without one, against some method that has ``X``; bare mentions of ``method.X`` (and
``mixer.``, ``addon.``, ``model.``, ``data.``, ``optim.``) must name an existing parameter or field.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from peerdistill import config as C
from peerdistill.data import DATASETS
from peerdistill.data.mix import MIXERS
from peerdistill.errors import PeerdistillError
from peerdistill.methods import ADDONS, METHODS
from peerdistill.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/reference holds the specs
REGISTRIES = {"method": METHODS, "mixer": MIXERS, "addon": ADDONS, "model": MODELS}
SOURCE_ARGS = {"data": DATASETS}  # data.<key> that is not a general data key is a parameter of the source
SECTIONS = {"data": C.DataConfig, "optim": C.OptimConfig}
EVERY = {"model": {"pretrained"}}  # accepted by every entry (models.base.check_model_args: a weights file)
# key=value: the value runs to whitespace or a quote / comma / bracket closing a Python list, unless it is a
# bracketed YAML list or mapping (``data.holdout_classes=[8, 9]``, ``method.extra_aug_args={criterion: kld}``)
OVERRIDE = re.compile(r"(?<![\w.$-])([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)?)=(\[[^\]]*\]|\{[^}]*\}|[^\s\"',)\]]*)")
MENTION = re.compile(r"(?<![\w./-])(method|mixer|addon|model|data|optim)\.([a-z][a-z0-9_]*)\b(?![\w(.=])")
TOP = {f.name for f in dataclasses.fields(C.Config)}


def examples(path: Path) -> list[str]:
    """Inline code spans and the lines of fenced code blocks of a Markdown file."""
    text, out = path.read_text(), []
    for i, block in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if i % 2:  # inside a fence
            out += [ln for ln in block.splitlines() if ln.strip()]
        else:  # a pipe inside a table cell is written \|
            out += [span.replace("\\|", "|") for span in re.findall(r"`([^`\n]+)`", block)]
    return out


def tokens(example: str) -> list[str]:
    try:
        return shlex.split(example, comments=True)
    except ValueError:  # an unbalanced quote in prose
        return example.split()


def placeholder(value: str) -> bool:
    """``<dir>``, ``$T``, ``DIR``, ``k``, ``...`` or nothing: the example names the key, not a value."""
    return (not value or any(c in value for c in "<>$") or "..." in value or value.isupper()
            or (len(value) == 1 and value.isalpha()))


def parse(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        return value


def preset_method(toks: list[str]) -> str | None:
    """The method of the preset an example loads with ``-c``, if any."""
    for flag, path in zip(toks, toks[1:]):
        if flag in ("-c", "--config") and (ROOT / path).is_file():
            method = (yaml.safe_load((ROOT / path).read_text()) or {}).get("method")
            return method.get("name") if isinstance(method, dict) else method
    return None


def check_component_arg(kind: str, name: str | None, arg: str, value: Any) -> str | None:
    """None if ``kind.arg=value`` is valid for ``name`` (or, unnamed, for some entry that has ``arg``)."""
    reg = REGISTRIES.get(kind) or SOURCE_ARGS[kind]
    if arg in EVERY.get(kind, ()):
        return None if value is None or isinstance(value, str) else f"{kind}.{arg} takes a path"
    names = [name] if name in reg else [n for n in reg if arg in reg.params(n)]
    if not names:
        return f"no {kind} has a parameter {arg!r}"
    errors = []
    for n in names:
        try:
            reg.check(n, {arg: value})
            return None
        except PeerdistillError as e:
            errors.append(str(e))
    return errors[0]


def check_token(key: str, value: str, context: dict[str, str | None]) -> str | None:
    """None if the override ``key=value`` is valid; else why not."""
    head, _, arg = key.partition(".")
    alternatives = [v for v in value.split("|")] if "|" in value and not value.startswith(("[", "{")) else [value]
    for v in alternatives:
        if head in REGISTRIES and not arg:
            names = v.split(",") if head == "model" else [v]
            bad = [n for n in names if not placeholder(n) and n not in ("none", "") and n not in REGISTRIES[head]]
            if bad:
                return f"unknown {head} {bad[0]!r}"
        elif head in REGISTRIES or (head in SOURCE_ARGS and not hasattr(SECTIONS[head](), arg)):
            error = check_component_arg(head, context.get(head), arg, None if placeholder(v) else parse(v))
            if error and not (placeholder(v) and "no " not in error):
                return error
        else:
            try:
                C.set_key(C.Config(), key, parse(v) if not placeholder(v) else getattr_path(key))
            except PeerdistillError as e:
                return str(e)
    return None


def getattr_path(key: str) -> Any:
    """The default of a config key (what a placeholder value is checked as: the key must exist)."""
    obj: Any = C.Config()
    for part in key.split("."):
        obj = getattr(obj, part) if hasattr(obj, part) else None
    return obj


def check_mention(kind: str, name: str) -> str | None:
    if kind in SECTIONS and name in {f.name for f in dataclasses.fields(SECTIONS[kind])}:
        return None
    if kind in SOURCE_ARGS:
        return None if any(name in DATASETS.params(n) for n in DATASETS) else f"no field or source parameter {kind}.{name}"
    if kind in SECTIONS:
        return f"no field {kind}.{name}"
    reg = REGISTRIES[kind]
    if name == "name" or name in EVERY.get(kind, ()) or any(name in reg.params(n) for n in reg):
        return None
    return f"no {kind} has a parameter {name!r}"


def parameter_lists(path: Path) -> list[tuple[str, str]]:
    """(method, parameter) for every ```name` = default`` of a "**Parameters**" paragraph, under the nearest
    heading that names one method."""
    out, method, para = [], None, None
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("#"):
            names = [n for n in re.findall(r"`([a-z_]+)`", line) if n in METHODS]
            method = names[0] if len(names) == 1 else None
        if line.startswith("**Parameters"):
            para = line
        elif para is not None and line.strip():
            para += " " + line
        elif para is not None:
            out += [(method, n) for n in re.findall(r"`([a-z_]+)` = ", para) if method]
            para = None
    return out


def problems(path: Path) -> list[tuple[str, str]]:
    """(the offending key or ``key=value``, why) for every invalid example of a Markdown file."""
    found = [(f"{m}: {n}", "listed under Parameters, but the method has no such parameter")
             for m, n in parameter_lists(path) if n not in METHODS.params(m)]
    for ex in examples(path):
        pairs = [(k, v) for k, v in OVERRIDE.findall(ex) if k.partition(".")[0] in TOP]
        context = {k: v for k, v in pairs if k in REGISTRIES}
        context.update({k: v for k, v in pairs if k.partition(".")[0] in SOURCE_ARGS and k.endswith(".name")})
        context = {k.removesuffix(".name"): v for k, v in context.items()}
        context.setdefault("method", preset_method(tokens(ex)))
        for key, value in pairs:
            error = check_token(key, value, context)
            if error:
                found.append((f"{key}={value}", f"in `{ex.strip()[:90]}`: {error}"))
        for kind, name in MENTION.findall(ex):
            error = check_mention(kind, name)
            if error:
                found.append((f"{kind}.{name}", f"in `{ex.strip()[:90]}`: {error}"))
    return found


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_documented_key_and_example_is_valid(path: Path) -> None:
    bad = problems(path)
    assert not bad, "\n".join(f"{path.name}: `{what}` {why}" for what, why in bad)


def test_the_checker_catches_what_it_is_for(tmp_path: Path) -> None:
    doc = tmp_path / "bad.md"
    doc.write_text("### `pcl`\nThe cohort size is `method.branches`.\n"
                   "Try `peerdistill train method=pcl method.tempreature=2`,\n"
                   "```\npeerdistill train method=dml mixer=cutmx data.size=abc optim.lr=0.1\n```\n"
                   "and `method=dml method.temperature=2 seed=1` (fine).\n\n"
                   "**Parameters:** `branches` = 3, `temperature` = 3.\n")
    found = {what for what, _ in problems(doc)}
    assert found == {"method.branches", "method.tempreature=2", "mixer=cutmx", "data.size=abc", "pcl: branches"}
