"""The training-policy contract (docs/ARCHITECTURE.md, contract 2) and the plain data it decides on.

A training policy decides four things and nothing else:

1. how each gradient allreduce request is partitioned into micro-ops
   (:meth:`TrainingPolicy.partition_gradients`);
2. which pending micro-ops one rank launches now, given what is pending and in flight on
   that rank (:meth:`TrainingPolicy.select`), optionally after planning, once per step
   and identically on every rank, in which gap between all-to-alls each allreduce
   micro-op may run (:meth:`TrainingPolicy.plan`, from a :class:`ProgramEstimate`);
3. the all-to-all/FFN pipelining degree (:attr:`TrainingPolicy.pipeline_degree`);
4. the number of experts per device (:meth:`TrainingPolicy.experts_per_device`).

It may change *when* a micro-op launches and how a request is cut, never the relative
order of micro-ops within one communicator, and its decisions are a pure function of its
inputs, so every rank decides the same. That is what keeps real collectives from
deadlocking: every rank of a communicator issues the same collectives in the same order.

Everything here is plain data (frozen dataclasses, tuples, strings, floats) so that the
simulator's engine and the torch.distributed executor drive the same objects. This
module must import neither simpy nor torch (tests/test_policy_purity.py checks it).

Units: bytes, seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lina_sim.config.fields import Field, check_fields
from lina_sim.errors import ConfigError
from lina_sim.workload.comm import ALL_TO_ALL, ALLREDUCE, GradRequest, MicroOp, PackingEstimate
from lina_sim.workload.moe_ops import DISPATCH_KERNELS

NO_GAP = 2**62  # RankView.first_owed_gap when no planned micro-op is owed


@dataclass(frozen=True, slots=True)
class ProgramEstimate:
    """One rank's step as estimated before it runs, for planning launches (seconds from
    the step's start, every rank alike: the program is SPMD).

    - ``a2a_start_s[j]`` / ``a2a_end_s[j]``: when the all-to-all with ``seq == j`` would
      start and end with no allreduce traffic (its dependencies done and the previous
      all-to-all finished; its time alone on the network);
    - ``op_end_s[op_id]``: when each compute op would end;
    - ``min_gap[op_id]``: how many all-to-alls (in ``seq`` order) must complete before
      that compute op can: its own dependencies and those of every compute op before it
      in program order (one compute stream).
    """

    a2a_start_s: tuple[float, ...]
    a2a_end_s: tuple[float, ...]
    op_end_s: Mapping[int, float]
    min_gap: Mapping[int, int]

    @property
    def gaps(self) -> int:
        """Gap indices run 0 .. ``gaps - 1``; the last one has no all-to-all after it."""
        return len(self.a2a_start_s) + 1

    def gap_window(self, j: int) -> tuple[float, float]:
        """[start, end) of gap ``j`` in s: from the end of all-to-all ``j - 1`` (0 for
        the first) to the start of all-to-all ``j`` (infinite for the last)."""
        start = self.a2a_end_s[j - 1] if j > 0 else 0.0
        end = self.a2a_start_s[j] if j < len(self.a2a_start_s) else math.inf
        return start, end


@dataclass(frozen=True, slots=True)
class RankView:
    """What one rank's scheduler sees at a decision point.

    - ``pending``: submitted (ready to go) but not launched, in submission order; within
      one communicator that is ``seq`` order.
    - ``in_flight``: launched and not yet completed (including a collective still waiting
      for the other ranks to launch it, and one queued behind another on its stream).
    - ``open_moe_blocks``: layers whose backward combine all-to-all has been launched on
      this rank and whose last backward dispatch all-to-all has not completed.
    - ``pending_a2a`` / ``pending_allreduce``: ``pending`` split by kind, each in
      submission order (derived when not given; a scheduler passes them so that a
      policy need not scan a long queue of held-back gradients at every decision).
    - ``a2a_done``: all-to-alls completed on this rank this step (they complete in
      ``seq`` order: one stream).
    - ``first_owed_gap``: the smallest ``gap`` of a planned allreduce micro-op not yet
      completed on this rank (:data:`NO_GAP` when none is owed).
    """

    pending: tuple[MicroOp, ...] = ()
    in_flight: tuple[MicroOp, ...] = ()
    open_moe_blocks: frozenset[int] = frozenset()
    pending_a2a: tuple[MicroOp, ...] | None = None
    pending_allreduce: tuple[MicroOp, ...] | None = None
    a2a_done: int = 0
    first_owed_gap: int = NO_GAP

    def __post_init__(self) -> None:
        if self.pending_a2a is None:
            object.__setattr__(self, "pending_a2a", tuple(m for m in self.pending if m.kind == ALL_TO_ALL))
        if self.pending_allreduce is None:
            object.__setattr__(self, "pending_allreduce", tuple(m for m in self.pending if m.kind != ALL_TO_ALL))


def pipeline_param(default: int) -> Field:
    """The ``pipeline_degree`` parameter, with a policy's own default."""
    return Field(int, default, minimum=1, help="chunks of each all-to-all and expert FFN, along tokens (1: none)")


