"""Statistics of expert-routing traces, and the same statistics of real OLMoE/Mixtral
routing counts so that a trace can be put beside them.

- **Load skew** per layer: busiest expert over the uniform share, coefficient of
  variation of per-expert counts, and the share of (token, choice) pairs taken by the
  top 12.5% of experts.
- **Inter-layer affinity**: accuracy of predicting a token's top-1 expert at a later layer
  from its top-1 at an earlier one with the best conditional predictor on the data
  (argmax of the joint counts), beside chance (always the most popular later expert)
  and uniform 1/E.
- **Path-based estimation accuracy**: for batches of held-out tokens, how often the
  top-2k experts by :class:`~lina_sim.policies.path_estimator.PathEstimator` estimate equal
  the actual top-2k (Lina's phase-2 trigger), per path length.
- **Token-to-token repeat rate**: how often consecutive tokens of a sequence pick the
  same top-1 expert at a layer, beside the rate two independent tokens would match.
- **Transition heatmaps** P(expert at l+1 | expert at l).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lina_sim.errors import RoutingTraceError
from lina_sim.policies.path_estimator import PathEstimator, top_experts
from lina_sim.routing.traces import RoutingTrace

TOP_FRACTION = 0.125  # "top 12.5% of experts"
DEFAULT_REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "olmoe-routing" / "routing_counts.json"


# ---- load skew --------------------------------------------------------------------------
@dataclass
class SkewStats:
    """Per-layer load skew of expert counts (unitless ratios)."""

    layers: list[int]
    max_over_uniform: list[float]  # busiest expert's count / (total / E)
    cv: list[float]  # std / mean of per-expert counts (population std)
    top_share: list[float]  # share of all counts taken by the top ceil(E/8) experts
    top_experts: int  # how many experts "top 12.5%" is

    def mean(self) -> dict[str, float]:
        return {k: float(np.mean(getattr(self, k))) for k in ("max_over_uniform", "cv", "top_share")}


def skew_from_counts(counts: np.ndarray, layers: Sequence[int] | None = None) -> SkewStats:
    """Skew of per-expert counts [layers, E] (or [E] for one layer)."""
    c = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    E = c.shape[1]
    total = c.sum(axis=1)
    mean = total / E
    n_top = max(1, math.ceil(E * TOP_FRACTION))
    top = np.sort(c, axis=1)[:, ::-1][:, :n_top].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return SkewStats(
            layers=list(layers) if layers is not None else list(range(c.shape[0])),
            max_over_uniform=(c.max(axis=1) / mean).tolist(),
            cv=(c.std(axis=1) / mean).tolist(),
            top_share=(top / total).tolist(),
            top_experts=n_top,
        )


def expert_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-layer counts [layers, E] of choices in experts [tokens, layers, k]."""
    T, L, k = experts.shape
    flat = (np.arange(L)[None, :, None] * num_experts + experts.astype(np.int64)).ravel()
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


# ---- inter-layer affinity ---------------------------------------------------------------------
@dataclass
class AffinityStats:
    """How well a token's top-1 expert at layer a predicts its top-1 at layer b (fractions)."""

    pairs: list[tuple[int, int]]
    accuracy: list[float]  # best conditional predictor: sum_a max_b joint / N
    chance: list[float]  # always the most popular expert at b: max_b marginal / N
    uniform: float  # 1 / E

    def mean(self) -> dict[str, float]:
        return {"accuracy": float(np.mean(self.accuracy)), "chance": float(np.mean(self.chance))}


def affinity_from_joint(joints: np.ndarray, pairs: Sequence[tuple[int, int]]) -> AffinityStats:
    """Affinity from joint top-1 counts [pairs, E, E] (rows: earlier layer)."""
    j = np.asarray(joints, dtype=np.float64)
    n = j.sum(axis=(1, 2))
    acc = j.max(axis=2).sum(axis=1) / n
    chance = j.sum(axis=1).max(axis=1) / n
    return AffinityStats([tuple(map(int, p)) for p in pairs], acc.tolist(), chance.tolist(), 1.0 / j.shape[1])


def joint_top1(top1: np.ndarray, a: int, b: int, num_experts: int) -> np.ndarray:
    """Joint counts [E, E] of (top-1 at layer a, top-1 at layer b) over tokens."""
    flat = top1[:, a].astype(np.int64) * num_experts + top1[:, b]
    return np.bincount(flat, minlength=num_experts * num_experts).reshape(num_experts, num_experts)


