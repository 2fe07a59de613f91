"""The expert-parallel load balancer of DeepSeek (EPLB), as vLLM and SGLang run it."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from lina_sim.config.fields import Field
from lina_sim.errors import ConfigError
from lina_sim.policies.placement.base import PlacementPolicy
from lina_sim.policies.placement.layout import Placement
from lina_sim.policies.placement.packing import eplb_pack, eplb_replicate, placement_from_groups


class EPLBPlacement(PlacementPolicy):
    """EPLB: ``E + redundant_experts`` physical expert slots, ``(E + R) / N`` per device.

    Every ``rebalance_interval`` batches (per layer) it re-plans from the mean per-expert
    load of the last ``window`` batches (a sliding window, as vLLM keeps): redundant
    slots go one at a time to the expert with the highest load per replica
    (:func:`~.packing.eplb_replicate`), then replicas are packed heaviest first onto the
    least-loaded device with a free slot (:func:`~.packing.eplb_pack`). Tokens of a
    replicated expert are split evenly over its replicas. Before any load is seen it
    plans from uniform load. Between rebalances the placement is kept, so weights move
    only when it rebalances (and the new layout is mapped onto devices to reuse resident
    weights). This is EPLB's global policy (one group, all devices); its hierarchical
    node-aware variant is not modelled.

    ``redundant_experts`` defaults to filling one slot more per device than the static
    layout needs (capped by ``max_experts_per_device``); ``E + R`` must be a multiple of
    ``N`` with ``(E + R) / N <= max_experts_per_device``.
    """

    PARAMS: ClassVar[dict[str, Field]] = {
        "redundant_experts": Field(
            int,
            None,
            minimum=0,
            allow_none=True,
            help="extra physical expert slots in all, experts (null: one more per device)",
        ),
        "window": Field(int, 32, minimum=1, help="batches in the load moving average"),
        "rebalance_interval": Field(int, 8, minimum=1, help="batches between re-plans of a layer"),
    }

    def __init__(
        self, *, redundant_experts: int | None = None, window: int = 32, rebalance_interval: int = 8, **kw
    ) -> None:
        super().__init__(**kw)
        n, e, m = self.num_devices, self.num_experts, self.max_experts_per_device
        if redundant_experts is None:
            slots = min(-(-e // n) + 1, m)
            redundant_experts = n * slots - e
        r = int(redundant_experts)
        field = f"{self.FIELD_PREFIX}.redundant_experts"
        if r < 0 or (e + r) % n:
            raise ConfigError(
                field, f"{r} makes {e + r} physical experts, not a multiple of {n} devices", f"E + R a multiple of {n}"
            )
        if (e + r) // n > m:
            raise ConfigError(
                field, f"{r} needs {(e + r) // n} slots per device > max_experts_per_device={m}", f"R <= {n * m - e}"
            )
        self.redundant_experts = r
        self.slots_per_device = (e + r) // n
        self.window = int(window)
        self.rebalance_interval = int(rebalance_interval)
        # Per layer: the last ``window`` batches' counts, oldest first, as the rows of one
        # array (the mean reads them in one call, as the stack of them it equals), and how
        # many rows are filled.
        self._history: dict[int, tuple[np.ndarray, int]] = {}
        self._since: dict[int, int] = {}  # batches observed since the layer's last re-plan
        self._current: dict[int, Placement] = {}

    def predict(self, layer: int, history: np.ndarray | None) -> np.ndarray | None:
        seen = self._history.get(layer)
        return None if seen is None else np.mean(seen[0][: seen[1]], axis=0)

    def observe(self, layer: int, actual_counts: np.ndarray) -> None:
        c = self._counts(actual_counts, "actual_counts")
        rows, k = self._history.get(layer) or (np.empty((self.window, self.num_experts)), 0)
        if k == self.window:  # full: the oldest row leaves
            rows[:-1] = rows[1:]
            k -= 1
        rows[k] = c
        self._history[layer] = (rows, k + 1)
        self._since[layer] = self._since.get(layer, 0) + 1

    def rebalance(self, loads: np.ndarray | None, previous: Placement | None) -> Placement:
        """EPLB's placement for mean per-expert ``loads`` (uniform if ``None`` or zero)."""
        w = np.ones(self.num_experts) if loads is None else self._counts(loads, "estimate")
        if not w.sum() > 0:
            w = np.ones(self.num_experts)
        replicas = eplb_replicate(w, self.num_experts + self.redundant_experts, self.num_devices)
        groups = eplb_pack(w, replicas, self.num_devices, self.slots_per_device)
        return self._checked(placement_from_groups(groups, self.num_experts, previous, "eplb"))

    def plan_exact(self, counts: np.ndarray) -> Placement:
        return self.rebalance(counts, None)

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        current = self._current.get(layer)
        due = self._since.get(layer, 0) >= self.rebalance_interval and estimate is not None
        if current is None or due:
            current = self.rebalance(estimate, current)
            self._current[layer] = current
            self._since[layer] = 0
        return current
