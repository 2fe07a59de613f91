"""The placement-policy interface, parameter validation, and the per-layer protocol.

A placement policy decides, for every MoE layer of every batch, which devices hold which
experts and how each expert's tokens are split among its replicas. The serving simulator
and the real runtime drive every policy the same way, through :func:`decide_layer`:

1. ``estimate = policy.predict(layer, history)`` before the gate runs (or the actual
   counts for a policy with ``plans_on_actual_counts``, i.e. ``oracle``, which also
   sees the gate's per-device counts first: :meth:`PlacementPolicy.see_gate`);
2. ``planned = policy.plan(layer, estimate)``: the phase-1 placement, whose weights are
   swapped in while the previous layer computes;
3. ``final = policy.refine(layer, planned, counts)`` once the gate's real counts exist;
   ``final is planned`` unless the policy re-planned (Lina's phase 2);
4. ``policy.observe(layer, counts)`` so that history-based policies learn.

A policy object is stateful and serves one stream of batches: call the steps for one
batch and layer in this order, batches in the order they run. Use one object per
simulated serving run (and per policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lina_sim.config.fields import Field, check_fields
from lina_sim.errors import ConfigError
from lina_sim.policies.placement.charge import LayerCharge, ProxyCharge
from lina_sim.policies.placement.layout import Placement, uniform_counts_by_source


class PlacementPolicy:
    """Base of all inference placement policies for ``num_experts`` experts per MoE layer
    on ``num_devices`` devices with top-``top_k`` gating.

    ``max_experts_per_device`` is each device's memory for expert weights, counted in
    experts of one layer; no placement any policy returns exceeds it. It defaults to
    ``2 * ceil(num_experts / num_devices)``: room for the static layout plus as much again
    for replicas (the serving layer should pass what its GPU memory really holds).

    Class attributes the serving layer reads:

    - ``uniform_gate``: replace the gate's counts by a uniform split before anything uses
      them (``ideal``); :meth:`gate` does it, :func:`decide_layer` calls it;
    - ``plans_on_actual_counts``: :meth:`plan` wants the batch's actual counts as its
      estimate (``oracle``), so the phase-1 placement already fits the real gate;
    - :attr:`plans_within_batch`: when its phase-1 swaps can be issued.
    """

    uniform_gate: ClassVar[bool] = False
    plans_on_actual_counts: ClassVar[bool] = False
    PARAMS: ClassVar[dict[str, Field]] = {}  # a policy's own parameters
    # Every policy's: the serving layer sets these from the model, cluster and trace.
    BASE_PARAMS: ClassVar[dict[str, Field]] = {
        "num_experts": Field(int, minimum=1, help="experts per MoE layer"),
        "num_devices": Field(int, minimum=1, help="devices (GPUs) serving the layer"),
        "top_k": Field(int, 1, minimum=1, help="experts each token is routed to"),
        "max_experts_per_device": Field(
            int,
            None,
            minimum=1,
            allow_none=True,
            help="expert slots per device, in experts of one layer (null: 2 x ceil(num_experts / num_devices))",
        ),
    }
    FIELD_PREFIX: ClassVar[str] = "placement"

    def __init__(
        self,
        *,
        num_experts: int,
        num_devices: int,
        top_k: int = 1,
        max_experts_per_device: int | None = None,
        name: str | None = None,
    ) -> None:
        p = self.FIELD_PREFIX
        base = self.BASE_PARAMS
        self.name = name or type(self).__name__
        # Checked here too, not only in from_params: a policy may be built directly.
        self.num_experts = base["num_experts"].check(num_experts, f"{p}.num_experts")
        self.num_devices = base["num_devices"].check(num_devices, f"{p}.num_devices")
        self.top_k = base["top_k"].check(top_k, f"{p}.top_k")
        if self.top_k > self.num_experts:
            raise ConfigError(f"{p}.top_k", f"{top_k} exceeds num_experts={num_experts}", f"1..{num_experts}")
        need = -(-self.num_experts // self.num_devices)
        m = base["max_experts_per_device"].check(max_experts_per_device, f"{p}.max_experts_per_device")
        if m is None:
            m = 2 * need
        if m < need:
            raise ConfigError(
                f"{p}.max_experts_per_device",
                f"{m} slots on {self.num_devices} devices cannot hold {self.num_experts} experts",
                f"an integer >= {need}",
            )
        self.max_experts_per_device = m
        # Phase-2 bookkeeping (Lina); stays zero for policies without a phase 2.
        self.phase2_checks = 0
        self.phase2_mismatches = 0
        self.phase2_fired = 0
        self.last_refine_fired = False
        self._static: Placement | None = None
        self._charge: LayerCharge | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def params(cls) -> dict[str, Field]:
        """Every parameter of this policy: :attr:`BASE_PARAMS` and its own ``PARAMS``."""
        return {**cls.BASE_PARAMS, **cls.PARAMS}

    @classmethod
    def from_params(cls, name: str | None = None, **params: Any) -> PlacementPolicy:
        """Validate ``params`` (unknown or bad ones raise :class:`ConfigError` naming
        ``placement.<param>`` and what is allowed) and construct the policy."""
        what = f"parameter of policy {name or cls.__name__!r}"
        return cls(name=name, **check_fields(params, cls.params(), cls.FIELD_PREFIX, what=what))

    # ------------------------------------------------------------------ the protocol
    def fit(self, experts: np.ndarray) -> None:
        """Learn from a training slice of a trace, ``experts[tokens, layers, k]``
        (expert ids). Policies that learn nothing offline ignore it."""

    def predict(self, layer: int, history: np.ndarray | None) -> np.ndarray | None:
        """Per-expert token counts this policy expects at ``layer`` before the gate runs,
        or ``None`` for no estimate. ``history`` is the batch's expert choices at the
        layers before this one, ``experts[tokens, :layer, k]``."""
        return None

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        """Phase 1: the placement for ``layer``, decided before its gate runs."""
        raise NotImplementedError

    def plan_exact(self, counts: np.ndarray) -> Placement:
        """The placement this policy's rule makes from per-expert ``counts`` known
        exactly, without touching its state (what the oracle weighs; default: static)."""
        return self.static_placement()

    def refine(self, layer: int, placement: Placement, actual_counts: np.ndarray) -> Placement:
        """Phase 2: after the gate. Returns ``placement`` itself to keep it."""
        self.last_refine_fired = False
        return placement

    def observe(self, layer: int, actual_counts: np.ndarray) -> None:
        """Record the gate's real per-expert counts of this batch at ``layer``."""

    def see_gate(self, layer: int, history: np.ndarray | None, counts_by_source: np.ndarray) -> None:
        """Only for a policy with :attr:`plans_on_actual_counts` (the oracle): the gate's
        per-device counts of ``layer``, before :meth:`plan`."""

    def see_batch(self, experts: np.ndarray, counts_by_source: np.ndarray) -> None:
        """Only for a policy with :attr:`plans_on_actual_counts`: the whole batch's gate
        at once, ``experts[tokens, layers, k]`` and ``counts_by_source[layers, devices,
        experts]``, before its layers go through :func:`decide_layer` (so that the oracle
        can charge every layer's candidates in one call). Optional."""

    # ------------------------------------------------------------------ the cost
    def bind_charge(self, charge: LayerCharge) -> None:
        """Use ``charge`` (what the simulator charges a layer, :mod:`.charge`) wherever
        this policy ranks placements by cost; policies that do not ignore it."""
        self._charge = charge

    @property
    def charge(self) -> LayerCharge:
        """The bound charge, else the pure :class:`~.charge.ProxyCharge`."""
        if self._charge is None:
            self._charge = ProxyCharge()
        return self._charge

    def gate(self, counts_by_source: np.ndarray) -> np.ndarray:
        """The per-device, per-expert counts the simulated gate produces: the trace's
        unless :attr:`uniform_gate`, in which case each device's tokens are spread evenly."""
        return uniform_counts_by_source(counts_by_source) if self.uniform_gate else np.asarray(counts_by_source)

    @property
    def plans_within_batch(self) -> bool:
        """Whether the phase-1 plan for layer ``l`` needs the current batch's gate results
        at earlier layers (Lina's token paths) or the layer's own counts (the oracle, a
        bound whose swaps are hidden like Lina's). The serving layer issues those swaps
        once layer ``l-1``'s gate has run; a policy that plans from earlier batches only
        (the default, unless :attr:`plans_on_actual_counts`) has all its swaps issued
        when the batch is formed."""
        return bool(self.plans_on_actual_counts)

    @property
    def phase2_rate(self) -> float:
        """Fraction of phase-2 checks that re-planned (0 when nothing was checked)."""
        return self.phase2_fired / self.phase2_checks if self.phase2_checks else 0.0

    # ------------------------------------------------------------------ helpers
    def static_placement(self) -> Placement:
        """Expert e on device e mod N (DeepSpeed-MoE, Tutel). With fewer experts than
        devices, expert e is on every device d with d mod E = e, tokens split evenly
        (expert-data-parallel groups)."""
        if self._static is None:
            n, e = self.num_devices, self.num_experts
            if e >= n:
                reps = [[i % n] for i in range(e)]
            else:
                reps = [list(range(i, n, e)) for i in range(e)]
            self._static = self._checked(Placement.from_replicas(n, reps, "static"))
        return self._static

    def _counts(self, counts: Any, what: str = "counts") -> np.ndarray:
        c = np.asarray(counts, dtype=np.float64)
        if c.shape != (self.num_experts,):
            raise ValueError(f"{what} has shape {c.shape}, expected ({self.num_experts},)")
        # Two reductions instead of four array calls (policies check every layer's counts):
        # a NaN fails both comparisons, an infinity one of them.
        if not (c.min() >= 0 and c.max() < np.inf):
            raise ValueError(f"{what} must be finite and >= 0")
        return c

    def _checked(self, placement: Placement) -> Placement:
        """Guard the contract every placement must meet (a violation is a bug here)."""
        if placement.num_devices != self.num_devices or placement.num_experts != self.num_experts:
            raise RuntimeError(f"{self.name}: placement has the wrong shape")
        most = int(placement.experts_per_device().max())
        if most > self.max_experts_per_device:
            raise RuntimeError(f"{self.name}: a device holds {most} experts > {self.max_experts_per_device}")
        return placement

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, experts={self.num_experts}, devices={self.num_devices})"


