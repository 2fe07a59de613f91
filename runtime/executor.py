"""Run a scenario's training policies for real on torch.distributed, and time every op.

Per rank and policy (``rank_main``, the ``scenario`` mode of ``runtime.entry``; the
policies take turns step by step, see :func:`train_policies`):

- the step graph is the simulator's (``build_training_graph`` with the packing and
  pipelining the policy picks from the same estimates as ``lina-sim run``), and the
  collectives are its micro-ops with the policy's launch plan, computed by the same
  function as the simulator's (``planned_micro_ops``), so every rank holds the same plan;
- the model is :class:`runtime.ep_moe.EPTransformer` of the scenario's ``model:``;
- a :class:`CommScheduler` thread owns the policy's :class:`RankScheduler` (the object
  the simulator's engine drives): the compute thread and the gradient hooks *submit*
  micro-ops, the thread *polls* the policy and issues what it selects as async
  collectives, one at a time per stream (``a2a``, ``allreduce``) like a CUDA stream,
  and *completes* them when their futures fire;
- gradient hooks (``register_post_accumulate_grad_hook``) mark tensors ready; an
  allreduce micro-op is submitted once all its tensors are, in the graph's submission
  order (so every rank issues each communicator's collectives in the same order);
  non-expert gradients reduce on ``dp``, expert gradients on the replicas' ``expert_dp``;
- the optimizer (Adam) runs once every gradient is reduced.

Timeline: compute ops from marks on the compute thread (wall clock; CUDA events on GPU),
collectives from issue to completion on the scheduler thread. ``finish`` (launcher side)
turns the ranks' results into the ``lina-sim run`` results table (median step after one
warm-up step) and writes ``results.csv``, per-policy timelines and Chrome traces.

Inference scenarios (``kind: inference``) go to :mod:`runtime.infer`.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from lina_sim.errors import ConfigError, LinaSimError
from lina_sim.policies.training.base import RankScheduler, owed_per_gap, submission_order
from lina_sim.workload.comm import MicroOp
from lina_sim.results.timeline import Event

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

    def __init__(self, policy: Any, now: Callable[[], float], micro_ops: Sequence[MicroOp] = ()):
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
        self.streams: dict[str, collections.deque[Item]] = {"a2a": collections.deque(), "allreduce": collections.deque()}
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
            raise LinaSimError(f"scheduler: {it.mop.id} did not complete within {timeout:.0f} s "
                               f"({'never launched' if it.t_issue < 0 else 'launched, peers missing'})")
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
    """The model's view of the executor (:class:`runtime.ep_moe.Exchange`): scheduled
    all-to-alls on ``ep`` and compute marks on this rank's timeline."""

    def __init__(self, rank: int, sched: CommScheduler, a2a_mops: dict[str, MicroOp], ep: Any, meta: Any,
                 clock: Clock, ops: dict[str, Any]):
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
            out.append(Event(self.rank, "compute", op, "compute", self.clock.resolve(a), self.clock.resolve(b),
                             g.layer if g else -1, g.chunk if g else -1))
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

    def __init__(self, sched: CommScheduler, tensors: dict[str, list[torch.nn.Parameter]], mops: Sequence[MicroOp],
                 groups: dict[str, Any], expected: dict[torch.nn.Parameter, int]):
        self.sched, self.tensors, self.groups, self.expected = sched, tensors, groups, expected
        self.mops = submission_order(mops)
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
        """Flat views of the gradient elements micro-op ``m`` carries, in order: a
        piece is a whole tensor, or slice ``chunk`` of ``chunks`` of one."""
        segs = []
        for name, _ in m.pieces:
            flat = [p.grad.view(-1) for p in self.tensors[name]]
            total = sum(f.numel() for f in flat)
            lo, hi = (m.chunk * total // m.chunks, (m.chunk + 1) * total // m.chunks) if m.chunks > 1 else (0, total)
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
                s.copy_(buf[off:off + s.numel()])
                off += s.numel()

        self.items.append(self.sched.submit(m, issue, after))

    def wait_all(self) -> None:
        if self._next < len(self.mops):
            m = self.mops[self._next]
            missing = [n for n, _ in m.pieces if any(self._acc[p] < self.expected.get(p, 1) for p in self.tensors[n])]
            raise LinaSimError(f"gradients never became ready for {m.id} ({', '.join(missing[:3])}): "
                               f"a parameter got no gradient this step")
        for it in self.items:
            self.sched.wait(it)


# ---------------------------------------------------------------------------------------
# One policy on one rank
# ---------------------------------------------------------------------------------------
_GROUPS: dict[tuple, Any] = {}


def _group(ranks: Sequence[int]) -> Any:
    """A communicator over ``ranks``, built once (collective: every rank calls it for
    every group, in the same order)."""
    from runtime import dist as ldist

    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = ldist.new_group(ranks)
    return _GROUPS[key]


def comm_groups(ctx: Any, graph: Any) -> dict[str, Any]:
    """Process groups for the graph's communicators, as this rank sees them: ``ep``
    (tokens), ``meta`` (fill counts, a second ep communicator), ``dp`` (all ranks) and
    ``expert_dp`` (expert replicas)."""
    rank, comms = ctx.info.rank, graph.communicators
    groups = ctx.groups(comms["ep"].size)
    out = {"ep": groups.ep, "dp": groups.dp}
    for name in ("meta", "expert_dp"):
        src = comms["ep" if name == "meta" else name]
        if src.size > 1 or name == "meta":
            built = {g: _group(g) for g in src.groups}  # all ranks create all groups, in order
            out[name] = built[src.group_of(rank)]
    return out


def global_name(tensor: str, lay: Any) -> str:
    """``L0.expert1.w1`` on ep rank 2 with k = 2 -> ``L0.E5.w1``: the same expert's name
    under any packing (non-expert names unchanged)."""
    parts = tensor.split(".")
    if len(parts) == 3 and parts[1].startswith("expert"):
        return f"{parts[0]}.E{lay.ep_rank * lay.k + int(parts[1][6:])}.{parts[2]}"
    return tensor


@dataclass
class StepRecord:
    """One step on one rank: [start, end) on the common clock (s), its events, loss,
    and the scheduler's own cost (s)."""

    start: float
    end: float
    events: list[Event]
    loss: float
    sched_busy_s: float
    handoff_s: list[float]


def batch(spec: Any, seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and targets of this rank's micro-batch (the same under any policy)."""
    g = torch.Generator().manual_seed(hash((seed, rank, step)) & 0x7FFF_FFFF)
    t = torch.randint(0, spec.vocab, (spec.micro_batch, spec.seq_len + 1), generator=g)
    return t[:, :-1], t[:, 1:]


class PolicyRunner:
    """One training policy on this rank: its model, scheduler thread and gradient hooks,
    run one step at a time (:meth:`step`) so that policies can take turns."""

    def __init__(self, ctx: Any, setup: Any, entry: Any, dispatch: str = "padded", keep_grads: bool = False):
        from lina_sim.training.launch_plan import planned_micro_ops
        from lina_sim.network.alone import AloneTimes
        from lina_sim.training.run import choose_shape
        from lina_sim.workload.graph import build_training_graph
        from runtime.ep_moe import TORCH_DTYPES, EPTransformer, Layout

        self.ctx, self.setup, self.entry, self.keep_grads = ctx, setup, entry, keep_grads
        info = ctx.info
        # The very decisions the simulator makes, so measured and predicted runs share
        # k, r and the launch plan.
        alone = AloneTimes(setup.cluster, setup.algos)
        policy, self.k, self.r = choose_shape(setup, entry, alone)
        graph = build_training_graph(setup.model, setup.cluster, experts_per_device=self.k, pipeline_degree=self.r)
        ep_comm = graph.communicators["ep"]
        self.groups = comm_groups(ctx, graph)
        ep_group = ep_comm.group_of(info.rank)
        self.lay = Layout(k=self.k, ep_size=ep_comm.size, ep_rank=ep_group.index(info.rank), r=self.r,
                          dispatch=dispatch)
        self.model = EPTransformer(setup.model, self.lay, setup.scenario.seed).to(
            info.device, TORCH_DTYPES[setup.model.dtype])
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
        tokens, targets = (x.to(info.device) for x in batch(self.setup.model, self.setup.scenario.seed, info.rank, step))
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
            self.final_grads = {global_name(n, self.lay): torch.cat([p.grad.reshape(-1) for p in ps]).cpu()
                                for n, ps in self.tensors.items()}
        ex.mark("optimizer")
        self.opt.step()
        ex.pause()
        events = ex.compute_events()
        end = events[-1].end if events else ctx.now()
        events += [Event(info.rank, it.mop.stream, it.mop.id, it.mop.kind, it.t_issue, it.t_end, it.mop.layer,
                         it.mop.chunk, it.mop.nbytes) for it in sched.done_items]
        self.records.append(StepRecord(start, end, events, float(loss.detach()), sched.busy_s, list(sched.handoff_s)))

    def close(self) -> None:
        self.sched.stop()
        self.grads.remove()

    def result(self) -> dict:
        return {"label": self.entry.label, "name": self.entry.name, "k": self.k, "r": self.r, "records": self.records,
                "grads": self.final_grads, "micro_ops": len(self.micro), "partition_s": self.partition_s}


def train_policies(ctx: Any, setup: Any, entries: Sequence[Any], steps: int, dispatch: str = "padded",
                   keep_grads: bool = False) -> list[dict]:
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
    finally:
        for runner in runners:
            runner.close()
    return [runner.result() for runner in runners]


# ---------------------------------------------------------------------------------------
# The `scenario` mode
# ---------------------------------------------------------------------------------------
def mode_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lina-run SCENARIO.yaml", exit_on_error=False)
    p.add_argument("scenario")
    p.add_argument("--out", default=None, help="results directory (default results/<name>-measured)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per policy (default: the scenario's)")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    p.add_argument("--dispatch", default="padded", choices=("padded", "uneven"))
    p.add_argument("--policies", default=None, help="comma-separated labels to run (default: all)")
    p.add_argument("--keep-grads", action="store_true", help="return step-0 reduced gradients (tests)")
    p.add_argument("--profile-compute", default=None, metavar="OUT.yaml",
                   help="instead of the policies: time every compute op without the network (calibration)")
    try:
        a = p.parse_args(list(argv))
    except (argparse.ArgumentError, SystemExit) as e:
        raise ConfigError("lina-run", str(e) or "bad arguments") from None
    if a.steps is not None and a.steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {a.steps}")
    if a.warmup < 0:
        raise ConfigError("--warmup", f"must be >= 0, got {a.warmup}")
    return a


def check_launch(info: Any, cluster: Any) -> None:
    """The launch must have the scenario's shape: world size and ranks per node."""
    from runtime.dist import check_world_size

    check_world_size(info.world_size, cluster.world_size, f"the scenario's cluster ({cluster.nodes} nodes x "
                                                f"{cluster.gpus_per_node} GPUs, field cluster)")
    if info.local_world_size != cluster.gpus_per_node:
        raise ConfigError("cluster.gpus_per_node", f"the scenario has {cluster.gpus_per_node} per node, the launch "
                                                   f"{info.local_world_size} ranks per node")


def select_policies(setup: Any, only: str | None) -> list:
    if not only:
        return setup.policies
    want = [s.strip() for s in only.split(",") if s.strip()]
    labels = [p.label for p in setup.policies]
    for w in want:
        if w not in labels:
            raise ConfigError("--policies", f"no policy labelled {w!r} in the scenario", labels)
    return [p for p in setup.policies if p.label in want]


def rank_main(ctx: Any) -> dict:
    """``runtime.entry`` mode ``scenario``: every policy of every point, on this rank."""
    from lina_sim.config.scenario import load_scenarios
    from lina_sim.training.run import resolve_training

    sys.setswitchinterval(5e-4)  # hand the GIL to the scheduler thread promptly
    a = mode_args(ctx.args)
    points = load_scenarios(a.scenario)
    if points[0].kind == "inference":
        from runtime.infer import rank_main as infer_main

        return infer_main(ctx, points, a)
    setups = [resolve_training(p) for p in points]
    for setup in setups:
        check_launch(ctx.info, setup.cluster)
    if a.profile_compute:
        from runtime.validate import profile_compute_rank

        # One table for the first point: all points of a validation share one model shape.
        return {"kind": "profile", "rows": profile_compute_rank(ctx, setups[0])}
    out = []
    for setup in setups:
        steps = (a.steps or setup.steps) + a.warmup
        runs = train_policies(ctx, setup, select_policies(setup, a.policies), steps, a.dispatch, a.keep_grads)
        out.append({"runs": runs, "warmup": a.warmup})
    return {"kind": "training", "points": out}


# ---------------------------------------------------------------------------------------
# Launcher side: results like `lina-sim run`
# ---------------------------------------------------------------------------------------
def _median_step(per_rank: list[list[StepRecord]], warmup: int) -> tuple[list[float], int]:
    """Step times (max end - min start over ranks) after warm-up, and the index of the
    step closest to their median."""
    n = len(per_rank[0])
    times = [max(r[i].end for r in per_rank) - min(r[i].start for r in per_rank) for i in range(n)]
    measured = list(range(warmup, n)) or list(range(n))
    med = statistics.median(times[i] for i in measured)
    pick = min(measured, key=lambda i: abs(times[i] - med))
    return [times[i] for i in measured], pick


def step_timeline(per_rank: list[list[StepRecord]], i: int):
    """Step ``i`` of every rank as one timeline frame, shifted so the step starts at 0."""
    from lina_sim.results.timeline import events_to_frame

    t0 = min(r[i].start for r in per_rank)
    df = events_to_frame([e for r in per_rank for e in r[i].events])
    df["start"] -= t0
    df["end"] -= t0
    return df


def measured_frame(results: list, setups: list):
    """(results DataFrame with ``lina-sim run``'s columns plus measured extras, and the
    median step's timeline per (point, policy label))."""
    import pandas as pd

    from lina_sim.training.breakdown import mean_breakdown

    rows, timelines = [], {}
    for pi, setup in enumerate(setups):
        runs_by_rank = [res["points"][pi]["runs"] for res in results]
        warmup = results[0]["points"][pi]["warmup"]
        base = None
        for j, run in enumerate(runs_by_rank[0]):
            per_rank = [rr[j]["records"] for rr in runs_by_rank]
            times, pick = _median_step(per_rank, warmup)
            tl = step_timeline(per_rank, pick)
            timelines[(pi, run["label"])] = tl
            step = statistics.median(times)
            base = base or step
            rec = [r[pick] for r in per_rank]
            sched_busy = statistics.mean(r.sched_busy_s for r in rec)
            handoff = [h for r in rec for h in r.handoff_s]
            rows.append({
                "point": pi, "scenario": setup.scenario.name, "policy": run["label"], "policy_name": run["name"],
                "cluster": setup.cluster.name, "nodes": setup.cluster.nodes, "gpus": setup.cluster.world_size,
                "model": setup.model.name, "experts": setup.model.experts,
                "experts_per_device": run["k"], "pipeline_degree": run["r"],
                "step_time_s": step, "speedup": base / step,
                **{f"{k}_s": v for k, v in mean_breakdown(tl, float(tl["end"].max())).items()},
                "bwd_a2a_slowdown_median": float("nan"), "bwd_a2a_slowdown_p95": float("nan"),
                "bwd_a2a_slowdown_max": float("nan"),
                "collectives": run["micro_ops"], "sim_wall_s": float(sum(times)),
                "step_time_min_s": min(times), "step_time_max_s": max(times), "steps": len(times),
                "step_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
                "loss_step0": statistics.mean(rr[j]["records"][0].loss for rr in runs_by_rank),
                "sched_busy_s": sched_busy, "sched_busy_frac": sched_busy / step,
                "partition_s": statistics.mean(rr[j]["partition_s"] for rr in runs_by_rank),
                "handoff_median_s": float(np.median(handoff)) if handoff else 0.0,
                "handoff_total_s": float(sum(handoff)) / len(rec),
                **{k: v for k, v in setup.scenario.swept.items()},
            })
    return pd.DataFrame(rows), timelines


def finish(results: list, args: list[str]) -> int:
    """Write results.csv, timelines and Chrome traces; print the `lina-sim run` table."""

    from lina_sim.results.tables import format_training_table, point_title
    from lina_sim.config.scenario import load_scenarios
    from lina_sim.results.timeline import write_chrome_trace
    from lina_sim.results.files import atomic_write_text
    from lina_sim.training.run import resolve_training

    a = mode_args(args)
    points = load_scenarios(a.scenario)
    out = Path(a.out or Path("results") / f"{points[0].name}-measured")
    if results[0].get("kind") == "inference":
        from runtime.infer import finish as infer_finish

        return infer_finish(results, points, out)
    if results[0].get("kind") == "profile":
        from runtime.validate import write_compute_profile

        path = write_compute_profile(results, a.profile_compute)
        print(f"# compute profile: {path}")
        return 0
    setups = [resolve_training(p) for p in points]
    df, timelines = measured_frame(results, setups)
    for pi, setup in enumerate(setups):
        sub = df[df["point"] == pi]
        print(format_training_table(sub, point_title(setup) + " [measured]"))
        print("  scheduler per step: " + ", ".join(
            f"{r.policy} {r.sched_busy_frac * 100:.2f}% thread + {r.handoff_total_s / r.step_time_s * 100:.2f}% "
            f"hand-off (median {r.handoff_median_s * 1e3:.2f} ms)" for r in sub.itertuples())
            + "; partitioning and launch plan once per run: " + ", ".join(f"{r.policy} {r.partition_s * 1e3:.1f} ms"
                                                          for r in sub.itertuples()))
        print()
    for (pi, label), tl in timelines.items():
        suffix = f"-p{pi}" if len(setups) > 1 else ""
        atomic_write_text(out / f"timeline{suffix}-{label}.csv", tl.to_csv(index=False))
        write_chrome_trace(tl, out / f"trace{suffix}-{label}.json", name="lina-run")
    path = atomic_write_text(out / "results.csv", df.to_csv(index=False))
    print(f"# measured results: {path}; timelines and traces in {out}/")
    return 0
