"""The cluster and the model every scenario kind has, resolved together: the model's
experts are checked against the cluster's GPU count."""

from __future__ import annotations

from collections.abc import Mapping

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec, resolve_cluster
from lina_sim.workload.model import ModelSpec, model_from_dict


def resolve_cluster_and_model(data: Mapping) -> tuple[ClusterSpec, ModelSpec]:
    """The ``cluster`` and ``model`` blocks of a scenario, validated: (ClusterSpec,
    ModelSpec with its experts resolved against the GPUs)."""
    if "cluster" not in data:
        raise ConfigError("cluster", "missing", ["preset: NAME, nodes: N"])
    cluster = resolve_cluster(data["cluster"], "cluster")
    if "model" not in data:
        raise ConfigError("model", "missing", ["preset: NAME"])
    return cluster, model_from_dict(data["model"], "model", world_size=cluster.world_size)
