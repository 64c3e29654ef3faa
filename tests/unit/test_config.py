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


def test_file_values_of_the_wrong_type_are_named() -> None:
    from pare.methods import WandaConfig

    # one regex given as text is one regex, not one per character
    assert MagnitudeConfig.from_dict({"targets": "down_proj"}).targets == ("down_proj",)
    assert MagnitudeConfig.from_dict({"ignore": ["mlp\\.down_proj"]}).ignore == ("mlp\\.down_proj",)
    with pytest.raises(ConfigError, match=r"pattern must be text, got 124: quote it"):
        WandaConfig.from_dict({"pattern": 124})  # YAML's reading of an unquoted 2:4
    with pytest.raises(ConfigError, match=r"layer_sparsity must be a list, e\.g\."):
        WandaConfig.from_dict({"layer_sparsity": 0.3})
    with pytest.raises(ConfigError, match=r"every item must be a number, got 'x'"):
        WandaConfig.from_dict({"layer_sparsity": [0.3, "x"]})
    with pytest.raises(ConfigError, match=r"must be a number, got '0\.5'"):
        WandaConfig.from_dict({"sparsity": "0.5"})
    with pytest.raises(ConfigError, match="must be true or false"):
        RuntimeConfig.from_dict({"offload": "no"})
    with pytest.raises(ConfigError, match=r"must be an integer, got 12\.5"):
        CalibrationConfig.from_dict({"nsamples": 12.5})
    with pytest.raises(ConfigError, match="must be a mapping"):
        WandaConfig.from_dict({"module_sparsity": [0.5]})
    assert WandaConfig.from_dict({"sparsity": 1 - 0.5, "layer_sparsity": [0, 0.5]}).layer_sparsity == (0, 0.5)
    assert RuntimeConfig.from_dict({"device": None}).device is None
