"""Compute profiling: every compute op of a training scenario's model, timed for real
without the network, as the table the simulator's ``compute: {model: profile}`` loads.

Rank side (``lina-run SCENARIO --profile-compute OUT``, which the training mode hands
here): every rank runs the model's steps with a local exchange (all-to-alls replaced by
local copies, no gradient reduction), once per pipelining degree the policies use, and
returns rows ``{op, shape, tokens, seconds}``. Launcher side: :func:`write_compute_profile`
merges them into a ``ProfileComputeModel`` table (``role.phase`` x tokens -> median s).
Step 2 of a validation (:mod:`runtime.validate`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import ClusterSpec, load_preset
from lina_sim.policies.registry import make_training_policy
from lina_sim.results.files import atomic_write_text
from lina_sim.training.run import TrainingSetup
from lina_sim.workload.graph import build_training_graph, packing_candidates
from lina_sim.workload.model import ModelSpec
from lina_sim.workload.moe_ops import DISPATCH_KERNELS
from runtime.comm import Clock, RankExchange
from runtime.context import RankContext
from runtime.dist import one_core_each
from runtime.ep_moe import TORCH_DTYPES, EPTransformer, Layout, batch

PROFILE_STEPS = 6  # compute-only steps per pipelining degree (the first is a warm-up)


class _LocalHandle:
    """An all-to-all that already completed: its output is what was sent."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def wait(self) -> torch.Tensor:
        return self.t


