"""Statistics of expert-routing traces, and the same statistics of real OLMoE/Mixtral
routing counts so that a trace can be put beside them.

- **Load skew** per layer: busiest expert over the uniform share, coefficient of
  variation of per-expert counts, and the share of (token, choice) pairs taken by the
  top 12.5% of experts.
- **Inter-layer affinity**: accuracy of predicting a token's top-1 expert at a later layer
  from its top-1 at an earlier one with the best conditional predictor on the data
  (argmax of the joint counts), beside chance (always the most popular later expert)
  and uniform 1/E.
- **Path-based estimation accuracy**: the
  :class:`~lina_sim.policies.path_estimator.PathEstimator` is fit on a seeded draw of
  whole sequences; for batches of the other sequences (out of sample) and of its own
  training tokens (in sample), how often its top-2k experts equal the actual top-2k
  (Lina's phase-2 trigger), per path length.
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
    top_share: list[float]  # share of all counts taken by the busiest ceil(E * top_fraction) experts
    top_experts: int  # how many experts that is
    top_fraction: float = TOP_FRACTION  # of the experts, before rounding up

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

    The estimator is fit on the training sequences only. ``exact``/``overlap`` score it out
    of sample, on batches of the held-out sequences; ``exact_in_sample``/
    ``overlap_in_sample`` score it on batches of its own training tokens, the optimistic
    number an evaluation on the fitted data would report (NaN: fewer training tokens than
    one batch). ``overlap`` is the mean fraction of the actual top-2k set the estimate got.
    Every path length is scored on the same layers (from ``first_layer`` on), so rows
    compare fairly; path length 0 is popularity alone (no path).
    """

    lengths: list[int]
    exact: list[float]
    overlap: list[float]
    exact_in_sample: list[float]
    overlap_in_sample: list[float]
    batch_tokens: int
    batches: int  # held-out batches
    batches_in_sample: int
    first_layer: int
    set_size: int
    train_tokens: int
    test_tokens: int
    train_sequences: int
    test_sequences: int
    seed: int
    split: str  # how train and test were cut: "by sequence", or by token position for 1 sequence


@dataclass
class SequenceSplit:
    """Token rows that fit an estimator (``train``) and rows that score it (``test``)."""

    train: np.ndarray  # int64 row indices, in trace order
    test: np.ndarray
    train_sequences: int
    test_sequences: int
    how: str


def split_sequences(seq_ids: np.ndarray, train_fraction: float = 0.5, seed: int = 0) -> SequenceSplit:
    """Whole sequences drawn at random (deterministic with ``seed``) for training, about
    ``train_fraction`` of them, the rest for testing: no sequence lends tokens to both.

    A single-sequence trace cannot be split so; it is cut at ``train_fraction`` of its
    tokens instead, and ``how`` says so.
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    seq_ids = np.asarray(seq_ids)
    uniq = np.unique(seq_ids)
    if uniq.size < 2:
        cut = min(max(1, int(round(seq_ids.size * train_fraction))), max(1, seq_ids.size - 1))
        rows = np.arange(seq_ids.size)
        return SequenceSplit(rows[:cut], rows[cut:], 1, 1, "1 sequence: cut at a token position")
    n_train = min(max(1, int(round(uniq.size * train_fraction))), uniq.size - 1)
    chosen = np.random.default_rng(seed).permutation(uniq)[:n_train]
    in_train = np.isin(seq_ids, chosen)
    return SequenceSplit(
        np.flatnonzero(in_train), np.flatnonzero(~in_train), n_train, uniq.size - n_train, "by sequence"
    )


def score_batches(
    est: PathEstimator, experts: np.ndarray, layers: Sequence[int], set_size: int, batch_tokens: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact and overlap shares per layer over consecutive batches of ``batch_tokens`` rows
    of ``experts`` [tokens, layers, k] (a partial last batch is left out), and the number
    of batches. No batch: NaN shares."""
    n_batches = experts.shape[0] // batch_tokens
    exact = np.zeros(len(layers))
    overlap = np.zeros(len(layers))
    if n_batches == 0:
        return exact * np.nan, overlap * np.nan, 0
    E = int(est.num_experts or 0)
    for b in range(n_batches):
        chunk = experts[b * batch_tokens : (b + 1) * batch_tokens]
        actual = expert_counts(chunk, E)
        for i, layer in enumerate(layers):
            estimate = est.estimate(layer, PathEstimator.paths_for(chunk[:, :, 0], layer, est.path_length))
            want = top_experts(actual[layer], set_size)
            got = top_experts(estimate, set_size)
            exact[i] += got == want
            overlap[i] += len(got & want) / set_size
    return exact / n_batches, overlap / n_batches, n_batches


