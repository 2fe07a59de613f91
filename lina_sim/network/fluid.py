"""A fluid flow network on simpy: every active flow shares every link max-min fairly.

Sharing is *weighted* max-min: a flow of weight w gets w times the share of a flow of
weight 1 on a link where both are bottlenecked. Collectives give each source rank a total
weight of 1 per step, split over its concurrent flows, because NCCL drives a rank's
part of one collective through a fixed set of channels (connections) however many peers
it has: an all-to-all to 15 peers does not get 15 times the NIC share of a ring
allreduce's single connection. Plain transfers have weight 1 (per-flow fairness).

Flows are handled in *groups*: ``n_flows`` flows of ``bytes_per_flow`` each, started
together, that the caller asserts are interchangeable under the topology's symmetry
(same size, and links of equal capacity carrying equal load). A group is stored as the
set of links it crosses with a per-link multiplicity (how many of its flows cross that
link), so a rate update costs per group, not per flow: a 1024-GPU all-to-all's million
flows are two groups (intra-node, inter-node). Uneven traffic is given one group per
flow up to ``collectives.EXACT_FLOW_LIMIT`` flows, which makes the solution exactly
per-flow max-min fair; above it, one aggregate per node pair whose per-link
multiplicities are fractional (the share of its bytes on each link; see
``Collectives._aggregate``). :func:`per_flow_makespan` is the exact per-flow reference.

Rates are recomputed by progressive filling (water-filling) whenever a group starts or
ends, only over the connected component of groups that share links with the change.
Groups that finish at the same instant are retired together, and groups started at
the same instant are admitted together. Nothing preempts a flow: a group runs until
its last byte is delivered.

Units: bytes, seconds, bytes/s.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import simpy

from lina_sim.hardware.topology import Topology

_REL_TOL = 1e-9  # a link is saturated when its leftover capacity is below this fraction


@dataclass(eq=False)
class FlowGroup:
    """``n_flows`` equal flows moving in lockstep at ``rate`` bytes/s each.

    ``links``/``mult``: the distinct links crossed and how many of the group's flows cross
    each. ``remaining`` is bytes left per flow as of time ``last`` (s).
    """

    gid: int
    links: np.ndarray
    mult: np.ndarray
    n_flows: int
    bytes_per_flow: float
    weight: float
    tag: str
    start: float
    done: simpy.Event
    remaining: float = 0.0
    rate: float = 0.0
    last: float = 0.0
    end: float = float("nan")

    @property
    def finish_time(self) -> float:
        return self.last + self.remaining / self.rate if self.rate > 0 else float("inf")


@dataclass
class NetworkStats:
    """Counters of the solver's own work, for benchmarks."""

    groups_started: int = 0
    flows_started: int = 0
    rate_updates: int = 0
    groups_in_updates: int = 0
    max_active_groups: int = 0


def links_of_paths(paths: np.ndarray, n_links: int) -> tuple[np.ndarray, np.ndarray]:
    """Collapse a [flows, hops] path matrix (padded with -1) into (distinct links,
    flows crossing each)."""
    flat = paths[paths >= 0]
    if flat.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    if flat.size > 4 * 1024 and n_links < 8 * flat.size:
        counts = np.bincount(flat, minlength=n_links)
        links = np.flatnonzero(counts)
        return links, counts[links].astype(np.float64)
    links, counts = np.unique(flat, return_counts=True)
    return links.astype(np.int64), counts.astype(np.float64)


