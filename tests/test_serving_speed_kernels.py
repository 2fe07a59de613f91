"""The compiled kernels behind the placement policies and the serving charge give, to the
bit, what their plain array (or plain Python) formulations give: each test holds the
plain formulation and compares on random inputs, ties and edge cases included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lina_sim.policies.path_estimator import PathEstimator
from lina_sim.policies.placement.layout import (
    Placement,
    _assign_kernel,
    _send_kernel,
    assign_many,
    assign_shares,
    send_matrices,
)
from lina_sim.policies.placement.packing import (
    _LINA_MEMO,
    _eplb_pack_kernel,
    _eplb_replicate_kernel,
    align_units,
    eplb_pack,
    eplb_replicate,
    first_fit_decreasing,
    lina_placement,
    lina_units,
    placement_from_groups,
)
from lina_sim.routing.generator import RoutingTraceGenerator
from lina_sim.serving.cost import _quick_a2a_kernel
from lina_sim.serving.server import ExpertCache, _gate_counts, _load_stamps


def _random_shares(rng: np.random.Generator, C: int, E: int, N: int) -> np.ndarray:
    """``[C, E, N]`` share matrices: a few replicas per expert, uneven weights, some even."""
    reps = (rng.random((C, E, N)) < 0.3) * rng.integers(1, 4, (C, E, N))
    reps[:, :, 0] += reps.sum(axis=2) == 0
    if C > 1:
        reps[0] = reps[0] > 0  # even splits: the ties the rotation breaks
    return reps / reps.sum(axis=2, keepdims=True)


def _assign_plain(s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Largest remainder with rotating ties, in array calls (Placement.assign's rule)."""
    n = s.shape[2]
    exact = c[:, :, None] * s
    base = np.minimum(np.floor(exact + 1e-9).astype(np.int64), c[:, :, None])
    remainder = c - base.sum(axis=2)
    frac = np.round(exact - base, 9)
    frac[s == 0] = -1.0
    extra = np.zeros_like(base)
    todo_c, todo_e = np.nonzero(remainder > 0)
    if todo_c.size:
        rot = (np.arange(n)[None, :] - todo_e[:, None]) % n
        order = np.argsort(-frac[todo_c, todo_e] + rot * (1e-10 / n), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(n)[None, :].repeat(todo_c.size, 0), axis=1)
        extra[todo_c, todo_e] = rank < remainder[todo_c, todo_e, None]
    return base + extra