@dataclass(frozen=True)
class LayerDecision:
    """What a policy decided for one MoE layer of one batch.

    - ``counts_by_source``: ``int64 [devices, experts]`` after :meth:`PlacementPolicy.gate`;
    - ``counts``: its column sums, the per-expert token counts;
    - ``estimate``: what phase 1 planned from (``None`` if nothing);
    - ``planned``: the phase-1 placement (swapped in before the gate);
    - ``final``: the placement the batch actually runs with;
    - ``replanned``: phase 2 fired (``final`` differs from ``planned``'s object).
    """

    counts_by_source: np.ndarray
    counts: np.ndarray
    estimate: np.ndarray | None
    planned: Placement
    final: Placement
    replanned: bool


def decide_layer(
    policy: PlacementPolicy,
    layer: int,
    history: np.ndarray | None,
    counts_by_source: np.ndarray,
) -> LayerDecision:
    """Run the placement protocol for one layer of one batch (see the module docstring).

    ``history`` is ``experts[tokens, :layer, k]`` of the batch; ``counts_by_source`` is
    :func:`~lina_sim.policies.placement.layout.counts_by_source` of the batch's real gate
    choices at ``layer``.
    """
    cbs = np.asarray(policy.gate(counts_by_source), dtype=np.int64)
    counts = cbs.sum(axis=0)
    if policy.plans_on_actual_counts:
        policy.see_gate(layer, history, cbs)
        estimate = counts.astype(np.float64)
    else:
        estimate = policy.predict(layer, history)
    planned = policy.plan(layer, estimate)
    final = policy.refine(layer, planned, counts)
    policy.observe(layer, counts)
    return LayerDecision(cbs, counts, estimate, planned, final, final is not planned)