class FluidNetwork:
    """Max-min fair sharing of the links of a :class:`Topology`, on a simpy clock."""

    def __init__(self, env: simpy.Environment, topology: Topology):
        self.env = env
        self.topology = topology
        self.capacity = topology.links.capacity  # bytes/s per link
        n = len(self.capacity)
        self.link_bytes = np.zeros(n)  # bytes carried per link
        self.link_busy = np.zeros(n)  # seconds with at least one flow on the link
        self._busy_since = np.zeros(n)
        self._active_count = np.zeros(n, dtype=np.int64)
        self._groups: dict[int, FlowGroup] = {}
        self._ids = itertools.count()
        self._pending_new: list[FlowGroup] = []
        self._flush_scheduled = False
        self._wakeup_gen = 0
        self.stats = NetworkStats()

    # -- public API ----------------------------------------------------------------------
    def transfer(
        self,
        links: np.ndarray,
        mult: np.ndarray,
        n_flows: int,
        bytes_per_flow: float,
        tag: str = "",
        weight: float = 1.0,
    ) -> simpy.Event:
        """Start a group of ``n_flows`` flows of ``bytes_per_flow`` bytes and fair-share
        ``weight`` each over ``links`` (each crossed by ``mult`` of the flows). Returns an
        event that fires when the last byte arrives; its value is the :class:`FlowGroup`."""
        if not weight > 0:
            raise ValueError(f"flow weight must be > 0, got {weight}")
        done = self.env.event()
        g = FlowGroup(
            next(self._ids),
            np.asarray(links, np.int64),
            np.asarray(mult, np.float64),
            int(n_flows),
            float(bytes_per_flow),
            float(weight),
            tag,
            self.env.now,
            done,
            remaining=float(bytes_per_flow),
            last=self.env.now,
        )
        self.stats.groups_started += 1
        self.stats.flows_started += int(n_flows)
        if g.bytes_per_flow <= 0 or g.links.size == 0 or n_flows == 0:
            g.end = self.env.now
            done.succeed(g)
            return done
        self._pending_new.append(g)
        if not self._flush_scheduled:
            # Admit every group started at this instant together, in one rate update.
            self._flush_scheduled = True
            self.env.timeout(0).callbacks.append(self._flush)
        return done

    def transfer_paths(
        self, paths: np.ndarray, bytes_per_flow: float, tag: str = "", weight: float = 1.0
    ) -> simpy.Event:
        """Start one group from a [flows, hops] path matrix (see ``Topology.paths``)."""
        links, mult = links_of_paths(paths, len(self.capacity))
        return self.transfer(links, mult, paths.shape[0], bytes_per_flow, tag, weight)

    @property
    def active_groups(self) -> list[FlowGroup]:
        return list(self._groups.values())

    def link_report(self, makespan: float | None = None) -> pd.DataFrame:
        """Per-link bytes, busy time (s) and load time (bytes / capacity, s), busiest first.

        ``utilisation`` is bytes / (capacity × makespan): 1.0 means the link was the
        bottleneck for the whole run."""
        self._settle(list(self._groups.values()))
        t = self.topology.links
        makespan = makespan or max(self.env.now, 1e-30)
        df = pd.DataFrame(
            {
                "link": t.names,
                "kind": t.kind,
                "capacity_Bps": self.capacity,
                "bytes": self.link_bytes,
                "busy_s": self.link_busy + np.where(self._active_count > 0, self.env.now - self._busy_since, 0.0),
            }
        )
        df["load_s"] = df["bytes"] / df["capacity_Bps"]
        df["utilisation"] = df["load_s"] / makespan
        df = df[df["bytes"] > 0]
        return df.sort_values(["load_s", "link"], ascending=[False, True]).reset_index(drop=True)

    # -- event handling ------------------------------------------------------------------
    def _flush(self, _event: simpy.Event) -> None:
        self._flush_scheduled = False
        new, self._pending_new = self._pending_new, []
        now = self.env.now
        for g in new:
            g.last = now
            self._groups[g.gid] = g
            idle = g.links[self._active_count[g.links] == 0]
            self._busy_since[idle] = now
            self._active_count[g.links] += 1
        self.stats.max_active_groups = max(self.stats.max_active_groups, len(self._groups))
        self._update(np.concatenate([g.links for g in new]))

    def _on_wakeup(self, gen: int) -> None:
        if gen != self._wakeup_gen:
            return  # superseded by a later rate update
        now = self.env.now
        eps = 1e-12 * max(now, 1e-3)
        finished = [g for g in self._groups.values() if g.finish_time <= now + eps]
        if not finished:
            self._reschedule()
            return
        for g in finished:
            self.link_bytes[g.links] += g.mult * g.remaining
            g.remaining = 0.0
            g.last = g.end = now
            del self._groups[g.gid]
            self._active_count[g.links] -= 1
            freed = g.links[self._active_count[g.links] == 0]
            self.link_busy[freed] += now - self._busy_since[freed]
        self._update(np.concatenate([g.links for g in finished]))
        for g in finished:
            g.done.succeed(g)

    def _update(self, touched_links: np.ndarray) -> None:
        comp = self._component(touched_links)
        if comp:
            self._settle(comp)
            self._solve(comp)
        self._reschedule()

    def _component(self, touched_links: np.ndarray) -> list[FlowGroup]:
        """Groups connected to ``touched_links`` through shared links: only their rates
        can change."""
        mask = np.zeros(len(self.capacity), dtype=bool)
        mask[touched_links] = True
        rest = list(self._groups.values())
        comp: list[FlowGroup] = []
        grew = True
        while grew and rest:
            grew = False
            keep = []
            for g in rest:
                if mask[g.links].any():
                    comp.append(g)
                    mask[g.links] = True
                    grew = True
                else:
                    keep.append(g)
            rest = keep
        return comp

    def _settle(self, groups: Iterable[FlowGroup]) -> None:
        now = self.env.now
        for g in groups:
            dt = now - g.last
            if dt > 0 and g.rate > 0:
                moved = min(g.rate * dt, g.remaining)
                g.remaining -= moved
                self.link_bytes[g.links] += g.mult * moved
            g.last = now

    def _solve(self, groups: list[FlowGroup]) -> None:
        """Progressive filling: raise a common fair level, every unfrozen flow's rate being
        weight × level, until a link saturates; freeze the groups crossing it; repeat."""
        self.stats.rate_updates += 1
        self.stats.groups_in_updates += len(groups)
        if len(groups) == 1:  # alone on its links: the tightest link sets the rate
            g = groups[0]
            g.rate = float(np.min(self.capacity[g.links] / g.mult))
            return
        rate = max_min_rates([(g.links, g.mult, g.weight) for g in groups], self.capacity)
        for g, r in zip(groups, rate):
            g.rate = float(r)

    def _reschedule(self) -> None:
        self._wakeup_gen += 1
        if not self._groups:
            return
        t_next = min(g.finish_time for g in self._groups.values())
        gen = self._wakeup_gen
        ev = self.env.timeout(max(t_next - self.env.now, 0.0))
        ev.callbacks.append(lambda _e: self._on_wakeup(gen))


