"""An inference scenario resolved and checked: the serving block, the routing traces,
the placement policies and their parameters (:func:`resolve_inference`).

Units: seconds, bytes, tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lina_sim.network.collectives import ALGORITHMS
from lina_sim.errors import ConfigError, RoutingTraceError
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.policies.placement import PlacementPolicy
from lina_sim.policies.registry import PLACEMENT_POLICIES, make_placement_policy
from lina_sim.serving.requests import (
    ArrivalSpec, BatchingSpec,
)
from lina_sim.config.scenario import Scenario
from lina_sim.workload.resolve import resolve_cluster_and_model
from lina_sim.serving.cost import InferenceCostModel
from lina_sim.routing.traces import RoutingTrace, load as load_trace
from lina_sim.workload.model import ModelSpec

SERVING_FIELDS = {
    "trace": "path of a .npz trace, or a list of them (concatenated)",
    "fold_experts": "true: map trace expert e to e mod model.experts",
    "train_fraction": "fraction of the trace's sequences that fit the estimators (0..1)",
    "requests": "number of requests to serve",
    "arrival": "{process: poisson, rate: REQ_PER_S} or {process: closed, concurrency: N}",
    "batching": "{token_budget: TOKENS, timeout: SECONDS}",
    "expert_slots": "experts of one layer each GPU can hold (null: the placement default)",
    "timeline_batches": "batches per policy recorded in the timeline",
}
# Placement-policy parameters the serving layer sets itself.
_RESERVED = ("num_experts", "num_devices", "top_k", "max_experts_per_device")


# ---------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------
@dataclass
class PlacementEntry:
    """One placement policy of a scenario: registry name, label, and parameters."""

    name: str
    label: str
    params: dict[str, Any]


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
            "kind": "inference", "name": self.scenario.name, "seed": self.scenario.seed,
            "cluster": dataclasses.asdict(self.cluster), "model": dataclasses.asdict(self.model),
            "policies": [{"name": p.name, "label": p.label, **p.params} for p in self.policies],
            "serving": {
                "trace": list(s.trace_paths), "trace_sha1": self.trace_digest(),
                "trace_tokens": self.trace.num_tokens, "trace_experts": self.trace.num_experts,
                "fold_experts": s.fold_experts, "train_fraction": s.train_fraction,
                "requests": s.requests, "arrival": dataclasses.asdict(s.arrival),
                "batching": dataclasses.asdict(s.batching), "expert_slots": s.expert_slots,
                "timeline_batches": s.timeline_batches,
            },
            "collectives": {"all_to_all": self.a2a_algo}, "compute": "roofline",
        }


def _mapping(v: Any, where: str, allowed: Any) -> Mapping:
    if not isinstance(v, Mapping):
        raise ConfigError(where, f"must be a mapping, got {v!r}", allowed)
    return v


def _number(v: Any, where: str, allowed: str, *, integer: bool = False, minimum: float | None = None,
            exclusive: bool = False, maximum: float | None = None) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
    if ok and integer and float(v) != int(v):
        ok = False
    if ok and minimum is not None and (v <= minimum if exclusive else v < minimum):
        ok = False
    if ok and maximum is not None and v > maximum:
        ok = False
    if not ok:
        raise ConfigError(where, f"got {v!r}", allowed)
    return int(v) if integer else float(v)


def _unknown(block: Mapping, where: str, known) -> None:
    for k in block:
        if k not in known:
            raise ConfigError(f"{where}.{k}", "unknown field", sorted(known))


def _arrival(v: Any) -> ArrivalSpec:
    allowed = "{process: poisson, rate: R > 0 req/s} or {process: closed, concurrency: N >= 1}"
    b = _mapping(v, "serving.arrival", allowed)
    process = b.get("process", "poisson")
    if process == "poisson":
        _unknown(b, "serving.arrival", ("process", "rate"))
        if "rate" not in b:
            raise ConfigError("serving.arrival.rate", "missing", "a number > 0 (requests/s)")
        return ArrivalSpec("poisson", rate=_number(b["rate"], "serving.arrival.rate", "a number > 0 (requests/s)",
                                                   minimum=0, exclusive=True))
    if process == "closed":
        _unknown(b, "serving.arrival", ("process", "concurrency"))
        if "concurrency" not in b:
            raise ConfigError("serving.arrival.concurrency", "missing", "an integer >= 1")
        return ArrivalSpec("closed", concurrency=_number(b["concurrency"], "serving.arrival.concurrency",
                                                         "an integer >= 1", integer=True, minimum=1))
    raise ConfigError("serving.arrival.process", f"unknown arrival process {process!r}", ["poisson", "closed"])


def _batching(v: Any) -> BatchingSpec:
    b = _mapping(v if v is not None else {}, "serving.batching", "{token_budget: N, timeout: S}")
    _unknown(b, "serving.batching", ("token_budget", "timeout"))
    budget = _number(b.get("token_budget", 8192), "serving.batching.token_budget", "an integer >= 1 (tokens)",
                     integer=True, minimum=1)
    timeout = _number(b.get("timeout", 0.01), "serving.batching.timeout", "a number >= 0 (seconds)", minimum=0)
    return BatchingSpec(budget, timeout)


def _trace_paths(v: Any, source: str) -> tuple[Path, ...]:
    allowed = "a .npz trace path, or a list of them"
    if v is None:
        raise ConfigError("serving.trace", "missing", allowed)
    items = v if isinstance(v, list) else [v]
    if not items or not all(isinstance(p, str) and p for p in items):
        raise ConfigError("serving.trace", f"got {v!r}", allowed)
    out = []
    for p in items:
        path = Path(p)
        if not path.is_absolute() and not path.exists() and source not in ("<memory>", ""):
            # Relative to the working directory first; else beside the scenario file or
            # one level up (scenarios/ sits beside traces/ in the repository).
            here = Path(source).resolve().parent
            path = next((c for c in (here / p, here.parent / p) if c.exists()), path)
        out.append(path)
    return tuple(out)


def _load_traces(paths: tuple[Path, ...]) -> RoutingTrace:
    from lina_sim.routing.traces import concatenate

    traces = [load_trace(p) for p in paths]  # RoutingTraceError names the file
    return traces[0] if len(traces) == 1 else concatenate(traces)


def parse_placement_policies(entries: Any, where: str = "policies") -> list[PlacementEntry]:
    allowed = sorted(PLACEMENT_POLICIES)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(where, "must be a non-empty list of placement policy names or {name: ..., params}", allowed)
    out, labels = [], set()
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": e}
        if not isinstance(e, Mapping) or "name" not in e:
            raise ConfigError(f"{where}[{i}]", "must be a policy name or a mapping with a name", allowed)
        name = str(e["name"])
        if name not in PLACEMENT_POLICIES:
            raise ConfigError(f"{where}[{i}].name", f"unknown placement policy {name!r}", allowed)
        params = {k: v for k, v in e.items() if k not in ("name", "label")}
        for k in params:
            if k in _RESERVED:
                raise ConfigError(f"{where}[{name}].{k}", "is set by the scenario (model, cluster, trace, "
                                  "serving.expert_slots), not per policy")
        label = str(e.get("label", name))
        if label in labels:
            raise ConfigError(f"{where}[{i}].label", f"duplicate label {label!r}: give each entry its own label")
        labels.add(label)
        out.append(PlacementEntry(name, label, params))
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
    cluster, model = resolve_cluster_and_model(d)
    policies = parse_placement_policies(d.get("policies"))

    comp = d.get("compute")
    if comp is not None:
        c = _mapping(comp, "compute", "{model: roofline}")
        _unknown(c, "compute", ("model",))
        if c.get("model", "roofline") != "roofline":
            raise ConfigError("compute.model", f"{c.get('model')!r} is not supported for inference", ["roofline"])
    coll = d.get("collectives") or {}
    coll = _mapping(coll, "collectives", "{all_to_all: direct|hierarchical}")
    _unknown(coll, "collectives", ("all_to_all",))
    algo = coll.get("all_to_all", "direct")
    if algo not in ALGORITHMS["all_to_all"]:
        raise ConfigError("collectives.all_to_all", f"unknown algorithm {algo!r}", ALGORITHMS["all_to_all"])

    sv = _mapping(d.get("serving"), "serving", sorted(SERVING_FIELDS)) if "serving" in d else None
    if sv is None:
        raise ConfigError("serving", "missing", sorted(SERVING_FIELDS))
    _unknown(sv, "serving", SERVING_FIELDS)
    fold = sv.get("fold_experts", False)
    if not isinstance(fold, bool):
        raise ConfigError("serving.fold_experts", f"got {fold!r}", ["true", "false"])
    train_fraction = _number(sv.get("train_fraction", 0.3), "serving.train_fraction",
                             "a number in (0, 1)", minimum=0, exclusive=True)
    if train_fraction >= 1:
        raise ConfigError("serving.train_fraction", f"got {train_fraction!r}", "a number in (0, 1)")
    requests = _number(sv.get("requests", 1000), "serving.requests", "an integer >= 1", integer=True, minimum=1)
    if "arrival" not in sv:
        raise ConfigError("serving.arrival", "missing", "{process: poisson, rate: R} or {process: closed, concurrency: N}")
    arrival = _arrival(sv["arrival"])
    batching = _batching(sv.get("batching"))
    slots = sv.get("expert_slots")
    if slots is not None:
        slots = _number(slots, "serving.expert_slots", "an integer >= 1 or null", integer=True, minimum=1)
    tl = _number(sv.get("timeline_batches", 2), "serving.timeline_batches", "an integer >= 0", integer=True, minimum=0)
    paths = _trace_paths(sv.get("trace"), sc.source)

    # The trace against the model: layers, experts (folding), top-k.
    trace = _load_traces(paths)
    origin = trace.origin if len(paths) == 1 else " + ".join(map(str, paths))
    moe_layers = len(model.moe_layer_ids)
    if trace.num_layers != moe_layers:
        raise RoutingTraceError(origin, f"trace has {trace.num_layers} MoE layers but model {model.name!r} has "
                                 f"{moe_layers} (set model.layers or model.moe_layers to match)")
    E = model.experts
    experts = trace.experts.astype(np.int64)
    if trace.num_experts != E:
        if not fold:
            raise RoutingTraceError(origin, f"trace has {trace.num_experts} experts but model.experts is {E} "
                                     f"(use a trace recorded with {E} experts, or set serving.fold_experts: true "
                                     f"to map expert e to e mod {E})")
        if trace.num_experts % E:
            raise RoutingTraceError(origin, f"cannot fold {trace.num_experts} experts onto model.experts={E}: "
                                     f"not a multiple (allowed: a divisor of {trace.num_experts})")
        experts = experts % E
    raw_model = d["model"] if isinstance(d["model"], Mapping) else {}
    if "top_k" in raw_model and raw_model["top_k"] != trace.top_k:
        raise RoutingTraceError(origin, f"trace routes each token to top-{trace.top_k} experts but model.top_k is "
                                 f"{raw_model['top_k']} (allowed: {trace.top_k}, or leave model.top_k unset)")
    model = dataclasses.replace(model, top_k=trace.top_k)
    seqs = np.unique(trace.seq_ids).size
    if seqs < 2:
        raise RoutingTraceError(origin, f"trace has {seqs} sequence(s); serving needs at least 2 (one to fit the "
                                 "estimators, one to serve)")

    setup = InferenceSetup(sc, cluster, model, policies,
                           ServingSpec(tuple(map(str, paths)), fold, train_fraction, requests, arrival, batching,
                                       slots, tl),
                           trace, experts, algo)
    # Memory: the expert slots of every MoE layer must fit the GPU beside the dense weights.
    cost = InferenceCostModel(model, cluster, trace.top_k)
    slots_eff = setup_slots(setup)
    dense_bytes = model.param_counts(experts_per_device=0).non_expert * model.dtype_bytes
    need = slots_eff * moe_layers * cost.expert_bytes + dense_bytes
    if need > cluster.gpu.memory_bytes:
        raise ConfigError("serving.expert_slots", f"{slots_eff} experts x {moe_layers} layers x "
                          f"{cost.expert_bytes / 1e6:.1f} MB + dense weights need {need / 1e9:.1f} GB "
                          f"> {cluster.gpu.memory_bytes / 1e9:.0f} GB of {cluster.gpu.name}",
                          "fewer slots")
    # Every policy must construct with these sizes and its parameters.
    for i, p in enumerate(policies):
        make_policy(setup, p, where=f"policies[{p.name}]")
    return setup


def setup_slots(setup: InferenceSetup) -> int:
    """Expert slots per device per layer: the scenario's, else the placement default."""
    E, N = setup.model.experts, setup.cluster.world_size
    need = -(-E // N)
    if setup.serving.expert_slots is not None:
        if setup.serving.expert_slots < need:
            raise ConfigError("serving.expert_slots", f"{setup.serving.expert_slots} slots on {N} GPUs cannot hold "
                              f"{E} experts", f"an integer >= {need}")
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
        return make_placement_policy(entry.name, num_experts=setup.model.experts,
                                     num_devices=setup.cluster.world_size, top_k=setup.top_k,
                                     max_experts_per_device=setup_slots(setup), **params)
    except ConfigError as e:
        field_name = e.field.split(".", 1)[-1]
        raise ConfigError(f"{where or 'policies[' + entry.name + ']'}.{field_name}", e.problem, e.allowed) from None