def path_accuracy(
    trace: RoutingTrace,
    lengths: Sequence[int] = (0, 1, 3, 6),
    batch_tokens: int = 256,
    train_fraction: float = 0.5,
    min_count: int = 2,
    seed: int = 0,
) -> PathAccuracy:
    """Fit on ``train_fraction`` of the sequences (seeded draw), score batches of the
    others (out of sample) and of the training tokens themselves (in sample)."""
    if trace.num_layers < 2:
        raise RoutingTraceError(trace.origin, "path accuracy needs at least 2 layers")
    split = split_sequences(trace.seq_ids, train_fraction, seed)
    if split.train.size == 0 or split.test.size < batch_tokens:
        raise RoutingTraceError(
            trace.origin,
            f"too few held-out tokens ({split.test.size} of {trace.num_tokens}) for one batch of {batch_tokens}",
        )
    train, test = trace.experts[split.train], trace.experts[split.test]
    first = min(max(lengths), trace.num_layers - 1) if max(lengths) else 1
    layers = list(range(first, trace.num_layers))
    set_size = min(2 * trace.top_k, trace.num_experts)
    exact, overlap, exact_in, overlap_in = [], [], [], []
    n_test = n_train = 0
    for m in lengths:
        est = PathEstimator(m, trace.num_experts, min_count).fit(train)
        e, o, n_test = score_batches(est, test, layers, set_size, batch_tokens)
        ei, oi, n_train = score_batches(est, train, layers, set_size, batch_tokens)
        exact.append(float(e.mean()))
        overlap.append(float(o.mean()))
        exact_in.append(float(ei.mean()))
        overlap_in.append(float(oi.mean()))
    return PathAccuracy(
        list(lengths),
        exact,
        overlap,
        exact_in,
        overlap_in,
        batch_tokens,
        n_test,
        n_train,
        first,
        set_size,
        int(split.train.size),
        int(split.test.size),
        split.train_sequences,
        split.test_sequences,
        seed,
        split.how,
    )


def estimation_accuracy_rows(
    train: np.ndarray,
    test: np.ndarray,
    num_experts: int,
    top_k: int,
    batch_tokens: int,
    lengths: Sequence[int],
    min_count: int = 2,
) -> list[dict[str, Any]]:
    """Per path length m and layer >= m (the layers Lina schedules): the estimator fit on
    ``train`` [tokens, layers, k] and scored on batches of ``test`` (``exact``,
    ``overlap``, ``batches``: out of sample) and on batches of ``train`` itself
    (``exact_in_sample``, ``overlap_in_sample``, ``batches_in_sample``). A batch is
    ``batch_tokens`` rows, or all of them if there are fewer."""
    set_size = min(2 * top_k, num_experts)
    num_layers = train.shape[1]
    rows = []
    for m in lengths:
        est = PathEstimator(m, num_experts, min_count).fit(train)
        layers = list(range(m, num_layers))
        e, o, n = score_batches(est, test, layers, set_size, max(1, min(batch_tokens, test.shape[0])))
        ei, oi, ni = score_batches(est, train, layers, set_size, max(1, min(batch_tokens, train.shape[0])))
        for i, layer in enumerate(layers):
            rows.append(
                {
                    "path_length": m,
                    "layer": layer,
                    "exact": float(e[i]),
                    "overlap": float(o[i]),
                    "batches": n,
                    "exact_in_sample": float(ei[i]),
                    "overlap_in_sample": float(oi[i]),
                    "batches_in_sample": ni,
                }
            )
    return rows


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
    path_skipped: str = ""  # why ``path`` is None

    def to_dict(self) -> dict[str, Any]:
        d = {k: asdict(getattr(self, k)) for k in ("skew", "skew_top1", "affinity", "repeat")}
        d["path"] = asdict(self.path) if self.path else None
        d["path_skipped"] = self.path_skipped or None
        d["summary"] = self.summary
        return d


