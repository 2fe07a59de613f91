"""The columns that say which point and policy a result row belongs to, the same for every
scenario kind, so result tables from training, serving and measured runs join on them."""

from __future__ import annotations

from typing import Any


def point_columns(setup: Any, label: str, name: str) -> dict[str, Any]:
    """scenario, policy (the entry's label), policy_name, cluster, nodes, gpus, model,
    experts of a resolved setup (anything with ``scenario``, ``cluster`` and ``model``)."""
    return {
        "scenario": setup.scenario.name,
        "policy": label,
        "policy_name": name,
        "cluster": setup.cluster.name,
        "nodes": setup.cluster.nodes,
        "gpus": setup.cluster.world_size,
        "model": setup.model.name,
        "experts": setup.model.experts,
    }