class LocalExchange(RankExchange):
    """A rank exchange without the network: every all-to-all returns its own rows (the
    fewest experts per rank receive as many rows as in the real run), compute marks as usual."""

    def a2a(self, op: str, send: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> _LocalHandle:
        return _LocalHandle(send)

    def counts_a2a(self, counts: torch.Tensor) -> torch.Tensor:
        return counts


def profile_compute_rank(ctx: RankContext, setup: TrainingSetup) -> list[dict]:
    """Time the model's compute ops on this rank with a local exchange (the fewest
    experts per rank, padded dispatch), for every pipelining degree of the scenario's
    policies, at one-core speed (CPU ranks take turns). Returns rows {op, shape, tokens,
    seconds} (median over steps)."""
    return one_core_each(ctx.info, lambda: _profile_ops(ctx, setup))


def _profile_ops(ctx: RankContext, setup: TrainingSetup) -> list[dict]:
    policies = [make_training_policy(e.name, **e.params) for e in setup.policies]
    shapes = sorted({(p.pipeline_degree, p.dispatch_kernels) for p in policies})
    return profile_ops(setup.model, setup.cluster, shapes, ctx.info.device, setup.scenario.seed, ctx.info.rank, ctx.now)


def profile_ops(
    spec: ModelSpec,
    cluster: ClusterSpec | int,
    shapes: Sequence[tuple[int, str]],
    device: torch.device,
    seed: int = 0,
    rank: int = 0,
    now: Callable[[], float] = time.monotonic,
    steps: int = PROFILE_STEPS,
) -> list[dict]:
    """Every compute op of ``spec``'s step on ``device``, timed with a local exchange (no
    network; the fewest experts per rank of ``cluster``, padded dispatch), once per
    (pipelining degree, dispatch kernels) in ``shapes``: rows {op, shape, tokens,
    seconds}, seconds the median over ``steps`` - 1 steps (the first is a warm-up). On a
    GPU each op is timed with CUDA events (:class:`runtime.comm.Clock`)."""
    world = cluster if isinstance(cluster, int) else cluster.world_size
    k = packing_candidates(spec, world)[0]  # the fewest experts per rank
    samples: dict[tuple[str, str, float], list[float]] = {}
    clock = Clock(now, device)
    for r, kernels in shapes:
        graph = build_training_graph(spec, world, experts_per_device=k, pipeline_degree=r, dispatch_kernels=kernels)
        ops = {o.name: o for o in graph.ops}
        lay = Layout(k=k, ep_size=graph.model.experts // k, ep_rank=0, r=r, dispatch="padded", kernels=kernels)
        model = EPTransformer(graph.model, lay, seed).to(device, TORCH_DTYPES[spec.dtype])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        for step in range(steps):
            tokens, targets = (x.to(device) for x in batch(graph.model, seed, rank, step))
            ex = LocalExchange(rank, None, {}, None, None, clock, ops)
            opt.zero_grad(set_to_none=True)
            clock.start_step()
            loss = model.loss(tokens, targets, ex)
            ex.mark("head.bwd")
            loss.backward()
            ex.mark("optimizer")
            opt.step()
            if step == 0:
                continue  # warm-up
            per_op: dict[str, float] = {}
            for e in ex.compute_events():  # an op may be cut by marks: sum its pieces
                per_op[e.op] = per_op.get(e.op, 0.0) + e.end - e.start
            for name, sec in per_op.items():
                op = ops[name]
                # Ops whose kernels depend on the dispatch style keep it in their row.
                shape = op.shape if "dispatch=" in op.shape else ""
                samples.setdefault((op.profile_key, shape, float(op.tokens)), []).append(sec)
    return [
        {"op": key, "shape": shape, "tokens": tok, "seconds": statistics.median(v)}
        for (key, shape, tok), v in sorted(samples.items())
    ]


def compare_ops(
    spec: ModelSpec, gpus: int, preset: str, device: torch.device, steps: int = PROFILE_STEPS
) -> pd.DataFrame:
    """Each compute op of ``spec`` cut for ``gpus`` GPUs, measured on ``device`` (:func:`profile_ops`)
    and predicted by ``preset``'s roofline compute model, per dispatch style: one row per
    (dispatch, op key, shape, tokens) with milliseconds and the error (%)."""
    cluster = load_preset(preset)
    model = RooflineComputeModel.from_cluster(cluster, spec.dtype)
    k = packing_candidates(spec, gpus)[0]
    rows = []
    for kernels in DISPATCH_KERNELS:
        graph = build_training_graph(spec, gpus, experts_per_device=k, dispatch_kernels=kernels)
        for row in profile_ops(spec, gpus, [(1, kernels)], device, steps=steps):
            same = [
                o
                for o in graph.ops
                if o.kind == "compute" and o.profile_key == row["op"] and float(o.tokens) == row["tokens"]
            ]
            if row["shape"]:
                same = [o for o in same if o.shape == row["shape"]]
            pred = float(np.median([model.op_time(o) for o in same])) if same else float("nan")
            rows.append(
                {
                    "dispatch": kernels,
                    "dtype": spec.dtype,
                    "op": row["op"],
                    "shape": row["shape"],
                    "tokens": row["tokens"],
                    "measured_ms": row["seconds"] * 1e3,
                    "predicted_ms": pred * 1e3,
                }
            )
    df = pd.DataFrame(rows)
    df["error_%"] = (df["predicted_ms"] / df["measured_ms"] - 1) * 100
    return df


def write_compute_profile(results: list[dict], out: str | Path) -> Path:
    """Median over ranks of each (op, shape, tokens) row of the scenario's first point (the
    only one profiled: all points of a validation share one model shape per run)."""
    by: dict[tuple[str, str, float], list[float]] = {}
    for res in results:
        for row in res["rows"]:
            by.setdefault((row["op"], row["shape"], row["tokens"]), []).append(row["seconds"])
    rows = [
        {"op": k, "shape": shape, "tokens": t, "seconds": statistics.median(v)}
        for (k, shape, t), v in sorted(by.items())
    ]
    header = (
        "# Compute profile measured by `lina-sim validate` (lina-run --profile-compute): every compute op of\n"
        "# the model on all ranks at once, no network; seconds = median over steps and ranks.\n"
    )
    return atomic_write_text(out, header + yaml.safe_dump({"rows": rows}, sort_keys=False))