def dispatch_kernels_param(default: str) -> Field:
    """The ``dispatch_kernels`` parameter, with the default of the system a policy is
    named after (:mod:`lina_sim.workload.moe_ops`)."""
    return Field(
        str,
        default,
        choices=DISPATCH_KERNELS,
        help="how tokens enter and leave the experts' capacity buffer: einsum (DeepSpeed-MoE's dense "
        "dispatch_mask einsums) or sparse (Tutel's scatter and gather)",
    )


class TrainingPolicy:
    """Base training policy: everything launches as soon as it is submitted.

    Subclasses override :meth:`partition_gradients`, :meth:`select` and
    :meth:`experts_per_device`, and declare their parameters in ``PARAMS``
    (name -> :class:`~lina_sim.config.fields.Field`). Attributes the engine reads:

    - ``pipeline_degree`` (int): chunks r of each dispatch all-to-all / expert FFN /
      combine all-to-all, along tokens;
    - ``dispatch_kernels`` (str): the kernels that move tokens into the experts'
      capacity buffer and back (``einsum`` or ``sparse``);
    - ``isolated_allreduce`` (bool): if True, allreduce traffic never shares bandwidth
      with all-to-all traffic (only the ``no-contention`` lower bound sets it);
    - ``plans_launches`` (bool): whether :meth:`plan` plans anything (else the caller
      skips estimating the program).
    """

    PARAMS: ClassVar[dict[str, Field]] = {}
    pipeline_degree: int = 1
    dispatch_kernels: str = "einsum"
    isolated_allreduce: bool = False
    plans_launches: bool = False  # True: :meth:`plan` sets MicroOp.gap, so callers estimate the program

    def __init__(self, name: str, **params: Any) -> None:
        self.name = name
        self.params = dict(params)
        for key, value in params.items():
            setattr(self, key, value)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_params(cls, name: str, _where: str | None = None, **params: Any) -> TrainingPolicy:
        """Validate ``params`` against ``PARAMS`` and build the policy.

        ``_where`` is the YAML path of the policy's entry (default ``policies.<name>``);
        errors name ``<_where>.<param>`` and what is allowed.
        """
        where = _where or f"policies.{name}"
        policy = cls(name=name, **check_fields(params, cls.PARAMS, where, what=f"parameter of policy {name!r}"))
        policy.check_combination(where)
        return policy

    def check_combination(self, where: str) -> None:
        """Cross-parameter rules, checked after each parameter passed its ``Field``
        (default: none); a violation is a ConfigError naming ``<where>.<param>``."""

    def only_with(self, where: str, param: str, switch: str, values: Sequence[str]) -> None:
        """A ConfigError naming ``<where>.<param>`` if ``param`` is set away from its
        default while ``switch`` is not one of ``values`` (where ``param`` is ignored)."""
        if getattr(self, switch) in values or getattr(self, param) == self.PARAMS[param].default:
            return
        raise ConfigError(
            f"{where}.{param}",
            f"got {getattr(self, param)!r}, but it is only used with {switch}: {' or '.join(values)} "
            f"(here {switch}: {getattr(self, switch)})",
            f"{self.PARAMS[param].default!r} (the default) with {switch}: {getattr(self, switch)}",
        )

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for result tables."""
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(name={self.name!r}{', ' if args else ''}{args})"

    # -- the four decisions ------------------------------------------------------------
    def partition_gradients(self, requests: Sequence[GradRequest]) -> tuple[MicroOp, ...]:
        """Cut/bucket gradient requests into allreduce micro-ops (default: one per tensor)."""
        return cut_requests(requests, math.inf)

    def select(self, view: RankView) -> tuple[MicroOp, ...]:
        """Which pending micro-ops to launch now (default: all of them, in order)."""
        return view.pending

    def plan(
        self, micro_ops: Sequence[MicroOp], program: ProgramEstimate, allreduce_s: Callable[[MicroOp], float]
    ) -> tuple[MicroOp, ...]:
        """The step's micro-ops with any launch plan set (``MicroOp.gap``), decided once
        per step from estimates every rank computes alike: ``program`` and
        ``allreduce_s(mop)``, an allreduce micro-op's time alone. Default: no plan."""
        return tuple(micro_ops)

    def experts_per_device(
        self, candidates: Sequence[int], estimates: Mapping[int, PackingEstimate] | None = None
    ) -> int:
        """Experts per device to use, among the valid ``candidates`` (ascending).

        ``estimates[k]``: the caller's :class:`lina_sim.workload.comm.PackingEstimate` of
        packing ``k`` (one expert-FFN and one all-to-all micro-op, and the step's compute,
        all-to-all and gradient allreduce, each alone). The default takes the smallest
        valid packing (one expert per device when experts = GPUs) and ignores the
        estimates.
        """
        if not candidates:
            raise ConfigError("experts_per_device", "no valid packing for this model and cluster")
        return min(candidates)


