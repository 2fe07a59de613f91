"""Training mode: a scenario's training policies run for real on torch.distributed, every op timed.

Per rank and policy (:class:`PolicyRunner`; the policies take turns step by step, see
:func:`train_policies`):

- the step graph is the simulator's (``build_training_graph`` with the packing and
  pipelining the policy picks from the same estimates as ``lina-sim run``), and the
  collectives are its micro-ops with the policy's launch plan, computed by the same
  function as the simulator's (``planned_micro_ops``), so every rank holds the same plan;
- the model is :class:`runtime.ep_moe.EPTransformer` of the scenario's ``model:``;
- a :class:`runtime.comm.CommScheduler` thread owns the policy's ``RankScheduler`` (the
  object the simulator's engine drives) and issues the collectives it selects;
- gradient hooks (:class:`runtime.comm.GradSync`) submit each allreduce micro-op once
  its tensors are ready, in the graph's submission order; non-expert gradients reduce
  on ``dp``, expert gradients on the replicas' ``expert_dp``;
- the optimizer (Adam) runs once every gradient is reduced.

Timeline: compute ops from marks on the compute thread (wall clock; CUDA events on GPU),
collectives from issue to completion on the scheduler thread. On the launcher side,
:class:`TrainingMode` turns the ranks' results into the ``lina-sim run`` results table
(median step after the warm-up steps) and writes ``results.csv``, per-policy timelines
and Chrome traces. With ``--profile-compute`` the mode profiles the model's compute
instead (:mod:`runtime.compute_profile`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from lina_sim.config.scenario import Scenario
from lina_sim.errors import ConfigError
from lina_sim.network.alone import AloneTimes
from lina_sim.results.files import atomic_write_text
from lina_sim.results.rows import point_columns
from lina_sim.results.tables import format_scheduler_cost, format_training_table, point_title
from lina_sim.results.timeline import Event, write_chrome_trace
from lina_sim.training.breakdown import mean_breakdown
from lina_sim.training.launch_plan import planned_micro_ops
from lina_sim.training.run import PolicyEntry, TrainingSetup, choose_shape, resolve_training
from lina_sim.workload.graph import build_training_graph
from runtime.comm import Clock, CommScheduler, GradSync, RankExchange, comm_groups
from runtime.compute_profile import profile_compute_rank, write_compute_profile
from runtime.context import RankContext
from runtime.dist import report_progress
from runtime.ep_moe import TORCH_DTYPES, EPTransformer, Layout, batch
from runtime.mode import Mode, Timelines, median_span, span_timeline


def global_name(tensor: str, lay: Layout) -> str:
    """``L0.expert1.w1`` on ep rank 2 with k = 2 -> ``L0.E5.w1``: the same expert's name
    under any packing (non-expert names unchanged)."""
    parts = tensor.split(".")
    if len(parts) == 3 and parts[1].startswith("expert"):
        return f"{parts[0]}.E{lay.ep_rank * lay.k + int(parts[1][6:])}.{parts[2]}"
    return tensor


@dataclass
class StepRecord:
    """One step on one rank (a :class:`runtime.mode.Span`): [start, end) on the common
    clock (s), its events, loss, and the scheduler's own cost (s)."""

    start: float
    end: float
    events: list[Event]
    loss: float
    sched_busy_s: float
    handoff_s: list[float]


