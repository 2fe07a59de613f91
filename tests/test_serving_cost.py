"""The serving cost model's expert FFN (grouped GEMM and per-expert loop), checked
against measured GEMM times where ../shared has them, and the charge the server binds to
its policies, checked against what the server actually charges a served batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lina_sim.config.scenario import expand
from lina_sim.errors import ConfigError
from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import load_preset
from lina_sim.policies.placement import Placement, counts_by_source
from lina_sim.routing.generator import RoutingTraceGenerator
from lina_sim.serving.cost import (
    FFN_KERNELS,
    InferenceCostModel,
    ServingCharge,
    block_size_m,
    grouped_gemm_time,
    padded_rows,
)
from lina_sim.serving.server import ExpertCache, PolicyServer, serving_inputs
from lina_sim.serving.setup import resolve_inference
from lina_sim.workload.model import model_preset

VIDUR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpu-kernels" / "vidur"
# Vidur's GPU folders -> the cluster presets whose GPU and compute efficiencies they test.
PRESET_OF = {"a100": "dgx-a100", "h100": "dgx-h100"}
# Median |error| allowed per (GPU, model, GEMM) over all measured token counts, and over
# the small ones (<= 512 tokens: launch- and tile-bound, where a roofline is weakest).
TOL_ALL, TOL_SMALL = 0.15, 0.30


def cost_model(ffn: str = "grouped", preset: str = "paper-testbed") -> InferenceCostModel:
    model = dataclasses.replace(model_preset("transformer-xl-12"), experts=16)
    return InferenceCostModel(model, load_preset(preset), top_k=1, ffn=ffn)


def test_block_size_and_padding_follow_vllm_defaults():
    # get_default_config: BLOCK_SIZE_M 16 when M <= E, else 64.
    assert block_size_m(np.array([4, 16, 17, 500]), np.array([16, 16, 16, 2])).tolist() == [16, 16, 64, 64]
    assert padded_rows(np.array([[1, 64, 65, 0]]), np.array([64])).tolist() == [64 + 64 + 128]


def test_grouped_pays_launches_once_and_one_weight_read_per_active_expert():
    cm = cost_model()
    rl, m, b = cm.roofline, cm.model, cm.model.dtype_bytes
    # One token on each of 1..8 experts of one device: memory-bound, so each extra
    # expert adds its two weight reads and nothing else (no launches).
    times = []
    for a in range(1, 9):
        rows = np.zeros((m.experts, 1))
        rows[:a, 0] = 1
        times.append(float(cm.expert_ffn(rows)[0]))
    weights = ((m.d_model * m.d_ff + m.d_ff) + (m.d_ff * m.d_model + m.d_model)) * b / rl.bytes_per_s
    steps = np.diff(times)
    assert np.allclose(steps, steps[0], rtol=1e-6)
    assert steps[0] == pytest.approx(weights, rel=0.05)
    # The per-expert loop pays three launches per extra expert on top of that.
    loop = cost_model("per-expert")
    t_loop = [float(loop.expert_ffn((np.arange(m.experts)[:, None] < a).astype(float))[0]) for a in (1, 8)]
    assert t_loop[1] - t_loop[0] == pytest.approx(7 * (weights + 3 * rl.launch_s), rel=0.05)
    assert times[-1] < t_loop[1]


def test_grouped_computes_padded_tiles_and_nothing_without_tokens():
    cm = cost_model()
    rl, m = cm.roofline, cm.model
    # Compute-bound (past ~165 rows on this roofline): 1025 rows pay for 17 tiles of 64.
    t = grouped_gemm_time(rl, np.array([[1025.0], [1088.0], [1024.0], [0.0]]), 4096, 4096, 2, bias=False)
    assert t[0] == pytest.approx(t[1], rel=1e-9) and t[0] > t[2]
    assert t[3] == 0.0
    assert cm.expert_ffn(np.zeros((m.experts, 3))).tolist() == [0.0, 0.0, 0.0]


def test_unknown_ffn_is_one_error_naming_the_field():
    with pytest.raises(ConfigError) as err:
        cost_model("fused")
    assert err.value.field == "serving.ffn"
    assert all(k in str(err.value) for k in FFN_KERNELS)


def _vidur_tables() -> list[Path]:
    return sorted(VIDUR.glob("*/*/*/mlp.csv")) if VIDUR.is_dir() else []


@pytest.mark.skipif(not _vidur_tables(), reason="../shared/data/gpu-kernels (Vidur's measured GEMMs) is absent")
@pytest.mark.parametrize("table", _vidur_tables(), ids=lambda p: f"{p.parts[-4]}-{p.parts[-2]}")
def test_grouped_gemm_matches_measured_gemms(table: Path):
    """One expert holding all ``num_tokens`` rows is the dense GEMM Vidur measured
    (``mlp_up_proj``: d_model -> d_ff (x2 gated) / TP, ``mlp_down_proj``: back)."""
    gpu = table.parts[-4]
    rl = RooflineComputeModel.from_cluster(load_preset(PRESET_OF[gpu]), "fp16")
    df = pd.read_csv(table)
    ff = (df.n_expanded_embd // df.num_tensor_parallel_workers).to_numpy()
    shapes = {
        "mlp_up_proj": (df.n_embd.to_numpy(), ff * np.where(df.use_gated_mlp, 2, 1)),
        "mlp_down_proj": (ff, df.n_embd.to_numpy()),
    }
    small = df.num_tokens.to_numpy() <= 512
    for op, (k_in, n_out) in shapes.items():
        pred = np.array(
            [
                grouped_gemm_time(rl, np.array([float(t)]), int(k), int(n), 2, bias=False)
                for t, k, n in zip(df.num_tokens, k_in, n_out)
            ]
        )
        meas = df[f"time_stats.{op}.median"].to_numpy() * 1e-3
        err = np.abs(pred - meas) / meas
        assert np.median(err) <= TOL_ALL, f"{op}: median |error| {np.median(err):.1%}"
        assert np.median(err[small]) <= TOL_SMALL, f"{op} <= 512 tokens: median |error| {np.median(err[small]):.1%}"


@pytest.fixture(scope="module")
def trace16(tmp_path_factory):
    gen = RoutingTraceGenerator.synthetic(16, 12, top_k=1, zipf_s=1.2, affinity=0.6, seq_len=64, seed=5)
    path = tmp_path_factory.mktemp("traces") / "syn16.npz"
    gen.generate(6400, seed=5).save(path)
    return path


@pytest.mark.parametrize("policy", ["static", "lina", "oracle"])
def test_charge_is_what_the_server_charges(trace16, policy):
    """The charge bound to the policies gives each served layer exactly the time the
    server's timeline charges it (every expert resident: nothing to swap)."""
    data = {
        "name": "t",
        "kind": "inference",
        "seed": 2,
        "cluster": {"preset": "paper-testbed", "nodes": 2},
        "model": {"preset": "transformer-xl-12", "experts": 16, "top_k": 1},
        "serving": {
            "trace": str(trace16),
            "requests": 24,
            "expert_slots": 16,
            "arrival": {"process": "closed", "concurrency": 8},
            "batching": {"token_budget": 1024, "timeout": 0.0005},
        },
        "policies": ["static", "lina", "oracle"],
    }
    setup = resolve_inference(expand(data)[0])
    shared = serving_inputs(setup)
    entry = next(e for e in setup.policies if e.name == policy)
    server = PolicyServer(setup, entry, shared)
    for _ in range(3):
        plan = server.prepare()
        L = plan.send.shape[0]
        tb = shared.cost.token_bytes
        times = shared.a2a.times(np.concatenate([plan.send, plan.send.transpose(0, 2, 1)]).astype(float) * tb)
        server.complete(plan, times[:L], times[L:])
        rec = server.records[-1]
        charged = server.charge.exact([(l, [plan.placements[l]], plan.counts_by_source[l]) for l in range(L)])
        assert np.allclose([c[0] for c in charged], rec.layer_moe, rtol=1e-9, atol=1e-12)


