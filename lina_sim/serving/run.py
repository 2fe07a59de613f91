"""Serving a scenario: every placement policy serves the same request stream in
lockstep (:func:`serve_policies`), and the per-policy latency table
(:func:`run_inference`). Units: seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from lina_sim.network.serving_a2a import AllToAllTimer
from lina_sim.results.rows import point_columns
from lina_sim.serving.server import PolicyServer, PolicyServing, serving_inputs
from lina_sim.serving.setup import InferenceSetup, setup_slots


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
    expert_slots (per GPU per layer), trace, requests, batches, arrival, arrival_rate,
    concurrency, token_budget, timeout_s,
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
        rows.append(
            {
                **point_columns(setup, run.entry.label, run.entry.name),
                "top_k": setup.top_k,
                "expert_slots": setup_slots(setup),
                "trace": "+".join(Path(p).stem for p in s.trace_paths),
                "requests": len(run.requests),
                "batches": len(b),
                "arrival": s.arrival.process,
                "arrival_rate": s.arrival.rate,
                "concurrency": s.arrival.concurrency,
                "token_budget": s.batching.token_budget,
                "timeout_s": s.batching.timeout,
                "latency_mean_s": float(lat.mean()),
                "latency_p50_s": _pct(lat, 50),
                "latency_p95_s": _pct(lat, 95),
                "latency_p99_s": _pct(lat, 99),
                "batch_time_mean_s": float(bt.mean()),
                "batch_time_p50_s": _pct(bt, 50),
                "batch_time_p95_s": _pct(bt, 95),
                "batch_tokens_mean": float(np.mean([r.tokens for r in b])),
                "moe_layer_p95_s": _pct(moe, 95),
                "a2a_p95_s": _pct(a2a.ravel(), 95),
                "a2a_tail_layer_max_s": float(layer_a2a_tail(run).max()),
                "ffn_p95_s": _pct(np.concatenate([r.ffn for r in b]), 95),
                "exposed_swap_per_batch_s": float(np.mean([r.exposed_swap.sum() for r in b])),
                "swapped_experts_per_batch": float(np.mean([r.swapped for r in b])),
                "load_imbalance_mean": float(np.mean(np.concatenate([r.imbalance for r in b]))),
                "phase2_checks": run.phase2_checks,
                "phase2_fired": run.phase2_fired,
                "phase2_rate": run.phase2_fired / run.phase2_checks if run.phase2_checks else 0.0,
                "throughput_rps": len(run.requests) / makespan if makespan > 0 else float("nan"),
                "makespan_s": makespan,
                "sim_wall_s": run.wall_s,
                **dict(setup.scenario.swept),
            }
        )
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