def submission_order(micro_ops: Iterable[MicroOp]) -> tuple[MicroOp, ...]:
    """The allreduce micro-ops in the order every rank submits them: by the compute op
    that makes them ready, then communicator, then ``seq``."""
    return tuple(sorted((m for m in micro_ops if not m.is_a2a), key=lambda m: (m.ready_after, m.communicator, m.seq)))


def owed_per_gap(micro_ops: Iterable[MicroOp]) -> dict[int, int]:
    """Planned allreduce micro-ops per gap (``MicroOp.gap``): what a step owes each gap,
    the same on every rank (computed once per step, handed to each RankScheduler)."""
    owed: dict[int, int] = {}
    for m in micro_ops:
        if m.gap >= 0 and not m.is_a2a:
            owed[m.gap] = owed.get(m.gap, 0) + 1
    return owed


# -- partitioning: shared by every policy ----------------------------------------------
def _ready_sorted(requests: Iterable[GradRequest]) -> list[GradRequest]:
    # The order gradients become ready; ties keep the backward's production order.
    return sorted(requests, key=lambda r: (r.ready_after, r.order))


def cut_requests(requests: Sequence[GradRequest], chunk_bytes: float, fuse_below: float = 0.0) -> tuple[MicroOp, ...]:
    """Cut each tensor into ``ceil(size / chunk_bytes)`` equal micro-ops; never mix tensors.

    ``chunk_bytes = inf`` keeps every tensor whole. ``fuse_below > 0`` is an opt-in
    deviation: consecutive tensors smaller than it share one micro-op (up to
    ``chunk_bytes``), trading the no-mixing rule for fewer latency-bound collectives.
    Micro-ops are numbered per communicator in the order their tensors become ready.
    """
    out: list[MicroOp] = []
    seq: dict[str, int] = {}
    small: dict[str, list[GradRequest]] = {}

    def emit(
        comm: str, pieces: list[tuple[str, float]], layer: int, ready: int, chunk: int, chunks: int, ident: str
    ) -> None:
        s = seq.get(comm, 0)
        seq[comm] = s + 1
        out.append(
            MicroOp(
                id=ident,
                kind=ALLREDUCE,
                communicator=comm,
                seq=s,
                nbytes=sum(b for _, b in pieces),
                layer=layer,
                chunk=chunk,
                chunks=chunks,
                ready_after=ready,
                pieces=tuple(pieces),
            )
        )

    def flush(comm: str) -> None:
        group = small.pop(comm, [])
        if group:
            emit(
                comm,
                [(g.name, g.nbytes) for g in group],
                group[-1].layer,
                group[-1].ready_after,
                0,
                1,
                f"{comm}.{group[0].name}" + (f"+{len(group) - 1}" if len(group) > 1 else ""),
            )

    for r in _ready_sorted(requests):
        comm = r.communicator
        if r.nbytes < fuse_below:
            small.setdefault(comm, []).append(r)
            if sum(g.nbytes for g in small[comm]) >= min(chunk_bytes, fuse_below):
                flush(comm)
            continue
        flush(comm)  # keep ready order within the communicator
        n = 1 if math.isinf(chunk_bytes) else max(1, math.ceil(r.nbytes / chunk_bytes - 1e-9))
        for i in range(n):
            emit(
                comm,
                [(r.name, r.nbytes / n)],
                r.layer,
                r.ready_after,
                i,
                n,
                f"{comm}.{r.name}" + (f".p{i}" if n > 1 else ""),
            )
    for comm in list(small):
        flush(comm)
    return submission_order(out)


