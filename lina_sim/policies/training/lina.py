"""Lina's training scheduler (ATC'23, section 4) and its ablations.

- Gradients are cut into equal micro-ops (``micro_op_mb``, default 30 MB), never mixing
  tensors, so a launched allreduce (which cannot be preempted) runs for a bounded time.
- When micro-ops launch (``launch``):

  - ``"planned"`` (default): an all-to-all never shares the network with an allreduce
    micro-op on the same rank. An all-to-all that arrives while a micro-op runs waits
    for it (preemption at micro-op boundaries), and a micro-op never starts while an
    all-to-all runs. Waiting is only safe if every rank launches the same micro-ops
    between the same two all-to-alls (else rank A holds all-to-all X behind micro-op m
    that rank B, already inside X, never launches: a deadlock). So once per step, from
    the step's estimated program (compute-model op times, all-to-alls and micro-ops
    alone on the network), every rank plans the same thing: in submission order, each
    micro-op goes into the first gap between all-to-alls, at or after the one where
    its gradient is ready, that it fits into behind the micro-ops already there; what
    fits nowhere runs after the last all-to-all.
  - ``"local"``: the paper's per-device rule, decided on this rank's state alone: an
    allreduce micro-op launches only while no all-to-all is pending or running on this
    rank, at most one at a time (the scheduler is one thread with a priority queue, and
    a second launched micro-op could not be held back any more). An all-to-all that
    arrives meanwhile launches at once, sharing the network with that one micro-op.
    With ``hold = "moe-block"`` (default) not once a layer's backward combine
    all-to-all has started until that layer's backward dispatch all-to-all has
    finished: the expert FFN between them is too short to hide a micro-op, which would
    then overlap the dispatch. ``hold = "a2a"`` drops that clause and lets allreduce
    fill the expert-FFN gap. (``hold`` has no effect on a plan, which sizes gaps from
    estimates.)
- What is cut (``partition_of``): ``"bucket"`` (default) first builds the buckets the
  underlying framework (``framework``, default the ``deepspeed`` baseline's 25 MB
  buckets) would reduce, then cuts each bucket into equal micro-ops, each ready when its
  bucket is (:func:`~lina_sim.policies.training.grad_sync.partition_buckets`): Lina is
  built on DeepSpeed-MoE and partitions what it launches. ``"tensor"`` cuts each
  gradient tensor on its own (:func:`~lina_sim.policies.training.base.cut_requests`).
  Lina's source is not public, so which one it does is not known
  (docs/gradient-sync-research.md, section 3). With ``bucket``, a micro-op size at or
  above the bucket size cuts nothing.
- The all-to-all and expert FFN are pipelined in ``pipeline_degree`` chunks.
- Experts per device (``packing``): ``cost`` (default) takes the valid packing with the
  lowest estimated step time (:class:`lina_sim.workload.graph.PackingEstimate`: compute,
  all-to-all and the allreduce backward compute cannot cover, expert-gradient
  allreduces among the replicas packing creates included); ``paper`` doubles the packing
  (1, 2, 4, ...) while one FFN micro-op is still shorter than one all-to-all micro-op,
  the paper's rule, which ignores the expert-gradient allreduce; ``off`` keeps one
  expert per device.

Pure: no simpy, no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from lina_sim.config.fields import Field
from lina_sim.policies.training.base import (
    ProgramEstimate,
    RankView,
    TrainingPolicy,
    bucket_requests,
    cut_requests,
    dispatch_kernels_param,
    pipeline_param,
    submission_order,
)
from lina_sim.policies.training.deepspeed import BUCKET_MB, DeepSpeedPolicy
from lina_sim.policies.training.grad_sync import FRAMEWORKS, framework_buckets, partition_buckets
from lina_sim.workload.comm import MB, GradRequest, MicroOp, PackingEstimate

HOLDS = ("moe-block", "a2a")
PACKINGS = ("cost", "paper", "off")
LAUNCHES = ("planned", "local")
PARTITIONS = ("tensor", "bucket")
MIN_MICRO_OP_MB = 0.001  # 1 KB (10^3 bytes)


class LinaPolicy(TrainingPolicy):
    """Lina: all-to-all first, gradients in bounded micro-ops, a2a/FFN pipelining and
    expert packing. Sizes in MB (10^6 bytes)."""

    PARAMS: ClassVar[dict[str, Field]] = {
        # At least 1 KB: below that an allreduce is pure launch and protocol latency (NCCL's
        # LL protocol floor, ~10 us on any size up to a few KB in nccl-tests), so smaller
        # micro-ops add only collectives, and their count grows without bound.
        "micro_op_mb": Field(
            float,
            30.0,
            minimum=MIN_MICRO_OP_MB,
            allowed=f"a number of MB >= {MIN_MICRO_OP_MB} (1 KB)",
            help="largest allreduce micro-op, MB (10^6 bytes)",
        ),
        "pipeline_degree": pipeline_param(2),
        # Lina is built on DeepSpeed-MoE: its dispatch and combine einsums.
        "dispatch_kernels": dispatch_kernels_param("einsum"),
        "packing": Field(
            object,
            "cost",
            predicate=lambda v: v in PACKINGS or isinstance(v, bool),
            allowed=f"{', '.join(PACKINGS)} (true: cost, false: off)",
            help="how experts per device are chosen: estimated step cost, the paper's rule, or one per device",
        ),
        "max_experts_per_device": Field(int, 16, minimum=1, help="most experts packing puts on one device"),
        "hold": Field(str, "moe-block", choices=HOLDS, help="with launch: local, what holds allreduce back"),
        "launch": Field(str, "planned", choices=LAUNCHES, help="when allreduce micro-ops launch"),
        # Opt-in deviation (default off, as specified): fuse consecutive tensors smaller
        # than this many MB into one micro-op, so tiny LayerNorm/bias tensors do not each
        # pay a collective's latency.
        "fuse_below_mb": Field(
            float,
            0.0,
            minimum=0,
            allowed="a number of MB >= 0",
            help="with partition_of: tensor, fuse consecutive tensors smaller than this into one micro-op, "
            "MB (0: never)",
        ),
        "partition_of": Field(
            str,
            "bucket",
            choices=PARTITIONS,
            help="what is cut into micro-ops: each gradient tensor, or each bucket of the framework's",
        ),
        # With partition_of: bucket, whose buckets: ddp-25mb matches the deepspeed
        # policy's default (so Lina partitions exactly the buckets that baseline reduces,
        # launched during backward); zero (DeepSpeed's real default) makes every bucket
        # ready only after backward, when no all-to-all is left to give way to.
        "framework": Field(
            str,
            "ddp-25mb",
            choices=FRAMEWORKS,
            help="with partition_of: bucket, the buckets partitioned: ddp-25mb (25 MB, during backward), "
            "zero (DeepSpeed ZeRO 0/1, 5e8 elements, after backward) or ddp (PyTorch DDP, 1 MiB then 25 MiB)",
        ),
        # The deepspeed baseline's bucket_mb, so Lina cuts the very buckets it reduces.
        "bucket_mb": dataclasses.replace(
            BUCKET_MB, help="with framework: ddp-25mb, the size of the buckets cut, MB (as deepspeed's bucket_mb)"
        ),
    }
    micro_op_mb: float
    partition_of: str
    framework: str
    bucket_mb: float
    fuse_below_mb: float
    packing: str | bool
    max_experts_per_device: int
    hold: str
    launch: str

    @property
    def plans_launches(self) -> bool:
        return self.launch == "planned"

    # How gradients are cut; the ablations override only this.
    def partition_gradients(self, requests: Sequence[GradRequest]) -> tuple[MicroOp, ...]:
        if self.partition_of == "bucket":
            buckets = framework_buckets(requests, self.framework, self.bucket_mb * MB)
            return partition_buckets(buckets, self.micro_op_mb * MB)
        return cut_requests(requests, self.micro_op_mb * MB, self.fuse_below_mb * MB)

    def check_combination(self, where: str) -> None:
        if "partition_of" in self.PARAMS:
            self.only_with(where, "framework", "partition_of", ("bucket",))
            self.only_with(where, "bucket_mb", "partition_of", ("bucket",))
            self.only_with(where, "bucket_mb", "framework", ("ddp-25mb",))
            self.only_with(where, "fuse_below_mb", "partition_of", ("tensor",))

    def allreduce_blocked(self, view: RankView) -> bool:
        """True while no allreduce micro-op may launch on this rank."""
        if view.pending_a2a:
            return True
        if view.in_flight:  # an all-to-all running, or the one allowed allreduce micro-op
            return True
        return self.hold == "moe-block" and bool(view.open_moe_blocks)

    def select(self, view: RankView) -> tuple[MicroOp, ...]:
        if self.plans_launches:
            return self._select_planned(view)
        # All-to-alls always launch at once, in order: they are on the critical path.
        a2a = view.pending_a2a
        if a2a or self.allreduce_blocked(view):
            return a2a
        # Pending is in submission order, so the first allreduce is the head of its
        # communicator's queue: launching it alone never reorders a communicator.
        return view.pending_allreduce[:1]

    @staticmethod
    def _select_planned(view: RankView) -> tuple[MicroOp, ...]:
        # An all-to-all waits for every micro-op planned before it; a micro-op waits for
        # the all-to-alls before its gap. So while a micro-op of gap j is owed, all-to-all
        # j cannot start, and the ones before it are done: the two never overlap.
        out = []
        for m in view.pending_a2a:  # seq order
            if m.seq >= view.first_owed_gap:
                break
            out.append(m)
        for m in view.pending_allreduce:  # submission order, gaps non-decreasing
            if m.gap > view.a2a_done:
                break
            out.append(m)
        return tuple(out)

    def plan(
        self, micro_ops: Sequence[MicroOp], program: ProgramEstimate, allreduce_s: Callable[[MicroOp], float]
    ) -> tuple[MicroOp, ...]:
        """With ``launch = "planned"``: every allreduce micro-op's gap (see the module
        docstring), first fit in submission order on one allreduce stream."""
        if not self.plans_launches:
            return tuple(micro_ops)
        grads = submission_order(micro_ops)
        last = program.gaps - 1
        gap, free = 0, 0.0  # the current gap and when the allreduce stream frees up (s)
        gaps: dict[str, int] = {}
        for m in grads:
            gap = max(gap, program.min_gap[m.ready_after])
            ready, dur = program.op_end_s[m.ready_after], allreduce_s(m)
            while True:
                lo, hi = program.gap_window(gap)
                start = max(free, ready, lo)
                if gap == last or start + dur <= hi:
                    break
                gap += 1
            free = start + dur
            gaps[m.id] = gap
        return tuple(dataclasses.replace(m, gap=gaps[m.id]) if m.id in gaps else m for m in micro_ops)

    @property
    def packing_rule(self) -> str:
        """``packing`` as one of :data:`PACKINGS` (``true`` is ``cost``, ``false`` ``off``)."""
        if isinstance(self.packing, bool):
            return "cost" if self.packing else "off"
        return self.packing

    def experts_per_device(
        self, candidates: Sequence[int], estimates: Mapping[int, PackingEstimate] | None = None
    ) -> int:
        """Experts per device by ``packing`` (see the module docstring), among
        ``candidates`` up to ``max_experts_per_device``, from the caller's ``estimates``."""
        k = super().experts_per_device(candidates)
        rule = self.packing_rule
        if rule == "off":
            return k
        if estimates is None:
            raise ValueError("lina needs estimates {k: PackingEstimate} to choose a packing")
        valid = [c for c in candidates if c <= self.max_experts_per_device] or [k]
        if rule == "cost":
            return min(valid, key=lambda c: (estimates[c].step_s, c))
        while 2 * k in valid:
            if not estimates[k].ffn_micro_op_s < estimates[k].a2a_micro_op_s:
                break
            k *= 2
        return k