# ---------------------------------------------------------------------------------------
# Rank side: one policy on one rank, and every policy in turn
# ---------------------------------------------------------------------------------------
class PolicyRunner:
    """One training policy on this rank: its model, scheduler thread and gradient hooks,
    run one step at a time (:meth:`step`) so that policies can take turns."""

    def __init__(
        self,
        ctx: RankContext,
        setup: TrainingSetup,
        entry: PolicyEntry,
        dispatch: str = "padded",
        keep_grads: bool = False,
    ):
        self.ctx, self.setup, self.entry, self.keep_grads = ctx, setup, entry, keep_grads
        info = ctx.info
        # The very decisions the simulator makes, so measured and predicted runs share
        # k, r and the launch plan.
        alone = AloneTimes(setup.cluster, setup.algos)
        policy, self.k, self.r = choose_shape(setup, entry, alone)
        graph = build_training_graph(
            setup.model,
            setup.cluster,
            experts_per_device=self.k,
            pipeline_degree=self.r,
            dispatch_kernels=policy.dispatch_kernels,
        )
        ep_comm = graph.communicators["ep"]
        base = ctx.groups(ep_comm.size)
        self.groups = comm_groups(info.rank, graph, base.ep, base.dp)
        ep_group = ep_comm.group_of(info.rank)
        self.lay = Layout(
            k=self.k,
            ep_size=ep_comm.size,
            ep_rank=ep_group.index(info.rank),
            r=self.r,
            dispatch=dispatch,
            kernels=policy.dispatch_kernels,
        )
        self.model = EPTransformer(setup.model, self.lay, setup.scenario.seed).to(
            info.device, TORCH_DTYPES[setup.model.dtype]
        )
        self.tensors = self.model.grad_tensors()
        t0 = time.perf_counter()
        # partition_gradients (and a policy's launch plan): once per run, as in Lina.
        self.micro = planned_micro_ops(graph, policy, setup.cluster, setup.compute.op_time, alone)
        self.partition_s = time.perf_counter() - t0
        self.a2a_mops = {m.id: m for m in self.micro if m.is_a2a}
        self.ops = {o.name: o for o in graph.ops}
        experts = self.model.expert_params()
        expected = {p: (self.r if p in experts else 1) for p in self.model.parameters()}
        self.clock = Clock(ctx.now, info.device)
        self.sched = CommScheduler(policy, ctx.now, self.micro)
        self.grads = GradSync(self.sched, self.tensors, [m for m in self.micro if not m.is_a2a], self.groups, expected)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, foreach=False)
        self.records: list[StepRecord] = []
        self.final_grads: dict[str, torch.Tensor] | None = None

    def step(self, step: int) -> None:
        """One training step (batch ``step``), recorded."""
        ctx, info, sched = self.ctx, self.ctx.info, self.sched
        tokens, targets = (
            x.to(info.device) for x in batch(self.setup.model, self.setup.scenario.seed, info.rank, step)
        )
        sched.new_step()
        self.grads.reset()
        ex = RankExchange(info.rank, sched, self.a2a_mops, self.groups["ep"], self.groups["meta"], self.clock, self.ops)
        self.opt.zero_grad(set_to_none=True)
        dist.barrier()
        self.clock.start_step()
        start = ctx.now()
        loss = self.model.loss(tokens, targets, ex)
        ex.mark("head.bwd")
        (loss / info.world_size).backward()  # allreduce sums: the mean over ranks
        ex.pause()
        self.grads.wait_all()
        if self.keep_grads and self.final_grads is None:
            self.final_grads = {
                global_name(n, self.lay): torch.cat([p.grad.reshape(-1) for p in ps]).cpu()
                for n, ps in self.tensors.items()
            }
        ex.mark("optimizer")
        self.opt.step()
        events = ex.compute_events()  # closes the optimizer's mark
        end = events[-1].end if events else ctx.now()
        events += [
            Event(
                info.rank,
                it.mop.stream,
                it.mop.id,
                it.mop.kind,
                it.t_issue,
                it.t_end,
                it.mop.layer,
                it.mop.chunk,
                it.mop.nbytes,
            )
            for it in sched.done_items
        ]
        self.records.append(StepRecord(start, end, events, float(loss.detach()), sched.busy_s, list(sched.handoff_s)))

    def close(self) -> None:
        self.sched.stop()
        self.grads.remove()

    def result(self) -> dict:
        return {
            "label": self.entry.label,
            "name": self.entry.name,
            "k": self.k,
            "r": self.r,
            "records": self.records,
            "grads": self.final_grads,
            "micro_ops": len(self.micro),
            "partition_s": self.partition_s,
        }


def train_policies(
    ctx: RankContext,
    setup: TrainingSetup,
    entries: Sequence[PolicyEntry],
    steps: int,
    dispatch: str = "padded",
    keep_grads: bool = False,
) -> list[dict]:
    """Run ``steps`` training steps of every policy on this rank, interleaved (step i of
    every policy, then step i + 1), so that a slow drift of the host or the network
    during the run falls on every policy alike instead of on whichever ran then."""
    runners: list[PolicyRunner] = []
    try:
        for e in entries:
            runners.append(PolicyRunner(ctx, setup, e, dispatch, keep_grads))
        for step in range(steps):
            for runner in runners:
                runner.step(step)
            report_progress(ctx.info.rank, step + 1, steps, "training steps (every policy)")
    finally:
        for runner in runners:
            runner.close()
    return [runner.result() for runner in runners]