def bucket_requests(requests: Sequence[GradRequest], cap_bytes: float) -> tuple[MicroOp, ...]:
    """PyTorch-DDP-style buckets: tensors in ready order fill a bucket until it holds at
    least ``cap_bytes``; a bucket is ready when its last tensor is. Buckets never mix
    communicators (a collective runs on exactly one)."""
    out: list[MicroOp] = []
    open_: dict[str, list[GradRequest]] = {}
    count: dict[str, int] = {}

    def close(comm: str) -> None:
        members = open_.pop(comm)
        s = count.get(comm, 0)
        count[comm] = s + 1
        last = members[-1]
        out.append(
            MicroOp(
                id=f"{comm}.bucket{s}",
                kind=ALLREDUCE,
                communicator=comm,
                seq=s,
                nbytes=sum(m.nbytes for m in members),
                layer=last.layer,
                ready_after=max(m.ready_after for m in members),
                pieces=tuple((m.name, m.nbytes) for m in members),
            )
        )

    for r in _ready_sorted(requests):
        open_.setdefault(r.communicator, []).append(r)
        if sum(m.nbytes for m in open_[r.communicator]) >= cap_bytes:
            close(r.communicator)
    for comm in list(open_):
        close(comm)
    # Interleave communicators by readiness so the list reads in submission order.
    return submission_order(out)


# -- launch-rule helpers -----------------------------------------------------------------
def fifo_prefix(pending: Sequence[MicroOp], launchable: Callable[[MicroOp], bool]) -> tuple[MicroOp, ...]:
    """The launchable pending micro-ops, stopping each communicator at its first blocked
    one, so that no micro-op ever overtakes an earlier one of its communicator."""
    blocked: set[str] = set()
    out = []
    for m in pending:
        if m.communicator in blocked:
            continue
        if launchable(m):
            out.append(m)
        else:
            blocked.add(m.communicator)
    return tuple(out)


def check_selection(view: RankView, chosen: Sequence[MicroOp]) -> None:
    """Raise ValueError if ``chosen`` breaks the contract: it must be pending micro-ops
    that form, per communicator, a prefix of that communicator's pending ones."""
    pending_ids = [m.id for m in view.pending]
    chosen_ids = {m.id for m in chosen}
    if len(chosen_ids) != len(chosen) or not chosen_ids <= set(pending_ids):
        raise ValueError("a policy may only launch pending micro-ops, each once")
    skipped: set[str] = set()
    for m in view.pending:
        if m.id in chosen_ids:
            if m.communicator in skipped:
                raise ValueError(f"{m.id} overtakes an earlier micro-op of communicator {m.communicator!r}")
        else:
            skipped.add(m.communicator)


