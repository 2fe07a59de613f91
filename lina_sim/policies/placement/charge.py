"""What a placement costs one MoE layer of one batch: the interface cost-aware placement
policies plan against, and a pure proxy of it for when no serving layer supplies one.

The serving simulator binds its own charge (:class:`lina_sim.serving.cost.ServingCharge`:
the grouped-GEMM FFN per device, the all-to-alls timed on the simulated network, the
weight swaps) to every policy it builds (:meth:`PlacementPolicy.bind_charge`), so a
policy that asks ranks placements by the time the simulator will charge for them.

A layer's time, as the server charges it: ``dispatch + max_d(wait_d + ffn_d) + combine``
(``wait_d``: how long device ``d``'s missing weights keep its FFN waiting after its tokens
have arrived). Units: seconds, tokens, bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lina_sim.policies.placement.layout import Placement

# One request to a charge: (layer, candidate placements, counts_by_source [devices, experts]).
ChargeItem = tuple[int, Sequence[Placement], np.ndarray]


class LayerCharge(Protocol):
    """Seconds one MoE layer of one batch takes under each candidate placement."""

    def quick(self, layer: int, placements: Sequence[Placement], counts_by_source: np.ndarray) -> np.ndarray:
        """``[candidates]`` s, cheap enough to rank many candidates in a search."""
        ...

    def exact(self, items: Sequence[ChargeItem]) -> list[np.ndarray]:
        """Per item, ``[candidates]`` s: exactly what the simulator charges the layer
        (batched: one call may cover every layer of a batch)."""
        ...

    def cheapest(self, items: Sequence[ChargeItem]) -> list[int]:
        """Per item, the index of its first candidate with the least :meth:`exact`
        charge (a charge may skip timing candidates it can prove dearer)."""
        ...


def spread_counts(counts: np.ndarray, num_devices: int) -> np.ndarray:
    """``int64 [devices, experts]``: whole per-expert ``counts`` spread as evenly as
    possible over the devices (a data-parallel batch whose gate is not known yet); an
    expert's odd tokens start at device ``e mod N`` so that they do not pile up on one."""
    c = np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)
    n = num_devices
    out = np.repeat((c // n)[None, :], n, axis=0)
    pos = (np.arange(n)[:, None] - np.arange(c.size)[None, :]) % n
    out += (pos < (c % n)[None, :]).astype(np.int64)
    return out


@dataclass(frozen=True)
class ProxyCharge:
    """A pure stand-in for the simulator's charge, from plain numbers (defaults: the
    paper's Transformer-XL expert, d_model 512 and d_ff 2048 in fp16, on an A100 of the
    paper testbed: 100 Gb/s per node of 4 GPUs).

    - all-to-all: dispatch and combine each ``latency_s + max_d max(send_d, recv_d) *
      token_bytes / bandwidth`` (tokens kept local are free);
    - FFN per device, grouped GEMM: ``ffn_launch_s`` once if it has tokens, plus
      ``expert_read_s`` per expert with tokens (its weights read from HBM), plus
      ``row_s`` per token after padding each expert's rows to ``block_rows``.

    Token splits are fractional (each expert's tokens times its shares), so
    ``counts_by_source`` may be an expectation. Weight swaps are not charged (no
    residency is known here). ``quick`` and ``exact`` are the same formula.
    """

    token_bytes: float = 512 * 2
    bandwidth: float = 100e9 / 8 / 4
    latency_s: float = 10e-6
    ffn_launch_s: float = 4 * 4e-6
    expert_read_s: float = 2 * 512 * 2048 * 2 / (1.555e12 * 0.85)
    row_s: float = 4 * 512 * 2048 / (312e12 * 0.7)
    block_rows: int = 64

    def _one(self, placements: Sequence[Placement], counts_by_source: np.ndarray) -> np.ndarray:
        cbs = np.asarray(counts_by_source, dtype=np.float64).T  # [E, N], may be fractional
        counts = cbs.sum(axis=1)
        out = np.empty(len(placements))
        for i, p in enumerate(placements):
            rows = counts[:, None] * p.share_matrix  # [E, N] tokens each replica computes
            kept = np.minimum(cbs, rows)  # served where they sit (send_matrix's local-first rule)
            worst = max(float((cbs - kept).sum(axis=0).max()), float((rows - kept).sum(axis=0).max()))
            a2a = 2.0 * (self.latency_s + worst * self.token_bytes / self.bandwidth)
            padded = (np.ceil(rows / self.block_rows - 1e-9) * self.block_rows).sum(axis=0)
            active = (rows > 0).sum(axis=0)
            ffn = np.where(rows.sum(axis=0) > 0, self.ffn_launch_s, 0.0)
            ffn = ffn + active * self.expert_read_s + padded * self.row_s
            out[i] = a2a + float(ffn.max())
        return out

    def quick(self, layer: int, placements: Sequence[Placement], counts_by_source: np.ndarray) -> np.ndarray:
        return self._one(placements, counts_by_source)

    def exact(self, items: Sequence[ChargeItem]) -> list[np.ndarray]:
        return [self._one(p, c) for _, p, c in items]

    def cheapest(self, items: Sequence[ChargeItem]) -> list[int]:
        return [int(np.argmin(t)) for t in self.exact(items)]