def test_cheapest_is_the_argmin_of_the_exact_charge(trace16):
    """The oracle's pick, which times only the candidates its lower bound cannot rule
    out, is exactly the first cheapest under the exact charge, with swaps charged."""
    data = {
        "name": "t",
        "kind": "inference",
        "seed": 1,
        "cluster": {"preset": "paper-testbed", "nodes": 4},
        "model": {"preset": "transformer-xl-12", "experts": 16, "top_k": 1},
        "serving": {"trace": str(trace16), "requests": 16, "arrival": {"process": "closed", "concurrency": 16}},
        "policies": ["static", "fastermoe-shadow", "eplb", "lina", "oracle"],
    }
    setup = resolve_inference(expand(data)[0])
    shared = serving_inputs(setup)
    server = PolicyServer(setup, next(e for e in setup.policies if e.name == "oracle"), shared)
    oracle, ex = server.policy, shared.serve_experts[: 16 * 64]
    N, E = setup.cluster.world_size, setup.model.experts
    items = []
    for l in range(ex.shape[1]):
        cbs = counts_by_source(ex[:, l], E, N)
        items.append((l, oracle._candidates(l, ex[:, :l], cbs), cbs))
    assert sum(len(c) for _, c, _ in items) > 3 * len(items)  # real choices to make
    fresh = ServingCharge(shared.cost, setup.cluster, type(shared.a2a)(setup.cluster), server.cache.missing)
    fresh.window = server.charge.window
    want = [int(np.argmin(t)) for t in fresh.exact(items)]
    assert server.charge.cheapest(items) == want


