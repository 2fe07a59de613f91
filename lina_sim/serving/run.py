"""Serving a scenario: every placement policy serves the same request stream in
lockstep (:func:`serve_policies`), and the per-policy latency table
(:func:`run_inference`), one request stream per served domain (``serving.domain``).
Units: seconds, tokens.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lina_sim.gc_tuning import fewer_collections
from lina_sim.network.serving_a2a import AllToAllTimer
from lina_sim.results.rows import point_columns
from lina_sim.serving.server import BatchPlan, PolicyServer, PolicyServing, ServingInputs, serving_inputs
from lina_sim.serving.setup import InferenceSetup, setup_slots


# ---------------------------------------------------------------------------------------
# Running a scenario
# ---------------------------------------------------------------------------------------
def serve_policies(setup: InferenceSetup, shared: ServingInputs | None = None) -> list[PolicyServing]:
    """Serve the request stream with every policy, in lockstep (see module docstring);
    ``shared`` is :func:`serving_inputs` of ``setup`` when the caller already has it.

    Each step, the policies that plan from their own estimates prepare their batches
    first and their all-to-alls are queued on the shared timer (``shared.a2a``, the one
    the policies' charge uses), so the oracle's timing of its candidates solves them in
    the same event loop; the step's own timing then comes from the timer's cache. The
    times are the same as when each is solved alone."""
    shared = shared or serving_inputs(setup)
    # The charge's timer: what the oracle timed while choosing is a cache hit here.
    timer = shared.a2a
    servers = [PolicyServer(setup, e, shared) for e in setup.policies]
    with fewer_collections():
        _serve_in_lockstep(servers, timer, shared.cost.token_bytes)
    return [s.result() for s in servers]


def _serve_in_lockstep(servers: list[PolicyServer], timer: AllToAllTimer, token_bytes: float) -> None:
    """:func:`serve_policies`' loop: one batch of every policy not done per step."""
    while True:
        active = [s for s in servers if not s.done]
        if not active:
            break
        # Policies that choose by timing their candidates (the oracle) go last, so that
        # the others' all-to-alls are solved in their timer calls (one call, not two).
        plans: list[BatchPlan | None] = [None] * len(active)
        for late in (False, True):
            for i, s in enumerate(active):
                if s.policy.plans_on_actual_counts == late:
                    plans[i] = s.prepare()
            early = [] if late else [_both_ways(p) for p in plans if p is not None]
            if early and len(early) < len(active):
                timer.prefetch(np.concatenate(early) * token_bytes)
        L = plans[0].send.shape[0]
        stack = np.concatenate([_both_ways(p) for p in plans])
        t0 = time.perf_counter()
        times = timer.times(stack * token_bytes).reshape(len(plans), 2, L)
        share = (time.perf_counter() - t0) / len(plans)
        for s, p, tm in zip(active, plans, times):
            s.wall += share
            s.complete(p, tm[0], tm[1])


def _both_ways(plan: BatchPlan) -> np.ndarray:
    """``float64 [2 * layers, N, N]`` tokens: the batch's dispatches, then its combines."""
    return np.concatenate([plan.send, plan.send.transpose(0, 2, 1)]).astype(np.float64)


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def batch_skew(run: PolicyServing, shared: ServingInputs, experts: int) -> np.ndarray:
    """``[batches, layers]`` skew of each batch the policy served: at layer ``l``, the
    busiest expert's tokens over the uniform share, ``max_e c[l, e] / (T * k / E)``, where
    ``c[l, e]`` counts the batch's ``T`` tokens whose recorded gate picks expert ``e``
    at ``l`` (each of a token's ``k`` choices counts once) and ``E`` is the model's
    experts. 1.0 is perfectly even; ``E`` is every token on one expert. It is a property
    of the batches' tokens, before any placement (``ideal`` serves the same tokens with a
    uniform gate; its skew is still the trace's)."""
    by_batch: list[list[int]] = [[] for _ in run.batches]
    for r in run.requests:
        by_batch[r.batch].append(r.seq)
    out = np.empty((len(run.batches), shared.layers))
    for b, seqs in enumerate(by_batch):
        ex = shared.serve_experts[shared.pool.token_index(seqs)]  # [T, L, k]
        T, L, k = ex.shape
        counts = np.bincount((np.arange(L)[None, :, None] * experts + ex).ravel(), minlength=L * experts)
        out[b] = counts.reshape(L, experts).max(axis=1) / (T * k / experts)
    return out


def run_inference(setup: InferenceSetup) -> tuple[pd.DataFrame, list[PolicyServing]]:
    """Serve the scenario's requests with every placement policy; one row per policy and
    served domain (``serving.domain``: ``mixed``, one domain, or ``each`` domain on its
    own, each a separate request stream with its estimators fit on its own training
    slice). With several domains the runs' labels carry the domain (``static [c4]``).

    Columns: scenario, policy, policy_name, cluster, nodes, gpus, model, experts, top_k,
    expert_slots (per GPU per layer), trace, domain, requests, batches, arrival,
    arrival_rate, concurrency, token_budget, tokens_per_gpu (the budget per GPU),
    timeout_s, latency_{mean,p50,p95,p99}_s, their ratios ``latency_{p50,p95,p99}_vs_static``
    (NaN without a ``static`` entry) and ``latency_p95_vs_ideal`` (both within the same
    domain), batch_time_{mean,p50,p95}_s, batch_tokens_mean, batch_tokens_per_gpu_mean,
    batch_skew_mean (the busiest expert's tokens over the uniform share, mean over the
    policy's batches and the layers: :func:`batch_skew`), moe_layer_p95_s, a2a_p95_s
    (dispatch + combine of one layer, p95 over batches and layers), a2a_tail_layer_max_s
    (the worst layer's p95), ffn_p95_s, exposed_swap_per_batch_s,
    swapped_experts_per_batch, load_imbalance_mean (busiest device's expert tokens over
    the mean), phase2_checks, phase2_fired, phase2_rate, throughput_rps, makespan_s,
    sim_wall_s, and the swept fields.
    """
    domains = setup.served_domains()
    frames, all_runs = [], []
    for domain in domains:
        sub = setup.for_domain(domain)
        df, runs = _run_domain(sub)
        frames.append(df)
        if len(domains) > 1:  # timelines and figures are keyed by label: keep them apart
            for run in runs:
                run.entry = dataclasses.replace(run.entry, label=f"{run.entry.label} [{domain}]")
        all_runs += runs
    return pd.concat(frames, ignore_index=True), all_runs


def _run_domain(setup: InferenceSetup) -> tuple[pd.DataFrame, list[PolicyServing]]:
    """:func:`run_inference` of one request stream (``setup.serving.domain``)."""
    shared = serving_inputs(setup)
    runs = serve_policies(setup, shared)
    s = setup.serving
    gpus = setup.cluster.world_size
    rows = []
    for run in runs:
        lat = run.latencies()
        b = run.batches
        bt = np.array([r.end - r.start for r in b])
        moe = np.concatenate([r.layer_moe for r in b])
        a2a = np.stack([r.dispatch + r.combine for r in b])  # [batches, layers]
        makespan = max(r.end for r in b)
        tokens = np.array([r.tokens for r in b], dtype=np.float64)
        rows.append(
            {
                **point_columns(setup, run.entry.label, run.entry.name),
                "top_k": setup.top_k,
                "expert_slots": setup_slots(setup),
                "trace": "+".join(Path(p).stem for p in s.trace_paths),
                "domain": s.domain,
                "requests": len(run.requests),
                "batches": len(b),
                "arrival": s.arrival.process,
                "arrival_rate": s.arrival.rate,
                "concurrency": s.arrival.concurrency,
                "token_budget": s.batching.token_budget,
                "tokens_per_gpu": s.batching.token_budget / gpus,
                "timeout_s": s.batching.timeout,
                "latency_mean_s": float(lat.mean()),
                "latency_p50_s": _pct(lat, 50),
                "latency_p95_s": _pct(lat, 95),
                "latency_p99_s": _pct(lat, 99),
                "batch_time_mean_s": float(bt.mean()),
                "batch_time_p50_s": _pct(bt, 50),
                "batch_time_p95_s": _pct(bt, 95),
                "batch_tokens_mean": float(tokens.mean()),
                "batch_tokens_per_gpu_mean": float(tokens.mean() / gpus),
                "batch_skew_mean": float(batch_skew(run, shared, setup.model.experts).mean()),
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