def select_policies(setup: TrainingSetup, only: str | None) -> list[PolicyEntry]:
    """The policies ``--policies`` names (comma-separated labels), all without it."""
    if not only:
        return setup.policies
    want = [s.strip() for s in only.split(",") if s.strip()]
    labels = [p.label for p in setup.policies]
    for w in want:
        if w not in labels:
            raise ConfigError("--policies", f"no policy labelled {w!r} in the scenario", labels)
    return [p for p in setup.policies if p.label in want]


# ---------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------
class TrainingMode(Mode):
    """``kind: training`` scenarios: every policy of every point trained on every rank
    (or, with ``--profile-compute``, the model's compute profiled instead)."""

    kind = "training"

    def resolve(self, point: Scenario) -> TrainingSetup:
        return resolve_training(point)

    def rank_main(self, ctx: RankContext, setups: list[TrainingSetup], args: argparse.Namespace) -> dict:
        if args.profile_compute:
            # One table for the first point: all points of a validation share one model shape.
            return {"kind": "profile", "rows": profile_compute_rank(ctx, setups[0])}
        out = []
        for setup in setups:
            steps = (args.steps or setup.steps) + args.warmup
            runs = train_policies(
                ctx, setup, select_policies(setup, args.policies), steps, args.dispatch, args.keep_grads
            )
            out.append({"runs": runs, "warmup": args.warmup})
        return {"kind": self.kind, "points": out}

    def measured_frame(self, results: list[dict], setups: list[TrainingSetup]) -> tuple[pd.DataFrame, Timelines]:
        """``lina-sim run``'s columns plus measured extras (step time spread, loss, the
        scheduler's cost), and the median step's timeline per (point, policy label)."""
        rows, timelines = [], {}
        for pi, setup in enumerate(setups):
            runs_by_rank = [res["points"][pi]["runs"] for res in results]
            warmup = results[0]["points"][pi]["warmup"]
            base = None
            for j, run in enumerate(runs_by_rank[0]):
                per_rank = [rr[j]["records"] for rr in runs_by_rank]
                times, pick = median_span(per_rank, warmup)
                tl = span_timeline(per_rank, pick)
                timelines[(pi, run["label"])] = tl
                step = statistics.median(times)
                base = base or step
                rec = [r[pick] for r in per_rank]
                sched_busy = statistics.mean(r.sched_busy_s for r in rec)
                handoff = [h for r in rec for h in r.handoff_s]
                rows.append(
                    {
                        "point": pi,
                        **point_columns(setup, run["label"], run["name"]),
                        "experts_per_device": run["k"],
                        "pipeline_degree": run["r"],
                        "step_time_s": step,
                        "speedup": base / step,
                        **{f"{k}_s": v for k, v in mean_breakdown(tl).items()},
                        "bwd_a2a_slowdown_median": float("nan"),
                        "bwd_a2a_slowdown_p95": float("nan"),
                        "bwd_a2a_slowdown_max": float("nan"),
                        "collectives": run["micro_ops"],
                        "sim_wall_s": float(sum(times)),
                        "step_time_min_s": min(times),
                        "step_time_max_s": max(times),
                        "steps": len(times),
                        "step_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
                        "loss_step0": statistics.mean(rr[j]["records"][0].loss for rr in runs_by_rank),
                        "sched_busy_s": sched_busy,
                        "sched_busy_frac": sched_busy / step,
                        "partition_s": statistics.mean(rr[j]["partition_s"] for rr in runs_by_rank),
                        "handoff_median_s": float(np.median(handoff)) if handoff else 0.0,
                        "handoff_total_s": float(sum(handoff)) / len(rec),
                        **setup.scenario.swept,
                    }
                )
        return pd.DataFrame(rows), timelines

    def finish(self, results: list[dict], setups: list[TrainingSetup], args: argparse.Namespace, out: Path) -> int:
        if args.profile_compute:
            path = write_compute_profile(results, args.profile_compute)
            print(f"# compute profile: {path}")
            return 0
        df, timelines = self.measured_frame(results, setups)
        for pi, setup in enumerate(setups):
            sub = df[df["point"] == pi]
            print(format_training_table(sub, point_title(setup) + " [measured]"))
            print(format_scheduler_cost(sub))
            print()
        for (pi, label), tl in timelines.items():
            suffix = f"-p{pi}" if len(setups) > 1 else ""
            atomic_write_text(out / f"timeline{suffix}-{label}.csv", tl.to_csv(index=False))
            write_chrome_trace(tl, out / f"trace{suffix}-{label}.json", name="lina-run")
        path = atomic_write_text(out / "results.csv", df.to_csv(index=False))
        print(f"# measured results: {path}; timelines and traces in {out}/")
        return 0
