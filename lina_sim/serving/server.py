"""Inference serving, trace-driven: requests, batches, per-layer placement, latency.

A single-model server on ``N`` GPUs serves requests (each one sequence of an
expert-routing trace) in dynamically formed batches (:mod:`lina_sim.serving.requests`). One
batch runs the forward pass of every layer on all GPUs, its tokens split data-parallel.
Per MoE layer ``l`` (:class:`PolicyServer`):

1. dense compute: attention and gate (:mod:`lina_sim.serving.cost`, roofline);
2. the gate: per-device, per-expert token counts are the trace's real choices of the
   batch's tokens at ``l`` (``ideal``: spread uniformly, see the placement package);
3. the placement (:func:`~lina_sim.policies.placement.decide_layer`): planned before the
   gate, refined after it (Lina's phase 2). Every policy is bound the charge this server
   levies (:class:`~lina_sim.serving.cost.ServingCharge`), which cost-aware policies
   plan against; ``oracle`` also gets the scenario's other policies as rivals, runs them
   on its own batches and never picks a plan the charge says is dearer than theirs;
4. weight swaps: an expert a device must serve but does not hold is loaded from host
   memory over its PCIe link (:class:`ExpertCache`: per layer, ``expert_slots`` experts
   per device, least recently used evicted; one PCIe queue per device). Lina's phase-1
   swaps of layer ``l`` are issued when layer ``l-1``'s gate has run (its path estimate
   needs it) and overlap layer ``l-1``'s all-to-alls and FFN and layer ``l``'s attention;
   policies that plan from earlier batches only issue all their swaps when the batch is
   formed (:attr:`PlacementPolicy.plans_within_batch`). Phase-2 swaps are issued after
   layer ``l``'s gate, overlap only its dispatch, and so sit on the critical path. A
   device starts its expert FFN when both its tokens and its weights are there. PCIe
   traffic is not put on the simulated network: host-to-device copies and the
   all-to-all's GPU-NIC traffic are assumed not to contend;
5. the dispatch all-to-all: bytes ``s -> d`` = tokens ``s`` sends ``d`` under the final
   placement × d_model × dtype bytes, timed alone on the simulated network
   (:class:`~lina_sim.network.serving_a2a.AllToAllTimer`, exact for the fluid network);
6. expert FFN per device from its experts' token counts, as ``serving.ffn`` runs it
   (grouped GEMM by default, :mod:`lina_sim.serving.cost`); the slowest device gates the
   combine;
7. the combine all-to-all: the transposed matrix.

On a cluster of CPU ranks sharing one host's cores (``cluster.host``), each compute phase
ends when processor sharing of those cores says it does (all ranks start it together).

Weights start with the static layout resident (every expert, when the slots hold them
all). Every policy serves the identical
request stream (same sequences, same arrival times for open loop). Placement decisions
depend on gate counts only, never on timings, so the runner advances all policies' servers
in lockstep and times every all-to-all of the step in one vectorised call.

Units: seconds, bytes, tokens.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numba
import numpy as np

from lina_sim.hardware.processors import shared_finish_times
from lina_sim.network.serving_a2a import AllToAllTimer
from lina_sim.policies.placement import Placement, PlacementPolicy, decide_layer, token_sources
from lina_sim.policies.placement.layout import assign_many, send_matrices
from lina_sim.results.timeline import Event, Timeline
from lina_sim.serving.cost import InferenceCostModel, ServingCharge
from lina_sim.serving.requests import (
    Batcher,
    Request,
    RequestPool,
    make_arrivals,
)
from lina_sim.serving.setup import InferenceSetup, PlacementEntry, make_policy, setup_slots


# ---------------------------------------------------------------------------------------
# Expert residency
# ---------------------------------------------------------------------------------------
class ExpertCache:
    """Which experts' weights each device holds, per MoE layer: ``slots`` per device per
    layer, least recently used evicted first. Starts with ``initial`` resident; when the
    slots hold every expert, the server loads them all at start-up, as a server whose
    memory fits the whole model does, so nothing is ever swapped."""

    def __init__(self, layers: int, initial: Placement, slots: int):
        self.slots = slots
        e, n = initial.num_experts, initial.num_devices
        held = np.ones((e, n), dtype=bool) if slots >= e else initial.share_matrix > 0
        # Per layer, expert and device: when the device last used the expert's weights
        # (larger is more recent; -1: not held). An expert's stamp is the load's clock
        # times E plus its id, so the experts of one load rank by id, as a list of them
        # appended in sorted order would.
        self._stamp = np.where(held, np.arange(e)[:, None], -1)[None].repeat(layers, axis=0).astype(np.int64)
        self._clock = 1
        # Per layer, the expert -> devices map of the placement loaded last: loading it
        # again (static every batch, EPLB between rebalances) changes nothing.
        self._last: list[tuple[tuple[int, ...], ...] | None] = [None] * layers
        self._none = np.zeros(n, dtype=np.int64)

    def missing(self, layer: int, placement: Placement) -> np.ndarray:
        """``int64 [devices]``: experts of ``placement`` each device does not hold now
        (what :meth:`load` would swap in), without changing anything."""
        return ((placement.share_matrix > 0) & (self._stamp[layer] < 0)).sum(axis=0)

    def missing_many(self, layer: int | np.ndarray, placements: list[Placement]) -> np.ndarray:
        """``int64 [placements, devices]``: :meth:`missing` of each, in one array call;
        ``layer`` is one layer for all, or ``[placements]`` one each."""
        share = np.stack([p.share_matrix for p in placements])  # [C, E, N]
        layers = np.broadcast_to(np.asarray(layer, dtype=np.int64), (len(placements),))
        return _missing_kernel(self._stamp, np.ascontiguousarray(layers), share)

    def load(self, layer: int, placement: Placement) -> np.ndarray:
        """Make ``placement``'s experts resident; returns ``int64 [devices]`` experts
        each device had to swap in."""
        if placement.devices == self._last[layer]:
            # Its experts are all held (a load evicts only others) and already the most
            # recent, in the same order a new stamp would give them: the LRU order of
            # every expert, all that later loads read, is unchanged.
            return self._none.copy()
        self._last[layer] = placement.devices
        out = _load_stamps(self._stamp[layer], placement.share_matrix > 0, self._clock, self.slots)
        self._clock += 1
        return out


@numba.njit(cache=True)
def _missing_kernel(stamp: np.ndarray, layers: np.ndarray, share: np.ndarray) -> np.ndarray:  # pragma: no cover
    """:meth:`ExpertCache.missing_many`: per candidate ``c`` (share matrix ``share[c]``,
    layer ``layers[c]``) and device, the experts it holds that ``stamp`` says are absent."""
    C, E, n = share.shape
    out = np.zeros((C, n), dtype=np.int64)
    for c in range(C):
        st = stamp[layers[c]]
        for e in range(E):
            for d in range(n):
                if share[c, e, d] > 0 and st[e, d] < 0:
                    out[c, d] += 1
    return out


@numba.njit(cache=True)
def _load_stamps(stamp: np.ndarray, need: np.ndarray, clock: int, slots: int) -> np.ndarray:  # pragma: no cover
    """:meth:`ExpertCache.load` on one layer's ``stamp [E, N]`` (changed in place) for
    the placement's experts ``need [E, N]``: counts each device's swaps, stamps the
    placement's experts ``clock * E + e`` (the most recent, ranked by id), then on each
    device holding more than ``slots`` evicts the least recent of the others (stamps are
    distinct, so the order is total). Returns ``int64 [N]`` swaps per device."""
    E, n = stamp.shape
    out = np.zeros(n, dtype=np.int64)
    for d in range(n):
        held = 0
        for e in range(E):
            if need[e, d]:
                if stamp[e, d] < 0:
                    out[d] += 1
                stamp[e, d] = clock * E + e
            if stamp[e, d] >= 0:
                held += 1
        for _ in range(held - slots):
            victim = -1
            for e in range(E):
                if stamp[e, d] >= 0 and not need[e, d] and (victim < 0 or stamp[e, d] < stamp[victim, d]):
                    victim = e
            if victim < 0:  # only the placement's own experts left
                break
            stamp[victim, d] = -1
    return out


@numba.njit(cache=True)
def _gate_counts(experts: np.ndarray, src: np.ndarray, n: int, e: int) -> np.ndarray:  # pragma: no cover
    """``int64 [layers, n, e]``: how many of a batch's tokens on each device chose each
    expert at each layer (:func:`~lina_sim.policies.placement.counts_by_source` of every
    layer at once), from ``experts [tokens, layers, k]`` and each token's device ``src``."""
    T, L, k = experts.shape
    out = np.zeros((L, n, e), dtype=np.int64)
    for t in range(T):
        d = src[t]
        for l in range(L):
            for j in range(k):
                out[l, d, experts[t, l, j]] += 1
    return out


