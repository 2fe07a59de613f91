"""Names → policy classes, imported lazily so that looking one up imports only it."""

from __future__ import annotations

import importlib
from typing import Any

from lina_sim.errors import ConfigError

# Training (communication-scheduling) policies: name -> "module:Class".
TRAINING_POLICIES: dict[str, str] = {
    "deepspeed": "lina_sim.policies.training.deepspeed:DeepSpeedPolicy",
    "tutel": "lina_sim.policies.training.deepspeed:TutelPolicy",
    "lina": "lina_sim.policies.training.lina:LinaPolicy",
    "lina-priority": "lina_sim.policies.training.lina:LinaPriorityPolicy",
    "lina-partition": "lina_sim.policies.training.lina:LinaPartitionPolicy",
    "no-contention": "lina_sim.policies.training.no_contention:NoContentionPolicy",
}

# Inference placement policies: name -> "module:Class".
PLACEMENT_POLICIES: dict[str, str] = {
    "static": "lina_sim.policies.placement.static:StaticPlacement",
    "fastermoe-shadow": "lina_sim.policies.placement.fastermoe:FasterMoEShadow",
    "eplb": "lina_sim.policies.placement.eplb:EPLBPlacement",
    "lina": "lina_sim.policies.placement.lina:LinaPlacement",
    "lina-no-estimate": "lina_sim.policies.placement.lina:LinaNoEstimate",
    "lina-no-finetune": "lina_sim.policies.placement.lina:LinaNoFinetune",
    "oracle": "lina_sim.policies.placement.lina:OraclePlacement",
    "ideal": "lina_sim.policies.placement.static:IdealPlacement",
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
