"""What runs leave and how they are read back: the result table, plots, CSV, per-step log, TB and W&B."""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import StepPatch

from peerdistill.cli import main
from peerdistill.config import Config
from peerdistill import run as run_mod
from peerdistill import notices
from peerdistill.errors import PeerdistillError
from peerdistill.report.logger import RunLogger
from peerdistill.report.plots import plot_history, plot_reliability
from peerdistill.report.table import load_runs, markdown_table

from .conftest import tiny_cfg


# ------------------------------------------------------------------------------------------ fake runs
def _test_metrics(top1: tuple[float, ...] = (80.0, 82.0)) -> dict:
    heads = {f"peer{i}": {"top1": t, "top5": 99.0, "nll": 0.5, "ece": 3.0} for i, t in enumerate(top1)}
    heads["ensemble"] = {"top1": max(top1) + 1, "top5": 99.5, "nll": 0.4, "ece": 2.0}
    heads["peers_mean"] = {"top1": sum(top1) / len(top1)}
    return heads


def _summary(top1: tuple[float, ...] = (80.0, 82.0)) -> dict:
    test = _test_metrics(top1)
    best = {h: {"epoch": 2, "val_top1": m["top1"], "test": m} for h, m in test.items()}
    return {"epochs": 2, "final": {"val": test, "test": test}, "best": best}


def _record(epoch: int, evaluated: bool = True, seconds: float = 2.0) -> dict:
    rec = {"epoch": epoch, "step": 10 * epoch, "loss": {"ce0": 1.0 / epoch, "kl0": 0.1 / epoch, "loss": 1.1 / epoch},
           "seconds": seconds, "images_per_s": 100.0, "lr": 0.1}
    if evaluated:
        rec |= {"eval_seconds": 0.5, "val": _test_metrics(), "test": _test_metrics()}
    return rec