# ---------------------------------------------------------------------------------------
# One policy's server
# ---------------------------------------------------------------------------------------
_DENSE_MEMO_SIZE = 256  # distinct per-device token splits kept per server


@dataclass
class BatchPlan:
    """One batch, decided (placements, swaps, token loads) but not yet timed."""

    index: int
    start: float
    requests: list[Request]
    tokens: np.ndarray  # [devices]
    keys: np.ndarray  # [devices] attention keys
    send: np.ndarray  # [layers, N, N] tokens dispatched s -> d
    ffn: np.ndarray  # [layers, N] expert FFN seconds
    swap1: np.ndarray  # [layers, N] experts swapped in by phase 1
    swap2: np.ndarray  # [layers, N] by phase 2
    replanned: np.ndarray  # [layers] bool
    imbalance: np.ndarray  # [layers] max device load / mean
    counts_by_source: np.ndarray | None = None  # [layers, N, experts] after the policy's gate
    placements: list[Placement] | None = None  # [layers] the placement each layer ran with
    dense: DenseTimes | None = None  # the batch's dense compute (None: computed when timed)


@dataclass(frozen=True)
class DenseTimes:
    """Per device, s: one batch's compute outside the experts (processor sharing applied
    on a shared host). A function of its tokens and keys per device only, so computed
    once when the batch is formed and reused when it is timed."""

    embed: np.ndarray  # [devices]
    first: np.ndarray  # [devices] layer 0's attention and gate
    rest: np.ndarray  # [devices] a later layer's combine-out, attention and gate
    head: np.ndarray  # [devices] the last combine-out, final norm and LM head


