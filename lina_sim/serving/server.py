"""Inference serving, trace-driven: requests, batches, per-layer placement, latency.

A single-model server on ``N`` GPUs serves requests (each one sequence of an
expert-selection trace) in dynamically formed batches (:mod:`lina_sim.serving.requests`). One
batch runs the forward pass of every layer on all GPUs, its tokens split data-parallel.
Per MoE layer ``l`` (:class:`PolicyServer`):

1. dense compute: attention and gate (:mod:`lina_sim.serving.cost`, roofline);
2. the gate: per-device, per-expert token counts are the trace's real choices of the
   batch's tokens at ``l`` (``ideal``: spread uniformly, see the placement package);
3. the placement (:func:`~lina_sim.policies.placement.decide_layer`): planned before the
   gate, refined after it (Lina's phase 2);
4. weight swaps: an expert a device must serve but does not hold is loaded from host
   memory over its PCIe link (:class:`ExpertCache`: per layer, ``expert_slots`` experts
   per device, least recently used evicted; one PCIe queue per device). Lina's phase-1
   swaps of layer ``l`` are issued when layer ``l-1``'s gate has run (its path estimate
   needs it) and overlap layer ``l-1``'s all-to-alls and FFN and layer ``l``'s attention;
   policies that plan from earlier batches only issue all their swaps when the batch is
   formed (:attr:`PlacementPolicy.plans_within_batch`). Phase-2 swaps are issued after
   layer ``l``'s gate, overlap only its dispatch, and so sit on the critical path. A
   device starts its expert FFN when both its tokens and its weights are there. PCIe
   traffic is not put on the simulated network: host-to-device copies and the
   all-to-all's GPU-NIC traffic are assumed not to contend;
5. the dispatch all-to-all: bytes ``s -> d`` = tokens ``s`` sends ``d`` under the final
   placement × d_model × dtype bytes, timed alone on the simulated network
   (:class:`~lina_sim.network.serving_a2a.AllToAllTimer`, exact for the fluid network);
6. expert FFN per device from its token load; the slowest device gates the combine;
7. the combine all-to-all: the transposed matrix.

On a cluster of CPU ranks sharing one host's cores (``cluster.host``), each compute phase
ends when processor sharing of those cores says it does (all ranks start it together).

Weights start with the static layout resident (every expert, when the slots hold them
all). Every policy serves the identical
request stream (same sequences, same arrival times for open loop). Placement decisions
depend on gate counts only, never on timings, so the runner advances all policies' servers
in lockstep and times every all-to-all of the step in one vectorised call.

Units: seconds, bytes, tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from lina_sim.network.collectives import ALGORITHMS
from lina_sim.errors import ConfigError, RoutingTraceError
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.policies.placement import Placement, PlacementPolicy, decide_layer, token_sources
from lina_sim.policies.registry import PLACEMENT_POLICIES, make_placement_policy
from lina_sim.hardware.processors import shared_finish_times
from lina_sim.serving.requests import (
    ArrivalSpec, Batcher, BatchingSpec, Request, RequestPool, make_arrivals,
)
from lina_sim.config.scenario import Scenario
from lina_sim.workload.resolve import resolve_cluster_and_model
from lina_sim.serving.cost import InferenceCostModel
from lina_sim.network.serving_a2a import AllToAllTimer
from lina_sim.results.timeline import Event, Timeline
from lina_sim.routing.traces import RoutingTrace, load as load_trace
from lina_sim.workload.graph import ModelSpec

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


# ---------------------------------------------------------------------------------------
# Expert residency
# ---------------------------------------------------------------------------------------
class ExpertCache:
    """Which experts' weights each device holds, per MoE layer: ``slots`` per device per
    layer, least recently used evicted first. Starts with ``initial`` resident; when the
    slots hold every expert, the server loads them all at start-up, as a server whose
    memory fits the whole model does, so nothing is ever swapped."""

    def __init__(self, layers: int, initial: Placement, slots: int):
        self.slots = slots
        everything = list(range(initial.num_experts))
        start = [everything if slots >= initial.num_experts else sorted(r) for r in initial.resident]
        # Per layer, per device: expert ids, least recently used first.
        self._held = [[list(h) for h in start] for _ in range(layers)]

    def load(self, layer: int, placement: Placement) -> np.ndarray:
        """Make ``placement``'s experts resident; returns ``int64 [devices]`` experts
        each device had to swap in."""
        held = self._held[layer]
        out = np.zeros(len(held), dtype=np.int64)
        for dev, need in enumerate(placement.resident):
            cur = held[dev]
            keep = [e for e in cur if e not in need]
            out[dev] = len(need) - (len(cur) - len(keep))
            # The placement's experts become most recent; evict from the least recent.
            held[dev] = keep[max(0, len(keep) + len(need) - self.slots):] + sorted(need)
        return out


# ---------------------------------------------------------------------------------------
# One policy's server
# ---------------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """One batch, decided (placements, swaps, token loads) but not yet timed."""

    index: int
    start: float
    requests: list[Request]
    tokens: np.ndarray  # [devices]
    keys: np.ndarray  # [devices] attention keys
    send: np.ndarray  # [layers, N, N] tokens dispatched s -> d
    ffn: np.ndarray  # [layers, N] expert FFN seconds
    swap1: np.ndarray  # [layers, N] experts swapped in by phase 1
    swap2: np.ndarray  # [layers, N] by phase 2
    replanned: np.ndarray  # [layers] bool
    imbalance: np.ndarray  # [layers] max device load / mean


@dataclass
class BatchRecord:
    """Timing of one served batch (s)."""

    index: int
    start: float
    end: float
    tokens: int
    requests: int
    layer_moe: np.ndarray  # [layers] gate end -> combine end
    dispatch: np.ndarray  # [layers]
    combine: np.ndarray  # [layers]
    ffn: np.ndarray  # [layers] slowest device's expert FFN
    exposed_swap: np.ndarray  # [layers]
    swapped: int
    replanned: int
    imbalance: np.ndarray


@dataclass
class PolicyServing:
    """Everything one policy's serving run produced."""

    entry: PlacementEntry
    requests: list[Request]
    batches: list[BatchRecord]
    timeline: Timeline
    phase2_checks: int
    phase2_fired: int
    wall_s: float = 0.0

    def latencies(self) -> np.ndarray:
        return np.array([r.latency for r in self.requests])