def compute(
    trace: RoutingTrace,
    path_lengths: Sequence[int] = (0, 1, 3, 6),
    batch_tokens: int = 256,
    train_fraction: float = 0.5,
    seed: int = 0,
) -> RoutingStats:
    """Every statistic of ``trace``; path estimation is fit on ``train_fraction`` of the
    sequences (drawn with ``seed``) and scored both on the others and in sample."""
    counts = expert_counts(trace.experts, trace.num_experts)
    counts1 = expert_counts(trace.experts[:, :, :1], trace.num_experts)
    path, skipped = None, ""
    try:
        path = path_accuracy(trace, path_lengths, batch_tokens, train_fraction, seed=seed)
    except RoutingTraceError as e:
        skipped = e.problem  # too small a trace for held-out batches; the rest still applies
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
        "experts_inferred": bool(m.get("num_experts_inferred", False)),
        "dropped_incomplete": m.get("dropped_incomplete"),
    }
    return RoutingStats(
        summary=summary,
        skew=skew_from_counts(counts),
        skew_top1=skew_from_counts(counts1),
        affinity=affinity(trace) if trace.num_layers > 1 else AffinityStats([], [], [], 1 / trace.num_experts),
        repeat=repeat_rate(trace),
        path=path,
        transitions=transition_matrices(trace),
        path_skipped=skipped,
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
    num_layers: int  # MoE layers of the model the ``layers`` are counted in
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
                        num_layers=int(model["num_layers"]),
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


def trace_row(
    trace: RoutingTrace, real_layers: Sequence[int] = (0, 7, 15), real_depth: int = 16, name: str | None = None
) -> RealRow:
    """The trace's statistics at the layers of the same relative depth as ``real_layers``
    of a ``real_depth``-layer model: layer l maps to round(l * (L - 1) / (real_depth - 1)).

    OLMoE records layers 0, 7, 15 of 16 (a 12-layer trace: 0, 5, 11); Mixtral records
    0, 7, 15 of 32 (a 32-layer trace: the same 0, 7, 15).
    """
    L = trace.num_layers
    scale = (L - 1) / (real_depth - 1) if real_depth > 1 else 0.0
    layers = sorted({int(round(l * scale)) for l in real_layers})
    pairs = list(zip(layers[:-1], layers[1:]))
    counts = expert_counts(trace.experts, trace.num_experts)[layers]
    counts1 = expert_counts(trace.experts[:, :, :1], trace.num_experts)[layers]
    return RealRow(
        name=name or str(trace.metadata.get("model")),
        domain=str(trace.metadata.get("dataset")),
        experts=trace.num_experts,
        top_k=trace.top_k,
        layers=layers,
        num_layers=L,
        skew=skew_from_counts(counts, layers),
        skew_top1=skew_from_counts(counts1, layers),
        affinity=affinity(trace, pairs) if pairs else AffinityStats([], [], [], 1 / trace.num_experts),
    )


def comparison_rows(trace: RoutingTrace, real: Sequence[RealRow]) -> list[RealRow]:
    """The real rows grouped by model, each group led by the trace at that model's relative
    depth (models of different depth record different relative layers)."""
    out: list[RealRow] = []
    for model in dict.fromkeys(r.name for r in real):
        group = [r for r in real if r.name == model]
        first = group[0]
        out.append(trace_row(trace, first.layers, first.num_layers, name=f"trace at {model}'s depth"))
        out += group
    return out
