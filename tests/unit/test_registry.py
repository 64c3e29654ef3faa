"""The method registry, versioned configs and field type checks."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import pytest

import pare
from pare.config import STAGES, PruneConfig, config_from_dict, field_hints, register, stage_for_config, unregister
from pare.errors import ConfigError
from pare.methods import METHODS, OsscarConfig, SparseGPTConfig, WandaConfig
from pare.methods.base import PruneContext, Pruner


def test_every_builtin_method_is_registered_by_its_config_type() -> None:
    assert {"magnitude", "wanda", "sparsegpt", "osscar", "width", "shortgpt", "angular", "ppl-window", "layers",
            "sublayer"} <= set(METHODS)
    for name, stage in METHODS.items():
        cfg = stage.example_config()
        assert cfg.method == name and stage_for_config(cfg) is stage
        assert config_from_dict(cfg.to_dict()) == cfg


def test_from_dict_refuses_another_methods_dict() -> None:
    data = SparseGPTConfig(sparsity=0.5).to_dict()
    with pytest.raises(ConfigError, match="method 'sparsegpt', not of 'wanda'"):
        WandaConfig.from_dict(data)


def test_from_dict_refuses_a_newer_version() -> None:
    data = {**WandaConfig().to_dict(), "version": 99}
    with pytest.raises(ConfigError, match=r"version 99.*upgrade pare"):
        WandaConfig.from_dict(data)
    with pytest.raises(ConfigError, match="version 99"):
        config_from_dict(data)


def test_config_from_dict_needs_a_known_method() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        config_from_dict({"method": "nope"})
    with pytest.raises(ConfigError, match="needs its 'method'"):
        config_from_dict({"sparsity": 0.5})


@pytest.mark.parametrize(("kwargs", "field"), [({"max_swaps": "3"}, "max_swaps"), ({"damp": True}, "damp"),
                                               ({"round_to": 2.0}, "round_to"), ({"exact": "yes"}, "exact")])
def test_osscar_fields_are_type_checked(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"OsscarConfig.{field} must be"):
        OsscarConfig(**kwargs)


def _wrong_value(hint: typing.Any) -> object:
    inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = typing.get_origin(inner[0]) or inner[0]
    return {str: 3, int: "3", float: "0.5", bool: "yes", tuple: 3, dict: "x"}[base]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_field_of_every_method_is_type_checked(name: str) -> None:
    cls = METHODS[name].config_class
    base = METHODS[name].example_config().to_dict()
    for f in dataclasses.fields(cls):
        hint = field_hints(cls)[f.name]
        if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:
            continue  # one text item is accepted as a one-item list
        with pytest.raises(ConfigError, match=f.name):
            cls(**{**{k: v for k, v in base.items() if k not in ("method", "version")},
                   f.name: _wrong_value(hint)})


@dataclass(frozen=True)
class _NamedConfig(PruneConfig):
    method: ClassVar[str] = "test-registry-dup"


class _NamedStage(Pruner):
    config_class = _NamedConfig

    def run(self, ctx: PruneContext) -> None:
        """Nothing."""


def test_register_refuses_a_taken_name_and_a_class_without_config() -> None:
    register(_NamedStage)
    try:
        assert pare.METHODS["test-registry-dup"] is _NamedStage

        class Other(_NamedStage):
            pass

        with pytest.raises(TypeError, match="already registered"):
            register(Other)
    finally:
        unregister("test-registry-dup")
    assert "test-registry-dup" not in STAGES

    class NoConfig:
        pass

    with pytest.raises(TypeError, match="config_class"):
        register(NoConfig)


def test_stage_for_config_refuses_non_configs() -> None:
    with pytest.raises(ConfigError, match="registered method config"):
        stage_for_config({"method": "wanda"})