class PolicyServer:
    """One placement policy serving the request stream (see the module docstring)."""

    def __init__(self, setup: InferenceSetup, entry: PlacementEntry, shared: "ServingInputs"):
        self.setup, self.entry, self.shared = setup, entry, shared
        self.policy = make_policy(setup, entry)
        self.policy.fit(shared.train_experts)
        L = shared.layers
        self.cache = ExpertCache(L, self.policy.static_placement(), setup_slots(setup))
        self.batcher = Batcher(setup.serving.batching)
        self.arrivals = make_arrivals(setup.serving.arrival, setup.serving.requests, setup.scenario.seed)
        self.requests: list[Request] = []
        self._admit(self.arrivals.initial())
        self.free_at = 0.0
        self.pcie_free = np.zeros(setup.cluster.world_size)
        self.records: list[BatchRecord] = []
        self.timeline = Timeline()
        self.within_batch = self.policy.plans_within_batch
        self.wall = 0.0
        # On a shared host (an emulated testbed) ranks that compute at once divide its cores.
        self.host_cores = setup.cluster.host.cores if setup.cluster.shares_cores else None

    def _admit(self, times: list[float]) -> None:
        new = []
        for t in times:
            rid = len(self.requests)
            seq = int(self.shared.request_seqs[rid])
            r = Request(rid, seq, int(self.shared.pool.lengths[seq]), float(t))
            self.requests.append(r)
            new.append(r)
        self.batcher.add_future(new)

    @property
    def done(self) -> bool:
        return not self.batcher.pending()

    def prepare(self) -> BatchPlan:
        """Form the next batch and run the placement protocol on every layer."""
        t0 = time.perf_counter()
        sh, N, E = self.shared, self.setup.cluster.world_size, self.setup.model.experts
        start, reqs = self.batcher.next_batch(self.free_at)
        rows = sh.pool.token_index([r.seq for r in reqs])
        ex = sh.serve_experts[rows]  # [T, L, k]
        T, L, k = ex.shape
        src = token_sources(T, N)
        tokens = np.bincount(src, minlength=N)
        keys = np.bincount(src, weights=sh.serve_seq_len[rows], minlength=N)
        # counts_by_source for every layer at once: [L, N, E].
        flat = ((np.arange(L)[None, :, None] * N + src[:, None, None]) * E + ex).ravel()
        cbs_all = np.bincount(flat, minlength=L * N * E).reshape(L, N, E)
        send = np.zeros((L, N, N), dtype=np.int64)
        assign = np.zeros((L, E, N), dtype=np.int64)
        swap1 = np.zeros((L, N), dtype=np.int64)
        swap2 = np.zeros((L, N), dtype=np.int64)
        replanned = np.zeros(L, dtype=bool)
        for l in range(L):
            dec = decide_layer(self.policy, l, ex[:, :l], cbs_all[l])
            swap1[l] = self.cache.load(l, dec.planned)
            if dec.replanned:
                swap2[l] = self.cache.load(l, dec.final)
                replanned[l] = True
            send[l] = dec.final.send_matrix(dec.counts_by_source)
            assign[l] = dec.final.assign(dec.counts)
        load = assign.sum(axis=1)  # [L, N] expert tokens per device
        imbalance = load.max(axis=1) / np.maximum(load.mean(axis=1), 1e-12)
        ffn = sh.cost.expert_ffn(assign)
        self.wall += time.perf_counter() - t0
        return BatchPlan(len(self.records), start, reqs, tokens, keys, send, ffn, swap1, swap2, replanned, imbalance)

    def complete(self, plan: BatchPlan, dispatch: np.ndarray, combine: np.ndarray) -> None:
        """Time the batch given its all-to-all times ``[layers]`` each, and advance."""
        t0 = time.perf_counter()
        cost, N = self.shared.cost, self.setup.cluster.world_size
        L = plan.send.shape[0]
        record_tl = plan.index < self.setup.serving.timeline_batches
        ev: list[Event] = []
        t = plan.start
        pcie_free = np.maximum(self.pcie_free, plan.start)
        on_host = functools.partial(shared_finish_times, cores=self.host_cores)
        embed = on_host(cost.embed(plan.tokens))
        if record_tl:
            ev += _per_rank(embed, t, "compute", "embed", "compute", -1)
        t += float(embed.max())
        # When each layer's phase-1 swaps can be issued (module docstring, step 4).
        issue = plan.start
        moe, exposed = np.zeros(L), np.zeros(L)
        ffn = np.stack([on_host(f) for f in plan.ffn])
        ffn_max = ffn.max(axis=1)
        dense_first = on_host(cost.dense_layer(plan.tokens, plan.keys, first=True))
        dense_rest = on_host(cost.dense_layer(plan.tokens, plan.keys, first=False))
        for l in range(L):
            dense = dense_first if l == 0 else dense_rest
            if record_tl:
                ev += _per_rank(dense, t, "compute", f"L{l}.attn+gate", "compute", l)
            gate_end = t + float(dense.max())
            ready = np.full(N, -np.inf)
            for n_swaps, when, name in ((plan.swap1[l], issue, "phase1"), (plan.swap2[l], gate_end, "phase2")):
                if n_swaps.any():
                    s0 = np.maximum(pcie_free, when)
                    s1 = s0 + cost.swap_time(n_swaps)
                    has = n_swaps > 0
                    pcie_free = np.where(has, s1, pcie_free)
                    ready = np.where(has, s1, ready)
                    if record_tl:
                        ev += [Event(int(r), "pcie", f"L{l}.swap.{name}", "swap", float(s0[r]), float(s1[r]), l,
                                     bytes=float(n_swaps[r] * cost.expert_bytes)) for r in np.flatnonzero(has)]
            d_end = gate_end + dispatch[l]
            f_start = np.maximum(d_end, ready)
            f_end = f_start + ffn[l]
            c_start = float(f_end.max())
            c_end = c_start + combine[l]
            exposed[l] = c_start - (d_end + ffn_max[l])
            moe[l] = c_end - gate_end
            if record_tl:
                sent = plan.send[l] * cost.token_bytes
                np.fill_diagonal(sent, 0)
                out_b, in_b = sent.sum(axis=1), sent.sum(axis=0)
                ev += [Event(r, "a2a", f"L{l}.dispatch", "all_to_all", gate_end, d_end, l, bytes=float(out_b[r]))
                       for r in range(N)]
                ev += [Event(r, "compute", f"L{l}.ffn", "compute", float(f_start[r]), float(f_end[r]), l)
                       for r in range(N)]
                ev += [Event(r, "a2a", f"L{l}.combine", "all_to_all", c_start, c_end, l, bytes=float(in_b[r]))
                       for r in range(N)]
            if self.within_batch:
                issue = gate_end  # the next layer's estimate needs this layer's gate
            t = c_end
        head = on_host(cost.head(plan.tokens))
        if record_tl:
            ev += _per_rank(head, t, "compute", "head", "compute", L)
            self.timeline.extend(ev)
        end = t + float(head.max())
        self.pcie_free = pcie_free
        self.free_at = end
        for r in plan.requests:
            r.start, r.end, r.batch = plan.start, end, plan.index
        self.records.append(BatchRecord(
            plan.index, plan.start, end, int(plan.tokens.sum()), len(plan.requests), moe,
            np.asarray(dispatch, float), np.asarray(combine, float), ffn_max, exposed,
            int(plan.swap1.sum() + plan.swap2.sum()), int(plan.replanned.sum()), plan.imbalance))
        self._admit(self.arrivals.on_complete(len(plan.requests), end))
        self.wall += time.perf_counter() - t0

    def result(self) -> PolicyServing:
        return PolicyServing(self.entry, self.requests, self.records, self.timeline,
                             self.policy.phase2_checks, self.policy.phase2_fired, self.wall)


