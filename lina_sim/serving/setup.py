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
from lina_sim.hardware.machine import available_memory, gigabytes
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.network.collectives import ALGORITHMS, algorithm_field
from lina_sim.policies.placement import PlacementPolicy
from lina_sim.policies.registry import PolicyEntry, make_placement_policy, policy_entries
from lina_sim.routing.traces import RoutingTrace, concatenate
from lina_sim.routing.traces import load as load_trace
from lina_sim.serving.cost import FFN_KERNELS, InferenceCostModel
from lina_sim.serving.requests import ArrivalSpec, BatchingSpec
from lina_sim.workload.model import ModelSpec
from lina_sim.workload.resolve import resolve_cluster_and_model

# ``serving.domain``: every domain in one request stream, or each domain on its own.
MIXED, EACH = "mixed", "each"


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
    "domain": Field(
        str,
        MIXED,
        help="which text domains the requests come from: mixed (every trace's sequences in one "
        "stream), one domain's name (a trace's dataset), or each (every domain served on its own, "
        "one result row per domain and policy)",
    ),
    "ffn": Field(
        str,
        "grouped",
        choices=FFN_KERNELS,
        help="how a GPU runs its experts' FFN: grouped (one grouped GEMM per device, vLLM's fused MoE) or "
        "per-expert (three kernels per expert, DeepSpeed-era)",
    ),
    "drop_incomplete": Field(
        bool,
        False,
        help="true: drop the tokens of a JSON trace that lack a record at some layer (the count is kept "
        "in the trace's metadata); false: refuse such a trace",
    ),
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
    domain: str = MIXED
    ffn: str = "grouped"
    drop_incomplete: bool = False


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
    # The text domain of each token (index into ``domain_names``: each trace's dataset).
    domain_of_token: np.ndarray | None = None
    domain_names: tuple[str, ...] = ()

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
                "domain": s.domain,
                "ffn": s.ffn,
                "drop_incomplete": s.drop_incomplete,
            },
            "collectives": {"all_to_all": self.a2a_algo},
            "compute": "roofline",
        }

    def served_domains(self) -> list[str]:
        """The domains this scenario serves, one request stream each: ``["mixed"]``, one
        domain's name, or (``serving.domain: each``) every domain of the traces."""
        d = self.serving.domain
        return list(self.domain_names) if d == EACH else [d]

    def for_domain(self, domain: str) -> InferenceSetup:
        """This setup serving only ``domain``'s sequences (``mixed``: all of them). The
        estimators are then fit on that domain's own training slice, as a deployment that
        serves one kind of text would fit them."""
        if domain == MIXED:
            return dataclasses.replace(self, serving=dataclasses.replace(self.serving, domain=MIXED))
        keep = self.domain_of_token == self.domain_names.index(domain)
        t = self.trace
        trace = dataclasses.replace(
            t,
            experts=t.experts[keep],
            seq_ids=t.seq_ids[keep],
            probs=None if t.probs is None else t.probs[keep],
            metadata={**t.metadata, "dataset": domain},
        )
        return dataclasses.replace(
            self,
            serving=dataclasses.replace(self.serving, domain=domain),
            trace=trace,
            experts=self.experts[keep],
            domain_of_token=self.domain_of_token[keep],
        )


def _trace_paths(v: str | list[str], source: str) -> tuple[Path, ...]:
    return tuple(beside(p, source) for p in (v if isinstance(v, list) else [v]))


def _load_traces(
    paths: tuple[Path, ...], drop_incomplete: bool = False
) -> tuple[RoutingTrace, np.ndarray, tuple[str, ...]]:
    """The traces concatenated, each token's domain (index into the names) and the
    domain names: each trace's ``dataset`` metadata, else its file name; traces of the
    same dataset form one domain. ``drop_incomplete``: see ``serving.drop_incomplete``."""
    traces = [load_trace(p, drop_incomplete=drop_incomplete) for p in paths]  # RoutingTraceError names the file
    names = [str(t.metadata.get("dataset") or Path(p).stem) for t, p in zip(traces, paths)]
    uniq = tuple(dict.fromkeys(names))
    domain = np.concatenate([np.full(t.num_tokens, uniq.index(n), dtype=np.int64) for t, n in zip(traces, names)])
    return (traces[0] if len(traces) == 1 else concatenate(traces)), domain, uniq


