"""Where each expert of one MoE layer lives, and what that implies for one batch.

A :class:`Placement` says, for each expert, which devices serve it and which share of its
tokens each of them takes. From it and a batch's gate counts follow:

- each device's token load (whole tokens, split deterministically by share);
- the uneven dispatch all-to-all: how many tokens (or bytes) every device sends to every
  other one, given the device each token sits on;
- the expert weights each device must swap in relative to the previous placement.

Units: tokens are (token, choice) pairs, i.e. one per expert a token is routed to, so a
top-k batch of ``T`` tokens dispatches ``k*T`` of them; bytes are whatever
``bytes_per_token`` says (``d_model * dtype bytes`` for an activation row).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numba
import numpy as np

_SHARE_TOL = 1e-6
# Results of assign / send_matrix kept per placement: cost-aware policies charge the same
# candidate for the same batch several times (search, then the exact charge).
_MEMO_SIZE = 8


@dataclass(frozen=True)
class Placement:
    """The devices serving each expert of one MoE layer and their shares of its tokens.

    - ``devices[e]``: the distinct devices (ranks ``0..num_devices-1``, ascending) that
      hold expert ``e``'s weights for this batch;
    - ``shares[e][i]``: the fraction of expert ``e``'s tokens that ``devices[e][i]``
      computes; each expert's shares are > 0 and sum to 1;
    - ``origin``: which rule produced it (``static``, ``phase1``, ``phase2``, ``shadow``,
      ``eplb``, ...), for reporting only; it takes no part in equality.
    """

    num_devices: int
    devices: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[float, ...], ...]
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        if len(self.devices) != len(self.shares) or not self.devices:
            raise ValueError("devices and shares need one non-empty entry per expert")
        for e, (devs, sh) in enumerate(zip(self.devices, self.shares)):
            if not devs or len(devs) != len(sh):
                raise ValueError(f"expert {e}: needs >= 1 device and one share per device")
            if list(devs) != sorted(set(devs)) or devs[0] < 0 or devs[-1] >= self.num_devices:
                raise ValueError(
                    f"expert {e}: devices {devs} must be distinct, ascending, in 0..{self.num_devices - 1}"
                )
            if min(sh) <= 0 or abs(sum(sh) - 1.0) > _SHARE_TOL:
                raise ValueError(f"expert {e}: shares {sh} must be > 0 and sum to 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_replicas(
        cls,
        num_devices: int,
        replicas: Sequence[Iterable[int] | Mapping[int, float]],
        origin: str = "",
    ) -> Placement:
        """Build from, per expert, either an iterable of devices (tokens split evenly) or
        a ``{device: weight}`` mapping (weights normalised to shares)."""
        devices: list[tuple[int, ...]] = []
        shares: list[tuple[float, ...]] = []
        for rep in replicas:
            weights: dict[int, float] = {}
            if isinstance(rep, Mapping):
                for d, w in rep.items():
                    if w > 0:
                        weights[int(d)] = weights.get(int(d), 0.0) + float(w)
            else:
                for d in rep:
                    weights[int(d)] = 1.0  # an even split; repeats mean the same device
            devs = tuple(sorted(weights))
            total = sum(weights[d] for d in devs)
            devices.append(devs)
            shares.append(tuple(weights[d] / total for d in devs) if total > 0 else ())
        return cls(num_devices, tuple(devices), tuple(shares), origin)

    @classmethod
    def from_counts(cls, num_devices: int, replicas: np.ndarray, origin: str = "") -> Placement:
        """Build from ``replicas [experts, devices]``: how many replicas of expert e
        device d holds (0: none); each expert's tokens split in proportion. The same
        placement, to the bit, as :meth:`from_replicas` given those counts as weights,
        without its per-expert Python work (planners build thousands per run)."""
        r = np.asarray(replicas, dtype=np.float64)
        if r.ndim != 2 or r.shape[1] != num_devices or not r.size:
            raise ValueError(f"replicas has shape {r.shape}, expected (experts, {num_devices})")
        total = r.sum(axis=1)
        # A NaN or inf entry makes its row's total NaN or inf.
        if not (r.min() >= 0 and total.min() > 0 and np.isfinite(total.max())):
            raise ValueError("replicas must be finite, >= 0, with at least one device per expert")
        share = r / total[:, None]
        rows, cols = np.nonzero(r)  # row-major: each expert's devices in order, every row has one
        cl, vl = cols.tolist(), share[rows, cols].tolist()
        devs: list[tuple[int, ...]] = []
        vals: list[tuple[float, ...]] = []
        at = 0
        for k in np.bincount(rows, minlength=r.shape[0]).tolist():  # slices, not an append per entry
            devs.append(tuple(cl[at : at + k]))
            vals.append(tuple(vl[at : at + k]))
            at += k
        return cls._assembled(num_devices, tuple(devs), tuple(vals), share, origin)

    @classmethod
    def _assembled(
        cls,
        num_devices: int,
        devices: tuple[tuple[int, ...], ...],
        shares: tuple[tuple[float, ...], ...],
        share_matrix: np.ndarray,
        origin: str,
    ) -> Placement:
        """A placement from parts its caller built consistently (``share_matrix`` is
        ``devices`` and ``shares`` as a matrix): no checks, for planners that build
        thousands of them."""
        out = object.__new__(cls)
        # Valid by construction: skip __post_init__'s per-expert checks.
        object.__setattr__(out, "num_devices", int(num_devices))
        object.__setattr__(out, "devices", devices)
        object.__setattr__(out, "shares", shares)
        object.__setattr__(out, "origin", origin)
        share_matrix.setflags(write=False)
        out.__dict__["share_matrix"] = share_matrix  # what the cached property would compute
        return out

    def __hash__(self) -> int:
        # The dataclass's hash (the compared fields), kept: searches and their memories
        # hash the same placement many times, and hashing its nested tuples is not free.
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = hash((self.num_devices, self.devices, self.shares))
        return h

    @cached_property
    def _memo(self) -> dict[tuple[str, bytes], np.ndarray]:
        return {}

    def _remember(self, key: tuple[str, bytes], value: np.ndarray) -> np.ndarray:
        if len(self._memo) >= _MEMO_SIZE:
            del self._memo[next(iter(self._memo))]
        value.setflags(write=False)
        self._memo[key] = value
        return value

    # ------------------------------------------------------------------ residency
    @property
    def num_experts(self) -> int:
        return len(self.devices)

    @cached_property
    def share_matrix(self) -> np.ndarray:
        """``float64 [experts, devices]``: share of expert e's tokens on device d."""
        m = np.zeros((self.num_experts, self.num_devices))
        for e, (devs, sh) in enumerate(zip(self.devices, self.shares)):
            m[e, list(devs)] = sh
        m.setflags(write=False)
        return m

    @cached_property
    def resident(self) -> tuple[frozenset[int], ...]:
        """Per device, the experts whose weights it holds."""
        held: list[set[int]] = [set() for _ in range(self.num_devices)]
        for e, devs in enumerate(self.devices):
            for d in devs:
                held[d].add(e)
        return tuple(frozenset(h) for h in held)

    def experts_per_device(self) -> np.ndarray:
        """``int64 [devices]``: how many experts' weights each device holds."""
        return (self.share_matrix > 0).sum(axis=0)

    def replica_counts(self) -> np.ndarray:
        """``int64 [experts]``: how many devices serve each expert."""
        return np.array([len(d) for d in self.devices], dtype=np.int64)

    def swap_ins(self, previous: Placement | None) -> tuple[frozenset[int], ...]:
        """Per device, the experts it must load because ``previous`` (the placement its
        memory holds now, for the same layer) did not have them there. ``None`` means
        nothing is resident yet, so everything must be loaded."""
        if previous is None:
            return self.resident
        if previous.num_devices != self.num_devices:
            raise ValueError("placements cover different numbers of devices")
        return tuple(now - before for now, before in zip(self.resident, previous.resident))

    def swap_in_counts(self, previous: Placement | None) -> np.ndarray:
        """``int64 [devices]``: number of expert weight sets each device must load."""
        return np.array([len(s) for s in self.swap_ins(previous)], dtype=np.int64)

    # ------------------------------------------------------------------ one batch
    def assign(self, counts: Sequence[int] | np.ndarray) -> np.ndarray:
        """``int64 [experts, devices]``: tokens of expert e computed on device d
        (read-only: the result is kept for repeated calls).

        Each expert's ``counts[e]`` tokens are split over its devices by share in whole
        tokens with the largest-remainder rule, so each row sums exactly to ``counts[e]``.
        Remainder ties go to devices in a rotating order starting at ``e mod N``, so the
        odd tokens of evenly replicated experts do not all land on device 0.
        """
        return _assigned([self], counts)[0]

    def device_loads(self, counts: Sequence[int] | np.ndarray) -> np.ndarray:
        """``int64 [devices]``: tokens each device's expert FFNs process for these counts."""
        return self.assign(counts).sum(axis=0)

    def send_matrix(self, counts_by_source: np.ndarray) -> np.ndarray:
        """``int64 [devices, devices]``: tokens device s sends to device d in the dispatch
        all-to-all (the combine all-to-all is its transpose); read-only, kept for repeats. The diagonal is the tokens a
        device keeps for its own experts (no network transfer).

        ``counts_by_source[s, e]`` is the number of tokens sitting on device s that chose
        expert e (see :func:`counts_by_source`). Each replica receives exactly its share
        from :meth:`assign`, so column sums equal :meth:`device_loads` of the total counts
        and row sums equal each source's token count. Tokens stay local where the source
        device itself serves the expert (up to that replica's quota); the rest are matched
        to the remaining quotas in device order.
        """
        return _sent([self], counts_by_source)[0]

    def send_bytes(self, counts_by_source: np.ndarray, bytes_per_token: float) -> np.ndarray:
        """``float64 [devices, devices]``: :meth:`send_matrix` times ``bytes_per_token``."""
        return self.send_matrix(counts_by_source).astype(np.float64) * float(bytes_per_token)

    def expected_traffic(self, counts: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fractional expectation of one batch for cost models: ``(send, recv, load)``,
        each ``float64 [devices]`` in tokens, assuming each expert's tokens sit evenly on
        all devices (data-parallel batches) and the same local-first routing as
        :meth:`send_matrix`. ``send``/``recv`` exclude tokens kept local."""
        c = np.asarray(counts, dtype=np.float64)
        s = self.share_matrix
        even = 1.0 / self.num_devices
        kept = np.minimum(s, even)  # per expert, per device: fraction computed locally
        load = c @ s
        recv = c @ (s - kept)
        send = c @ (even - kept)
        return send, recv, load


def assign_many(placements: Sequence[Placement], counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """``int64 [placements, experts, devices]``: :meth:`Placement.assign` of each of
    ``placements`` (same experts and devices) for ``counts`` (``[experts]``, the same
    for all, or ``[placements, experts]``), computed together for those not already
    kept, and kept on each."""
    return np.stack(_assigned(placements, counts))


def assign_shares(share: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``int64 [C, experts, devices]``: :meth:`Placement.assign` of the placements whose
    share matrices are stacked in ``share [C, experts, devices]``, for whole ``counts
    [C, experts]``, one row each; computed, not kept (for callers that already hold the
    stack and would not ask again)."""
    return _assign_kernel(np.ascontiguousarray(share, dtype=np.float64), np.ascontiguousarray(counts, dtype=np.int64))


def send_matrices(
    placements: Sequence[Placement], counts_by_source: np.ndarray, item_of: np.ndarray | None = None
) -> np.ndarray:
    """``int64 [placements, devices, devices]``: :meth:`Placement.send_matrix` of each
    of ``placements`` (same experts and devices) for ``counts_by_source`` (``[devices,
    experts]``, the same for all, or ``[placements, devices, experts]``; with
    ``item_of``, ``[items, devices, experts]`` and the item of each placement), computed
    together for those not already kept, and kept on each."""
    return np.stack(_sent(placements, counts_by_source, item_of))


def _assigned(placements: Sequence[Placement], counts: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    e_count = placements[0].num_experts
    raw = np.asarray(counts)
    if raw.ndim == 2:
        if raw.shape[0] != len(placements):
            raise ValueError(f"counts has {raw.shape[0]} rows for {len(placements)} placements")
        rows = list(_as_counts(raw, e_count, rows=True))  # checked at once, not row by row
        keys = [("assign", r.tobytes()) for r in rows]
    else:
        rows = [_as_counts(raw, e_count)] * len(placements)
        keys = [("assign", rows[0].tobytes())] * len(placements)
    out = [p._memo.get(k) for p, k in zip(placements, keys)]
    todo = [i for i, hit in enumerate(out) if hit is None]
    if todo:
        s = np.stack([placements[i].share_matrix for i in todo])  # [C, E, N]
        c = np.stack([rows[i] for i in todo])  # [C, E]
        for i, a in zip(todo, _assign_kernel(s, c)):
            out[i] = placements[i]._remember(keys[i], a)
    return out


@numba.njit(cache=True)
def _assign_kernel(s: np.ndarray, c: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """``int64 [C, E, N]``: the largest-remainder split of :meth:`Placement.assign` for
    share matrices ``s [C, E, N]`` and counts ``c [C, E]``, one (placement, expert) row at
    a time. Each replica gets ``floor(c * share + 1e-9)`` (at most ``c``); the tokens
    left go one each to the largest fractional parts, rounded to 9 decimals (numpy's
    ``round(x, 9)``, i.e. ``rint(x * 1e9) / 1e9``, so equal shares give equal parts),
    ties to the device that comes first in a rotation starting at ``e mod N`` (so the
    odd tokens of evenly replicated experts do not all land on device 0). That is the
    first ``remainder`` devices of a stable sort by ``-frac + rotation * 1e-10 / N``,
    picked here as the smallest keys one by one, ties to the lower device."""
    C, E, n = s.shape
    out = np.zeros((C, E, n), dtype=np.int64)
    exact = np.empty(n)
    key = np.empty(n)
    taken = np.empty(n, dtype=np.bool_)
    step = 1e-10 / n
    for ci in range(C):
        for e in range(E):
            cnt = c[ci, e]
            placed = 0
            for d in range(n):
                x = cnt * s[ci, e, d]
                b = np.int64(np.floor(x + 1e-9))
                if b > cnt:
                    b = cnt
                out[ci, e, d] = b
                exact[d] = x
                placed += b
            left = cnt - placed
            if left <= 0:
                continue
            for d in range(n):
                frac = np.rint((exact[d] - out[ci, e, d]) * 1e9) / 1e9 if s[ci, e, d] != 0 else -1.0
                key[d] = -frac + ((d - e) % n) * step
                taken[d] = False
            for _ in range(min(left, n)):
                best = -1
                for d in range(n):
                    if not taken[d] and (best < 0 or key[d] < key[best]):
                        best = d
                taken[best] = True
                out[ci, e, best] += 1
    return out


def _sent(
    placements: Sequence[Placement], counts_by_source: np.ndarray, item_of: np.ndarray | None = None
) -> list[np.ndarray]:
    cbs = np.asarray(counts_by_source, dtype=np.int64)
    n, e_count = placements[0].num_devices, placements[0].num_experts
    per = cbs.ndim == 3
    items = len(placements) if item_of is None else cbs.shape[0]
    if item_of is None and per:
        item_of = np.arange(len(placements))
    bad_items = per and (cbs.shape[0] != items or len(item_of) != len(placements) or not (item_of < items).all())
    if cbs.shape[-2:] != (n, e_count) or cbs.ndim not in (2, 3) or bad_items or (item_of is not None and not per):
        want = f"({items}, {n}, {e_count})" if per else f"({n}, {e_count})"
        raise ValueError(f"counts_by_source has shape {cbs.shape}, expected {want}")
    if (cbs < 0).any():
        raise ValueError("counts_by_source must be >= 0")
    if per:
        item_keys = [("send", c.tobytes()) for c in cbs]  # once per item, not per placement
        keys = [item_keys[i] for i in item_of.tolist()]
    else:
        keys = [("send", cbs.tobytes())] * len(placements)
    out = [p._memo.get(k) for p, k in zip(placements, keys)]
    todo = [i for i, hit in enumerate(out) if hit is None]
    if todo:
        src = cbs[item_of[todo]].transpose(0, 2, 1) if per else np.broadcast_to(cbs.T, (len(todo), e_count, n))
        counts = src.sum(axis=2) if per else cbs.sum(axis=0)  # per placement, or shared
        quota = np.stack(_assigned([placements[i] for i in todo], counts))  # [C, E, N]
        for i, m in zip(todo, _send_kernel(np.ascontiguousarray(src), quota)):
            out[i] = placements[i]._remember(keys[i], m)
    return out


@numba.njit(cache=True)
def _send_kernel(src: np.ndarray, quota: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """``int64 [C, N, N]`` send matrices from ``src [C, E, N]`` (each device's tokens of
    each expert) and ``quota [C, E, N]`` (each replica's tokens, :func:`_assigned`):
    tokens stay local up to the local quota; per expert, the rest are laid out as
    consecutive intervals on one line of tokens, sources and destinations each in device
    order, and each overlap is sent (the north-west-corner plan, walked by two
    pointers)."""
    C, E, n = src.shape
    out = np.zeros((C, n, n), dtype=np.int64)
    a = np.empty(n, dtype=np.int64)
    b = np.empty(n, dtype=np.int64)
    for ci in range(C):
        for e in range(E):
            for d in range(n):
                kept = min(src[ci, e, d], quota[ci, e, d])
                out[ci, d, d] += kept
                a[d] = src[ci, e, d] - kept
                b[d] = quota[ci, e, d] - kept
            i = j = 0
            while i < n and j < n:
                if a[i] == 0:
                    i += 1
                elif b[j] == 0:
                    j += 1
                else:
                    t = min(a[i], b[j])
                    out[ci, i, j] += t
                    a[i] -= t
                    b[j] -= t
    return out


def _as_counts(counts: Sequence[int] | np.ndarray, num_experts: int, rows: bool = False) -> np.ndarray:
    """``counts`` checked as whole, non-negative token counts per expert, as int64: one
    ``[experts]`` vector, or with ``rows`` a ``[rows, experts]`` stack of them."""
    c = np.asarray(counts)
    if c.shape[-1:] != (num_experts,) or c.ndim != 1 + rows:
        shape = c.shape[1:] if rows and c.ndim == 2 else c.shape
        raise ValueError(f"counts has shape {shape}, expected ({num_experts},)")
    if c.dtype.kind == "f":
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise ValueError("counts must be whole numbers of tokens")
    c = c.astype(np.int64)
    if (c < 0).any():
        raise ValueError("counts must be >= 0")
    return c


def token_sources(num_tokens: int, num_devices: int) -> np.ndarray:
    """``int64 [tokens]``: the device each token of a batch sits on. A data-parallel
    batch is cut into ``num_devices`` contiguous, near-equal slices."""
    return (np.arange(num_tokens, dtype=np.int64) * num_devices) // max(num_tokens, 1)


def counts_by_source(experts: np.ndarray, num_experts: int, num_devices: int) -> np.ndarray:
    """``int64 [devices, experts]`` from one layer's choices ``experts[tokens]`` or
    ``experts[tokens, k]`` of one batch: how many tokens on each device chose each expert
    (tokens placed by :func:`token_sources`)."""
    ex = np.asarray(experts)
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.ndim != 2:
        raise ValueError(f"experts must be [tokens] or [tokens, k], got shape {ex.shape}")
    src = np.repeat(token_sources(ex.shape[0], num_devices), ex.shape[1])
    flat = src * num_experts + ex.reshape(-1).astype(np.int64)
    return np.bincount(flat, minlength=num_devices * num_experts).reshape(num_devices, num_experts)


def uniform_counts_by_source(counts_by_source: np.ndarray) -> np.ndarray:
    """The same per-device token totals spread as evenly as possible over the experts:
    the gate of the ``ideal`` policy. Each device's remainder goes to experts in a
    rotating order so that the per-expert totals also stay within one token per device."""
    cbs = np.asarray(counts_by_source, dtype=np.int64)
    n, e = cbs.shape
    totals = cbs.sum(axis=1)
    out = np.repeat((totals // e)[:, None], e, axis=1)
    rem = totals % e
    offset = np.cumsum(np.concatenate(([0], rem[:-1])))  # where each device's extras start
    pos = (np.arange(e)[None, :] - offset[:, None]) % e
    out += (pos < rem[:, None]).astype(np.int64)
    return out