@pytest.mark.parametrize("preset,nodes", [("paper-testbed", 4), ("paper-testbed", 1), ("dgx-a100", 2)])
def test_quick_bound_is_read_off_the_send_matrix_without_building_it(preset, nodes):
    """The quick all-to-all bound, from interval overlaps, equals to the bit the same
    bound computed on the send matrix itself, for the dispatch and its transpose."""
    cluster = load_preset(preset, nodes)
    n, g = cluster.world_size, cluster.gpus_per_node
    model = dataclasses.replace(model_preset("transformer-xl-12"), experts=12)
    charge = ServingCharge(InferenceCostModel(model, cluster, 1), cluster, None)
    node = np.arange(n) // g
    intra_mask = (node[:, None] == node[None, :]) & ~np.eye(n, dtype=bool)
    rng = np.random.default_rng(4)
    for _ in range(20):
        ps = []
        for _ in range(4):
            r = (rng.random((12, n)) < 0.3).astype(float)
            r[np.arange(12), rng.integers(0, n, size=12)] = 1.0
            ps.append(Placement.from_counts(n, r))
        cbs = rng.integers(0, 60, size=(n, 12))
        want = []
        for p in ps:
            sent = p.send_matrix(cbs).astype(float) * charge.cost.token_bytes
            np.fill_diagonal(sent, 0.0)
            bounds = []
            for m in (sent, sent.T):
                intra, inter = m * intra_mask, m * ~intra_mask
                gpu = max(intra.sum(axis=1).max(), intra.sum(axis=0).max()) / cluster.nvlink.effective_bandwidth
                node_out = np.bincount(node, weights=inter.sum(axis=1))
                node_in = np.bincount(node, weights=inter.sum(axis=0))
                nic = max(node_out.max(), node_in.max()) / (cluster.nic.effective_bandwidth * cluster.nics_per_node)
                lat = cluster.nic.latency if inter.sum() > 0 else cluster.nvlink.latency
                bounds.append(max(gpu, nic) + lat if m.sum() > 0 else 0.0)
            assert bounds[0] == bounds[1]
            want.append(bounds[0])
        assert charge._quick_a2a(ps, cbs).tolist() == want


def test_expert_cache_missing_is_what_load_would_swap_without_loading():
    static = Placement.from_replicas(4, [[0], [1], [2], [3], [0], [1], [2], [3]])
    cache = ExpertCache(2, static, slots=2)
    moved = Placement.from_replicas(4, [[1], [0], [2], [3], [0], [1], [2], [3, 0]])
    before = cache.missing(0, moved)
    assert before.tolist() == cache.missing(0, moved).tolist()  # nothing changed
    assert before.tolist() == cache.load(0, moved).tolist() == [2, 1, 0, 0]
    assert cache.missing(0, moved).tolist() == [0, 0, 0, 0]
    assert cache.missing(1, moved).tolist() == [2, 1, 0, 0]  # layers are apart


