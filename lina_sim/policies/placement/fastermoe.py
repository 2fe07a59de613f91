"""FasterMoE's dynamic shadowing (PPoPP'22), applied per layer at inference time."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from lina_sim.config.fields import Field
from lina_sim.policies.placement.base import PlacementPolicy
from lina_sim.policies.placement.layout import Placement

# Defaults: the paper's Transformer-XL expert (d_model 512, d_ff 2048) in fp16 on its
# testbed (A100, 100 Gb/s per node of 4 GPUs). The serving layer should pass its own.
_D_MODEL, _D_FF, _DTYPE_BYTES = 512, 2048, 2


class FasterMoEShadow(PlacementPolicy):
    """FasterMoE shadowing: the hottest experts are replicated ("shadowed") on every
    device, so each device computes those experts for its own tokens and sends none of
    them through the all-to-all, at the price of broadcasting the experts' weights.

    Decided per layer from the previous batch's counts at that layer (the first batch is
    static). Following FasterMoE's greedy, experts are considered hottest first and each
    is shadowed while the predicted layer time keeps falling; it stops at the first one
    that does not pay or does not fit in ``max_experts_per_device``. Predicted time:

    - all-to-all: ``2 * max_d max(send_d, recv_d) * token_bytes / network_bandwidth``
      (dispatch and combine; tokens sit evenly on all devices, local tokens are free);
    - FFN: ``max_d load_d * flops_per_token / device_flops`` (the straggler);
    - shadowing: ``expert_bytes / weight_bandwidth`` per expert not already shadowed in
      this layer's previous placement (inference weights never change, so an expert kept
      shadowed costs nothing again).

    Parameters (plain numbers): ``token_bytes`` (bytes per token activation),
    ``expert_bytes`` (bytes of one expert's weights), ``flops_per_token`` (FLOPs of one
    token through one expert), ``network_bandwidth`` (bytes/s each device sends or
    receives in the all-to-all), ``weight_bandwidth`` (bytes/s a broadcast of weights
    delivers to each device; default ``network_bandwidth``), ``device_flops`` (achieved
    FLOP/s per device). Shadow shares are ``1/N`` per device.
    """

    PARAMS: ClassVar[dict[str, Field]] = {
        "token_bytes": Field(
            float, _D_MODEL * _DTYPE_BYTES, minimum=0, exclusive_minimum=True, help="one token's activation, bytes"
        ),
        "expert_bytes": Field(
            float, 2 * _D_MODEL * _D_FF * _DTYPE_BYTES, minimum=0, help="one expert's weights, bytes"
        ),
        "flops_per_token": Field(
            float, 2 * 2 * _D_MODEL * _D_FF, minimum=0, help="FLOPs of one token through one expert"
        ),
        "network_bandwidth": Field(
            float,
            100e9 / 8 / 4,
            minimum=0,
            exclusive_minimum=True,
            help="what each device sends or receives in the all-to-all, bytes/s",
        ),
        "weight_bandwidth": Field(
            float,
            None,
            minimum=0,
            exclusive_minimum=True,
            allow_none=True,
            help="what a broadcast of weights delivers to each device, bytes/s (null: network_bandwidth)",
        ),
        "device_flops": Field(float, 312e12, minimum=0, exclusive_minimum=True, help="achieved FLOP/s per device"),
    }

    def __init__(
        self,
        *,
        token_bytes: float = _D_MODEL * _DTYPE_BYTES,
        expert_bytes: float = 2 * _D_MODEL * _D_FF * _DTYPE_BYTES,
        flops_per_token: float = 2 * 2 * _D_MODEL * _D_FF,
        network_bandwidth: float = 100e9 / 8 / 4,
        weight_bandwidth: float | None = None,
        device_flops: float = 312e12,
        **kw,
    ) -> None:
        super().__init__(**kw)
        self.token_bytes = float(token_bytes)
        self.expert_bytes = float(expert_bytes)
        self.flops_per_token = float(flops_per_token)
        self.network_bandwidth = float(network_bandwidth)
        self.weight_bandwidth = float(weight_bandwidth if weight_bandwidth is not None else network_bandwidth)
        self.device_flops = float(device_flops)
        self._previous: dict[int, np.ndarray] = {}
        self._shadowed: dict[int, frozenset[int]] = {}
        # Placements per shadow set: the greedy tries the same few sets batch after batch.
        self._with: dict[frozenset[int], Placement] = {}

    def predict(self, layer: int, history: np.ndarray | None) -> np.ndarray | None:
        prev = self._previous.get(layer)
        return None if prev is None else prev.copy()

    def observe(self, layer: int, actual_counts: np.ndarray) -> None:
        self._previous[layer] = self._counts(actual_counts, "actual_counts").copy()

    def shadowed(self, layer: int) -> frozenset[int]:
        """Experts shadowed in the latest plan for ``layer``."""
        return self._shadowed.get(layer, frozenset())

    def with_shadows(self, shadows: frozenset[int]) -> Placement:
        """The static placement with ``shadows`` replicated on every device."""
        static = self.static_placement()
        if not shadows:
            return static
        hit = self._with.get(shadows)
        if hit is None:
            every = range(self.num_devices)
            reps = [every if e in shadows else static.devices[e] for e in range(self.num_experts)]
            hit = Placement.from_replicas(self.num_devices, reps, "shadow")
            if len(self._with) >= 4096:  # bounded: sets are few in practice
                self._with.clear()
            self._with[shadows] = hit
        return hit

    def predicted_time(self, placement: Placement, counts: np.ndarray, new_shadows: int) -> float:
        """The cost model above, in seconds, for ``counts`` tokens per expert."""
        send, recv, load = placement.expected_traffic(counts)
        comm = 2.0 * float(max(send.max(), recv.max())) * self.token_bytes / self.network_bandwidth
        ffn = float(load.max()) * self.flops_per_token / self.device_flops
        return comm + ffn + new_shadows * self.expert_bytes / self.weight_bandwidth

    def _greedy(self, c: np.ndarray, before: frozenset[int]) -> frozenset[int]:
        """FasterMoE's greedy for per-expert counts ``c`` (class docstring)."""
        chosen: frozenset[int] = frozenset()
        best = self.predicted_time(self.static_placement(), c, 0)
        cl = c.tolist()  # plain floats: the same order, without a numpy scalar per look
        for e in sorted(range(self.num_experts), key=lambda x: (-cl[x], x)):
            if cl[e] <= 0:
                break
            trial = chosen | {e}
            placement = self.with_shadows(trial)
            if placement.experts_per_device().max() > self.max_experts_per_device:
                break
            t = self.predicted_time(placement, c, len(trial - before))
            if not t < best:
                break
            chosen, best = trial, t
        return chosen

    def plan_exact(self, counts: np.ndarray) -> Placement:
        return self._checked(self.with_shadows(self._greedy(self._counts(counts, "counts"), frozenset())))

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        if estimate is None:
            self._shadowed[layer] = frozenset()
            return self.static_placement()
        chosen = self._greedy(self._counts(estimate, "estimate"), self.shadowed(layer))
        self._shadowed[layer] = chosen
        return self._checked(self.with_shadows(chosen))
