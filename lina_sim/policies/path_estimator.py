"""Lina's path-based load estimator: next-layer expert load from tokens' recent paths.

A token's *path* at layer l is its top-1 experts at the ``path_length`` layers before l.
Tokens that shared a path tend to pick the same experts next, so P(expert at l | path)
learned from a training slice of a trace predicts each expert's load at layer l before
the gate runs. Pure numpy: the placement policies and the statistics share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def top_experts(counts: np.ndarray, n: int) -> frozenset[int]:
    """The ``n`` experts with the highest counts; ties go to the lower expert id.

    The fixed tie-break makes "the estimated top-2k set equals the actual one"
    deterministic even when counts tie.
    """
    order = np.argsort(-np.asarray(counts, dtype=float), kind="stable")
    return frozenset(int(e) for e in order[:n])


@dataclass
class _Table:
    """Counts of next-layer choices for each distinct path of one length at one layer."""

    keys: np.ndarray  # int64 [U] sorted path keys
    counts: np.ndarray  # float64 [U, E] next-layer choice counts (all k choices)
    totals: np.ndarray  # float64 [U] tokens that had each path


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
            pos = np.searchsorted(table.keys, keys)
            pos_c = np.minimum(pos, table.keys.size - 1)
            hit = (table.keys[pos_c] == keys) & (table.totals[pos_c] >= self.min_count)
            rows = pos_c[hit]
            out[idx[hit]] = table.counts[rows] / table.totals[rows, None]
            todo[idx[hit]] = False
        out[todo] = self._marginal[layer] * 1.0
        return out

    def estimate(self, layer: int, paths: np.ndarray) -> np.ndarray:
        """Expected (token, choice) count per expert at ``layer`` for these tokens: [E]."""
        return self.distribution(layer, paths).sum(axis=0)

    @staticmethod
    def paths_for(top1: np.ndarray, layer: int, path_length: int) -> np.ndarray:
        """Slice tokens' paths for ``layer`` out of top-1 choices [tokens, layers]."""
        return np.asarray(top1)[:, max(0, layer - path_length) : layer]

    def _check_key_range(self, E: int) -> None:
        if self.path_length and E**self.path_length >= 2**62:
            raise ValueError(f"paths of {self.path_length} over {E} experts do not fit a 64-bit key")


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
