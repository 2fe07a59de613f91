"""The cluster and the model every scenario kind has, resolved together: the model's
experts are checked against the cluster's GPU count."""

from __future__ import annotations

from collections.abc import Mapping

from lina_sim.config.scenario import beside
from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec, resolve_cluster
from lina_sim.workload.model import ModelSpec, model_from_dict


def resolve_cluster_and_model(data: Mapping, source: str = "<memory>") -> tuple[ClusterSpec, ModelSpec]:
    """The ``cluster`` and ``model`` blocks of a scenario, validated: (ClusterSpec,
    ModelSpec with its experts resolved against the GPUs). A profile path in
    ``cluster.preset`` is found as traces are (:func:`lina_sim.config.scenario.beside`
    the scenario file ``source``)."""
    if "cluster" not in data:
        raise ConfigError("cluster", "missing", ["preset: NAME, nodes: N"])
    block = data["cluster"]
    if isinstance(block, str):
        block = {"preset": block}
    preset = block.get("preset") if isinstance(block, Mapping) else None
    if isinstance(preset, str) and preset.endswith((".yaml", ".yml")):
        block = {**block, "preset": str(beside(preset, source))}
    cluster = resolve_cluster(block, "cluster")
    if "model" not in data:
        raise ConfigError("model", "missing", ["preset: NAME"])
    return cluster, model_from_dict(data["model"], "model", world_size=cluster.world_size)
