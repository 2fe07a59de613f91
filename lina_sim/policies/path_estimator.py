"""Lina's path-based load estimator: next-layer expert load from tokens' recent paths.

A token's *path* at layer l is its top-1 experts at the ``path_length`` layers before l.
Tokens that shared a path tend to pick the same experts next, so P(expert at l | path)
learned from a training slice of a trace predicts each expert's load at layer l before
the gate runs. Numpy, and one numba kernel for the per-batch estimate: the placement
policies and the statistics share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


def top_experts(counts: np.ndarray, n: int) -> frozenset[int]:
    """The ``n`` experts with the highest counts; ties go to the lower expert id.

    The fixed tie-break makes "the estimated top-2k set equals the actual one"
    deterministic even when counts tie.
    """
    order = np.argsort(-np.asarray(counts, dtype=float), kind="stable")
    return frozenset(order[:n].tolist())


# A dense path -> row index per (layer, length) when it has at most this many entries
# (E ** length keys); larger tables keep the binary search.
_DENSE_KEYS = 1 << 20
# Estimates kept per estimator: policies sharing one (Lina and its ablations, and the
# oracle's copies of them) ask for the same batch's layers in turn.
_MEMO = 16
# Estimators fitted, kept for policies that fit the same settings on the same array.
_FITTED: list[tuple[np.ndarray, tuple[int, int | None, int], PathEstimator]] = []
_FITTED_SIZE = 4


@dataclass
class _Table:
    """Counts of next-layer choices for each distinct path of one length at one layer."""

    keys: np.ndarray  # int64 [U] sorted path keys
    counts: np.ndarray  # float64 [U, E] next-layer choice counts (all k choices)
    totals: np.ndarray  # float64 [U] tokens that had each path
    probs: np.ndarray | None = None  # float64 [U, E] counts / totals, once asked
    rows: np.ndarray | None = None  # int64 [E ** length]: row of a trusted key, else -1

    def lookup(self, keys: np.ndarray, num_experts: int, length: int, min_count: int) -> np.ndarray:
        """``int64 [n]``: the table row of each path key seen at least ``min_count``
        times in training, else -1."""
        if self.rows is None and num_experts**length <= _DENSE_KEYS:
            rows = np.full(num_experts**length, -1, dtype=np.int64)
            trusted = self.totals >= min_count
            rows[self.keys[trusted]] = np.flatnonzero(trusted)
            self.rows = rows
        if self.rows is not None:
            inside = (keys >= 0) & (keys < self.rows.size)  # an id outside 0..E-1 is never seen
            return np.where(inside, self.rows[np.where(inside, keys, 0)], -1)
        pos = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        hit = (self.keys[pos] == keys) & (self.totals[pos] >= min_count)
        return np.where(hit, pos, -1)


class PathEstimator:
    """Estimates per-expert token counts at a layer from the tokens' expert paths.

    ``estimate(layer, paths)`` returns the expected number of (token, choice) pairs each
    expert receives at ``layer`` (it sums to tokens x k). A path not seen at least
    ``min_count`` times in training backs off to its shorter suffix, down to the layer's
    popularity alone (``path_length=0`` is that popularity-only estimator). One training
    sighting is a single sample, not a distribution, hence the default of 2.
    """

    def __init__(self, path_length: int, num_experts: int | None = None, min_count: int = 2):
        if path_length < 0:
            raise ValueError(f"path_length must be >= 0, got {path_length}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.path_length = path_length
        self.num_experts = num_experts
        self.min_count = min_count
        self.num_layers = 0
        self._marginal: list[np.ndarray] = []  # per layer: expected choices per token [E]
        self._tables: list[dict[int, _Table]] = []  # per layer: path length -> table
        self._memo: dict[tuple[int, tuple[int, ...], bytes], np.ndarray] = {}
        # Per layer: its dense lookup tables packed for :func:`_estimate_dense` (None when a
        # table is too large to be dense), built on first use.
        self._packed: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None] = {}
        self._last: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per layer: (paths, estimate)

    @classmethod
    def fitted(cls, path_length: int, num_experts: int | None, min_count: int, experts: np.ndarray) -> PathEstimator:
        """``PathEstimator(...).fit(experts)``, shared with earlier callers that asked
        for the same settings on the same array object (fitting is deterministic, and
        an estimator is read-only once fitted; the array must not be modified since,
        as the serving layer's training slice never is)."""
        key = (path_length, num_experts, min_count)
        for arr, k, est in _FITTED:
            if arr is experts and k == key:
                return est
        est = cls(path_length, num_experts=num_experts, min_count=min_count).fit(experts)
        if len(_FITTED) >= _FITTED_SIZE:
            _FITTED.pop(0)
        _FITTED.append((experts, key, est))  # holding the array keeps its identity unique
        return est

    # ---- training ------------------------------------------------------------------------
    def fit(self, experts: np.ndarray) -> PathEstimator:
        """Learn from expert choices [tokens, layers, k] (or [tokens, layers] for top-1)."""
        ex = np.asarray(experts)
        if ex.ndim == 2:
            ex = ex[:, :, None]
        if ex.ndim != 3 or ex.shape[0] == 0:
            raise ValueError(f"experts must be a non-empty [tokens, layers, k] array, got shape {ex.shape}")
        ex = ex.astype(np.int64)
        E = self.num_experts or int(ex.max()) + 1
        self.num_experts = E
        self._check_key_range(E)
        T, L, k = ex.shape
        self.num_layers = L
        top1 = ex[:, :, 0]
        self._marginal, self._tables = [], []
        self._memo = {}
        self._packed = {}
        self._last = {}
        for layer in range(L):
            nxt = ex[:, layer, :]  # [T, k]
            self._marginal.append(_bincount_rows(np.zeros(T, dtype=np.int64), nxt, 1, E)[0] / T)
            tables: dict[int, _Table] = {}
            for m in range(1, min(self.path_length, layer) + 1):
                keys = _path_keys(top1[:, layer - m : layer], E)
                uniq, inv = np.unique(keys, return_inverse=True)
                counts = _bincount_rows(inv, nxt, uniq.size, E)
                tables[m] = _Table(uniq, counts, counts.sum(axis=1) / k)
            self._tables.append(tables)
        return self

    # ---- inference -----------------------------------------------------------------------
    def distribution(self, layer: int, paths: np.ndarray) -> np.ndarray:
        """Expected choices per expert for each token: float [n, E], rows sum to k.

        ``paths`` is int [n, m]: each token's top-1 experts at layers layer-m .. layer-1
        (oldest first). Only the last ``min(m, path_length, layer)`` columns are used.
        """
        if not self._marginal:
            raise RuntimeError("PathEstimator.fit() must be called before estimating")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside the {self.num_layers} layers fitted")
        paths = np.asarray(paths, dtype=np.int64)
        if paths.ndim == 1:
            paths = paths[:, None]
        n = paths.shape[0]
        out = np.empty((n, self.num_experts), dtype=np.float64)
        todo = np.ones(n, dtype=bool)
        use = min(paths.shape[1], self.path_length, layer)
        for m in range(use, 0, -1):
            if not todo.any():
                break
            table = self._tables[layer][m]
            idx = np.flatnonzero(todo)
            keys = _path_keys(paths[idx, paths.shape[1] - m :], self.num_experts)
            found = table.lookup(keys, self.num_experts, m, self.min_count)
            hit = found >= 0
            if table.probs is None:
                table.probs = table.counts / table.totals[:, None]
            out[idx[hit]] = table.probs[found[hit]]
            todo[idx[hit]] = False
        out[todo] = self._marginal[layer] * 1.0
        return out

    def estimate(self, layer: int, paths: np.ndarray) -> np.ndarray:
        """Expected (token, choice) count per expert at ``layer`` for these tokens: [E]
        (a new array each call): :meth:`distribution` summed over the tokens."""
        p = np.asarray(paths, dtype=np.int64)
        if p.ndim == 1:
            p = p[:, None]
        packed = self._dense(layer) if p.ndim == 2 else None
        if packed is not None:
            # The last paths asked at this layer, compared in one pass (policies sharing
            # this estimator ask for the same batch in turn).
            last = self._last.get(layer)
            if last is not None and _same(last[0], p):
                return last[1].copy()
            # Token by token, in order: the additions numpy's sum over axis 0 of the
            # [tokens, E] distribution makes, without building it (the same bits).
            rows, offsets, sizes, probs = packed
            use = min(p.shape[1], self.path_length, layer)
            c = np.ascontiguousarray(p)
            out = _estimate_dense(c, self.num_experts, use, rows, offsets, sizes, probs, self._marginal[layer])
            # Kept as a copy of its own: the caller's array may change after this call.
            self._last[layer] = (c if c is not p else c.copy(), out)
            return out.copy()
        p = np.ascontiguousarray(p)
        key = (layer, p.shape, p.tobytes())
        hit = self._memo.get(key)
        if hit is None:
            hit = self.distribution(layer, p).sum(axis=0)
            if len(self._memo) >= _MEMO:
                del self._memo[next(iter(self._memo))]
            self._memo[key] = hit
        return hit.copy()

    def _dense(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """``layer``'s tables for :func:`_estimate_dense`, or None if any is too large for
        a dense key -> row array: ``rows`` (every length's dense array, length 1 first,
        rows offset into ``probs``), ``offsets`` and ``sizes`` ``[path_length + 1]`` (where
        length m's array starts in ``rows`` and its size), ``probs`` every length's rows
        stacked. Validates ``layer`` as :meth:`distribution` does."""
        if not self._marginal:
            raise RuntimeError("PathEstimator.fit() must be called before estimating")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside the {self.num_layers} layers fitted")
        if layer in self._packed:
            return self._packed[layer]
        E, lengths = self.num_experts, sorted(self._tables[layer])
        packed = None
        if all(E**m <= _DENSE_KEYS for m in lengths):
            rows, probs = [], []
            offsets = np.zeros(self.path_length + 1, dtype=np.int64)
            sizes = np.zeros(self.path_length + 1, dtype=np.int64)
            at = start = 0
            for m in lengths:
                table = self._tables[layer][m]
                table.lookup(np.zeros(0, dtype=np.int64), E, m, self.min_count)  # builds table.rows
                if table.probs is None:
                    table.probs = table.counts / table.totals[:, None]
                rows.append(np.where(table.rows >= 0, table.rows + start, -1))
                probs.append(table.probs)
                offsets[m], sizes[m] = at, table.rows.size
                at += table.rows.size
                start += table.probs.shape[0]
            cat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
            stacked = np.concatenate(probs) if probs else np.zeros((0, E))
            packed = (cat, offsets, sizes, np.ascontiguousarray(stacked))
        self._packed[layer] = packed
        return packed

    @staticmethod
    def paths_for(top1: np.ndarray, layer: int, path_length: int) -> np.ndarray:
        """Slice tokens' paths for ``layer`` out of top-1 choices [tokens, layers]."""
        return np.asarray(top1)[:, max(0, layer - path_length) : layer]

    def _check_key_range(self, E: int) -> None:
        if self.path_length and E**self.path_length >= 2**62:
            raise ValueError(f"paths of {self.path_length} over {E} experts do not fit a 64-bit key")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` equals ``b``; the first rows are compared first (a different batch's paths
    almost always differ there, and the whole comparison is the dearer call)."""
    return a.shape == b.shape and (a.size == 0 or (bool((a[0] == b[0]).all()) and np.array_equal(a, b)))


@numba.njit(cache=True)
def _estimate_dense(
    paths: np.ndarray,
    E: int,
    use: int,
    rows: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    probs: np.ndarray,
    marginal: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """``float64 [E]``: :meth:`PathEstimator.distribution` summed over the tokens, with
    dense tables (:meth:`PathEstimator._dense`): each token's longest trusted suffix of
    at most ``use`` experts picks its row of ``probs``, else ``marginal``; the rows are
    added in token order, as numpy's sum over axis 0 adds them."""
    n, width = paths.shape
    out = np.zeros(E)
    for i in range(n):
        row = -1
        for m in range(use, 0, -1):
            key = 0
            for j in range(width - m, width):
                key = key * E + paths[i, j]
            if key >= 0 and key < sizes[m]:
                row = rows[offsets[m] + key]
                if row >= 0:
                    break
        if row >= 0:
            for e in range(E):
                out[e] += probs[row, e]
        else:
            for e in range(E):
                out[e] += marginal[e]
    return out


def _path_keys(paths: np.ndarray, E: int) -> np.ndarray:
    """Encode each row of expert ids as one int64 (base-E digits)."""
    keys = np.zeros(paths.shape[0], dtype=np.int64)
    for j in range(paths.shape[1]):
        keys = keys * E + paths[:, j]
    return keys


def _bincount_rows(rows: np.ndarray, choices: np.ndarray, n_rows: int, E: int) -> np.ndarray:
    """counts[r, e] = number of (token, choice) with token row r and choice e."""
    flat = (rows[:, None] * E + choices).ravel()
    return np.bincount(flat, minlength=n_rows * E).reshape(n_rows, E).astype(np.float64)
