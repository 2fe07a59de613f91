"""Lina's two-phase inference placement, its ablations, and the ``oracle`` bound."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from lina_sim.config.fields import Field
from lina_sim.errors import ConfigError
from lina_sim.policies.path_estimator import PathEstimator, top_experts
from lina_sim.policies.placement.base import PlacementPolicy
from lina_sim.policies.placement.layout import Placement
from lina_sim.policies.placement.packing import lina_units, placement_from_groups


class _BalancedPlanner(PlacementPolicy):
    """Shared by Lina and the oracle: Lina's allocation (:func:`lina_units`) from a load
    vector, mapped onto devices so that resident weights are reused where possible."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._last: dict[int, Placement] = {}  # per layer: what device memory holds now

    def balanced(self, loads: np.ndarray, origin: str, previous: Placement | None) -> Placement:
        """Lina's placement for per-expert ``loads`` (static if they are all zero)."""
        w = self._counts(loads, "estimate")
        if not w.sum() > 0:
            return self.static_placement()
        groups, _ = lina_units(w, self.num_devices, self.max_experts_per_device)
        return self._checked(placement_from_groups(groups, self.num_experts, previous, origin))

    def _remember(self, layer: int, placement: Placement) -> Placement:
        self._last[layer] = placement
        return placement


class LinaPlacement(_BalancedPlanner):
    """Lina's inference scheduler (ATC'23, section 5).

    **Phase 1** (before the gate, overlapped with the previous layer): estimate each
    expert's tokens, give expert e ``n_e = N * estimated share`` devices: popular experts
    (``n_e >= 1``) are replicated on ``round(n_e)`` devices with their tokens split evenly
    over the replicas, unpopular ones are packed first-fit-decreasing so each shared
    device takes about ``1/N`` of the tokens (:func:`~.packing.lina_units`).

    **Phase 2** (after the gate): if the estimated top-2k expert set (k = ``top_k``)
    differs from the actual one, re-plan from the actual counts; otherwise keep phase 1.
    Counters: ``phase2_checks`` (layers checked), ``phase2_mismatches`` (sets differed),
    ``phase2_fired`` (re-planned; equals mismatches unless ``finetune`` is off), and
    ``last_refine_fired`` for the latest :meth:`refine`. With ``2k >= num_experts`` the
    sets always agree and phase 2 never fires.

    **How paths reach it.** The policy owns its :class:`PathEstimator` (``path_length``,
    default 3): the serving layer calls :meth:`fit` once with the training slice of the
    trace, ``experts[tokens, layers, k]``, and then, per batch and layer,
    :meth:`predict` with the batch's choices at the earlier layers (``history =
    experts[batch_tokens, :layer, :]``); predict takes each token's top-1 experts at the
    last ``path_length`` layers as its path. As in the paper, scheduling starts once a
    full path exists: at layers ``< path_length`` (the first three) predict returns
    ``None`` and the layer keeps the static placement, with no phase 2.

    **Ablations** (same class, fixed by the registry name):

    - ``lina-no-finetune`` (``finetune=False``): phase 1 only; mismatches are still
      counted so estimation accuracy can be reported.
    - ``lina-no-estimate`` (``estimator="previous"``): phase 1 plans from the previous
      batch's actual counts at the same layer instead of the path estimate (the obvious
      history-only predictor, which isolates what the token paths add); phase 2 is
      unchanged and compares that prediction's top-2k set with the actual one. It plans
      every layer once a previous batch exists (no path needed); on the first batch it is
      static.

    Each new placement is mapped onto devices to reuse the weights already resident in
    this layer's previous placement (phase 1) or in phase 1's placement (phase 2), since
    devices are interchangeable in a data-parallel batch and swaps cost PCIe time.
    """

    PARAMS: ClassVar[dict[str, Field]] = {
        "path_length": Field(int, 3, minimum=1, help="layers of expert path the estimator conditions on"),
        "min_count": Field(int, 2, minimum=1, help="training sightings (tokens) before a path is trusted"),
    }
    ESTIMATORS: ClassVar[tuple[str, ...]] = ("path", "previous")

    def __init__(
        self, *, path_length: int = 3, min_count: int = 2, finetune: bool = True, estimator: str = "path", **kw
    ) -> None:
        super().__init__(**kw)
        if estimator not in self.ESTIMATORS:
            raise ConfigError(f"{self.FIELD_PREFIX}.estimator", f"unknown estimator {estimator!r}", self.ESTIMATORS)
        self.path_length = path_length
        self.min_count = min_count
        self.finetune = bool(finetune)
        self.estimator_kind = estimator
        self.estimator: PathEstimator | None = None
        self._previous: dict[int, np.ndarray] = {}
        self._estimated: dict[int, np.ndarray | None] = {}  # per layer: phase-1 estimate

    @property
    def plans_within_batch(self) -> bool:
        """The path estimator reads this batch's experts at the layers before ``l``
        (the ``previous`` estimator plans from earlier batches only)."""
        return super().plans_within_batch or self.estimator_kind == "path"

    @property
    def top_set_size(self) -> int:
        return min(2 * self.top_k, self.num_experts)

    def fit(self, experts: np.ndarray) -> None:
        if self.estimator_kind != "path":
            return
        self.estimator = PathEstimator(self.path_length, num_experts=self.num_experts, min_count=self.min_count)
        self.estimator.fit(experts)

    def predict(self, layer: int, history: np.ndarray | None) -> np.ndarray | None:
        if self.estimator_kind == "previous":
            prev = self._previous.get(layer)
            return None if prev is None else prev.copy()
        if self.estimator is None:
            raise RuntimeError(f"{self.name}: call fit() with a training slice of the trace before predict()")
        if history is None or layer < self.path_length:
            return None
        h = np.asarray(history)
        top1 = h[:, :, 0] if h.ndim == 3 else h
        if top1.shape[1] < layer:
            raise ValueError(f"history covers {top1.shape[1]} layers; layer {layer} needs experts[:, :{layer}]")
        paths = PathEstimator.paths_for(top1, layer, self.path_length)
        return self.estimator.estimate(layer, paths)

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        self._estimated[layer] = None if estimate is None else self._counts(estimate, "estimate")
        if estimate is None:
            return self._remember(layer, self.static_placement())
        return self._remember(layer, self.balanced(estimate, "phase1", self._last.get(layer)))

    def refine(self, layer: int, placement: Placement, actual_counts: np.ndarray) -> Placement:
        self.last_refine_fired = False
        est = self._estimated.pop(layer, None)
        if est is None:  # nothing was estimated: Lina has not started scheduling here
            return placement
        actual = self._counts(actual_counts, "actual_counts")
        self.phase2_checks += 1
        k2 = self.top_set_size
        if top_experts(est, k2) == top_experts(actual, k2):
            return placement
        self.phase2_mismatches += 1
        if not self.finetune:
            return placement
        self.phase2_fired += 1
        self.last_refine_fired = True
        return self._remember(layer, self.balanced(actual, "phase2", placement))

    def observe(self, layer: int, actual_counts: np.ndarray) -> None:
        if self.estimator_kind == "previous":
            self._previous[layer] = self._counts(actual_counts, "actual_counts").copy()


