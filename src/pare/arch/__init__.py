"""The architecture description: one view of a model's roles that every method uses."""

from pare.arch.infer import config_head_counts, describe
from pare.arch.overrides import ArchOverride
from pare.arch.roles import (
    AttentionRoles,
    ConfigFields,
    ExpertsRoles,
    LayerRoles,
    MLPRoles,
    ModelArch,
    Proj,
    get_weight,
)

__all__ = [
    "ArchOverride",
    "AttentionRoles",
    "ConfigFields",
    "ExpertsRoles",
    "LayerRoles",
    "MLPRoles",
    "ModelArch",
    "Proj",
    "config_head_counts",
    "describe",
    "get_weight",
]
