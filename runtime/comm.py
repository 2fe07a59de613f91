"""The communication primitives a rank runs a policy's step with: the lowest runtime module.

- :class:`Clock`: times on the run's common origin (wall clock; CUDA events on GPU);
- :class:`CommScheduler`: Lina's per-device scheduler, one thread around the policy's
  :class:`~lina_sim.policies.training.base.RankScheduler` (the object the simulator's
  engine drives): the compute thread and the gradient hooks *submit* micro-ops, the
  thread *polls* the policy and issues what it selects as async collectives, one at a
  time per stream (``a2a``, ``allreduce``) like a CUDA stream, and *completes* them when
  their futures fire;
- :class:`RankExchange`: the model's view of the scheduler (scheduled all-to-alls on
  ``ep``) and the compute marks of this rank's timeline;
- :class:`GradSync`: gradient hooks -> allreduce micro-ops, submitted in the graph's order;
- :func:`comm_groups`: the process groups of a step graph's communicators.

It imports torch and lina_sim only, never another runtime module, so every runtime
module can build on it. Process-group setup (init, world-size checks) is
:mod:`runtime.dist`'s.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lina_sim.errors import LinaSimError
from lina_sim.policies.training.base import RankScheduler, TrainingPolicy, owed_per_gap, submission_order
from lina_sim.results.timeline import Event
from lina_sim.workload.comm import MicroOp, piece_ranges
from lina_sim.workload.graph import Op, TrainingGraph

WAIT_TIMEOUT_S = 120.0  # one collective; a dead peer surfaces as gloo's own error first


# ---------------------------------------------------------------------------------------
# Clock: wall time on CPU, CUDA events on GPU
# ---------------------------------------------------------------------------------------
class Clock:
    """Times on the run's common origin (s). On GPU, :meth:`stamp` records a CUDA event
    on the current stream and :meth:`resolve` turns it into seconds after a sync."""

    def __init__(self, now: Callable[[], float], device: torch.device):
        self.now, self.cuda = now, device.type == "cuda"
        self._ref: tuple[Any, float] | None = None

    def start_step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._ref = (ev, self.now())

    def stamp(self) -> Any:
        if not self.cuda:
            return self.now()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def resolve(self, t: Any) -> float:
        if not self.cuda:
            return t
        torch.cuda.synchronize()
        ref, t0 = self._ref
        return t0 + ref.elapsed_time(t) / 1e3


# ---------------------------------------------------------------------------------------
# The scheduler thread
# ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Item:
    """One submitted micro-op: how to issue it, what to do when it completes."""

    mop: MicroOp
    issue: Callable[[], Any]  # returns an async Work (scheduler thread)
    after: Callable[[], None] | None = None  # on completion (scheduler thread)
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = 0.0
    t_issue: float = -1.0
    t_end: float = -1.0
    work: Any = None
    error: BaseException | None = None


class CommScheduler:
    """Lina's per-device scheduler: one thread around the policy's RankScheduler.

    ``submit`` (any thread) queues a micro-op; the thread submits it to the
    RankScheduler, polls the policy, issues what it selects on the micro-op's stream
    (one collective at a time per stream, in launch order) and completes micro-ops when
    their futures fire. ``busy_s`` is the thread's own time in submit/poll/complete.
    """

    def __init__(self, policy: TrainingPolicy, now: Callable[[], float], micro_ops: Sequence[MicroOp] = ()):
        self.policy, self.now, self.owed = policy, now, owed_per_gap(micro_ops)
        self._cv = threading.Condition()
        self._inbox: list[Item] = []
        self._finished: list[Item] = []
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lina-scheduler", daemon=True)
        self.new_step()
        self._thread.start()

    def new_step(self) -> None:
        """Fresh scheduler state: micro-op sequence numbers restart every step."""
        self.sched = RankScheduler(self.policy, owed=self.owed)
        self.streams: dict[str, collections.deque[Item]] = {
            "a2a": collections.deque(),
            "allreduce": collections.deque(),
        }
        self.items: dict[str, Item] = {}
        self.done_items: list[Item] = []
        self.busy_s = 0.0
        self.handoff_s: list[float] = []
        self._last_allreduce_end = -1.0

    # -- any thread -------------------------------------------------------------------
    def submit(self, mop: MicroOp, issue: Callable[[], Any], after: Callable[[], None] | None = None) -> Item:
        it = Item(mop, issue, after, t_submit=self.now())
        with self._cv:
            if self._error is not None:
                raise LinaSimError(f"scheduler: {self._error}")
            self._inbox.append(it)
            self._cv.notify()
        return it

    def wait(self, it: Item, timeout: float = WAIT_TIMEOUT_S) -> None:
        if not it.done.wait(timeout):
            raise LinaSimError(
                f"scheduler: {it.mop.id} did not complete within {timeout:.0f} s "
                f"({'never launched' if it.t_issue < 0 else 'launched, peers missing'})"
            )
        if it.error is not None:
            raise LinaSimError(f"collective {it.mop.id} failed: {str(it.error).splitlines()[0][:200]}")

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- the thread -------------------------------------------------------------------
    def _on_future(self, it: Item) -> None:
        it.t_end = self.now()
        with self._cv:
            self._finished.append(it)
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._finished or self._stop):
                    self._cv.wait()
                if self._stop:
                    return
                new, finished = self._inbox, self._finished
                self._inbox, self._finished = [], []
            try:
                self._step(new, finished)
            except BaseException as e:  # a failed collective: fail every waiter, loudly
                self._fail(e)

    def _step(self, new: list[Item], finished: list[Item]) -> None:
        t0 = time.perf_counter()
        for it in finished:
            try:
                it.work.wait()
            except Exception as e:
                it.error = e
            self.sched.complete(it.mop)
            if not it.mop.is_a2a:
                self._last_allreduce_end = max(self._last_allreduce_end, it.t_end)
            stream = self.streams[it.mop.stream]
            assert stream[0] is it
            stream.popleft()
            self.done_items.append(it)
        for it in new:
            self.items[it.mop.id] = it
            self.sched.submit(it.mop)
        chosen = self.sched.poll()
        self.busy_s += time.perf_counter() - t0
        for it in finished:
            if it.after is not None and it.error is None:
                it.after()
            it.done.set()
            if it.error is not None:
                raise it.error
        now = self.now()
        for m in chosen:
            it = self.items[m.id]
            if m.is_a2a:  # the thread's reaction time: from when the policy let it go
                # (submitted, or the planned micro-op it waited for completed) to launch
                self.handoff_s.append(now - max(it.t_submit, self._last_allreduce_end))
            self.streams[m.stream].append(it)
        for stream in self.streams.values():
            self._issue_head(stream)

    def _issue_head(self, stream: collections.deque[Item]) -> None:
        if not stream or stream[0].t_issue >= 0:
            return
        it = stream[0]
        it.t_issue = self.now()
        it.work = it.issue()
        it.work.get_future().add_done_callback(lambda _f, it=it: self._on_future(it))

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            self._error = e
            pending = list(self.items.values()) + self._inbox
        for it in pending:
            if not it.done.is_set():
                it.error = it.error or e
                it.done.set()


# ---------------------------------------------------------------------------------------
# Compute marks and the model's Exchange
# ---------------------------------------------------------------------------------------
class _A2AHandle:
    def __init__(self, sched: CommScheduler, it: Item, out: torch.Tensor):
        self.sched, self.it, self.out = sched, it, out

    def wait(self) -> torch.Tensor:
        self.sched.wait(self.it)
        return self.out


class RankExchange:
    """The model's view of the scheduler (the ``Exchange`` protocol of
    :mod:`runtime.ep_moe`): scheduled all-to-alls on ``ep``, fill counts on ``meta``, and
    compute marks on this rank's timeline."""

    def __init__(
        self,
        rank: int,
        sched: CommScheduler | None,
        a2a_mops: dict[str, MicroOp],
        ep: dist.ProcessGroup | None,
        meta: dist.ProcessGroup | None,
        clock: Clock,
        ops: dict[str, Op],
    ):
        self.rank, self.sched, self.mops, self.ep, self.meta, self.clock = rank, sched, a2a_mops, ep, meta, clock
        self.ops = ops  # graph op name -> Op, for the layer and chunk of each compute event
        self.marks: list[tuple[str, Any, Any]] = []  # (op, start stamp, end stamp)
        self._open: tuple[str, Any] | None = None

    def mark(self, op: str) -> None:
        t = self.clock.stamp()
        if self._open is not None:
            self.marks.append((self._open[0], self._open[1], t))
        self._open = (op, t)

    def pause(self) -> None:
        if self._open is not None:
            self.marks.append((self._open[0], self._open[1], self.clock.stamp()))
            self._open = None

    def a2a(self, op: str, send: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> _A2AHandle:
        mop = self.mops[op]
        send = send.contiguous()
        out = send.new_empty((int(sum(out_splits)), *send.shape[1:]))
        ins, outs = [int(x) for x in in_splits], [int(x) for x in out_splits]
        issue = lambda: dist.all_to_all_single(out, send, outs, ins, group=self.ep, async_op=True)  # noqa: E731
        return _A2AHandle(self.sched, self.sched.submit(mop, issue), out)

    def counts_a2a(self, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(counts)
        dist.all_to_all_single(out, counts, group=self.meta)
        return out

    def compute_events(self) -> list[Event]:
        self.pause()
        out = []
        for op, a, b in self.marks:
            g = self.ops.get(op)
            out.append(
                Event(
                    self.rank,
                    "compute",
                    op,
                    "compute",
                    self.clock.resolve(a),
                    self.clock.resolve(b),
                    g.layer if g else -1,
                    g.chunk if g else -1,
                )
            )
        return out


# ---------------------------------------------------------------------------------------
# Gradients: hooks -> allreduce micro-ops
# ---------------------------------------------------------------------------------------
class GradSync:
    """Submits each allreduce micro-op once all its gradient tensors are final.

    A parameter is final after ``expected[p]`` accumulations (expert weights accumulate
    once per pipeline chunk). Micro-ops are submitted in the graph's order (ready op,
    communicator, seq) so every rank issues every communicator's collectives in the
    same order; a micro-op that is ready early waits for its predecessors.
    """

    def __init__(
        self,
        sched: CommScheduler,
        tensors: dict[str, list[torch.nn.Parameter]],
        mops: Sequence[MicroOp],
        groups: dict[str, dist.ProcessGroup],
        expected: dict[torch.nn.Parameter, int],
    ):
        self.sched, self.tensors, self.groups, self.expected = sched, tensors, groups, expected
        self.mops = submission_order(mops)
        self._ranges = piece_ranges(self.mops)
        self.hooks = []
        users: dict[torch.nn.Parameter, list[int]] = collections.defaultdict(list)
        self._need = []
        for i, m in enumerate(self.mops):
            params = {p for name, _ in m.pieces for p in tensors[name]}
            self._need.append(len(params))
            for p in params:
                users[p].append(i)
        self._users = users
        for p in users:
            self.hooks.append(p.register_post_accumulate_grad_hook(self._hook))
        self.reset()

    def reset(self) -> None:
        self._acc = collections.Counter()
        self._left = list(self._need)
        self._next = 0
        self.items: list[Item] = []

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def _hook(self, p: torch.nn.Parameter) -> None:
        self._acc[p] += 1
        if self._acc[p] != self.expected.get(p, 1):
            return
        for i in self._users[p]:
            self._left[i] -= 1
        while self._next < len(self.mops) and self._left[self._next] == 0:
            self._submit(self.mops[self._next])
            self._next += 1

    def _segments(self, m: MicroOp) -> list[torch.Tensor]:
        """Flat views of the gradient elements micro-op ``m`` carries, in order: for each
        piece, the range of its tensor that :func:`lina_sim.workload.comm.piece_ranges`
        gives (a whole tensor, a chunk of one, or part of a framework bucket)."""
        segs = []
        for name, lo_f, hi_f in self._ranges[m.id]:
            flat = [p.grad.view(-1) for p in self.tensors[name]]
            total = sum(f.numel() for f in flat)
            lo, hi = round(lo_f * total), round(hi_f * total)
            off = 0
            for f in flat:
                a, b = max(lo - off, 0), min(hi - off, f.numel())
                if a < b:
                    segs.append(f[a:b])
                off += f.numel()
        return segs

    def _submit(self, m: MicroOp) -> None:
        segs = self._segments(m)
        buf = torch.cat(segs) if len(segs) > 1 else segs[0].clone()
        group = self.groups[m.communicator]

        def issue():
            return dist.all_reduce(buf, group=group, async_op=True)

        def after():
            off = 0
            for s in segs:
                s.copy_(buf[off : off + s.numel()])
                off += s.numel()

        self.items.append(self.sched.submit(m, issue, after))

    def wait_all(self) -> None:
        if self._next < len(self.mops):
            m = self.mops[self._next]
            missing = [n for n, _ in m.pieces if any(self._acc[p] < self.expected.get(p, 1) for p in self.tensors[n])]
            raise LinaSimError(
                f"gradients never became ready for {m.id} ({', '.join(missing[:3])}): "
                f"a parameter got no gradient this step"
            )
        for it in self.items:
            self.sched.wait(it)


# ---------------------------------------------------------------------------------------
# Communicators of a step graph
# ---------------------------------------------------------------------------------------
def new_group(ranks: Sequence[int]) -> dist.ProcessGroup:
    """A new communicator over ``ranks`` (collective: every rank must call it)."""
    return dist.new_group(ranks=sorted(ranks), use_local_synchronization=False)


_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _group(ranks: Sequence[int]) -> dist.ProcessGroup:
    """A communicator over ``ranks``, built once per process (collective: every rank
    calls it for every group, in the same order)."""
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = new_group(ranks)
    return _GROUPS[key]


def comm_groups(
    rank: int, graph: TrainingGraph, ep: dist.ProcessGroup, dp: dist.ProcessGroup
) -> dict[str, dist.ProcessGroup]:
    """Process groups for the graph's communicators, as ``rank`` sees them: ``ep``
    (tokens) and ``dp`` (all ranks) as given (``runtime.dist.make_groups``' for the
    graph's ep size), ``meta`` (fill counts, a second ep communicator) and ``expert_dp``
    (expert replicas, when experts are replicated)."""
    comms = graph.communicators
    out = {"ep": ep, "dp": dp}
    for name in ("meta", "expert_dp"):
        src = comms["ep" if name == "meta" else name]
        if src.size > 1 or name == "meta":
            built = {g: _group(g) for g in src.groups}  # all ranks create all groups, in order
            out[name] = built[src.group_of(rank)]
    return out
