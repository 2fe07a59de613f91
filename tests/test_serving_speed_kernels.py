"""The compiled kernels behind the placement policies and the serving charge give, to the
bit, what their plain array (or plain Python) formulations give: each test holds the
plain formulation and compares on random inputs, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest

from lina_sim.policies.path_estimator import PathEstimator
from lina_sim.policies.placement.layout import Placement, _assign_kernel, _send_kernel, assign_many
from lina_sim.policies.placement.packing import (
    _eplb_pack_kernel,
    _eplb_replicate_kernel,
    align_units,
    eplb_pack,
    eplb_replicate,
    placement_from_groups,
)
from lina_sim.routing.generator import RoutingTraceGenerator
from lina_sim.serving.cost import _quick_a2a_kernel
from lina_sim.serving.server import _load_stamps


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
        assert np.array_equal(_quick_a2a_kernel(src, quota, *args), _quick_a2a_plain(src, quota, *args))


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
