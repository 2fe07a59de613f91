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
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from lina_sim.policies.registry import make_training_policy
from lina_sim.results.files import atomic_write_text
from lina_sim.training.run import TrainingSetup
from lina_sim.workload.graph import build_training_graph, packing_candidates
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
    spec = setup.model
    k = packing_candidates(spec, setup.cluster.world_size)[0]  # the fewest experts per rank
    policies = [make_training_policy(e.name, **e.params) for e in setup.policies]
    shapes = sorted({(p.pipeline_degree, p.dispatch_kernels) for p in policies})
    samples: dict[tuple[str, str, float], list[float]] = {}
    clock = Clock(ctx.now, ctx.info.device)
    for r, kernels in shapes:
        graph = build_training_graph(
            spec, setup.cluster, experts_per_device=k, pipeline_degree=r, dispatch_kernels=kernels
        )
        ops = {o.name: o for o in graph.ops}
        lay = Layout(k=k, ep_size=spec.experts // k, ep_rank=0, r=r, dispatch="padded", kernels=kernels)
        model = EPTransformer(spec, lay, setup.scenario.seed).to(ctx.info.device, TORCH_DTYPES[spec.dtype])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        for step in range(PROFILE_STEPS):
            tokens, targets = (x.to(ctx.info.device) for x in batch(spec, setup.scenario.seed, ctx.info.rank, step))
            ex = LocalExchange(ctx.info.rank, None, {}, None, None, clock, ops)
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