def affinity(trace: RoutingTrace, pairs: Sequence[tuple[int, int]] | None = None) -> AffinityStats:
    """Affinity of the given layer pairs (default: every adjacent pair)."""
    pairs = list(pairs) if pairs is not None else [(l, l + 1) for l in range(trace.num_layers - 1)]
    joints = np.stack([joint_top1(trace.top1, a, b, trace.num_experts) for a, b in pairs])
    return affinity_from_joint(joints, pairs)


def transition_matrices(trace: RoutingTrace) -> np.ndarray:
    """P(top-1 at l+1 = b | top-1 at l = a) as [layers-1, E, E]; rows of unused a are 0."""
    mats = []
    for l in range(trace.num_layers - 1):
        j = joint_top1(trace.top1, l, l + 1, trace.num_experts).astype(np.float64)
        rows = j.sum(axis=1, keepdims=True)
        mats.append(np.divide(j, rows, out=np.zeros_like(j), where=rows > 0))
    return np.stack(mats) if mats else np.zeros((0, trace.num_experts, trace.num_experts))


# ---- token-to-token locality ------------------------------------------------------------------
@dataclass
class RepeatStats:
    """Per layer: share of consecutive same-sequence token pairs with equal top-1 expert."""

    rate: list[float]
    chance: list[float]  # sum_e p_e^2: two independent tokens with the layer's popularity
    pairs: int  # consecutive pairs counted


def repeat_rate(trace: RoutingTrace) -> RepeatStats:
    top1 = trace.top1
    same_seq = trace.seq_ids[1:] == trace.seq_ids[:-1]
    pairs = int(same_seq.sum())
    eq = top1[1:][same_seq] == top1[:-1][same_seq]
    rate = eq.mean(axis=0) if pairs else np.full(trace.num_layers, np.nan)
    p = expert_counts(trace.experts[:, :, :1], trace.num_experts) / max(1, trace.num_tokens)
    return RepeatStats(rate.tolist(), (p**2).sum(axis=1).tolist(), pairs)


# ---- path-based estimation accuracy -----------------------------------------------------------
@dataclass
class PathAccuracy:
    """Share of (batch, layer) cases whose estimated top-2k expert set equals the actual one.

    ``overlap`` is the mean fraction of the actual top-2k set that the estimate got.
    Every path length is scored on the same layers (from ``first_layer`` on), so rows
    compare fairly; path length 0 is popularity alone (no path).
    """

    lengths: list[int]
    exact: list[float]
    overlap: list[float]
    batch_tokens: int
    batches: int
    first_layer: int
    set_size: int
    train_tokens: int


def path_accuracy(
    trace: RoutingTrace,
    lengths: Sequence[int] = (0, 1, 3, 6),
    batch_tokens: int = 256,
    train_fraction: float = 0.5,
    min_count: int = 2,
) -> PathAccuracy:
    """Fit on the first ``train_fraction`` of sequences, score batches of the rest."""
    if trace.num_layers < 2:
        raise RoutingTraceError(trace.origin, "path accuracy needs at least 2 layers")
    split = _sequence_split(trace.seq_ids, train_fraction)
    if split == 0 or trace.num_tokens - split < batch_tokens:
        raise RoutingTraceError(
            trace.origin, f"too few tokens ({trace.num_tokens}) for a train slice and one batch of {batch_tokens}"
        )
    train, test = trace.experts[:split], trace.experts[split:]
    first = min(max(lengths), trace.num_layers - 1) if max(lengths) else 1
    set_size = min(2 * trace.top_k, trace.num_experts)
    n_batches = test.shape[0] // batch_tokens
    exact, overlap = [], []
    for m in lengths:
        est = PathEstimator(m, trace.num_experts, min_count).fit(train)
        hits, share = 0, 0.0
        for b in range(n_batches):
            chunk = test[b * batch_tokens : (b + 1) * batch_tokens]
            actual_counts = expert_counts(chunk, trace.num_experts)
            for layer in range(first, trace.num_layers):
                estimate = est.estimate(layer, PathEstimator.paths_for(chunk[:, :, 0], layer, m))
                want = top_experts(actual_counts[layer], set_size)
                got = top_experts(estimate, set_size)
                hits += got == want
                share += len(got & want) / set_size
        cases = n_batches * (trace.num_layers - first)
        exact.append(hits / cases)
        overlap.append(share / cases)
    return PathAccuracy(list(lengths), exact, overlap, batch_tokens, n_batches, first, set_size, split)


def _sequence_split(seq_ids: np.ndarray, fraction: float) -> int:
    """Token index nearest ``fraction`` of the trace that starts a new sequence."""
    target = int(round(len(seq_ids) * fraction))
    starts = np.flatnonzero(np.r_[True, seq_ids[1:] != seq_ids[:-1]])
    if starts.size <= 1:
        return target  # one sequence: split it
    return int(starts[np.argmin(np.abs(starts - target))])