class RankScheduler:
    """One rank's communication scheduler: the bookkeeping around a policy's ``select``.

    It models Lina's per-device scheduler thread: a queue of submitted micro-ops, the
    set in flight, and the MoE blocks open on this rank. The engine (or the runtime
    executor) calls :meth:`submit` when a micro-op becomes ready, :meth:`poll` after
    every event on the rank to learn what to launch, and :meth:`complete` when a
    launched micro-op finishes. A micro-op submitted ahead of an earlier one of its
    communicator is held back until the gap is filled, so launches stay in ``seq`` order.
    ``owed`` (:func:`owed_per_gap` of the step's planned micro-ops) tells it what the
    step owes each gap before those micro-ops are submitted.
    """

    def __init__(self, policy: TrainingPolicy, validate: bool = True, owed: Mapping[int, int] | None = None) -> None:
        self.policy = policy
        self.validate = validate
        self._pending_a2a: list[MicroOp] = []
        self._pending_ar: list[MicroOp] = []
        self._in_flight: dict[str, MicroOp] = {}
        self._open: set[int] = set()
        self._next_seq: dict[str, int] = {}
        self._held: dict[str, dict[int, MicroOp]] = {}
        self._a2a_done = 0
        self._owed = dict(owed or {})
        self._first_owed = min(self._owed, default=NO_GAP)

    def submit(self, mop: MicroOp) -> None:
        comm = mop.communicator
        held = self._held.setdefault(comm, {})
        held[mop.seq] = mop
        nxt = self._next_seq.get(comm, 0)
        while nxt in held:
            m = held.pop(nxt)
            (self._pending_a2a if m.is_a2a else self._pending_ar).append(m)
            nxt += 1
        self._next_seq[comm] = nxt

    def view(self) -> RankView:
        a2a, ar = tuple(self._pending_a2a), tuple(self._pending_ar)
        return RankView(
            a2a + ar, tuple(self._in_flight.values()), frozenset(self._open), a2a, ar, self._a2a_done, self._first_owed
        )

    def poll(self) -> tuple[MicroOp, ...]:
        """Ask the policy what to launch now; mark it in flight and return it in order."""
        if not self._pending_a2a and not self._pending_ar:
            return ()
        view = self.view()
        chosen = tuple(self.policy.select(view))
        if not chosen:
            return ()
        if self.validate:
            check_selection(view, chosen)
        self._pending_a2a = _without(self._pending_a2a, [m for m in chosen if m.is_a2a])
        self._pending_ar = _without(self._pending_ar, [m for m in chosen if not m.is_a2a])
        for m in chosen:
            self._in_flight[m.id] = m
            if m.is_a2a and m.phase == "bwd" and m.role == "combine":
                self._open.add(m.layer)
        return chosen

    def complete(self, mop: MicroOp) -> None:
        del self._in_flight[mop.id]
        if mop.is_a2a:
            self._a2a_done += 1
            if mop.phase == "bwd" and mop.role == "dispatch" and mop.chunk == mop.chunks - 1:
                self._open.discard(mop.layer)
        elif mop.gap >= 0:
            left = self._owed[mop.gap] - 1
            if left:
                self._owed[mop.gap] = left
            else:
                del self._owed[mop.gap]
                if mop.gap == self._first_owed:
                    self._first_owed = min(self._owed, default=NO_GAP)

    @property
    def idle(self) -> bool:
        """Nothing pending, held back or in flight."""
        return not self._pending_a2a and not self._pending_ar and not self._in_flight and not any(self._held.values())


def _without(queue: list[MicroOp], chosen: list[MicroOp]) -> list[MicroOp]:
    if not chosen:
        return queue
    n = len(chosen)
    if queue[:n] == chosen:  # the usual case: a prefix launches
        return queue[n:]
    ids = {m.id for m in chosen}
    return [m for m in queue if m.id not in ids]