def _check_domain(value: str, names: tuple[str, ...], domain: np.ndarray, seq_ids: np.ndarray) -> None:
    """``serving.domain`` against the traces' domains; a served domain needs two sequences
    (one to fit the estimators, one to serve)."""
    allowed = [MIXED, EACH, *names]
    if value not in allowed:
        raise ConfigError("serving.domain", f"got {value!r}: the traces hold domains {', '.join(names)}", allowed)
    for i, name in enumerate(names):
        if value in (EACH, name) and np.unique(seq_ids[domain == i]).size < 2:
            raise ConfigError(
                "serving.domain", f"domain {name!r} has fewer than 2 sequences (one fits the estimators)", allowed
            )


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


# The serving all-to-all timer works on a batch's [N, N] send matrix: the float64 matrix,
# the rank-pair indices (2 x int64, the array a 100,000-GPU run failed to allocate at
# 149 GiB) and the pairs' path kinds and weights, 64 B per ordered pair in all.
SERVING_BYTES_PER_PAIR = 64.0
SERVING_FIXED_BYTES = 300e6  # traces, requests and one batch's bookkeeping (about 220 MB at 128 GPUs)


def check_serving_memory(cluster) -> None:
    """Refuse, before anything is built, a serving cluster whose per-batch all-to-all
    arrays would not fit this machine's available memory, naming the node count that
    fits."""
    have = available_memory()
    if have is None:
        return
    n = cluster.world_size

    def need(gpus: int) -> float:
        return SERVING_FIXED_BYTES + gpus * gpus * SERVING_BYTES_PER_PAIR

    if need(n) <= have:
        return
    fits = (
        int(((have - SERVING_FIXED_BYTES) / SERVING_BYTES_PER_PAIR) ** 0.5) // cluster.gpus_per_node
        if have > SERVING_FIXED_BYTES
        else 0
    )
    raise ConfigError(
        "cluster.nodes",
        f"serving {n} GPUs needs about {gigabytes(need(n))} of memory (a {n} x {n} all-to-all per batch, "
        f"{SERVING_BYTES_PER_PAIR:.0f} B per rank pair); this machine has {gigabytes(have)} available",
        f"cluster.nodes <= {fits} ({fits * cluster.gpus_per_node} GPUs)" if fits else "none",
    )


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
    check_serving_memory(cluster)
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
    raw_batching = sv["batching"] or {}
    batching = BatchingSpec(**check_fields(raw_batching, declared(BatchingSpec), "serving.batching"))
    if batching.tokens_per_gpu is not None and "token_budget" in raw_batching:
        raise ConfigError(
            "serving.batching.tokens_per_gpu",
            "set together with serving.batching.token_budget: give the budget one way",
            "token_budget (tokens per batch) or tokens_per_gpu (tokens per GPU per batch)",
        )
    batching = batching.per_gpu(cluster.world_size)
    slots, tl = sv["expert_slots"], sv["timeline_batches"]
    paths = _trace_paths(sv["trace"], sc.source)

    # The trace against the model: layers, experts (folding), top-k.
    trace, domain_of_token, domain_names = _load_traces(paths, sv["drop_incomplete"])
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

    _check_domain(sv["domain"], domain_names, domain_of_token, trace.seq_ids)

    setup = InferenceSetup(
        sc,
        cluster,
        model,
        policies,
        ServingSpec(
            tuple(map(str, paths)),
            fold,
            train_fraction,
            requests,
            arrival,
            batching,
            slots,
            tl,
            sv["domain"],
            sv["ffn"],
            sv["drop_incomplete"],
        ),
        trace,
        experts,
        algo,
        domain_of_token,
        domain_names,
    )
    # Memory: the expert slots of every MoE layer must fit the GPU beside the dense weights.
    cost = InferenceCostModel(model, cluster, trace.top_k, sv["ffn"])
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
