"""Names → policy classes, imported lazily so that looking one up imports only it."""

from __future__ import annotations

import importlib
from typing import Any

from lina_sim.errors import ConfigError

# Training (communication-scheduling) policies: name -> "module:Class".
TRAINING_POLICIES: dict[str, str] = {
}

# Inference placement policies: name -> "module:Class".
PLACEMENT_POLICIES: dict[str, str] = {
}


def _load(table: dict[str, str], family: str, name: str) -> type:
    if name not in table:
        raise ConfigError(f"{family} policy", f"unknown policy {name!r}", sorted(table))
    module, _, cls = table[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def training_policy_class(name: str) -> type:
    return _load(TRAINING_POLICIES, "training", name)


def placement_policy_class(name: str) -> type:
    return _load(PLACEMENT_POLICIES, "placement", name)


def make_training_policy(name: str, **params: Any):
    return training_policy_class(name).from_params(name=name, **params)


def make_placement_policy(name: str, **params: Any):
    return placement_policy_class(name).from_params(name=name, **params)