# ---- everything for one trace -----------------------------------------------------------------
@dataclass
class RoutingStats:
    """All statistics of one trace (see the module docstring)."""

    summary: dict[str, Any]
    skew: SkewStats  # all k choices
    skew_top1: SkewStats
    affinity: AffinityStats  # adjacent layers
    repeat: RepeatStats
    path: PathAccuracy | None
    transitions: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: asdict(getattr(self, k)) for k in ("skew", "skew_top1", "affinity", "repeat")}
        d["path"] = asdict(self.path) if self.path else None
        d["summary"] = self.summary
        return d


def compute(trace: RoutingTrace, path_lengths: Sequence[int] = (0, 1, 3, 6), batch_tokens: int = 256) -> RoutingStats:
    counts = expert_counts(trace.experts, trace.num_experts)
    counts1 = expert_counts(trace.experts[:, :, :1], trace.num_experts)
    try:
        path = path_accuracy(trace, path_lengths, batch_tokens)
    except RoutingTraceError:
        path = None  # too small a trace for held-out batches; the rest still applies
    m = trace.metadata
    summary = {
        "file": trace.origin,
        "model": m.get("model"),
        "dataset": m.get("dataset"),
        "tokens": trace.num_tokens,
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "sequences": int(np.unique(trace.seq_ids).size),
    }
    return RoutingStats(
        summary=summary,
        skew=skew_from_counts(counts),
        skew_top1=skew_from_counts(counts1),
        affinity=affinity(trace) if trace.num_layers > 1 else AffinityStats([], [], [], 1 / trace.num_experts),
        repeat=repeat_rate(trace),
        path=path,
        transitions=transition_matrices(trace),
    )


# ---- real OLMoE / Mixtral counts ----------------------------------------------------------------
@dataclass
class RealRow:
    """Skew and affinity of one model/domain (or a trace mapped onto the same layers)."""

    name: str
    domain: str
    experts: int
    top_k: int
    layers: list[int]  # the recorded layers (a trace: the layers at the same relative depth)
    skew: SkewStats
    skew_top1: SkewStats
    affinity: AffinityStats  # top-1 across the non-adjacent pairs


def load_real(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else DEFAULT_REAL
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RoutingTraceError(
            str(path), "no such file (the real routing counts of ../shared/data/olmoe-routing)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RoutingTraceError(str(path), f"not valid JSON ({e})") from None


def real_rows(data: dict[str, Any], source: str = "routing_counts.json") -> list[RealRow]:
    """One row per (model, domain) that has cross-layer counts."""
    rows = []
    try:
        layers, pairs = data["layers"], [tuple(p) for p in data["layer_pairs"]]
        for key, model in data["models"].items():
            for domain, d in model["domains"].items():
                if "expert_counts_crosslayer_top1" not in d:
                    continue
                rows.append(
                    RealRow(
                        name=key,
                        domain=domain,
                        experts=model["experts"],
                        top_k=model["top_k"],
                        layers=layers,
                        skew=skew_from_counts(np.array(d["expert_counts"]), layers),
                        skew_top1=skew_from_counts(np.array(d["expert_counts_top1"]), layers),
                        affinity=affinity_from_joint(np.array(d["expert_counts_crosslayer_top1"]), pairs),
                    )
                )
    except (KeyError, TypeError, ValueError) as e:
        raise RoutingTraceError(
            source, f"unexpected layout of the real routing counts ({type(e).__name__}: {e})"
        ) from None
    return rows


def trace_row(trace: RoutingTrace, real_layers: Sequence[int] = (0, 7, 15), real_depth: int = 16) -> RealRow:
    """The trace's statistics at the layers of the same relative depth as the real ones.

    OLMoE records layers 0, 7, 15 of 16; a 12-layer trace maps them to 0, 5, 11.
    """
    L = trace.num_layers
    layers = sorted({int(round(l * (L - 1) / (real_depth - 1))) for l in real_layers})
    pairs = list(zip(layers[:-1], layers[1:]))
    counts = expert_counts(trace.experts, trace.num_experts)[layers]
    counts1 = expert_counts(trace.experts[:, :, :1], trace.num_experts)[layers]
    return RealRow(
        name=str(trace.metadata.get("model")),
        domain=str(trace.metadata.get("dataset")),
        experts=trace.num_experts,
        top_k=trace.top_k,
        layers=layers,
        skew=skew_from_counts(counts, layers),
        skew_top1=skew_from_counts(counts1, layers),
        affinity=affinity(trace, pairs),
    )
