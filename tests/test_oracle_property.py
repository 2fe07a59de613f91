"""``oracle`` is the best plan any policy could make: on the same batches, its charged
batch time is never above any other placement policy's, under the very charge the
server levies (:class:`lina_sim.serving.cost.ServingCharge`; that it is what the server
charges is checked in tests/test_serving_cost.py).

Batches come from the shipped routing traces (traces/, scenarios/data) and from traces
the generator makes; every expert is resident (no swaps), so the batch time is the sum
of its layers' charges plus compute that is the same for every policy.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lina_sim.config.scenario import expand
from lina_sim.hardware.processors import shared_finish_times
from lina_sim.policies.placement import counts_by_source, decide_layer
from lina_sim.policies.registry import PLACEMENT_POLICIES
from lina_sim.routing.generator import RoutingTraceGenerator
from lina_sim.serving.cost import ServingCharge
from lina_sim.serving.server import rivals, serving_inputs
from lina_sim.serving.setup import InferenceSetup, make_policy, resolve_inference

ROOT = Path(__file__).resolve().parents[1]
# Every policy that plans a placement for the real gate (ideal replaces the gate).
POLICIES = [p for p in PLACEMENT_POLICIES if p != "ideal"]
SHIPPED = ["traces/moe12-top1-arxiv.npz", "traces/moe12-top2-github.npz", "scenarios/data/testbed-l4-e4.npz"]
GENERATED = [("gen-top1", 16, 1, 1.3, 7), ("gen-top2", 8, 2, 0.8, 11)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, str]:
    """The generated traces, by name: 12 layers, 64-token sequences."""
    out = {}
    for name, experts, k, zipf, seed in GENERATED:
        gen = RoutingTraceGenerator.synthetic(experts, 12, top_k=k, zipf_s=zipf, affinity=0.6, seq_len=64, seed=seed)
        path = tmp_path_factory.mktemp("traces") / f"{name}.npz"
        gen.generate(64 * 80, seed=seed).save(path)
        out[name] = str(path)
    return out


@functools.cache
def _setup(trace: str, nodes: int, path: str) -> InferenceSetup:
    """An inference setup over ``trace`` (at ``path``) with every expert resident and
    every policy."""
    if trace.endswith("testbed-l4-e4.npz"):  # its own small model and emulated cluster
        src = ROOT / "scenarios" / "testbed-inference.yaml"
        data = yaml.safe_load(src.read_text())
        data["serving"]["expert_slots"] = data["model"]["experts"]
        data["policies"] = POLICIES
        return resolve_inference(expand(data, str(src))[0])
    experts = next((g[1] for g in GENERATED if g[0] == trace), 16)
    data = {
        "name": "oracle-property",
        "kind": "inference",
        "seed": 0,
        "cluster": {"preset": "paper-testbed", "nodes": nodes},
        "model": {"preset": "transformer-xl-12", "experts": experts},
        "serving": {
            "trace": path,
            "requests": 8,
            "expert_slots": experts,
            "arrival": {"process": "closed", "concurrency": 8},
        },
        "policies": POLICIES,
    }
    return resolve_inference(expand(data)[0])


def charged_batch_times(setup: InferenceSetup, seed: int, seqs: int, batches: int) -> dict[str, np.ndarray]:
    """Serve ``batches`` identical batches of ``seqs`` sequences with every policy;
    per policy, ``[batches]`` s of charged MoE-layer time (dispatch, FFN, combine)."""
    shared = serving_inputs(setup)
    N, E = setup.cluster.world_size, setup.model.experts
    cores = setup.cluster.host.cores if setup.cluster.shares_cores else None
    on_host = functools.partial(shared_finish_times, cores=cores) if cores else None
    charge = ServingCharge(shared.cost, setup.cluster, shared.a2a, None, on_host)
    policies = {}
    for entry in setup.policies:
        p = make_policy(setup, entry)
        if entry.name == "oracle":
            p.bind_rivals(rivals(setup, entry))
        p.bind_charge(charge)
        p.fit(shared.train_experts)
        policies[entry.name] = p
    rng = np.random.default_rng(seed)
    out = {name: np.zeros(batches) for name in policies}
    for b in range(batches):
        chosen = rng.choice(len(shared.pool.lengths), size=min(seqs, len(shared.pool.lengths)), replace=False)
        ex = shared.serve_experts[shared.pool.token_index(chosen.tolist())]  # [T, L, k]
        cbs = np.stack([counts_by_source(ex[:, l], E, N) for l in range(ex.shape[1])])
        items = {}
        for name, p in policies.items():
            if p.plans_on_actual_counts:
                p.see_batch(ex, cbs)  # as the server does
            finals = [decide_layer(p, l, ex[:, :l], cbs[l]).final for l in range(ex.shape[1])]
            items[name] = [(l, [f], cbs[l]) for l, f in enumerate(finals)]
        flat = [it for name in policies for it in items[name]]
        times = iter(t[0] for t in charge.exact(flat))
        for name in policies:
            out[name][b] = sum(next(times) for _ in items[name])
    return out


def _check(generated: dict[str, str], trace: str, nodes: int, seed: int, seqs: int, batches: int) -> None:
    path = generated.get(trace) or str(ROOT / trace)
    t = charged_batch_times(_setup(trace, nodes, path), seed, seqs, batches)
    oracle = t.pop("oracle")
    for name, other in t.items():
        assert (oracle <= other * (1 + 1e-9)).all(), f"{trace} x{nodes}: oracle {oracle} > {name} {other}"


TRACES = SHIPPED + [g[0] for g in GENERATED]
FAST = settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FAST
@given(
    trace=st.sampled_from(TRACES),
    nodes=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
    seqs=st.integers(4, 24),
)
def test_oracle_is_never_dearer_than_any_policy(generated, trace, nodes, seed, seqs):
    _check(generated, trace, nodes, seed, seqs, batches=2)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    trace=st.sampled_from(TRACES),
    nodes=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
    seqs=st.integers(2, 64),
)
def test_oracle_is_never_dearer_than_any_policy_many(generated, trace, nodes, seed, seqs):
    _check(generated, trace, nodes, seed, seqs, batches=4)