@dataclass
class BatchRecord:
    """Timing of one served batch (s)."""

    index: int
    start: float
    end: float
    tokens: int
    requests: int
    layer_moe: np.ndarray  # [layers] gate end -> combine end
    dispatch: np.ndarray  # [layers]
    combine: np.ndarray  # [layers]
    ffn: np.ndarray  # [layers] slowest device's expert FFN
    exposed_swap: np.ndarray  # [layers]
    swapped: int
    replanned: int
    imbalance: np.ndarray


@dataclass
class PolicyServing:
    """Everything one policy's serving run produced."""

    entry: PlacementEntry
    requests: list[Request]
    batches: list[BatchRecord]
    timeline: Timeline
    phase2_checks: int
    phase2_fired: int
    wall_s: float = 0.0

    def latencies(self) -> np.ndarray:
        return np.array([r.latency for r in self.requests])


class PolicyServer:
    """One placement policy serving the request stream (see the module docstring)."""

    def __init__(self, setup: InferenceSetup, entry: PlacementEntry, shared: ServingInputs):
        self.setup, self.entry, self.shared = setup, entry, shared
        self.policy = make_policy(setup, entry)
        L = shared.layers
        self.cache = ExpertCache(L, self.policy.static_placement(), setup_slots(setup))
        # On a shared host (an emulated testbed) ranks that compute at once divide its cores.
        self.host_cores = setup.cluster.host.cores if setup.cluster.shares_cores else None
        on_host = functools.partial(shared_finish_times, cores=self.host_cores) if self.host_cores else None
        self.charge = ServingCharge(
            shared.cost, setup.cluster, shared.a2a, self.cache.missing, on_host, self.cache.missing_many
        )
        if hasattr(self.policy, "bind_rivals"):
            self.policy.bind_rivals(rivals(setup, entry))
        self.policy.bind_charge(self.charge)
        self.policy.fit(shared.train_experts)
        self.batcher = Batcher(setup.serving.batching)
        self.arrivals = make_arrivals(setup.serving.arrival, setup.serving.requests, setup.scenario.seed)
        self.requests: list[Request] = []
        self._admit(self.arrivals.initial())
        self.free_at = 0.0
        self.pcie_free = np.zeros(setup.cluster.world_size)
        self.records: list[BatchRecord] = []
        self.timeline = Timeline()
        self.within_batch = self.policy.plans_within_batch
        self.wall = 0.0
        self._dense_memo: dict[tuple[bytes, bytes], DenseTimes] = {}

    def _admit(self, times: list[float]) -> None:
        new = []
        for t in times:
            rid = len(self.requests)
            seq = int(self.shared.request_seqs[rid])
            r = Request(rid, seq, int(self.shared.pool.lengths[seq]), float(t))
            self.requests.append(r)
            new.append(r)
        self.batcher.add_future(new)

    @property
    def done(self) -> bool:
        return not self.batcher.pending()

    def prepare(self) -> BatchPlan:
        """Form the next batch and run the placement protocol on every layer."""
        t0 = time.perf_counter()
        sh, N, E = self.shared, self.setup.cluster.world_size, self.setup.model.experts
        start, reqs = self.batcher.next_batch(self.free_at)
        rows = sh.pool.token_index([r.seq for r in reqs])
        ex = sh.serve_experts[rows]  # [T, L, k]
        T, L, k = ex.shape
        src = token_sources(T, N)
        tokens = np.bincount(src, minlength=N)
        keys = np.bincount(src, weights=sh.serve_seq_len[rows], minlength=N)
        cbs_all = _gate_counts(ex, src, N, E)  # counts_by_source for every layer at once: [L, N, E]
        swap1 = np.zeros((L, N), dtype=np.int64)
        swap2 = np.zeros((L, N), dtype=np.int64)
        replanned = np.zeros(L, dtype=bool)
        finals: list[Placement] = []
        gated = np.zeros_like(cbs_all)
        dense = self._dense_times(tokens, keys)
        self.charge.window = self._swap_windows(dense, L)
        if self.policy.plans_on_actual_counts:
            self.policy.see_batch(ex, cbs_all)
        for l in range(L):
            dec = decide_layer(self.policy, l, ex[:, :l], cbs_all[l])
            swap1[l] = self.cache.load(l, dec.planned)
            if dec.replanned:
                swap2[l] = self.cache.load(l, dec.final)
                replanned[l] = True
            finals.append(dec.final)
            gated[l] = dec.counts_by_source
        # Every layer at once (each placement keeps its own for repeats).
        send = send_matrices(finals, gated)  # [L, N, N]
        assign = assign_many(finals, gated.sum(axis=1))  # [L, E, N]
        load = assign.sum(axis=1)  # [L, N] expert tokens per device
        imbalance = load.max(axis=1) / np.maximum(load.mean(axis=1), 1e-12)
        ffn = sh.cost.expert_ffn(assign)
        self.wall += time.perf_counter() - t0
        return BatchPlan(
            len(self.records),
            start,
            reqs,
            tokens,
            keys,
            send,
            ffn,
            swap1,
            swap2,
            replanned,
            imbalance,
            gated,
            finals,
            dense,
        )

    def _dense_times(self, tokens: np.ndarray, keys: np.ndarray) -> DenseTimes:
        """The batch's :class:`DenseTimes` for ``tokens`` and ``keys`` per device, kept
        for repeats (full batches split their tokens alike: a few dozen distinct ones
        in thousands of batches); its arrays are read-only."""
        key = (tokens.tobytes(), np.asarray(keys, dtype=np.float64).tobytes())
        hit = self._dense_memo.get(key)
        if hit is None:
            cost = self.shared.cost
            on_host = functools.partial(shared_finish_times, cores=self.host_cores)
            hit = DenseTimes(
                on_host(cost.embed(tokens)),
                on_host(cost.dense_layer(tokens, keys, first=True)),
                on_host(cost.dense_layer(tokens, keys, first=False)),
                on_host(cost.head(tokens)),
            )
            for a in (hit.embed, hit.first, hit.rest, hit.head):
                a.setflags(write=False)
            if len(self._dense_memo) >= _DENSE_MEMO_SIZE:
                del self._dense_memo[next(iter(self._dense_memo))]
            self._dense_memo[key] = hit
        return hit

    def _swap_windows(self, dense: DenseTimes, L: int) -> np.ndarray:
        """``[layers]`` s a phase-1 swap of each layer has before that layer's gate ends
        (see :meth:`complete`): within-batch planners issue it at the previous layer's
        gate (that layer's MoE part and this layer's attention and gate hide it),
        the others when the batch is formed (everything before the layer hides it).
        The MoE part of a layer is taken as the previous batch's mean, being unknown
        until the batch is timed."""
        rest = float(dense.rest.max())
        embed = float(dense.embed.max())
        moe = float(self.records[-1].layer_moe.mean()) if self.records else 0.0
        l = np.arange(L)
        if self.within_batch:
            return rest + np.where(l > 0, moe, embed)
        return embed + (l + 1) * rest + l * moe

    def complete(self, plan: BatchPlan, dispatch: np.ndarray, combine: np.ndarray) -> None:
        """Time the batch given its all-to-all times ``[layers]`` each, and advance."""
        t0 = time.perf_counter()
        cost, N = self.shared.cost, self.setup.cluster.world_size
        L = plan.send.shape[0]
        record_tl = plan.index < self.setup.serving.timeline_batches
        ev: list[Event] = []
        t = plan.start
        pcie_free = np.maximum(self.pcie_free, plan.start)
        on_host = functools.partial(shared_finish_times, cores=self.host_cores)
        dt = plan.dense if plan.dense is not None else self._dense_times(plan.tokens, plan.keys)
        embed = dt.embed
        if record_tl:
            ev += _per_rank(embed, t, "compute", "embed", "compute", -1)
        t += float(embed.max())
        # When each layer's phase-1 swaps can be issued (module docstring, step 4).
        issue = plan.start
        moe, exposed = np.zeros(L), np.zeros(L)
        # Without a shared host each device's FFN takes its own time (on_host copies it).
        ffn = np.stack([on_host(f) for f in plan.ffn]) if self.host_cores else np.asarray(plan.ffn, dtype=float)
        ffn_max = ffn.max(axis=1)
        dense_first, dense_rest = dt.first, dt.rest
        for l in range(L):
            dense = dense_first if l == 0 else dense_rest
            if record_tl:
                ev += _per_rank(dense, t, "compute", f"L{l}.attn+gate", "compute", l)
            gate_end = t + float(dense.max())
            ready = np.full(N, -np.inf)
            for n_swaps, when, name in ((plan.swap1[l], issue, "phase1"), (plan.swap2[l], gate_end, "phase2")):
                if n_swaps.any():
                    s0 = np.maximum(pcie_free, when)
                    s1 = s0 + cost.swap_time(n_swaps)
                    has = n_swaps > 0
                    pcie_free = np.where(has, s1, pcie_free)
                    ready = np.where(has, s1, ready)
                    if record_tl:
                        ev += [
                            Event(
                                int(r),
                                "pcie",
                                f"L{l}.swap.{name}",
                                "swap",
                                float(s0[r]),
                                float(s1[r]),
                                l,
                                bytes=float(n_swaps[r] * cost.expert_bytes),
                            )
                            for r in np.flatnonzero(has)
                        ]
            d_end = gate_end + dispatch[l]
            f_start = np.maximum(d_end, ready)
            f_end = f_start + ffn[l]
            c_start = float(f_end.max())
            c_end = c_start + combine[l]
            exposed[l] = c_start - (d_end + ffn_max[l])
            moe[l] = c_end - gate_end
            if record_tl:
                sent = plan.send[l] * cost.token_bytes
                np.fill_diagonal(sent, 0)
                out_b, in_b = sent.sum(axis=1), sent.sum(axis=0)
                ev += [
                    Event(r, "a2a", f"L{l}.dispatch", "all_to_all", gate_end, d_end, l, bytes=float(out_b[r]))
                    for r in range(N)
                ]
                ev += [
                    Event(r, "compute", f"L{l}.ffn", "compute", float(f_start[r]), float(f_end[r]), l) for r in range(N)
                ]
                ev += [
                    Event(r, "a2a", f"L{l}.combine", "all_to_all", c_start, c_end, l, bytes=float(in_b[r]))
                    for r in range(N)
                ]
            if self.within_batch:
                issue = gate_end  # the next layer's estimate needs this layer's gate
            t = c_end
        head = dt.head
        if record_tl:
            ev += _per_rank(head, t, "compute", "head", "compute", L)
            self.timeline.extend(ev)
        end = t + float(head.max())
        self.pcie_free = pcie_free
        self.free_at = end
        for r in plan.requests:
            r.start, r.end, r.batch = plan.start, end, plan.index
        self.records.append(
            BatchRecord(
                plan.index,
                plan.start,
                end,
                int(plan.tokens.sum()),
                len(plan.requests),
                moe,
                np.asarray(dispatch, float),
                np.asarray(combine, float),
                ffn_max,
                exposed,
                int(plan.swap1.sum() + plan.swap2.sum()),
                int(plan.replanned.sum()),
                plan.imbalance,
            )
        )
        self._admit(self.arrivals.on_complete(len(plan.requests), end))
        self.wall += time.perf_counter() - t0

    def result(self) -> PolicyServing:
        return PolicyServing(
            self.entry,
            self.requests,
            self.records,
            self.timeline,
            self.policy.phase2_checks,
            self.policy.phase2_fired,
            self.wall,
        )