# The ablations turn packing off by default (it can still be turned on).
_no_packing = dataclasses.replace(LinaPolicy.PARAMS["packing"], default="off")


class LinaPriorityPolicy(LinaPolicy):
    """Ablation: Lina's launch rule on DeepSpeed's unpartitioned 25 MB buckets
    (``bucket_mb``); no pipelining, no packing. A launched bucket runs to its end, so an
    all-to-all that arrives meanwhile still shares bandwidth with it."""

    PARAMS: ClassVar[dict[str, Field]] = {
        "bucket_mb": DeepSpeedPolicy.PARAMS["bucket_mb"],
        "pipeline_degree": pipeline_param(1),
        "dispatch_kernels": LinaPolicy.PARAMS["dispatch_kernels"],
        "packing": _no_packing,
        "max_experts_per_device": LinaPolicy.PARAMS["max_experts_per_device"],
        "hold": LinaPolicy.PARAMS["hold"],
        "launch": LinaPolicy.PARAMS["launch"],
    }
    bucket_mb: float

    def partition_gradients(self, requests: Sequence[GradRequest]) -> tuple[MicroOp, ...]:
        return bucket_requests(requests, self.bucket_mb * MB)


class LinaPartitionPolicy(LinaPolicy):
    """Ablation: Lina's launch rule and gradient partitioning; no pipelining, no packing."""

    PARAMS: ClassVar[dict[str, Field]] = {
        **LinaPolicy.PARAMS,
        "pipeline_degree": pipeline_param(1),
        "packing": _no_packing,
    }
