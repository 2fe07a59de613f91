"""Names → policy classes, imported lazily so that looking one up imports only it, and
a scenario's ``policies:`` list read into entries."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
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
    "lina-cost": "lina_sim.policies.placement.lina:LinaCostPlacement",
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


@dataclass
class PolicyEntry:
    """One policy of a scenario: its registry name, display label and parameters (as the
    scenario wrote them; the policy's ``PARAMS`` check them)."""

    name: str
    label: str
    params: dict[str, Any]


def policy_entries(entries: Any, family: str, where: str = "policies") -> list[PolicyEntry]:
    """A scenario's ``policies:`` list of ``family`` (``training`` or ``placement``)
    policies: each a name or a mapping ``{name, label, PARAM: VALUE...}``, every label
    unique. Errors name ``policies[i]`` and the known names; the caller checks the
    parameters."""
    table = {"training": TRAINING_POLICIES, "placement": PLACEMENT_POLICIES}[family]
    known = sorted(table)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(where, f"must be a non-empty list of {family} policy names or {{name: ..., params}}", known)
    out: list[PolicyEntry] = []
    labels: set[str] = set()
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, Mapping) or "name" not in e:
            raise ConfigError(f"{where}[{i}]", "must be a policy name or a mapping with a name", known)
        name = str(e["name"])
        if name not in table:
            raise ConfigError(f"{where}[{i}].name", f"unknown {family} policy {name!r}", known)
        label = str(e.get("label", name))
        if label in labels:
            raise ConfigError(f"{where}[{i}].label", f"duplicate label {label!r}: give each entry its own label")
        labels.add(label)
        out.append(PolicyEntry(name, label, {k: v for k, v in e.items() if k not in ("name", "label")}))
    return out
