"""Placements that never change: ``static`` (DeepSpeed-MoE, Tutel) and ``ideal``."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from lina_sim.policies.placement.base import PlacementPolicy
from lina_sim.policies.placement.layout import Placement


class StaticPlacement(PlacementPolicy):
    """Expert e on device e mod N, for every layer and batch, as in DeepSpeed-MoE and
    Tutel (one expert per GPU when E = N). With E < N each expert sits on the devices
    d with d mod E = e and its tokens are split evenly among them. Weights stay resident,
    so after the first batch nothing is ever swapped."""

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        return self.static_placement()


class IdealPlacement(StaticPlacement):
    """The paper's normaliser: a perfectly uniform gate on the static placement.

    ``uniform_gate = True`` tells the serving layer to replace the trace's gate counts by
    a uniform split before it computes loads or all-to-alls: each device's tokens are
    spread evenly over the experts (:meth:`PlacementPolicy.gate`, which
    :func:`~lina_sim.policies.placement.base.decide_layer` applies). Device loads then
    differ by at most a token or so per device, which no placement of the real, skewed
    gate can beat; latency is reported relative to this as the paper does.
    """

    uniform_gate: ClassVar[bool] = True