def _per_rank(seconds: np.ndarray, start: float, stream: str, op: str, kind: str, layer: int) -> list[Event]:
    return [Event(r, stream, op, kind, start, start + float(s), layer) for r, s in enumerate(seconds)]


@dataclass
class ServingInputs:
    """Read-only inputs every policy's server shares, built by :func:`serving_inputs`.

    ``serve_experts`` is the whole trace (the pool's token rows index into it); the rows
    actually served are ``pool.token_index(...)`` of the pool's sequences (or of
    ``request_seqs`` for the requests of this run). ``train_experts`` holds only the
    training sequences' rows."""

    layers: int
    train_experts: np.ndarray  # [tokens, layers, k] that fit the estimators
    serve_experts: np.ndarray  # [tokens, layers, k] of the trace (rows indexed by the pool)
    serve_seq_len: np.ndarray  # [tokens] length of each token's sequence
    pool: RequestPool
    request_seqs: np.ndarray  # [requests] pool index of each request's sequence
    cost: InferenceCostModel


def serving_inputs(setup: InferenceSetup) -> ServingInputs:
    """Split the trace's sequences into a training part (``serving.train_fraction``, to
    fit the estimators) and a served pool, draw the request stream's sequences from the
    pool, and build the cost model: everything the policies' servers share."""
    ex = setup.experts
    seq_ids = setup.trace.seq_ids
    cut = np.flatnonzero(np.diff(seq_ids) != 0) + 1
    starts = np.concatenate(([0], cut))
    lengths = np.diff(np.concatenate((starts, [seq_ids.size])))
    rng = np.random.default_rng([setup.scenario.seed, 1])
    order = rng.permutation(starts.size)
    n_train = min(max(1, int(round(setup.serving.train_fraction * starts.size))), starts.size - 1)
    train, serve = np.sort(order[:n_train]), np.sort(order[n_train:])
    train_rows = np.concatenate([np.arange(starts[s], starts[s] + lengths[s]) for s in train])
    seq_len = np.repeat(lengths, lengths).astype(np.float64)
    pool = RequestPool(starts[serve], lengths[serve], seed=setup.scenario.seed)
    request_seqs = np.array([pool.draw() for _ in range(setup.serving.requests)], dtype=np.int64)
    return ServingInputs(ex.shape[1], ex[train_rows], ex, seq_len, pool, request_seqs,
                   InferenceCostModel(setup.model, setup.cluster, setup.top_k))