def _fake_run(d: Path, cfg: dict | None = None, summary: dict | None = None, history: list[dict] | None = None,
              **changes: object) -> Path:
    """A run directory as `train` leaves it; ``changes`` are top-level config keys (``seed=1``)."""
    d.mkdir(parents=True)
    cfg = cfg if cfg is not None else Config().to_dict()
    cfg.setdefault("peers", None)
    cfg["peers"] = cfg["peers"] or 2  # a real run's config names its (resolved) cohort size
    cfg.update(changes)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (d / "summary.json").write_text(json.dumps(summary if summary is not None else _summary()))
    history = history if history is not None else [_record(1), _record(2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return d


def _rows(table: str) -> list[str]:
    return [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| run ")]


def _notes(table: str) -> list[str]:
    return [ln for ln in table.splitlines() if ln and not ln.startswith("|")]


# -------------------------------------------------------------------------------------------- table
def test_table_pools_a_run_whatever_defaults_its_config_spells_out(tmp_path):
    plain = _fake_run(tmp_path / "plain", seed=0)  # `peerdistill train`: method {name: dml}
    preset = _fake_run(tmp_path / "preset", seed=1, threads=1, log_every=5, device="cpu",
                       method={"name": "dml", "temperature": 1, "weight": 1.0})  # a preset spells them out
    old_cfg = Config().to_dict()
    for key in ("addon", "eval_every", "wandb", "progress_every"):  # keys an older version did not write
        old_cfg.pop(key, None)
    old_cfg["optim"].pop("name", None)
    old_cfg["data"]["name"] = "fashion-mnist"  # the dataset's older spelling (an alias): the same experiment
    old = _fake_run(tmp_path / "old", old_cfg, seed=2, method="dml")
    hot = _fake_run(tmp_path / "hot", seed=0, method={"name": "dml", "temperature": 2.0})
    gone = _fake_run(tmp_path / "gone", seed=0, method={"name": "retired_method", "foo": 1})
    cut = _fake_run(tmp_path / "cut", seed=0, mixer="cutmix")
    cut_preset = _fake_run(tmp_path / "cut_preset", seed=1, mixer={"name": "cutmix", "alpha": 1, "prob": 0.5})

    rows = _rows(markdown_table(load_runs([plain, preset, old, hot, gone, cut, cut_preset])))

    assert len(rows) == 4, rows
    assert rows[0].startswith("| dml · resnet14 x2 · fashion_mnist · 5 ep | 3 |")  # seeds counted
    assert "temperature" not in rows[0] and "weight" not in rows[0]  # default-valued args are not printed
    assert rows[1].startswith("| dml(temperature=2.0) · ")
    assert rows[2].startswith("| retired_method(foo=1) · ")  # an unknown name is grouped as written
    assert rows[3].startswith("| dml + cutmix · resnet14 x2 · fashion_mnist · 5 ep | 2 |")


def test_table_labels_show_the_keys_that_differ_between_rows(tmp_path):
    a = _fake_run(tmp_path / "a", optim={**Config().to_dict()["optim"], "lr": 0.05})
    b = _fake_run(tmp_path / "b", batch_size=128)

    rows = _rows(markdown_table(load_runs([a, b])))

    assert len(rows) == 2
    assert " · optim.lr=0.05 |" in rows[0] and " · optim.lr=0.1 |" in rows[1]
    assert "batch_size" not in rows[0]  # the same in every row: not repeated


def test_table_flags_runs_pooled_with_the_same_seed(tmp_path):
    dirs = [_fake_run(tmp_path / "a", seed=1), _fake_run(tmp_path / "b", seed=1), _fake_run(tmp_path / "c", seed=2)]

    table = markdown_table(load_runs(dirs))

    assert "| 3 ⚠ |" in _rows(table)[0]
    (warning,) = [n for n in _notes(table) if "seed 1" in n]
    assert str(dirs[0]) in warning and str(dirs[1]) in warning and str(dirs[2]) not in warning


def test_table_eval_every_splits_rows_for_best_only(tmp_path):
    dirs = [_fake_run(tmp_path / "e1", seed=0, eval_every=1), _fake_run(tmp_path / "e2", seed=1, eval_every=2)]

    assert len(_rows(markdown_table(load_runs(dirs), "final"))) == 1  # same training, same last epoch
    assert len(_rows(markdown_table(load_runs(dirs), "best"))) == 2  # other epochs eligible as best


def test_table_skips_unfinished_and_broken_runs_with_a_note(tmp_path, capsys):
    good = _fake_run(tmp_path / "good")
    unfinished = _fake_run(tmp_path / "unfinished")
    (unfinished / "summary.json").unlink()
    empty = _fake_run(tmp_path / "empty", summary={"final": {"val": {}, "test": {}}})
    bad_json = _fake_run(tmp_path / "bad_json")
    (bad_json / "summary.json").write_text('{"final": {"test": ')
    bad_yaml = _fake_run(tmp_path / "bad_yaml")
    (bad_yaml / "config.yaml").write_text("method: [dml\n")
    (tmp_path / "bare").mkdir()
    broken = [unfinished, empty, bad_json, bad_yaml, tmp_path / "bare"]

    table = markdown_table(load_runs([good, *broken]))

    assert len(_rows(table)) == 1
    skipped = [n for n in _notes(table) if n.startswith("skipped ")]
    assert len(skipped) == len(broken)
    for d, note in zip(broken, skipped):
        assert note.startswith(f"skipped {d}: ")
    with pytest.raises(PeerdistillError, match="no usable run") as err:
        load_runs(broken)
    assert "\n" not in str(err.value)
    assert main(["table", str(good), str(empty)]) == 0  # the command as wired today
    assert f"skipped {empty}" in capsys.readouterr().out


def test_table_reads_runs_with_unevaluated_epochs_and_without_metrics(tmp_path):
    sparse = _fake_run(tmp_path / "sparse", seed=0,
                       history=[_record(1, evaluated=False, seconds=1.0), _record(2, seconds=3.0)])
    no_log = _fake_run(tmp_path / "no_log", seed=0, method="independent")
    (no_log / "metrics.jsonl").unlink()

    rows = _rows(markdown_table(load_runs([sparse, no_log])))

    assert rows[0].endswith("| 2.0 |")  # mean training seconds of both epochs
    assert rows[1].endswith("| – |")


# -------------------------------------------------------------------------------------------- plots
@pytest.fixture
def saved(monkeypatch) -> dict[str, Figure]:
    """The figures the plots save, by file name (to inspect what was drawn)."""
    figures: dict[str, Figure] = {}
    real = Figure.savefig

    def spy(self: Figure, fname: object, *args: object, **kwargs: object) -> None:
        figures[Path(str(fname)).name] = self
        real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def _legends(fig: Figure) -> list[Legend]:
    return [c for ax in fig.axes for c in ax.get_children() if isinstance(c, Legend)]


def _visible_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_accuracy_legend_tells_heads_from_splits_and_one_epoch_has_whole_ticks(tmp_path, saved):
    plot_history([_record(1)], tmp_path)

    fig = saved["accuracy.png"]
    labels = {t.get_text(): leg for leg in _legends(fig) for t in leg.get_texts()}
    assert {"peer0", "peer1", "ensemble", "test", "val"} <= set(labels)
    styles = {t.get_text(): h.get_linestyle() for leg in _legends(fig)
              for t, h in zip(leg.get_texts(), leg.legend_handles)}
    assert styles["test"] == "-" and styles["val"] == "--"
    assert _visible_ticks(fig.axes[0]) == [1.0]


def test_plots_cope_with_unevaluated_epochs_nan_and_missing_values(tmp_path, saved):
    history = [_record(1), _record(2, evaluated=False), _record(3)]
    history[2]["val"]["peer1"]["top1"] = math.nan
    del history[2]["test"]["ensemble"]
    history[1]["loss"]["kl0"] = math.nan

    paths = plot_history(history, tmp_path)

    assert [p.name for p in paths] == ["accuracy.png", "losses.png"] and all(p.is_file() for p in paths)
    lines = {ln.get_color(): ln for ln in saved["accuracy.png"].axes[0].get_lines() if ln.get_linestyle() == "-"}
    assert [list(ln.get_xdata()) for ln in lines.values()][0] == [1, 3]  # evaluated epochs only
    assert all(t == int(t) for t in _visible_ticks(saved["losses.png"].axes[0]))


def test_losses_plot_draws_step_records_with_their_sum(tmp_path, saved):
    steps = [{"step": 5 * i, "epoch": i / 4, "loss": {"ce0": 2.0 / i, "kl0": 0.5 / i}, "lr": 0.1} for i in range(1, 9)]

    plot_history([_record(1), _record(2)], tmp_path, steps)
    lines = {ln.get_label(): ln for ln in saved["losses.png"].axes[0].get_lines()}
    assert list(lines["loss (sum)"].get_xdata()) == [s["epoch"] for s in steps]
    assert list(lines["loss (sum)"].get_ydata()) == pytest.approx([2.5 / i for i in range(1, 9)])

    plot_history([_record(1), _record(2)], tmp_path)  # no step records: the epoch means
    lines = {ln.get_label(): ln for ln in saved["losses.png"].axes[0].get_lines()}
    assert list(lines["loss (sum)"].get_xdata()) == [1, 2]


def test_reliability_diagram_shows_bin_counts(tmp_path, saved):
    bins = {"peer0": {"confidence": [0.1, 0.5, math.nan, 0.9], "accuracy": [0.0, 0.4, 0.0, 0.95],
                      "count": [3.0, 10.0, 0.0, 87.0]}}

    plot_reliability(bins, tmp_path)

    (patch,) = [p for ax in saved["reliability.png"].axes for p in ax.patches if isinstance(p, StepPatch)]
    assert list(patch.get_data().values) == [3.0, 10.0, 0.0, 87.0]
    assert list(patch.get_data().edges) == [0.0, 0.25, 0.5, 0.75, 1.0]


# ------------------------------------------------------------------------------ logger: CSV and steps
def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_has_every_column_and_blanks_where_an_epoch_has_none(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    third = _record(3)
    third["test"]["ema0"] = {"top1": 90.0}
    for rec in (_record(1), _record(2, evaluated=False), third):
        log.epoch(rec)

    rows = _csv(tmp_path / "metrics.csv")

    assert list(rows[0])[:8] == ["epoch", "step", "loss/ce0", "loss/kl0", "loss/loss", "seconds", "images_per_s", "lr"]
    assert "test/peer0/top1" in rows[0] and "test/ema0/top1" in rows[0] and "val/ensemble/ece" in rows[0]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["test/peer0/top1"] == "" and rows[0]["test/ema0/top1"] == "" and rows[2]["test/ema0/top1"] == "90.0"
    log.truncate_after(2)
    assert [r["epoch"] for r in _csv(tmp_path / "metrics.csv")] == ["1", "2"]


def test_step_records_are_kept_and_truncated_on_resume(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    for i in range(1, 7):
        log.step({"step": 5 * i, "epoch": i / 2, "loss": {"ce0": 1.0}, "lr": 0.1})
        if i % 2 == 0:
            log.epoch(_record(i // 2))
    with (tmp_path / "steps.jsonl").open("a") as f:
        f.write('{"step": 35, "epo')  # the torn tail of a process killed mid-write

    assert [r["epoch"] for r in log.step_history()] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    log.truncate_after(2)  # resumed from the checkpoint of epoch 2
    assert [r["epoch"] for r in RunLogger(tmp_path, tensorboard=False).step_history()] == [0.5, 1.0, 1.5, 2.0]
    assert [r["epoch"] for r in log.history()] == [1, 2]


def test_a_real_run_writes_metrics_csv_beside_the_jsonl(tmp_path):
    out = tmp_path / "run"
    run_mod.train(tiny_cfg("epochs=1"), out, echo=False)

    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = _csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history]
    assert float(rows[-1]["test/peer0/top1"]) == history[-1]["test"]["peer0"]["top1"]
    assert float(rows[-1]["loss/kl1"]) == history[-1]["loss"]["kl1"]


# ------------------------------------------------------------------------------------- TensorBoard, W&B
def test_missing_tensorboard_is_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    monkeypatch.setattr(notices, "_NOTED", set())

    RunLogger(tmp_path / "a", tensorboard=True)
    RunLogger(tmp_path / "b", tensorboard=True)
    RunLogger(tmp_path / "c", tensorboard=False)

    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1
    assert "pip install 'peerdistill[tensorboard]'" in err


def test_wandb_offline_logs_epochs_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    out = tmp_path / "run"
    for epoch in (1, 2):  # the second logger is the resumed run
        log = RunLogger(out, tensorboard=False, wandb=True, config={"seed": 0})
        log.epoch(_record(epoch))
        log.close()
        wandb.teardown()  # finish() may return before W&B's service has written the offline file out
        if epoch == 1:
            run_id = (out / "wandb_id").read_text().strip()

    assert (out / "wandb_id").read_text().strip() == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    # a resume within the same second as the first run gets W&B's "-1" suffix on its directory
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)
    for r in runs:
        data = (r / f"run-{run_id}.wandb").read_bytes()
        assert b"test/peer0/top1" in data and b"loss/ce0" in data


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(PeerdistillError, match=r"pip install 'peerdistill\[wandb\]'"):
        RunLogger(tmp_path, tensorboard=False, wandb=True)