def test_batched_charges_are_the_per_layer_ones_to_the_bit(trace16):
    """The oracle charges every layer of a batch in one pass (``quick_many``, and the
    exact charge's FFN and swap terms for all items at once); each candidate's charge is
    bit for bit what the per-layer forms give, with weight swaps in play (2 slots)."""
    data = {
        "name": "t",
        "kind": "inference",
        "seed": 1,
        "cluster": {"preset": "paper-testbed", "nodes": 4},
        "model": {"preset": "transformer-xl-12", "experts": 16, "top_k": 1},
        "serving": {
            "trace": str(trace16),
            "requests": 48,
            "arrival": {"process": "closed", "concurrency": 16},
            "batching": {"token_budget": 1024, "timeout": 0.0005},
        },
        "policies": ["static", "fastermoe-shadow", "eplb", "lina", "oracle"],
    }
    setup = resolve_inference(expand(data)[0])
    shared = serving_inputs(setup)
    server = PolicyServer(setup, next(e for e in setup.policies if e.name == "oracle"), shared)
    for _ in range(2):  # a second batch: residency has moved, so the swap terms differ by layer
        plan = server.prepare()
        L = plan.send.shape[0]
        times = shared.a2a.times(np.concatenate([plan.send, plan.send.transpose(0, 2, 1)]).astype(float) * 1024.0)
        server.complete(plan, times[:L], times[L:])
    oracle, ex = server.policy, shared.serve_experts[: 16 * 64]
    N, E = setup.cluster.world_size, setup.model.experts
    charge = server.charge
    charge.window = np.linspace(0.0, 2e-4, ex.shape[1])  # per-layer windows, as the server sets them
    items = [
        (l, oracle._candidates(l, ex[:, :l], cbs), cbs)
        for l in range(ex.shape[1])
        for cbs in [counts_by_source(ex[:, l], E, N)]
    ]
    assert any((charge.missing_many(l, c) > 0).any() for l, c, _ in items)  # swaps are charged
    per_layer = [charge.quick(l, c, cbs) for l, c, cbs in items]
    for a, b in zip(charge.quick_many(items), per_layer):
        assert a.tolist() == b.tolist()
    lone = ServingCharge(charge.cost, charge.cluster, charge.timer, charge.missing)  # no missing_many: per item
    lone.window = charge.window
    for a, b in zip(charge.exact(items), lone.exact(items)):
        assert a.tolist() == b.tolist()


def test_expert_cache_is_least_recently_used_per_device():
    """Loads against a plain per-device LRU list: what each load swaps in, and what is
    held after it, including repeated loads of one placement (which change nothing) and
    placements that need more experts on a device than its slots (all kept)."""
    rng = np.random.default_rng(3)
    E, N, slots = 8, 4, 3
    static = Placement.from_replicas(N, [[e % N] for e in range(E)])
    cache = ExpertCache(1, static, slots)
    lru = [[e for e in range(E) if e % N == d] for d in range(N)]  # least recent first
    placements = []
    for _ in range(6):
        reps = [sorted(set(rng.choice(N, int(rng.integers(1, 3)), replace=False).tolist())) for _ in range(E)]
        placements.append(Placement.from_replicas(N, reps))
    for i in rng.integers(0, len(placements), 40):
        p = placements[i]
        want = [sum(e not in lru[d] for e in p.resident[d]) for d in range(N)]
        assert cache.missing(0, p).tolist() == want
        assert cache.load(0, p).tolist() == want
        for d in range(N):
            need = p.resident[d]  # kept even beyond the slots; the others go least recent first
            others = [e for e in lru[d] if e not in need]
            gone = others[: max(0, len(others) + len(need) - slots)]
            lru[d] = [e for e in others if e not in gone] + sorted(need)
        held = [sorted(lru[d]) for d in range(N)]
        assert [sorted(np.flatnonzero(cache._stamp[0][:, d] >= 0).tolist()) for d in range(N)] == held
