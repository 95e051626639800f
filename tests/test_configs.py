"""Every shipped YAML config parses into a valid RunConfig and names the command that runs it."""

from pathlib import Path

import pytest

from matryoshka_lora.experiment import RunConfig, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    run = RunConfig.from_flat(load_yaml(path))
    assert run.adapter.r >= max(run.adapter.ranks)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mlora ") or first.startswith("# accelerate launch"), "a config starts with its command"
    assert str(path.relative_to(path.parents[1])) in first


def test_unknown_key_lists_valid_ones(tmp_path):
    (tmp_path / "bad.yaml").write_text("learning_rte: 1e-4\n")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['learning_rte'\]. Valid options: .*learning_rate"):
        RunConfig.from_flat(load_yaml(tmp_path / "bad.yaml"))


def test_yaml_scientific_notation_is_a_number(tmp_path):
    (tmp_path / "lr.yaml").write_text("learning_rate: 1e-4\n")  # PyYAML reads this as the string '1e-4'
    assert RunConfig.from_flat(load_yaml(tmp_path / "lr.yaml")).train.learning_rate == 1e-4
