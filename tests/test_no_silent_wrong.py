"""What a new user found in every command: one test per defect (each fails on the code before the fix).

Wrong results with exit 0, tracebacks and half-made runs, messages that mislead, and output that reads
wrong. The fuzz test over every command's options is in test_hardening.py.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch import nn

from peerdistill import config as C
from peerdistill.cli import main, parse
from peerdistill.data import DATASETS
from peerdistill import run as run_mod
from peerdistill.engine.build import load_splits, validate_config
from peerdistill.errors import PeerdistillError
from peerdistill.methods import METHODS
from peerdistill.models import MODELS

from .conftest import TINY, have_fmnist, one_line_error, tiny_cfg, tree_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nsw") / "run"
    run_mod.train(tiny_cfg("epochs=1"), out, echo=False)
    return out


def _image_folder(root: Path, classes: int = 2, per_class: int = 4, side: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


# ------------------------------------------------------------------ 1. every source parameter reaches it
def test_imagefolder_gets_its_image_size_and_grayscale(tmp_path):
    from peerdistill.engine.trainer import Trainer

    root = _image_folder(tmp_path / "imgs")
    cfg = C.load(None, ["data.name=imagefolder", f"data.root={root}", "data.image_size=16", "data.grayscale=true",
                        "model=resnet8", "batch_size=4", "data.val_split=0", "tensorboard=false"])
    tr = Trainer(cfg, None)
    assert tuple(tr.data.train.images.shape[1:]) == (1, 16, 16)  # what was asked, not the 32 px RGB default
    assert cfg.to_dict()["data"]["image_size"] == 16 and cfg.to_dict()["data"]["grayscale"] is True
    assert (root / ".peerdistill-imagefolder-16-gray.npz").is_file()


def test_a_parameter_of_another_source_is_refused(capsys, tmp_path):
    out = tmp_path / "r"
    err = one_line_error(capsys, "train", "--out", str(out), "data.name=fashion-mnist", "data.image_size=64",
                         f"data.root={tmp_path / 'nowhere'}")  # refused before the data is looked for
    assert "dataset 'fashion_mnist' has images of a fixed size; data.image_size applies to" in err
    assert not out.exists()
    err = one_line_error(capsys, "train", "--out", str(out), "data.name=imagefolder", "data.root=x",
                         "data.image_size=abc")
    assert "config key 'data.image_size' must be int >= 8 or none, got 'abc'" in err


@pytest.fixture
def probe_source():
    """A source registered from Python with a parameter of its own, removed afterwards."""
    from peerdistill.data.synthetic import synthetic

    seen = {}

    def probe(root: str | None = None, flavour: str = "plain", size: int = 64):
        seen.update(flavour=flavour, size=size)
        return synthetic(size=size, num_classes=4, image_size=16, test_size=32)

    DATASETS.register("probe")(probe)
    yield seen
    DATASETS._items.pop("probe")


def test_every_parameter_a_source_declares_reaches_it(probe_source):
    load_splits(C.load(None, ["data.name=probe", "data.flavour=salty", "data.size=48"]))
    assert probe_source == {"flavour": "salty", "size": 48}
    cfg = C.load(None, ["data.name=probe"])
    validate_config(cfg)
    assert cfg.to_dict()["data"]["flavour"] == "plain"  # the source's defaults are recorded


def test_a_source_parameter_named_like_a_general_key_is_refused():
    def shadow(root: str | None = None, val_split: float = 0.5):
        raise AssertionError("never built")

    DATASETS.register("shadow_test")(shadow)
    try:
        with pytest.raises(PeerdistillError, match="parameter 'val_split' named like the general key data.val_split"):
            validate_config(C.load(None, ["data.name=shadow_test"]))
    finally:
        DATASETS._items.pop("shadow_test")


# ------------------------------------------------------------------ 2. the named checkpoint or an error
def test_eval_of_a_checkpoint_that_does_not_exist_is_an_error(run_dir, capsys, tmp_path):
    err = one_line_error(capsys, "eval", str(run_dir), "--checkpoint", "middle.pt")
    assert "no checkpoint middle.pt" in err and "best.pt, last.pt" in err
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "best.pt").unlink()
    assert "no checkpoint best.pt" in one_line_error(capsys, "eval", str(copy), "--checkpoint", "best.pt")
    assert main(["eval", str(run_dir), "--checkpoint", "best.pt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"].endswith("best.pt")


# ------------------------------------------------------------------ 3. eps in (0, 1], 8/255 as written
def test_eps_outside_its_range_is_refused_and_overwrites_nothing(run_dir, capsys):
    fast = ["--attacks", "fgsm", "--limit", "8", "--threads", "1", "--no-plots"]
    assert main(["eval", str(run_dir), "--adversarial", "--eps", "8/255", *fast, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adversarial"]["results"]["fgsm"]["peer0"].keys() == {"8/255"}
    before = tree_digest(run_dir)
    for eps in ("2", "8", "0", "1/255,2"):
        err = one_line_error(capsys, "eval", str(run_dir), "--adversarial", "--eps", eps, *fast)
        assert "argument --eps: must be a list of float > 0 and <= 1" in err and "8/255" in err
    assert tree_digest(run_dir) == before


# ------------------------------------------------------------------ 4. exact p for few points
def test_spearman_p_of_three_points_is_exact():
    from peerdistill.report.correlation import correlations, format_study

    stats = correlations([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert stats["spearman"]["r"] == pytest.approx(-1.0)
    assert stats["spearman"]["p"] == pytest.approx(1 / 3)  # 2 of the 3! orderings are as extreme
    assert stats["kendall"]["p"] == pytest.approx(1 / 3)
    study = {"metric": "nll", "points": [], **stats}
    assert "spearman  -1.0000  (p = 33.33 %, exact)" in format_study(study)


# ------------------------------------------------------------------ 5. no validation: no val_top1
def test_without_a_validation_split_no_epoch_is_stored_as_val_top1(tmp_path):
    summary = run_mod.train(tiny_cfg("epochs=2", "data.val_split=0"), tmp_path / "r", echo=False)
    for head, best in summary["best"].items():
        assert best["val_top1"] is None and best["epoch"] == 2, head
    assert summary["selection"] == "last epoch (no validation split)"


# ------------------------------------------------------------------ 6. train_subset is exactly N
def test_train_subset_is_exactly_the_pool_before_the_validation_split(capsys, tmp_path):
    from peerdistill.data.loader import split_to_device

    cfg = tiny_cfg("data.train_subset=25")  # 96 images, 4 classes of 24
    splits = load_splits(cfg)
    assert len(splits.train) == 25 and sorted(np.bincount(splits.train.labels)) == [6, 6, 6, 7]
    data = split_to_device(splits, cfg.data.val_split, cfg.seed, "cpu")
    assert (len(data.train), len(data.val)) == (22, 3)  # round(0.1 x 25) = 3 held out
    assert len(load_splits(tiny_cfg("data.train_subset=5")).train) == 5
    err = one_line_error(capsys, "train", "--out", str(tmp_path / "a"), *TINY, "data.train_subset=3")
    assert "data.train_subset=3 gives class 'class" in err and "no image" in err
    err = one_line_error(capsys, "train", "--out", str(tmp_path / "b"), *TINY, "data.train_subset=97")
    assert "more images than the 96 of the training set" in err
    err = one_line_error(capsys, "train", "--out", str(tmp_path / "c"), *TINY, "data.train_subset=4",
                         "data.val_split=0.5")
    assert "without a training image" in err
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.skipif(not have_fmnist(), reason="Fashion-MNIST not installed")
def test_train_subset_of_fashion_mnist_is_exact():
    assert len(load_splits(C.load(None, ["data.train_subset=1234"])).train) == 1234


# ------------------------------------------------------------------ 7. bench --steps 0
@pytest.mark.parametrize("option", ["--steps=0", "--warmup=-1", "--epoch-size=0", "--steps=two"])
def test_bench_options_are_checked(capsys, option):
    err = one_line_error(capsys, "bench", *TINY, option)
    assert err.startswith(f"error: peerdistill bench: argument {option.split('=')[0]}: must be int")


# ------------------------------------------------------------------ 8. the model contract, before any file
@pytest.fixture
def plain_model():
    class Plain(nn.Module):
        def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
            super().__init__()
            self.fc = nn.Linear(in_channels, num_classes)

    MODELS.register("plain_test_model")(Plain)
    yield
    MODELS._items.pop("plain_test_model")


def test_a_model_outside_the_contract_is_refused_before_the_run_folder(plain_model, capsys, tmp_path):
    out = tmp_path / "r"
    err = one_line_error(capsys, "train", "--out", str(out), *TINY, "model=plain_test_model")
    assert "model 'plain_test_model' builds a Plain, not a StagedNet" in err
    assert not out.exists()


# ------------------------------------------------------------------ 9. no half-made run left behind
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(capsys, tmp_path):
    out = tmp_path / "r"
    args = [*TINY, "optim.lr=1e30", "threads=1", "progress=false"]
    assert main(["train", "--out", str(out), *args]) == 2
    assert "error: non-finite loss term" in capsys.readouterr().err and not out.exists()
    sweep_dir = tmp_path / "s"  # a folder that held other files before: those stay, the run's own go
    sweep_dir.mkdir()
    (sweep_dir / "train.log").write_text("attempt 1\n")
    assert main(["train", "--out", str(sweep_dir), *args]) == 2
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["train.log"]


# ------------------------------------------------------------------ 10. hints name options that exist
def test_a_corrupt_last_checkpoint_under_resume_suggests_what_resume_can_do(run_dir, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "summary.json").unlink()  # unfinished: --resume reads last.pt
    (copy / "checkpoints" / "last.pt").write_bytes(b"garbage")
    err = one_line_error(capsys, "train", "--resume", str(copy))
    assert "--checkpoint" not in err and "best.pt may still be readable (copy it over" in err


def test_a_corrupt_teacher_checkpoint_suggests_method_teacher(run_dir, capsys, tmp_path):
    teacher = tmp_path / "t"
    shutil.copytree(run_dir, teacher)
    (teacher / "checkpoints" / "best.pt").write_bytes(b"garbage")
    err = one_line_error(capsys, "train", "--out", str(tmp_path / "s"), *TINY, "method=kd", f"method.teacher={teacher}")
    assert "--checkpoint" not in err and f"(method.teacher={teacher / 'checkpoints' / 'last.pt'})" in err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ 11. resolved config, resolved resume
def test_config_yaml_holds_every_resolved_parameter_and_resume_compares_values(run_dir, capsys, tmp_path):
    assert main(["train", "--resume", str(run_dir), "method.temperature=1.0"]) == 0  # the default, as stored
    assert main(["train", "--resume", str(run_dir), "method.temperature=1"]) == 0
    capsys.readouterr()
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["method"]["temperature"] == 1.0 and stored["data"]["size"] == 96
    assert stored["method"] == {"name": "dml", **METHODS.resolve("dml", {})}
    assert "method.temperature would change (1.0 -> 2.0)" in one_line_error(
        capsys, "train", "--resume", str(run_dir), "method.temperature=2")
    # a run written before defaults were stored (and with the synthetic keys every config had) resumes too
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    legacy = {**stored, "method": {"name": "dml"}}
    (old / "config.yaml").write_text(yaml.safe_dump(legacy))
    assert main(["train", "--resume", str(old), "method.temperature=1.0"]) == 0


def test_a_legacy_config_of_another_dataset_loses_the_synthetic_keys():
    raw = {"data": {"name": "fashion-mnist", "size": 512, "test_size": 256, "num_classes": 10, "image_size": 32,
                    "channels": 3, "val_split": 0.1}}
    cfg = C.from_dict(raw, stored=True)
    assert cfg.data.args == {} and cfg.data.val_split == 0.1
    with pytest.raises(PeerdistillError, match="unknown config key 'data.size'"):
        validate_config(C.from_dict(raw))  # only a run's own stored config is upgraded


# ------------------------------------------------------------------ 12. messages that mislead
def test_a_failed_first_save_does_not_claim_a_previous_checkpoint(monkeypatch, tmp_path):
    from peerdistill.engine import checkpoint as ck

    def full_disk(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(PeerdistillError) as e:
        run_mod.train(tiny_cfg("epochs=1"), tmp_path / "r", echo=False)
    msg = str(e.value)
    assert "no space left on device" in msg and "intact" not in msg and "no checkpoint was written yet" in msg


def test_limit_zero_names_limit(run_dir, capsys):
    err = one_line_error(capsys, "eval", str(run_dir), "--robustness", "--limit", "0")
    assert "argument --limit: must be int >= 1, got '0'" in err and "--adv-limit" not in err


def test_tstddev_takes_augmentations_after_its_options():
    args = parse(["tstddev", "RUN", "mixup", "--epochs", "1", "cutmix", "flip"])
    assert args.augs == ["mixup", "cutmix", "flip"] and args.epochs == 1
    args = parse(["correlate", "TS.json", "--head", "peer1", "a", "b"])
    assert args.runs == ["a", "b"] and args.head == "peer1"


def test_argument_errors_are_one_line_of_the_subcommand(capsys):
    err = one_line_error(capsys, "tstddev", "RUN", "--epochs", "x")
    assert err.startswith("error: peerdistill tstddev: argument --epochs") and "usage:" not in err
    err = one_line_error(capsys, "eval", "RUN", "--nonsense")
    assert "peerdistill eval: unrecognized arguments: --nonsense (see peerdistill eval --help)" in err
    assert "peerdistill: argument command: invalid choice: 'trian'" in one_line_error(capsys, "trian")


# ------------------------------------------------------------------ 13. kd trains one student
def test_kd_trains_one_student_by_default():
    cfg = tiny_cfg("method=kd", "method.teacher=somewhere")
    validate_config(cfg)
    assert cfg.peers == 1


def test_a_methods_default_cohort_is_what_its_presets_set():
    """The cause of 13: a default no preset uses. Every method whose presets all set one cohort size has it
    as its default (or fixed) size."""
    sizes: dict[str, set] = {}
    for path in (ROOT / "configs").rglob("*.yaml"):
        raw = yaml.safe_load(path.read_text()) or {}
        method = raw.get("method")
        name = method if isinstance(method, str) else (method or {}).get("name", "dml")
        sizes.setdefault(name, set()).add(raw.get("peers"))
    for name, found in sizes.items():
        if len(found) == 1 and None not in found:
            needs = METHODS.build(name, **({"teacher": "t"} if name == "kd" else {})).needs
            assert (needs.peers or needs.default_peers) == found.pop(), name


# ------------------------------------------------------------------ 14. output that reads right
def test_ood_score_ticks_do_not_overlap(monkeypatch, tmp_path):
    from peerdistill.evaluation import plots as RP

    rng = np.random.default_rng(0)

    def scores():
        return {"msp": rng.uniform(0.5, 1, 99), "odin": 0.1 + rng.uniform(0, 3e-5, 99), "energy": rng.normal(5, 1, 99)}

    raw = {"in": {"peer0": scores()}, "out": {s: {"peer0": scores()} for s in ("holdout", "mnist", "gaussian")}}
    clashes = []

    def check(fig, ax, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for a in fig.axes:
            lo, hi = a.get_xlim()
            boxes = [t.get_window_extent(renderer) for t, v in zip(a.get_xticklabels(), a.get_xticks())
                     if lo <= v <= hi and t.get_text()]
            clashes.extend(t.get_text() for (b1, b2), t in zip(zip(boxes, boxes[1:]), a.get_xticklabels())
                           if b1.x1 >= b2.x0)
        return real(fig, ax, path)

    real = RP.save_figure
    monkeypatch.setattr(RP, "save_figure", check)
    RP.plot_ood_scores(raw, tmp_path / "ood.png")
    assert (tmp_path / "ood.png").is_file() and clashes == []


def _study_results(epochs: int = 1):
    from peerdistill.report.study import RunResult, StudyRow

    rows = [StudyRow("a", "method=dml", {0: Path("a")}), StudyRow("b", "method=pcl", {0: Path("b")})]
    summary = lambda v: {"final": {"test": {"peer0": {"top1": v}}}}  # noqa: E731
    history = lambda v: [{"epoch": e + 1, "test": {"peer0": {"top1": v}}} for e in range(epochs)]  # noqa: E731
    return rows, {"a": [RunResult(0, Path("a"), summary(91.0), history(91.0))],
                  "b": [RunResult(0, Path("b"), summary(92.0), history(92.0))]}


def test_study_bars_start_at_zero_and_one_epoch_curves_have_whole_epoch_ticks(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    from peerdistill.report.study import plot_bars, plot_curves

    axes = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: axes.append(fig.axes[0]))
    rows, results = _study_results()
    plot_bars(rows, results, ["peer0"], "top1", "final", tmp_path / "bars.png")
    plot_curves(rows, results, ["peer0"], tmp_path / "curves.png")
    bars, curves = axes
    assert bars.get_ylim()[0] == 0.0  # 91 vs 92 drawn from 0, not from 89
    lo, hi = curves.get_xlim()
    assert hi - lo >= 1 and [t for t in curves.get_xticks() if lo <= t <= hi] == [1.0]


def test_a_run_shorter_than_log_every_has_step_records(tmp_path):
    run_mod.train(tiny_cfg("epochs=1", "log_every=1000"), tmp_path / "r", echo=False)
    steps = (tmp_path / "r" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 1 and json.loads(steps[0])["epoch"] == 1.0


def test_text_tables_fit_long_head_names():
    from peerdistill.report.robust_tables import adversarial_table

    m = {"top1": 91.5, "top5": 99.0, "nll": 0.3, "ece": 2.0}
    lines = run_mod.format_table({"peer0": m, "logit_ensemble": m}, {"peer0": {"test": m, "epoch": 3},
                                                                   "logit_ensemble": {"test": m, "epoch": 3}}).splitlines()
    assert len({len(line) for line in lines}) == 1  # right-aligned columns: every line ends at the same place
    assert lines[2].index("91.50") == lines[1].index("91.50")
    part = {"settings": {"adv_limit": 8, "pgd_steps": 1, "pgd_random_start": True},
            "results": {"clean": {"peer0": 90.0, "logit_ensemble": 91.0},
                        "fgsm": {"peer0": {"8/255": 50.0}, "logit_ensemble": {"8/255": 51.0}}}}
    table = adversarial_table(part).splitlines()
    assert "8 test images" in table[0] and table[0].endswith("PGD 1 step")
    assert len({len(line) for line in table[1:]}) == 1


def test_counts_read_as_english(capsys, tmp_path):
    from peerdistill.sweep.launch import Plan, plan_slots

    assert Plan(1, 1).describe() == "1 slot × 1 thread"
    with pytest.raises(PeerdistillError, match=r"^1 slot × 3 threads \(1 process × 3\)"):
        plan_slots(1, 2, slots=1, threads=3)
    report = main(["bench", *TINY, "epochs=1", "threads=1", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert report == 0 and " 1 thread," in out and "(1 epoch x" in out and "1 timed step after 0 warm-up steps" in out


def test_files_of_a_run_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "r"
        run_mod.train(tiny_cfg("epochs=1"), out, echo=False)
    finally:
        os.umask(old)
    modes = {str(f.relative_to(out)): stat.S_IMODE(f.stat().st_mode) for f in out.rglob("*") if f.is_file()}
    assert {"summary.json", "metrics.csv", "checkpoints/last.pt"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_no_synthetic_keys_in_another_datasets_config_or_table_label(tmp_path):
    cfg = C.load(None, ["data.name=fashion-mnist"])
    validate_config(cfg)
    data = cfg.to_dict()["data"]
    assert not {"channels", "size"} & set(data) and data["image_size"] is None  # a general key, unset
    from peerdistill.report.table import load_runs, markdown_table

    dirs = []
    for seed, extra in enumerate(({}, {"size": 512, "test_size": 256, "num_classes": 10, "image_size": 32,
                                       "channels": 3})):  # a run written now, and one written before the fix
        d = tmp_path / f"s{seed}"
        d.mkdir()
        raw = {**cfg.to_dict(), "seed": seed}
        raw["data"].update(extra)
        (d / "config.yaml").write_text(yaml.safe_dump(raw))
        (d / "summary.json").write_text(json.dumps({"final": {"test": {"peer0": {"top1": 90.0}}}}))
        dirs.append(d)
    table = markdown_table(load_runs(dirs))
    assert "image_size" not in table and table.count("| 2 |") == 1  # one row pooling the old and the new run


def test_a_sweep_attempt_stopped_by_ctrl_c_is_recorded_as_interrupted(tmp_path):
    from peerdistill.sweep.launch import RECORD, Job, LocalLauncher, Plan

    d = tmp_path / "run"
    code = "import signal, time; signal.signal(signal.SIGINT, lambda *a: exit(130)); time.sleep(60)"
    launcher = LocalLauncher(Plan(1, 1))
    launcher.start([Job("run", d, [sys.executable, "-c", code], {}, "new", "local")])
    time.sleep(1.0)
    launcher.stop(grace_s=10)
    (rec,) = json.loads((d / RECORD).read_text())["attempts"]
    assert rec["returncode"] == 130 and rec["interrupted"] is True


# ------------------------------------------------------------------ 15. the config keys, documented
def test_every_config_key_is_listed_with_type_range_and_default(capsys):
    from peerdistill.config_keys import undocumented

    assert undocumented() == []
    assert main(["list", "config"]) == 0
    out = capsys.readouterr().out
    for key, text in (("optim.warmup_epochs", "float >= 0"), ("optim.no_decay_bn_bias", "bool"),
                      ("eval_every", "int >= 1"), ("data.train_subset", "int >= 0")):
        line = next(ln for ln in out.splitlines() if ln.startswith(key + " "))
        assert text in line, line


def test_the_config_page_is_current():
    from peerdistill.config_keys import config_markdown

    page = ROOT / "docs" / "config.md"
    assert page.read_text() == config_markdown(), "regenerate: peerdistill list config --markdown > docs/config.md"


def test_list_config_markdown_prints_the_page(capsys):
    assert main(["list", "config", "--markdown"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "config.md").read_text()