def rivals(setup: InferenceSetup, entry: PlacementEntry) -> list[PlacementPolicy]:
    """Fresh objects of the scenario's other policies that plan from their own estimates
    (not ``oracle`` itself, not ``ideal``'s uniform gate): what ``oracle`` must beat."""
    out = []
    for e in setup.policies:
        if e is entry:
            continue
        p = make_policy(setup, e)
        if not (p.plans_on_actual_counts or p.uniform_gate):
            out.append(p)
    return out


def _per_rank(seconds: np.ndarray, start: float, stream: str, op: str, kind: str, layer: int) -> list[Event]:
    return [Event(r, stream, op, kind, start, start + float(s), layer) for r, s in enumerate(seconds)]


@dataclass
class ServingInputs:
    """Read-only inputs every policy's server shares, built by :func:`serving_inputs`.

    ``serve_experts`` is the whole trace (the pool's token rows index into it); the rows
    actually served are ``pool.token_index(...)`` of the pool's sequences (or of
    ``request_seqs`` for the requests of this run). ``train_experts`` holds only the
    training sequences' rows."""

    layers: int
    train_experts: np.ndarray  # [tokens, layers, k] that fit the estimators
    serve_experts: np.ndarray  # [tokens, layers, k] of the trace (rows indexed by the pool)
    serve_seq_len: np.ndarray  # [tokens] length of each token's sequence
    pool: RequestPool
    request_seqs: np.ndarray  # [requests] pool index of each request's sequence
    cost: InferenceCostModel
    a2a: AllToAllTimer  # the charge bound to the policies and the runner share it (exact repeats are cached)