def max_min_rates(groups: Sequence[tuple[np.ndarray, np.ndarray, float]], capacity: np.ndarray) -> np.ndarray:
    """Per-flow rate (bytes/s) of each group ``(links, mult, weight)`` when all run
    together on links of ``capacity``: progressive filling raises a common fair level,
    every unfrozen flow's rate being weight x level, until a link saturates, freezes the
    groups crossing it, and repeats."""
    if not groups:
        return np.zeros(0)
    sizes = np.fromiter((g[0].size for g in groups), np.int64, len(groups))
    gidx = np.repeat(np.arange(len(groups)), sizes)
    all_links = np.concatenate([g[0] for g in groups])
    weights = np.fromiter((g[2] for g in groups), np.float64, len(groups))
    return _progressive_fill(gidx, all_links, np.concatenate([g[1] for g in groups]), weights, capacity)


def _dense_ids(ids: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_inverse=True)`` for integers in ``[0, bound)``: by a table of
    ``bound`` entries rather than a sort where ``ids`` is long (the 16,384-GPU step solves
    hundreds of thousands of group-link entries at once; the sort was most of its solver
    time). The same arrays either way."""
    if ids.size <= 4 * 1024 or bound > 8 * ids.size:
        ulinks, inv = np.unique(ids, return_inverse=True)
        return ulinks, inv.ravel()
    present = np.zeros(bound, dtype=bool)
    present[ids] = True
    ulinks = np.flatnonzero(present)
    index = np.cumsum(present) - 1
    return ulinks, index[ids]


def _progressive_fill(
    gidx: np.ndarray, all_links: np.ndarray, mult: np.ndarray, weights: np.ndarray, capacity: np.ndarray
) -> np.ndarray:
    """:func:`max_min_rates` on groups given back to back: entry i says group
    ``gidx[i]`` has ``mult[i]`` flows on link ``all_links[i]``; ``weights`` per group."""
    mult = mult * weights[gidx]
    ulinks, inv = _dense_ids(all_links, capacity.size)
    full = capacity[ulinks]
    cap = full.copy()
    rate = np.zeros(weights.size)
    frozen = np.zeros(weights.size, dtype=bool)
    live = np.ones(all_links.size, dtype=bool)
    while not frozen.all():
        w = np.bincount(inv[live], weights=mult[live], minlength=ulinks.size)
        used = w > 0
        delta = float(np.min(cap[used] / w[used]))
        rate[~frozen] += delta * weights[~frozen]
        cap[used] -= delta * w[used]
        saturated = used & (cap <= _REL_TOL * full)
        cap[saturated] = 0.0
        frozen[gidx[live & saturated[inv]]] = True
        live = ~frozen[gidx]
    return rate


def per_flow_makespan(paths: np.ndarray, nbytes: np.ndarray, weight: np.ndarray, capacity: np.ndarray) -> float:
    """Time (s) until the last of a set of flows that start together ends, every flow
    (a row of ``paths``, padded with -1, carrying ``nbytes`` at fair-share ``weight``)
    sharing links max-min fairly on its own: the exact reference that aggregated steps
    are measured against. Vectorised over flows, one rate solve per finishing instant;
    O(flows x hops) per solve, so meant for hundreds of GPUs, not thousands."""
    size = np.asarray(nbytes, dtype=np.float64)
    remaining = size.copy()
    live = remaining > 0
    valid = paths >= 0
    hops = valid.sum(axis=1)
    flow_of_hop = np.repeat(np.arange(len(paths)), hops)
    link_of_hop = paths[valid]
    weight = np.asarray(weight, dtype=np.float64)
    now = 0.0
    while live.any():
        ids = np.flatnonzero(live)
        # Each live flow as a group of one: its links, one flow on each, its weight.
        links = link_of_hop[live[flow_of_hop]]
        gidx = np.repeat(np.arange(ids.size), hops[ids])
        rate = _progressive_fill(gidx, links, np.ones(links.size), weight[ids], capacity)
        dt = float(np.min(remaining[ids] / rate))
        now += dt
        remaining[ids] -= rate * dt
        # Done within a part in 1e9 of its size (the flow that set dt is at 0).
        live &= remaining > 1e-9 * size
    return now