class LinaNoFinetune(LinaPlacement):
    """``lina-no-finetune``: Lina's phase 1 only (see :class:`LinaPlacement`)."""

    def __init__(self, **kw) -> None:
        super().__init__(finetune=False, **kw)


class LinaNoEstimate(LinaPlacement):
    """``lina-no-estimate``: phase 1 from the previous batch's counts at the same layer
    instead of the token-path estimate; phase 2 as in Lina (see :class:`LinaPlacement`)."""

    PARAMS: ClassVar[dict[str, Field]] = {}

    def __init__(self, **kw) -> None:
        super().__init__(estimator="previous", **kw)


class OraclePlacement(_BalancedPlanner):
    """The bound for Lina: its allocation computed from the batch's *actual* counts
    before the gate runs (``plans_on_actual_counts = True``: the serving layer passes the
    actual counts to :meth:`plan`; :func:`~.base.decide_layer` does). Its phase-1
    placement already fits the real gate, so :meth:`refine` never changes it and its
    swaps are hidden behind compute like Lina's phase 1. It bounds what a better estimate
    could give Lina; it is not the optimum over all placements (Lina's rounding of
    ``n_e`` and its dedicated replica devices remain), so another packing can beat it on
    some batches."""

    plans_on_actual_counts: ClassVar[bool] = True

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        if estimate is None:
            raise ValueError(f"{self.name}: plan() needs the actual counts as its estimate")
        return self._remember(layer, self.balanced(estimate, "oracle", self._last.get(layer)))
