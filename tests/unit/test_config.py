"""Config dataclasses: validation messages, versioned round-trip, config files."""

from __future__ import annotations

import json

import pytest

from pare.config import CalibrationConfig, RuntimeConfig, read_config_file
from pare.errors import ConfigError
from pare.methods import METHODS, MagnitudeConfig, pruner_for

REQUIRED = {"layers": {"layers": "1-2"}}  # methods without a sensible default


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_config_round_trips(name: str) -> None:
    cls = METHODS[name].config_class
    cfg = cls(**REQUIRED.get(name, {}))
    data = cfg.to_dict()
    assert data["version"] == 1 and data["method"] == name
    assert cls.from_dict(json.loads(json.dumps(data))) == cfg


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid options are"):
        MagnitudeConfig.from_dict({"sparsity": 0.5, "sparsty": 0.2})


def test_unknown_method_lists_choices() -> None:
    with pytest.raises(ConfigError, match="magnitude"):
        pruner_for("nope")


@pytest.mark.parametrize("field", ["nsamples", "seqlen", "batch_size"])
def test_calibration_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CalibrationConfig(**{field: 0})


def test_bad_regex_and_pattern_messages() -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        MagnitudeConfig(targets=("(",))
    with pytest.raises(ConfigError, match="N:M"):
        MagnitudeConfig(pattern="two-four")
    with pytest.raises(ConfigError, match="0 < N < M"):
        MagnitudeConfig(pattern="4:2")


def test_config_files_yaml_and_json(tmp_path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("method: magnitude\nsparsity: 0.3\nruntime:\n  device: cpu\n")
    assert read_config_file(y) == {"method": "magnitude", "sparsity": 0.3, "runtime": {"device": "cpu"}}
    j = tmp_path / "c.json"
    j.write_text('{"sparsity": 0.3}')
    assert read_config_file(j) == {"sparsity": 0.3}
    j.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(j)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(tmp_path / "list.yaml")
    assert RuntimeConfig.from_dict({"device": "cpu"}).device == "cpu"
