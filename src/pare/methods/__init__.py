"""Pruning methods: one file per method, each a config dataclass plus a pruner.

``METHODS`` maps the CLI / config name of each method to its pruner class.
"""

from __future__ import annotations

from pare.errors import ConfigError
from pare.methods.base import Pruner, PruneContext, SparsityConfig, SparsityPruner
from pare.methods.magnitude import MagnitudeConfig, MagnitudePruner

METHODS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
}


def pruner_for(method: str) -> type[Pruner]:
    """The pruner class of a method name, with the list of valid names on error."""
    try:
        return METHODS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None


__all__ = [
    "METHODS",
    "MagnitudeConfig",
    "MagnitudePruner",
    "PruneContext",
    "Pruner",
    "SparsityConfig",
    "SparsityPruner",
    "pruner_for",
]