def ffn_kind(setup: InferenceSetup) -> str:
    """How the scenario's devices run their experts (``serving.ffn``)."""
    return setup.serving.ffn


def serving_inputs(setup: InferenceSetup) -> ServingInputs:
    """Split the trace's sequences into a training part (``serving.train_fraction``, to
    fit the estimators) and a served pool, draw the request stream's sequences from the
    pool, and build the cost model: everything the policies' servers share."""
    ex = setup.experts
    seq_ids = setup.trace.seq_ids
    cut = np.flatnonzero(np.diff(seq_ids) != 0) + 1
    starts = np.concatenate(([0], cut))
    lengths = np.diff(np.concatenate((starts, [seq_ids.size])))
    rng = np.random.default_rng([setup.scenario.seed, 1])
    order = rng.permutation(starts.size)
    n_train = min(max(1, int(round(setup.serving.train_fraction * starts.size))), starts.size - 1)
    train, serve = np.sort(order[:n_train]), np.sort(order[n_train:])
    train_rows = np.concatenate([np.arange(starts[s], starts[s] + lengths[s]) for s in train])
    seq_len = np.repeat(lengths, lengths).astype(np.float64)
    pool = RequestPool(starts[serve], lengths[serve], seed=setup.scenario.seed)
    request_seqs = np.array([pool.draw() for _ in range(setup.serving.requests)], dtype=np.int64)
    return ServingInputs(
        ex.shape[1],
        ex[train_rows],
        ex,
        seq_len,
        pool,
        request_seqs,
        InferenceCostModel(setup.model, setup.cluster, setup.top_k, ffn_kind(setup)),
        AllToAllTimer(setup.cluster, algo=setup.a2a_algo),
    )
