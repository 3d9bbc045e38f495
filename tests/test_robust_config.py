"""The config's ``robustness`` field is typed (RobustOptions), stored as given and compared normalised."""
from __future__ import annotations

import pytest
import yaml

import peerdistill.config as C
from peerdistill.engine.build import validate_config
from peerdistill.errors import PeerdistillError
from peerdistill.robust_options import RobustOptions
from peerdistill.run import check_resume
from peerdistill.sweep.study import config_change, experiment_key

from .conftest import one_line_error, tiny_cfg

GIVEN = "{adversarial: true, attacks: [fgsm], eps: [0.03], limit: 8, plots: false}"


def test_the_field_is_typed_and_checked_when_the_config_is_read(capsys, tmp_path):
    cfg = tiny_cfg(f"robustness={GIVEN}")
    assert isinstance(cfg.robustness, RobustOptions)
    assert (cfg.robustness.adv_limit, cfg.robustness.ood_limit, cfg.robustness.attacks) == (8, 8, ["fgsm"])
    one = tiny_cfg("robustness.adversarial=true", "robustness.pgd_steps=3")  # one option at a time
    assert one.robustness.pgd_steps == 3 and one.to_dict()["robustness"] == {"adversarial": True, "pgd_steps": 3}
    assert tiny_cfg(f"robustness={GIVEN}", "robustness=none").robustness is None
    for bad, expected in (("robustness={advesarial: true}", "unknown robustness option 'advesarial'"),
                          ("robustness={adversarial: true, eps: [2]}", "'eps' must be a list of float > 0"),
                          ("robustness=3", "config key 'robustness' must be a mapping")):
        with pytest.raises(PeerdistillError, match=expected):
            tiny_cfg(bad)
        err = one_line_error(capsys, "train", "--out", str(tmp_path / "r"), "data.name=synthetic", bad)
        assert expected.split("'")[0] in err and not (tmp_path / "r").exists()


def test_config_yaml_stores_the_section_as_given(tmp_path):
    """What a run writes is what it wrote before the field was typed: the mapping as given, not every default."""
    cfg = tiny_cfg(f"robustness={GIVEN}")
    validate_config(cfg)
    C.save(cfg, tmp_path / "config.yaml")
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())["robustness"]
    assert stored == yaml.safe_load(GIVEN) and isinstance(stored["limit"], int)
    again = C.load(tmp_path / "config.yaml", stored=True)
    C.save(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == (tmp_path / "config.yaml").read_text()
    assert RobustOptions(adversarial=True, pgd_steps=3).mapping() == {"adversarial": True, "pgd_steps": 3}


def test_resume_and_sweeps_compare_the_normalised_options(tmp_path):
    written = tiny_cfg(f"robustness={GIVEN}")  # as a run written before stored it
    validate_config(written)
    C.save(written, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    spelled = tiny_cfg("robustness={adversarial: true, attacks: [fgsm], eps: [0.03], adv_limit: 8, "
                       "corruption_limit: 8, ood_limit: 8, plots: false, pgd_steps: 10, corruptions: false}")
    validate_config(spelled)
    check_resume(spelled, tmp_path)  # the same evaluation, its defaults spelt out: no change
    assert config_change(raw, spelled) is None and experiment_key(raw) == experiment_key(spelled)
    same = tiny_cfg(f"robustness={GIVEN}")
    validate_config(same)
    check_resume(same, tmp_path)
    assert experiment_key(raw) == experiment_key(same)
    changed = tiny_cfg(f"robustness={GIVEN}", "robustness.pgd_steps=3")
    validate_config(changed)
    with pytest.raises(PeerdistillError, match=r"robustness.pgd_steps would change \(10 -> 3\)"):
        check_resume(changed, tmp_path)
    assert "robustness.pgd_steps" in config_change(raw, changed)
    plain = tiny_cfg()
    validate_config(plain)
    with pytest.raises(PeerdistillError, match="robustness"):
        check_resume(plain, tmp_path)