def _send_plain(src: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Local first, then the north-west-corner plan per expert as interval overlaps."""
    C, E, n = src.shape
    local = np.minimum(src, quota)
    sends = np.zeros((C, n, n), dtype=np.int64)
    sends[:, np.arange(n), np.arange(n)] = local.sum(axis=1)
    a, b = (src - local).reshape(-1, n), (quota - local).reshape(-1, n)
    ca, cb = np.cumsum(a, axis=1), np.cumsum(b, axis=1)
    lo = np.maximum((ca - a)[:, :, None], (cb - b)[:, None, :])
    hi = np.minimum(ca[:, :, None], cb[:, None, :])
    return sends + np.maximum(hi - lo, 0).reshape(C, E, n, n).sum(axis=1)


@pytest.mark.parametrize("seed", range(4))
def test_assign_and_send_kernels_are_the_array_forms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        C, E, N = (int(x) for x in rng.integers(1, [6, 20, 20]))
        s = _random_shares(rng, C, E, N)
        c = rng.integers(0, 3000, (C, E)) * (rng.random((C, E)) < 0.9)
        quota = _assign_kernel(s, c)
        assert np.array_equal(quota, _assign_plain(s, c))
        src = np.stack([rng.multinomial(int(x), np.ones(N) / N) for x in c.ravel()]).reshape(C, E, N)
        assert np.array_equal(_send_kernel(src, quota), _send_plain(src, quota))


def _eplb_replicate_plain(w: list[float], num_physical: int, max_replicas: int) -> list[int]:
    r = [1] * len(w)
    for _ in range(num_physical - len(w)):
        best, e = -np.inf, -1
        for i, (wi, ri) in enumerate(zip(w, r)):
            if ri < max_replicas and wi / ri > best:
                best, e = wi / ri, i
        if e < 0:
            break
        r[e] += 1
    return r


def _eplb_pack_plain(w: list[float], reps: list[int], num_devices: int, slots: int) -> list[list[int]]:
    items = sorted(((w[e] / reps[e], e) for e in range(len(w)) for _ in range(reps[e])), key=lambda t: (-t[0], t[1]))
    devices: list[list[int]] = [[] for _ in range(num_devices)]
    load, used = [0.0] * num_devices, [0] * num_devices
    every = range(num_devices)
    for weight, e in items:
        room = [d for d in every if used[d] < slots and e not in devices[d]] or [d for d in every if used[d] < slots]
        d = min(room or every, key=lambda x: (load[x], x))
        devices[d].append(e)
        used[d] += 1
        load[d] += weight
    return devices


@pytest.mark.parametrize("seed", range(3))
def test_eplb_kernels_are_the_python_forms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for t in range(300):
        E, n, slots = int(rng.integers(1, 40)), int(rng.integers(1, 20)), int(rng.integers(1, 6))
        w = rng.zipf(1.3, E).astype(float) * (rng.random(E) < 0.8)
        if t % 4 == 0:
            w = np.round(w / 3)  # ties
        phys = E + int(rng.integers(0, n * slots))
        r = eplb_replicate(w, phys, n)
        assert r.tolist() == _eplb_replicate_plain(w.tolist(), phys, n)
        assert np.array_equal(_eplb_replicate_kernel(w, phys, n), r)
        assert eplb_pack(w, r, n, slots) == _eplb_pack_plain(w.tolist(), r.tolist(), n, slots)
        experts, device = _eplb_pack_kernel(w, r, n, slots)
        assert sorted(experts.tolist()) == sorted(e for e in range(E) for _ in range(r[e]))
        assert device.min() >= 0 and device.max() < n


def _quick_a2a_plain(src, quota, first, last, node_start, tb, nvl_bw, nic_bw, nic_lat, nvl_lat) -> np.ndarray:
    """ServingCharge._quick_a2a's array form."""
    local = np.minimum(src, quota)
    out, into = src - local, quota - local
    end_out, end_in = np.cumsum(out, axis=2), np.cumsum(into, axis=2)
    f, l = first, last
    to_node = np.minimum(end_out, end_in[..., l]) - np.maximum(end_out - out, end_in[..., f] - into[..., f])
    from_node = np.minimum(end_in, end_out[..., l]) - np.maximum(end_in - into, end_out[..., f] - out[..., f])
    intra_out, intra_in = np.maximum(to_node, 0).sum(axis=1), np.maximum(from_node, 0).sum(axis=1)
    sent, taken = out.sum(axis=1), into.sum(axis=1)
    node_out = np.add.reduceat(sent - intra_out, node_start, axis=1)
    node_in = np.add.reduceat(taken - intra_in, node_start, axis=1)
    gpu = np.maximum(intra_out, intra_in).max(axis=1) * tb / nvl_bw
    nic = np.maximum(node_out, node_in).max(axis=1) * tb / nic_bw
    lat = np.where(node_out.sum(axis=1) > 0, nic_lat, nvl_lat)
    return np.where(sent.sum(axis=1) > 0, np.maximum(gpu, nic) + lat, 0.0)


@pytest.mark.parametrize("gpus_per_node", [1, 3, 4])
def test_quick_a2a_kernel_is_the_array_form(gpus_per_node: int) -> None:
    rng = np.random.default_rng(gpus_per_node)
    for t in range(80):
        C, E, N = int(rng.integers(1, 8)), int(rng.integers(1, 18)), int(rng.integers(1, 18))
        g = min(gpus_per_node, N)
        first = (np.arange(N) // g) * g
        last = np.minimum(first + g, N) - 1
        node_start = np.arange(0, N, g)
        s = _random_shares(rng, C, E, N)
        c = rng.integers(0, 500, (C, E)) * (rng.random((C, E)) < 0.8)
        quota = _assign_kernel(s, c)
        per = t % 2 == 0  # one source matrix for all candidates, or one each
        src = (
            np.stack([rng.multinomial(int(x), np.ones(N) / N) for x in c.ravel()]).reshape(C, E, N)
            if per
            else np.broadcast_to(rng.integers(0, 300, (1, E, N)), (1, E, N)).copy()
        )
        if not per:
            quota = _assign_kernel(s, np.repeat(src.sum(axis=2), C, axis=0))
        args = (first, last, node_start, 1024.0, 150e9, 25e9, 5e-6, 1e-6)
        item_of = np.arange(C) if per else np.zeros(C, dtype=np.int64)
        assert np.array_equal(_quick_a2a_kernel(src, item_of, quota, *args), _quick_a2a_plain(src, quota, *args))


def _load_plain(stamp: np.ndarray, need: np.ndarray, clock: int, slots: int) -> np.ndarray:
    """ExpertCache.load's array form (LRU by stamp, one layer)."""
    e = stamp.shape[0]
    out = (need & (stamp < 0)).sum(axis=0)
    np.copyto(stamp, clock * e + np.arange(e)[:, None], where=need)
    held = stamp >= 0
    over = held.sum(axis=0) - slots
    if (over > 0).any():
        others = held & ~need
        order = np.argsort(np.where(others, stamp, np.iinfo(np.int64).max), axis=0, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(e)[:, None].repeat(stamp.shape[1], axis=1), axis=0)
        stamp[others & (rank < over[None, :])] = -1
    return out


@pytest.mark.parametrize("slots", [1, 2, 3, 16])
def test_load_stamps_is_the_array_form(slots: int) -> None:
    rng = np.random.default_rng(slots)
    E, N = 12, 6
    a = np.where(rng.random((E, N)) < 0.3, np.arange(E)[:, None], -1).astype(np.int64)
    b = a.copy()
    for clock in range(1, 200):
        need = rng.random((E, N)) < rng.uniform(0.05, 0.4)
        assert np.array_equal(_load_stamps(a, need, clock, slots), _load_plain(b, need, clock, slots))
        assert np.array_equal(a, b)


def test_placement_from_groups_is_from_counts() -> None:
    rng = np.random.default_rng(0)
    prev = None
    E = n = 1
    for t in range(300):
        if t % 3 == 0:  # a few placements in a row on the same shape, aligned with the last
            E, n = int(rng.integers(1, 20)), int(rng.integers(1, 12))
        groups = [[int(rng.integers(0, E))] for _ in range(n)]
        for e in range(E):  # every expert somewhere; a repeat on one device now and then
            groups[int(rng.integers(0, n))].append(e)
        if prev is not None and (prev.num_experts, prev.num_devices) != (E, n):
            prev = None
        p = placement_from_groups(groups, E, prev, "x")
        device_of = align_units(groups, prev)
        flat = [e * n + device_of[g] for g, members in enumerate(groups) for e in members]
        want = Placement.from_counts(n, np.bincount(flat, minlength=E * n).reshape(E, n).astype(np.float64), "x")
        assert p == want and p.shares == want.shares and p.origin == "x"
        assert np.array_equal(p.share_matrix, want.share_matrix)
        assert hash(p) == hash(want)
        prev = p if t % 3 else None
    with pytest.raises(ValueError):
        placement_from_groups([[0], [0]], 2, None, "x")  # expert 1 nowhere


@pytest.mark.parametrize("path_length,min_count", [(0, 2), (1, 1), (3, 2), (3, 50)])
def test_path_estimate_is_the_summed_distribution(path_length: int, min_count: int) -> None:
    ex = RoutingTraceGenerator.synthetic(16, 8, top_k=2, zipf_s=1.0, affinity=0.6, seq_len=64, seed=0).generate(
        6000, seed=0
    )
    est = PathEstimator(path_length, 16, min_count).fit(ex.experts[:4000])
    rng = np.random.default_rng(path_length)
    for _ in range(40):
        n = int(rng.integers(1, 1500))
        lo = int(rng.integers(0, 6000 - n))
        layer = int(rng.integers(0, 8))
        paths = PathEstimator.paths_for(ex.experts[lo : lo + n, :, 0], layer, 3)
        want = est.distribution(layer, paths).sum(axis=0)
        got = est.estimate(layer, paths)
        assert np.array_equal(got, want)
        got[:] = -1.0  # a new array each call: the kept one is untouched
        assert np.array_equal(est.estimate(layer, paths.copy()), want)


def test_assign_many_matches_assign_plain_on_placements() -> None:
    """Through the public entry point, memo and all."""
    rng = np.random.default_rng(3)
    ps = [Placement.from_counts(8, r) for r in (rng.random((6, 5, 8)) < 0.4) + np.eye(6, 8, dtype=bool)[:5]]
    counts = rng.integers(0, 1000, (6, 5))
    got = assign_many(ps, counts)
    want = _assign_plain(np.stack([p.share_matrix for p in ps]), counts)
    assert np.array_equal(got, want)
    assert np.array_equal(assign_many(ps, counts), want)  # kept results


def decreasing_order(w: list[float], items: list[int] | None = None) -> list[int]:
    """``items`` (default: all indices) by decreasing load, ties by increasing id."""
    return sorted(range(len(w)) if items is None else items, key=lambda i: (-w[i], i))


def _ffd_plain(w: list[float], capacity: float, max_items: int, items: list[int] | None = None) -> list[list[int]]:
    """First-fit decreasing in plain Python (first_fit_decreasing's docstring)."""
    bins: list[list[int]] = []
    load: list[float] = []
    tol = 1e-9 * max(capacity, 1.0)
    for i in decreasing_order(w, items):
        for b, members in enumerate(bins):
            if len(members) < max_items and load[b] + w[i] <= capacity + tol:
                members.append(i)
                load[b] += w[i]
                break
        else:
            bins.append([i])
            load.append(float(w[i]))
    return bins


def test_ffd_kernel_is_the_plain_rule() -> None:
    rng = np.random.default_rng(7)
    for t in range(500):
        E = int(rng.integers(0, 25))
        w = rng.gamma(0.5, size=E) if t % 2 else np.round(rng.random(E) * 5)
        cap, m = float(rng.random() * 3 + 0.2), int(rng.integers(1, 5))
        items = sorted(rng.choice(E, int(rng.integers(0, E + 1)), replace=False).tolist()) if E else []
        assert first_fit_decreasing(w, cap, m) == _ffd_plain(w.tolist(), cap, m)
        assert first_fit_decreasing(w, cap, m, items) == _ffd_plain(w.tolist(), cap, m, items)


def _group_load_plain(w: list[float], r: list[int], g: list[int]) -> float:
    return float(sum(w[e] / r[e] for e in g))


def _spill_plain(groups: list[list[int]], r: list[int], w: list[float], max_items: int) -> None:
    k = min(range(len(groups)), key=lambda i: (_group_load_plain(w, r, groups[i]), i))
    victim = groups.pop(k)
    for e in decreasing_order(w, victim):
        if r[e] > 1:
            r[e] -= 1
            continue
        room = [i for i, g in enumerate(groups) if len(g) < max_items and e not in g]
        if not room:
            spare = [(w[x] / (r[x] - 1), i, x) for i, g in enumerate(groups) for x in g if r[x] > 1]
            if not spare:
                raise RuntimeError("no free slot")
            _, i, x = min(spare)
            groups[i].remove(x)
            r[x] -= 1
            room = [i]
        dest = min(room, key=lambda i: (_group_load_plain(w, r, groups[i]), i))
        groups[dest].append(e)


def _lina_units_plain(w: np.ndarray, n: int, max_items: int) -> tuple[list[list[int]], list[int]]:
    """Lina's allocation in plain Python (lina_units' docstring, step by step)."""
    wl = (w / float(w.sum())).tolist()
    target = 1.0 / n
    r = [0] * len(wl)
    groups: list[list[int]] = []
    for e in [e for e in range(len(wl)) if wl[e] >= target * (1 - 1e-9)]:
        r[e] = min(max(int(math.floor(wl[e] / target + 0.5)), 1), n)
        groups.extend([e] for _ in range(r[e]))
    for b in _ffd_plain(wl, target, max_items, [e for e in range(len(wl)) if r[e] == 0]):
        groups.append(b)
        for e in b:
            r[e] += 1
    while len(groups) > n:
        best = None
        for i, g in enumerate(groups):
            if len(g) == 1 and r[g[0]] > 1:
                e = g[0]
                worst = max(
                    _group_load_plain(wl, r, h) - wl[e] / r[e] + wl[e] / (r[e] - 1)
                    for k, h in enumerate(groups)
                    if k != i and e in h
                )
                if best is None or (worst, 0, i, -1) < best:
                    best = (worst, 0, i, -1)
        loads = [_group_load_plain(wl, r, g) for g in groups]
        order = sorted(range(len(groups)), key=lambda k: (loads[k], k))
        for a in range(len(order)):
            if a + 1 < len(order) and best is not None and loads[order[a]] + loads[order[a + 1]] >= best[0]:
                break
            for b in range(a + 1, len(order)):
                gi, gj = groups[order[a]], groups[order[b]]
                if len(gi) + len(gj) <= max_items and not set(gi) & set(gj):
                    i, j = min(order[a], order[b]), max(order[a], order[b])
                    cand = (loads[order[a]] + loads[order[b]], 1, i, j)
                    if best is None or cand < best:
                        best = cand
                    break
        if best is None:
            _spill_plain(groups, r, wl, max_items)
            continue
        _, kind, i, j = best
        if kind == 0:
            r[groups[i][0]] -= 1
            del groups[i]
        else:
            groups[i] = groups[i] + groups[j]
            del groups[j]
    while len(groups) < n:
        e = max(range(len(wl)), key=lambda x: (wl[x] / r[x] if r[x] else math.inf, -x))
        r[e] += 1
        groups.append([e])
    return groups, r


@pytest.mark.parametrize("seed", range(3))
def test_lina_kernel_is_the_plain_rule(seed: int) -> None:
    """Merges, dropped replicas, spills (tight slots), too few groups, ties, zero loads."""
    rng = np.random.default_rng(seed)
    for t in range(1500):
        E, n = int(rng.integers(1, 30)), int(rng.integers(1, 20))
        m = -(-E // n) + int(rng.integers(0, 4))
        w = [
            rng.gamma(0.5, size=E) * 1000,
            rng.zipf(1.3, E).astype(float) * (rng.random(E) < 0.7),
            np.round(rng.random(E) * 4),
            rng.integers(0, 200, E).astype(float),
        ][t % 4]
        if not w.sum() > 0:
            continue
        _LINA_MEMO.clear()
        try:
            want = _lina_units_plain(w, n, m)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                lina_units(w, n, m)
            continue
        groups, replicas = lina_units(w, n, m)
        assert groups == want[0] and replicas.tolist() == want[1]
        assert lina_units(w, n, m)[0] == want[0]  # kept
        p = lina_placement(w, n, m, None, "x")
        assert p == placement_from_groups(groups, E, None, "x") and p.origin == "x"
    with pytest.raises(ValueError):
        lina_units(np.zeros(4), 2, 2)


def _some_placement(rng: np.random.Generator, E: int, N: int) -> Placement:
    r = (rng.random((E, N)) < 0.4).astype(float)
    r[np.arange(E), np.arange(E) % N] = 1.0  # every expert somewhere
    return Placement.from_counts(N, r)


def test_missing_and_gate_count_kernels_are_the_array_forms() -> None:
    rng = np.random.default_rng(5)
    L, E, N = 3, 6, 4
    static = Placement.from_replicas(N, [[e % N] for e in range(E)])
    cache = ExpertCache(L, static, slots=2)
    ps = [_some_placement(rng, E, N) for _ in range(7)]
    for l, p in enumerate(ps[:L]):
        cache.load(l, p)
    layers = rng.integers(0, L, len(ps))
    want = np.stack([cache.missing(int(l), p) for l, p in zip(layers, ps)])
    assert np.array_equal(cache.missing_many(layers, ps), want)
    assert np.array_equal(cache.missing_many(1, ps), np.stack([cache.missing(1, p) for p in ps]))
    ex = rng.integers(0, E, (50, L, 2)).astype(np.int16)
    src = np.sort(rng.integers(0, N, 50))
    flat = ((np.arange(L)[None, :, None] * N + src[:, None, None]) * E + ex).ravel()
    assert np.array_equal(_gate_counts(ex, src, N, E), np.bincount(flat, minlength=L * N * E).reshape(L, N, E))


def test_send_matrices_per_item_are_each_alone() -> None:
    rng = np.random.default_rng(6)
    N, E = 5, 7
    ps = [_some_placement(rng, E, N) for _ in range(6)]
    cbs = rng.integers(0, 40, (3, N, E))
    item_of = np.array([2, 0, 0, 1, 2, 1])
    got = send_matrices(ps, cbs, item_of)
    for p, i, m in zip(ps, item_of, got):
        assert np.array_equal(m, Placement.from_counts(N, p.share_matrix).send_matrix(cbs[i]))
    share = np.stack([p.share_matrix for p in ps])
    assert np.array_equal(assign_shares(share, cbs.sum(axis=1)[item_of]), assign_many(ps, cbs.sum(axis=1)[item_of]))
    with pytest.raises(ValueError):
        send_matrices(ps, cbs, np.array([3, 0, 0, 1, 2, 1]))  # no item 3