# ---------------------------------------------------------------------------------------
# Running a scenario
# ---------------------------------------------------------------------------------------
def serve_policies(setup: InferenceSetup) -> list[PolicyServing]:
    """Serve the request stream with every policy, in lockstep (see module docstring)."""
    shared = serving_inputs(setup)
    timer = AllToAllTimer(setup.cluster, algo=setup.a2a_algo)
    servers = [PolicyServer(setup, e, shared) for e in setup.policies]
    token_bytes = shared.cost.token_bytes
    while True:
        active = [s for s in servers if not s.done]
        if not active:
            break
        plans = [s.prepare() for s in active]
        L = plans[0].send.shape[0]
        stack = np.concatenate([np.concatenate([p.send, p.send.transpose(0, 2, 1)]) for p in plans])
        t0 = time.perf_counter()
        times = timer.times(stack.astype(np.float64) * token_bytes).reshape(len(plans), 2, L)
        share = (time.perf_counter() - t0) / len(plans)
        for s, p, tm in zip(active, plans, times):
            s.wall += share
            s.complete(p, tm[0], tm[1])
    return [s.result() for s in servers]


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def run_inference(setup: InferenceSetup) -> tuple[pd.DataFrame, list[PolicyServing]]:
    """Serve the scenario's requests with every placement policy; one row per policy.

    Columns: scenario, policy, policy_name, cluster, nodes, gpus, model, experts, top_k,
    expert_slots (per GPU per layer), trace, requests, batches, arrival, arrival_rate, concurrency, token_budget, timeout_s,
    latency_{mean,p50,p95,p99}_s, their ratios ``latency_{p50,p95,p99}_vs_static`` (NaN
    without a ``static`` entry) and ``latency_p95_vs_ideal``, batch_time_{mean,p50,p95}_s,
    batch_tokens_mean, moe_layer_p95_s, a2a_p95_s (dispatch + combine of one layer, p95
    over batches and layers), a2a_tail_layer_max_s (the worst layer's p95), ffn_p95_s,
    exposed_swap_per_batch_s, swapped_experts_per_batch, load_imbalance_mean (busiest
    device's expert tokens over the mean), phase2_checks, phase2_fired, phase2_rate,
    throughput_rps, makespan_s, sim_wall_s, and the swept fields.
    """
    runs = serve_policies(setup)
    s = setup.serving
    rows = []
    for run in runs:
        lat = run.latencies()
        b = run.batches
        bt = np.array([r.end - r.start for r in b])
        moe = np.concatenate([r.layer_moe for r in b])
        a2a = np.stack([r.dispatch + r.combine for r in b])  # [batches, layers]
        makespan = max(r.end for r in b)
        rows.append({
            "scenario": setup.scenario.name, "policy": run.entry.label, "policy_name": run.entry.name,
            "cluster": setup.cluster.name, "nodes": setup.cluster.nodes, "gpus": setup.cluster.world_size,
            "model": setup.model.name, "experts": setup.model.experts, "top_k": setup.top_k,
            "expert_slots": setup_slots(setup),
            "trace": "+".join(Path(p).stem for p in s.trace_paths), "requests": len(run.requests),
            "batches": len(b), "arrival": s.arrival.process, "arrival_rate": s.arrival.rate,
            "concurrency": s.arrival.concurrency, "token_budget": s.batching.token_budget,
            "timeout_s": s.batching.timeout,
            "latency_mean_s": float(lat.mean()), "latency_p50_s": _pct(lat, 50),
            "latency_p95_s": _pct(lat, 95), "latency_p99_s": _pct(lat, 99),
            "batch_time_mean_s": float(bt.mean()), "batch_time_p50_s": _pct(bt, 50), "batch_time_p95_s": _pct(bt, 95),
            "batch_tokens_mean": float(np.mean([r.tokens for r in b])),
            "moe_layer_p95_s": _pct(moe, 95), "a2a_p95_s": _pct(a2a.ravel(), 95),
            "a2a_tail_layer_max_s": float(layer_a2a_tail(run).max()),
            "ffn_p95_s": _pct(np.concatenate([r.ffn for r in b]), 95),
            "exposed_swap_per_batch_s": float(np.mean([r.exposed_swap.sum() for r in b])),
            "swapped_experts_per_batch": float(np.mean([r.swapped for r in b])),
            "load_imbalance_mean": float(np.mean(np.concatenate([r.imbalance for r in b]))),
            "phase2_checks": run.phase2_checks, "phase2_fired": run.phase2_fired,
            "phase2_rate": run.phase2_fired / run.phase2_checks if run.phase2_checks else 0.0,
            "throughput_rps": len(run.requests) / makespan if makespan > 0 else float("nan"),
            "makespan_s": makespan, "sim_wall_s": run.wall_s,
            **dict(setup.scenario.swept),
        })
    df = pd.DataFrame(rows)
    ratios = (("static", "p50"), ("static", "p95"), ("static", "p99"), ("ideal", "p95"))
    for base, q in ratios:
        ref = df[df["policy_name"] == base]
        col = f"latency_{q}_s"
        df[f"latency_{q}_vs_{base}"] = df[col] / float(ref[col].iloc[0]) if len(ref) else float("nan")
    return df, runs


def layer_a2a_tail(run: PolicyServing, q: float = 95) -> np.ndarray:
    """``[layers]`` the q-th percentile over batches of each layer's dispatch + combine (s)."""
    a2a = np.stack([r.dispatch + r.combine for r in run.batches])
    return np.percentile(a2a, q, axis=0)
