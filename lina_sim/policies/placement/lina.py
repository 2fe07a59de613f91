"""Lina's two-phase inference placement, its ablations, its cost-aware variant
``lina-cost``, and the ``oracle`` bound."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from lina_sim.config.fields import Field
from lina_sim.errors import ConfigError
from lina_sim.policies.path_estimator import PathEstimator, top_experts
from lina_sim.policies.placement.base import PlacementPolicy, decide_layer
from lina_sim.policies.placement.charge import spread_counts
from lina_sim.policies.placement.layout import Placement
from lina_sim.policies.placement.packing import lina_placement
from lina_sim.policies.placement.search import improve, improve_many, remembered, remembered_many
from lina_sim.policies.registry import PLACEMENT_POLICIES, make_placement_policy

_SEARCH_ROUNDS = Field(
    int, 2, minimum=0, help="local-search steps from the cheapest candidate under the charge (0: none)"
)


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
        return self._checked(lina_placement(w, self.num_devices, self.max_experts_per_device, previous, origin))

    def _remember(self, layer: int, placement: Placement) -> Placement:
        self._last[layer] = placement
        return placement

    def plan_exact(self, counts: np.ndarray) -> Placement:
        return self.balanced(counts, "exact", None)


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
        self.estimator = PathEstimator.fitted(self.path_length, self.num_experts, self.min_count, experts)

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


class LinaCostPlacement(LinaPlacement):
    """``lina-cost``: Lina's phases (estimate, replicate and pack, re-plan after the gate
    when the top-2k set was wrong) with each plan weighed against the cost the simulator
    charges (:meth:`PlacementPolicy.charge`, quick form) instead of balancing tokens only.

    Wherever Lina computes a placement from loads (phase 1 from the estimate, phase 2
    from the actual counts), ``lina-cost`` ranks Lina's own allocation, the static
    layout and the layout its memory holds now, and runs :func:`~.search.improve` from
    the cheapest, taking whatever is cheapest in the end. The loads stand for a batch
    spread evenly over the devices (:func:`~.charge.spread_counts`), as the gate's
    per-device counts are not known before it runs. A grouped-GEMM device pays little for
    a second expert but a whole weight read, and every replica adds all-to-all
    destinations: that is what stops it from stacking experts that do not pay.
    """

    PARAMS: ClassVar[dict[str, Field]] = {**LinaPlacement.PARAMS, "search_rounds": _SEARCH_ROUNDS}

    def __init__(self, *, search_rounds: int = 2, **kw) -> None:
        super().__init__(**kw)
        self.search_rounds = search_rounds
        self._layer = 0

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        self._layer = layer  # the charge is per layer (its resident weights)
        return super().plan(layer, estimate)

    def refine(self, layer: int, placement: Placement, actual_counts: np.ndarray) -> Placement:
        self._layer = layer
        return super().refine(layer, placement, actual_counts)

    def balanced(self, loads: np.ndarray, origin: str, previous: Placement | None) -> Placement:
        lina = super().balanced(loads, origin, previous)
        w = self._counts(loads, "estimate")
        if not w.sum() > 0:
            return lina
        cbs = spread_counts(w, self.num_devices)
        counts = cbs.sum(axis=0)
        cands = [lina, self.static_placement()] + ([previous] if previous is not None else [])
        layer = self._layer

        quick = remembered(lambda ps: self.charge.quick(layer, ps, cbs))
        t = quick(cands)
        start = cands[int(np.argmin(t))]
        best, _ = improve(start, counts, quick, self.max_experts_per_device, self.search_rounds, origin)
        if best.origin != origin:  # static or the resident layout won: report it as this phase's plan
            best = Placement(best.num_devices, best.devices, best.shares, origin)
        return self._checked(best)


class OraclePlacement(_BalancedPlanner):
    """The best plan any policy could make from the batch's exact counts, under the very
    cost the simulator charges (``plans_on_actual_counts = True``: it sees the gate first,
    :meth:`see_gate`, and :func:`~.base.decide_layer` passes the actual counts to
    :meth:`plan`).

    Per layer it collects candidates and keeps the one the charge
    (:meth:`PlacementPolicy.charge`, exact form: FFN per device, the all-to-alls as timed
    on the simulated network, weight swaps) says is cheapest:

    - its **rivals'** placements for this batch: every other policy (the scenario's, bound
      by the serving layer with :meth:`bind_rivals`; by default every registered one
      but itself and ``ideal``, whose gate is not the real one) runs alongside on the
      same batches, fed the same history, so the oracle holds exactly what each of them
      would run;
    - each rival's plan from the **exact counts** (:meth:`PlacementPolicy.plan_exact`:
      Lina's allocation, EPLB's rebalance, FasterMoE's shadowing, static);
    - its own **search**: :func:`~.search.improve` (``search_rounds`` steps, quick form
      of the charge) from the cheapest of those.

    So on the same batches its charged layer time is never above any rival's, and with
    nothing to swap (every expert resident) neither is its batch time. With swaps the
    choice is greedy per layer from what its own memory holds. Its phase-1 placement
    already fits the real gate, so :meth:`refine` never changes it.
    """

    plans_on_actual_counts: ClassVar[bool] = True
    PARAMS: ClassVar[dict[str, Field]] = {"search_rounds": _SEARCH_ROUNDS}

    def __init__(self, *, search_rounds: int = 2, **kw) -> None:
        super().__init__(**kw)
        self.search_rounds = search_rounds
        self._base = {
            "num_experts": self.num_experts,
            "num_devices": self.num_devices,
            "top_k": self.top_k,
            "max_experts_per_device": self.max_experts_per_device,
        }
        self._rivals: list[PlacementPolicy] | None = None
        # Per layer: (the gate's counts_by_source as bytes, its per-expert counts, choice).
        self._chosen: dict[int, tuple[bytes, np.ndarray, Placement]] = {}

    # ------------------------------------------------------------------ rivals
    def bind_rivals(self, rivals: list[PlacementPolicy]) -> None:
        """The policies whose placements this oracle must never lose to (fresh objects,
        fitted by :meth:`fit`). The serving layer passes the scenario's other policies."""
        bad = [r.name for r in rivals if r.plans_on_actual_counts or r.uniform_gate]
        if bad:
            raise ValueError(f"{self.name}: rivals must plan from their own estimates, not {bad}")
        self._rivals = list(rivals)

    @property
    def rivals(self) -> list[PlacementPolicy]:
        if self._rivals is None:
            self._rivals = []
            for name in PLACEMENT_POLICIES:
                rival = make_placement_policy(name, **self._base)
                if not (rival.plans_on_actual_counts or rival.uniform_gate):
                    self._rivals.append(rival)
        return self._rivals

    def fit(self, experts: np.ndarray) -> None:
        for r in self.rivals:
            r.fit(experts)

    def bind_charge(self, charge) -> None:
        super().bind_charge(charge)
        for r in self.rivals:
            r.bind_charge(charge)

    # ------------------------------------------------------------------ choosing
    def _candidates(self, layer: int, history: np.ndarray | None, cbs: np.ndarray) -> list[Placement]:
        return self._candidates_many([(layer, history, cbs)])[0]

    def _candidates_many(self, requests: list[tuple[int, np.ndarray | None, np.ndarray]]) -> list[list[Placement]]:
        """The candidates of each ``(layer, history, counts_by_source)`` request (class
        docstring). The searches of all requests step together, so each step charges
        every layer's neighbours in one call; each layer's search is its own, as if run
        alone (the charge reads no state the rivals change)."""
        out: list[list[Placement]] = []
        searched: list[int] = []  # requests with tokens: they get a search
        for layer, history, cbs in requests:
            counts = cbs.sum(axis=0)
            cands = [decide_layer(r, layer, history, cbs).final for r in self.rivals]
            if counts.sum() > 0:
                # Rivals of one Lina rule plan alike from exact counts: each rule once.
                rules: dict[object, PlacementPolicy] = {}
                for r in (self, *self.rivals):
                    rule = (type(r).balanced, None) if isinstance(r, _BalancedPlanner) else (type(r), id(r))
                    rules.setdefault(rule, r)
                cands += [self.static_placement()] + [r.plan_exact(counts) for r in rules.values()]
                searched.append(len(out))
            out.append(cands)
        if searched:
            quick = remembered_many(self._quick_charge([requests[k] for k in searched]), len(searched))
            t = quick([(i, out[k]) for i, k in enumerate(searched)])
            starts = [out[k][int(np.argmin(ti))] for k, ti in zip(searched, t)]
            counts = [requests[k][2].sum(axis=0) for k in searched]
            found = improve_many(starts, counts, quick, self.max_experts_per_device, self.search_rounds, "oracle")
            for k, start, (best, _) in zip(searched, starts, found):
                if best is not start:
                    out[k].append(best)
        return [list(dict.fromkeys(c)) for c in out]  # equal placements (origin aside) charged once

    def _quick_charge(self, requests: list[tuple[int, np.ndarray | None, np.ndarray]]):
        """``(search, placements)`` requests -> the quick charge of each, search ``i``
        being ``requests[i]``'s layer and batch: one :meth:`quick_many` call where the
        charge has it, else one :meth:`quick` per request."""
        many = getattr(self.charge, "quick_many", None)

        def charge(asked: list[tuple[int, list[Placement]]]) -> list[np.ndarray]:
            items = [(requests[i][0], ps, requests[i][2]) for i, ps in asked]
            if many is not None:
                return many(items)
            return [self.charge.quick(layer, ps, cbs) for layer, ps, cbs in items]

        return charge

    @staticmethod
    def _key(cbs: np.ndarray) -> bytes:
        return np.ascontiguousarray(cbs, dtype=np.int64).tobytes()

    def _choose(self, items: list[tuple[int, list[Placement], np.ndarray]]) -> None:
        for (layer, cands, cbs), i in zip(items, self.charge.cheapest(items)):
            self._chosen[layer] = (self._key(cbs), cbs.sum(axis=0), cands[i])

    def see_batch(self, experts: np.ndarray, counts_by_source: np.ndarray) -> None:
        ex = np.asarray(experts)
        gates = [np.asarray(cbs) for cbs in counts_by_source]
        cands = self._candidates_many([(l, ex[:, :l], cbs) for l, cbs in enumerate(gates)])
        self._choose([(l, c, cbs) for l, (c, cbs) in enumerate(zip(cands, gates))])

    def see_gate(self, layer: int, history: np.ndarray | None, counts_by_source: np.ndarray) -> None:
        cbs = np.asarray(counts_by_source, dtype=np.int64)
        seen = self._chosen.get(layer)
        if seen is not None and seen[0] == self._key(cbs):
            return  # see_batch already chose it
        self._choose([(layer, self._candidates(layer, history, cbs), cbs)])

    def plan(self, layer: int, estimate: np.ndarray | None) -> Placement:
        if estimate is None:
            raise ValueError(f"{self.name}: plan() needs the actual counts as its estimate")
        counts = self._counts(estimate, "estimate")
        seen = self._chosen.pop(layer, None)
        if seen is not None and np.array_equal(seen[1], counts):
            choice = seen[2]
        else:  # called without the gate (plan() alone): the counts spread evenly stand for it
            cbs = spread_counts(counts, self.num_devices)
            self._choose([(layer, self._candidates(layer, None, cbs), cbs)])
            choice = self._chosen.pop(layer)[2]
        return self._remember(layer, self._checked(choice))
