"""An inference scenario resolved and checked: the serving block, the routing traces,
the placement policies and their parameters (:func:`resolve_inference`).

Units: seconds, bytes, tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lina_sim.config.fields import Field, check_fields, check_mapping, declared
from lina_sim.config.scenario import Scenario, beside
from lina_sim.errors import ConfigError, RoutingTraceError
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.network.collectives import ALGORITHMS, algorithm_field
from lina_sim.policies.placement import PlacementPolicy
from lina_sim.policies.registry import PolicyEntry, make_placement_policy, policy_entries
from lina_sim.routing.traces import RoutingTrace, concatenate
from lina_sim.routing.traces import load as load_trace
from lina_sim.serving.cost import InferenceCostModel
from lina_sim.serving.requests import ArrivalSpec, BatchingSpec
from lina_sim.workload.model import ModelSpec
from lina_sim.workload.resolve import resolve_cluster_and_model


def _trace_list(v: Any) -> bool:
    """Whether ``v`` is a trace path or a non-empty list of them."""
    items = v if isinstance(v, list) else [v]
    return bool(items) and all(isinstance(p, str) and p for p in items)


SERVING_FIELDS: dict[str, Field] = {
    "trace": Field(
        object,
        predicate=_trace_list,
        allowed="a .npz trace path, or a list of them",
        help="path of a .npz trace, or a list of them (concatenated)",
    ),
    "fold_experts": Field(bool, False, help="true: map trace expert e to e mod model.experts"),
    "train_fraction": Field(
        float,
        0.3,
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
        exclusive_maximum=True,
        help="fraction of the trace's sequences that fit the estimators",
    ),
    "requests": Field(int, 1000, minimum=1, help="requests to serve"),
    "arrival": Field(
        dict,
        allowed="{process: poisson, rate: R > 0 req/s} or {process: closed, concurrency: N >= 1}",
        help="how requests arrive (requests/s, or requests in flight)",
    ),
    "batching": Field(
        dict,
        None,
        allow_none=True,
        allowed="{token_budget: TOKENS, timeout: SECONDS}",
        help="dynamic batching (tokens, s)",
    ),
    "expert_slots": Field(
        int,
        None,
        minimum=1,
        allow_none=True,
        help="experts of one layer each GPU can hold (null: the placement default)",
    ),
    "timeline_batches": Field(int, 2, minimum=0, help="batches per policy recorded in the timeline"),
}
# The other blocks of an inference scenario that it reads.
COMPUTE_FIELDS: dict[str, Field] = {
    "model": Field(str, "roofline", choices=("roofline",), help="the compute model (inference: the roofline)"),
}
COLLECTIVES_FIELDS: dict[str, Field] = {"all_to_all": algorithm_field("all_to_all")}
# Placement-policy parameters the serving layer sets itself.
_RESERVED = tuple(PlacementPolicy.BASE_PARAMS)


# ---------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------
PlacementEntry = PolicyEntry  # one placement policy of a scenario: registry name, label, parameters


@dataclass(frozen=True)
class ServingSpec:
    """The resolved ``serving:`` block (see :data:`SERVING_FIELDS`)."""

    trace_paths: tuple[str, ...]
    fold_experts: bool
    train_fraction: float
    requests: int
    arrival: ArrivalSpec
    batching: BatchingSpec
    expert_slots: int | None
    timeline_batches: int


@dataclass
class InferenceSetup:
    """An inference scenario with every part resolved and validated. ``trace`` is the
    (concatenated, possibly folded) trace the server replays; ``experts`` holds its
    choices as int64 ``[tokens, layers, k]`` over ``model.experts`` experts."""

    scenario: Scenario
    cluster: ClusterSpec
    model: ModelSpec
    policies: list[PlacementEntry]
    serving: ServingSpec
    trace: RoutingTrace
    experts: np.ndarray
    a2a_algo: str

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def trace_digest(self) -> str:
        """SHA-1 of the trace's expert choices and sequence ids (the ids decide the
        train/serve split, so they are part of what a cached result depends on)."""
        h = hashlib.sha1(np.ascontiguousarray(self.trace.experts).tobytes())
        h.update(np.ascontiguousarray(self.trace.seq_ids).tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """The fully resolved scenario as plain JSON-able data (for caching)."""
        s = self.serving
        return {
            "kind": "inference",
            "name": self.scenario.name,
            "seed": self.scenario.seed,
            "cluster": dataclasses.asdict(self.cluster),
            "model": dataclasses.asdict(self.model),
            "policies": [{"name": p.name, "label": p.label, **p.params} for p in self.policies],
            "serving": {
                "trace": list(s.trace_paths),
                "trace_sha1": self.trace_digest(),
                "trace_tokens": self.trace.num_tokens,
                "trace_experts": self.trace.num_experts,
                "fold_experts": s.fold_experts,
                "train_fraction": s.train_fraction,
                "requests": s.requests,
                "arrival": dataclasses.asdict(s.arrival),
                "batching": dataclasses.asdict(s.batching),
                "expert_slots": s.expert_slots,
                "timeline_batches": s.timeline_batches,
            },
            "collectives": {"all_to_all": self.a2a_algo},
            "compute": "roofline",
        }


def _trace_paths(v: str | list[str], source: str) -> tuple[Path, ...]:
    return tuple(beside(p, source) for p in (v if isinstance(v, list) else [v]))


def _load_traces(paths: tuple[Path, ...]) -> RoutingTrace:
    traces = [load_trace(p) for p in paths]  # RoutingTraceError names the file
    return traces[0] if len(traces) == 1 else concatenate(traces)


def parse_placement_policies(entries: Any, where: str = "policies") -> list[PlacementEntry]:
    out = policy_entries(entries, "placement", where)
    for e in out:
        for k in e.params:
            if k in _RESERVED:
                raise ConfigError(
                    f"{where}[{e.name}].{k}",
                    "is set by the scenario (model, cluster, trace, serving.expert_slots), not per policy",
                )
    return out


def resolve_inference(sc: Scenario) -> InferenceSetup:
    """Validate every field of an inference scenario. Bad fields raise
    :class:`ConfigError` naming the YAML path and what is allowed; bad or mismatched
    traces raise :class:`RoutingTraceError` naming the file."""
    d = sc.data
    if sc.kind != "inference":
        raise ConfigError("kind", f"resolve_inference needs kind: inference, got {sc.kind!r}", ["inference"])
    for key in ("steps",):
        if key in d:
            raise ConfigError(key, "only allowed in a training scenario (kind: training)")
    cluster, model = resolve_cluster_and_model(d, sc.source)
    policies = parse_placement_policies(d.get("policies"))

    if d.get("compute") is not None:
        check_fields(check_mapping(d["compute"], "compute", "{model: roofline}"), COMPUTE_FIELDS, "compute")
    coll_allowed = "{all_to_all: " + "|".join(ALGORITHMS["all_to_all"]) + "}"
    coll = check_mapping(d.get("collectives") or {}, "collectives", coll_allowed)
    for key in ("algo", "proto", "allreduce"):  # the training scenario's allreduce fields
        if key in coll:
            raise ConfigError(
                f"collectives.{key}",
                "only in a training scenario: serving runs no allreduce, only collectives.all_to_all applies",
                coll_allowed,
            )
    algo = check_fields(coll, COLLECTIVES_FIELDS, "collectives")["all_to_all"]

    if "serving" not in d:
        raise ConfigError("serving", "missing", sorted(SERVING_FIELDS))
    sv = check_fields(check_mapping(d["serving"], "serving", sorted(SERVING_FIELDS)), SERVING_FIELDS, "serving")
    fold, train_fraction, requests = sv["fold_experts"], sv["train_fraction"], sv["requests"]
    arrival = ArrivalSpec.from_block(sv["arrival"], "serving.arrival")
    batching = BatchingSpec(**check_fields(sv["batching"] or {}, declared(BatchingSpec), "serving.batching"))
    slots, tl = sv["expert_slots"], sv["timeline_batches"]
    paths = _trace_paths(sv["trace"], sc.source)

    # The trace against the model: layers, experts (folding), top-k.
    trace = _load_traces(paths)
    origin = trace.origin if len(paths) == 1 else " + ".join(map(str, paths))
    moe_layers = len(model.moe_layer_ids)
    if trace.num_layers != moe_layers:
        raise RoutingTraceError(
            origin,
            f"trace has {trace.num_layers} MoE layers but model {model.name!r} has "
            f"{moe_layers} (set model.layers or model.moe_layers to match)",
        )
    E = model.experts
    experts = trace.experts.astype(np.int64)
    if trace.num_experts != E:
        if not fold:
            raise RoutingTraceError(
                origin,
                f"trace has {trace.num_experts} experts but model.experts is {E} "
                f"(use a trace recorded with {E} experts, or set serving.fold_experts: true "
                f"to map expert e to e mod {E})",
            )
        if trace.num_experts % E:
            raise RoutingTraceError(
                origin,
                f"cannot fold {trace.num_experts} experts onto model.experts={E}: "
                f"not a multiple (allowed: a divisor of {trace.num_experts})",
            )
        experts = experts % E
    raw_model = d["model"] if isinstance(d["model"], Mapping) else {}
    if "top_k" in raw_model and raw_model["top_k"] != trace.top_k:
        raise RoutingTraceError(
            origin,
            f"trace routes each token to top-{trace.top_k} experts but model.top_k is "
            f"{raw_model['top_k']} (allowed: {trace.top_k}, or leave model.top_k unset)",
        )
    model = dataclasses.replace(model, top_k=trace.top_k)
    seqs = np.unique(trace.seq_ids).size
    if seqs < 2:
        raise RoutingTraceError(
            origin, f"trace has {seqs} sequence(s); serving needs at least 2 (one to fit the estimators, one to serve)"
        )

    setup = InferenceSetup(
        sc,
        cluster,
        model,
        policies,
        ServingSpec(tuple(map(str, paths)), fold, train_fraction, requests, arrival, batching, slots, tl),
        trace,
        experts,
        algo,
    )
    # Memory: the expert slots of every MoE layer must fit the GPU beside the dense weights.
    cost = InferenceCostModel(model, cluster, trace.top_k)
    slots_eff = setup_slots(setup)
    dense_bytes = model.param_counts(experts_per_device=0).non_expert * model.dtype_bytes
    need = slots_eff * moe_layers * cost.expert_bytes + dense_bytes
    if need > cluster.gpu.memory_bytes:
        raise ConfigError(
            "serving.expert_slots",
            f"{slots_eff} experts x {moe_layers} layers x "
            f"{cost.expert_bytes / 1e6:.1f} MB + dense weights need {need / 1e9:.1f} GB "
            f"> {cluster.gpu.memory_bytes / 1e9:.0f} GB of {cluster.gpu.name}",
            "fewer slots",
        )
    # Every policy must construct with these sizes and its parameters.
    for p in policies:
        make_policy(setup, p, where=f"policies[{p.name}]")
    return setup


def setup_slots(setup: InferenceSetup) -> int:
    """Expert slots per device per layer: the scenario's, else the placement default."""
    E, N = setup.model.experts, setup.cluster.world_size
    need = -(-E // N)
    if setup.serving.expert_slots is not None:
        if setup.serving.expert_slots < need:
            raise ConfigError(
                "serving.expert_slots",
                f"{setup.serving.expert_slots} slots on {N} GPUs cannot hold {E} experts",
                f"an integer >= {need}",
            )
        return min(setup.serving.expert_slots, E)
    return min(2 * need, E)


def cost_model_params(setup: InferenceSetup) -> dict[str, float]:
    """FasterMoE's cost-model inputs from the scenario's hardware and model."""
    c, m = setup.cluster, setup.model
    if c.nodes > 1:
        # Each GPU's share of its NIC, the all-to-all bottleneck across nodes.
        net = c.nic.effective_bandwidth * c.nics_per_node / c.gpus_per_node
    else:
        net = c.nvlink.effective_bandwidth
    return {
        "token_bytes": float(m.d_model * m.dtype_bytes),
        "expert_bytes": float((2 * m.d_model * m.d_ff + m.d_ff + m.d_model) * m.dtype_bytes),
        "flops_per_token": float(4 * m.d_model * m.d_ff),
        "network_bandwidth": float(net),
        "weight_bandwidth": float(c.pcie.effective_bandwidth),
        "device_flops": float(c.gpu.flops(m.dtype) * c.compute.matmul_efficiency),
    }


def make_policy(setup: InferenceSetup, entry: PlacementEntry, where: str | None = None) -> PlacementPolicy:
    """A fresh policy object for one serving run (errors name ``policies[NAME].param``)."""
    params = dict(entry.params)
    if entry.name == "fastermoe-shadow":
        params = {**cost_model_params(setup), **params}
    try:
        return make_placement_policy(
            entry.name,
            num_experts=setup.model.experts,
            num_devices=setup.cluster.world_size,
            top_k=setup.top_k,
            max_experts_per_device=setup_slots(setup),
            **params,
        )
    except ConfigError as e:
        field_name = e.field.split(".", 1)[-1]
        raise ConfigError(f"{where or 'policies[' + entry.name + ']'}.{field_name}", e.problem, e.allowed) from None
