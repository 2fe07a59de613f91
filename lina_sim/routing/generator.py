"""Synthetic expert-routing traces: a first-order model of MoE routing.

The model, per token and layer:

- **layer 0**: the top-1 expert is drawn from the layer's popularity (Zipf or Dirichlet
  when synthetic; the measured top-1 shares when fitted);
- **layer l > 0**: the top-1 expert is drawn from the row of the inter-layer transition
  matrix ``P(top-1 at l | top-1 at l-1)``;
- **k > 1**: the other k-1 experts are drawn without replacement from
  ``P(other choice | top-1)`` at that layer;
- **sequence locality**: at layer 0, a token copies the previous token's choices with
  probability ``locality[0]``; at layer l, if its top-1 at l-1 equals the previous
  token's, it copies the previous token's layer-l choices with probability
  ``locality[l]``. Copying only from an equal state keeps every layer's popularity and
  every transition matrix exact in expectation, so locality never distorts the skew or
  affinity statistics.

``RoutingTraceGenerator.fit(trace)`` measures all of this on a real trace; ``scaled`` extends
the fitted model to more layers or experts, ``with_skew`` sets how unevenly the experts
are loaded while keeping the cross-layer path structure, and ``generate`` extends it to
any number of tokens. Generation is deterministic for a given seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lina_sim.errors import ConfigError
from lina_sim.routing.stats import expert_counts, joint_top1
from lina_sim.routing.traces import RoutingTrace, make_trace


@dataclass
class GeneratorParams:
    """Parameters of the routing model (probabilities; rows sum to 1).

    popularity  [E]          top-1 shares at layer 0
    transitions [L-1, E, E]  P(top-1 at l+1 = b | top-1 at l = a)
    secondary   [L, E, E]    P(another choice = b | top-1 = a) for k > 1 (zero diagonal)
    locality    [L]          copy probability (see the module docstring)
    seq_len                  tokens per generated sequence
    """

    num_experts: int
    num_layers: int
    top_k: int
    popularity: np.ndarray
    transitions: np.ndarray
    secondary: np.ndarray | None
    locality: np.ndarray
    seq_len: int
    origin: dict[str, Any] = field(default_factory=dict)  # how the parameters were made

    def __post_init__(self) -> None:
        E, L = self.num_experts, self.num_layers
        _check_shape("popularity", self.popularity, (E,))
        _check_shape("transitions", self.transitions, (L - 1, E, E))
        _check_shape("locality", self.locality, (L,))
        if self.top_k > 1:
            if self.secondary is None:
                raise ConfigError("secondary", f"required for top_k={self.top_k}")
            _check_shape("secondary", self.secondary, (L, E, E))
        if not 1 <= self.top_k <= E:
            raise ConfigError("top_k", f"{self.top_k} not in [1, num_experts={E}]")
        if self.seq_len < 1:
            raise ConfigError("seq_len", f"must be >= 1, got {self.seq_len}")
        if np.any(self.locality < 0) or np.any(self.locality > 1):
            raise ConfigError("locality", "must lie in [0, 1]")


def _check_shape(name: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    if np.shape(a) != shape:
        raise ConfigError(name, f"shape {np.shape(a)}, expected {shape}")


def _normalise_rows(m: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Row-normalise; an all-zero row becomes ``fallback`` (broadcast to its shape)."""
    s = m.sum(axis=-1, keepdims=True)
    fb = np.broadcast_to(fallback, m.shape)
    return np.where(s > 0, m / np.where(s > 0, s, 1), fb)


class RoutingTraceGenerator:
    """Samples traces from :class:`GeneratorParams` (see the module docstring)."""

    def __init__(self, params: GeneratorParams):
        self.params = params

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def synthetic(
        cls,
        num_experts: int,
        num_layers: int,
        top_k: int = 1,
        popularity: str = "zipf",
        zipf_s: float = 1.0,
        dirichlet_alpha: float = 1.0,
        affinity: float = 0.5,
        locality: float = 0.1,
        seq_len: int = 128,
        seed: int = 0,
    ) -> RoutingTraceGenerator:
        """A model from parameters.

        Each layer's popularity is Zipf(``zipf_s``) over a random permutation of the
        experts, or Dirichlet(``dirichlet_alpha``). Transitions mix the next layer's
        popularity with a rank-preserving map (the i-th most popular expert at l goes to
        the i-th most popular at l+1) with weight ``affinity`` in [0, 1]; for Zipf this
        keeps every layer's popularity exact.
        """
        for name, v in (("affinity", affinity), ("locality", locality)):
            if not 0 <= v <= 1:
                raise ConfigError(name, f"{v} not in [0, 1]")
        if num_experts < 1 or num_layers < 1:
            raise ConfigError("experts/layers", "must be positive")
        rng = np.random.default_rng(seed)
        E, L = num_experts, num_layers
        if popularity == "zipf":
            if zipf_s < 0:
                raise ConfigError("zipf_s", f"{zipf_s} must be >= 0")
            base = 1.0 / np.arange(1, E + 1) ** zipf_s
            pops = np.stack([base[np.argsort(rng.permutation(E))] / base.sum() for _ in range(L)])
        elif popularity == "dirichlet":
            if dirichlet_alpha <= 0:
                raise ConfigError("dirichlet_alpha", f"{dirichlet_alpha} must be > 0")
            pops = rng.dirichlet(np.full(E, dirichlet_alpha), size=L)
        else:
            raise ConfigError("popularity", f"unknown {popularity!r}", ["zipf", "dirichlet"])
        trans = np.empty((max(0, L - 1), E, E))
        for l in range(L - 1):
            rank_src = np.argsort(-pops[l], kind="stable")
            rank_dst = np.argsort(-pops[l + 1], kind="stable")
            perm = np.zeros((E, E))
            perm[rank_src, rank_dst] = 1.0
            trans[l] = (1 - affinity) * pops[l + 1][None, :] + affinity * perm
        secondary = None
        if top_k > 1:  # other choices follow the layer's popularity, never the top-1 again
            sec = np.repeat(pops[:, None, :], E, axis=1) * (1 - np.eye(E))[None]
            secondary = _normalise_rows(sec, np.full(E, 1.0 / E))
        origin = {
            "kind": "synthetic",
            "popularity": popularity,
            "zipf_s": zipf_s,
            "dirichlet_alpha": dirichlet_alpha,
            "affinity": affinity,
            "locality": locality,
            "seed": seed,
        }
        return cls(GeneratorParams(E, L, top_k, pops[0], trans, secondary, np.full(L, locality), seq_len, origin))

    @classmethod
    def fit(cls, trace: RoutingTrace) -> RoutingTraceGenerator:
        """Measure popularity, transitions, other-choice shares and locality on ``trace``."""
        E, L, k = trace.num_experts, trace.num_layers, trace.top_k
        top1 = trace.top1.astype(np.int64)
        pop1 = expert_counts(trace.experts[:, :, :1], E).astype(np.float64)
        pop1 /= pop1.sum(axis=1, keepdims=True)
        trans = (
            np.stack(
                [_normalise_rows(joint_top1(top1, l, l + 1, E).astype(np.float64), pop1[l + 1]) for l in range(L - 1)]
            )
            if L > 1
            else np.zeros((0, E, E))
        )
        secondary = None
        if k > 1:
            sec = np.zeros((L, E, E))
            for l in range(L):
                rows = np.repeat(top1[:, l], k - 1)
                others = trace.experts[:, l, 1:].astype(np.int64).ravel()
                sec[l] = np.bincount(rows * E + others, minlength=E * E).reshape(E, E)
            sec *= 1 - np.eye(E)[None]
            fallback = sec.sum(axis=1, keepdims=True)  # the layer's other-choice shares
            secondary = _normalise_rows(sec, _normalise_rows(fallback, np.full(E, 1.0 / E)))
        locality = _fit_locality(trace, pop1, trans)
        seq_lens = np.bincount(np.unique(trace.seq_ids, return_inverse=True)[1])
        seq_len = int(np.median(seq_lens)) if seq_lens.size else 1
        origin = {
            "kind": "fitted",
            "trace": trace.origin,
            "model": trace.metadata.get("model"),
            "dataset": trace.metadata.get("dataset"),
            "license": trace.metadata.get("license"),
        }
        return cls(GeneratorParams(E, L, k, pop1[0], trans, secondary, locality, seq_len, origin))

    def scaled(self, num_layers: int | None = None, num_experts: int | None = None) -> RoutingTraceGenerator:
        """The same model over more (or fewer) layers, or over ``m`` times the experts.

        Layers: fewer keeps the first ones; more walks the fitted layers back and forth
        so every layer keeps a fitted layer's popularity and transitions. Experts: each
        expert splits into ``m = num_experts / E`` equal children,
        and child j of one expert goes to child j of the next layer's expert, so skew
        ratios and affinity accuracy carry over unchanged.
        """
        p = self.params
        if num_layers is not None and num_layers != p.num_layers:
            p = _scale_layers(p, num_layers)
        if num_experts is not None and num_experts != p.num_experts:
            p = _scale_experts(p, num_experts)
        return RoutingTraceGenerator(p)

    def with_skew(self, skew: float) -> RoutingTraceGenerator:
        """The same model with every layer's busiest top-1 expert at ``skew`` times its
        uniform share (``max_e share_e * E``, the ``max_over_uniform`` of
        :func:`lina_sim.routing.stats.skew_from_counts`; 1 is perfectly even).

        Each layer's popularity is tempered, ``q_e ∝ p_e ** beta``, with the ``beta`` that
        gives the target: ranks and the shape of the tail are kept, only how steep it is
        changes. Each pair of adjacent layers keeps its path structure: the fitted joint
        ``P(a at l, b at l+1)`` is rescaled to the new marginals by iterative proportional
        fitting, the closest joint in KL divergence, which keeps every odds ratio
        ``J[a,b] J[c,d] / (J[a,d] J[c,b])``, i.e. which expert follows which. Other
        choices (k > 1) are reweighted by the same per-expert factors; locality is kept
        (copying from an equal state never moves a marginal).
        """
        p = self.params
        E = p.num_experts
        pops = layer_popularities(p)
        reachable = min(E / max(1, int(np.sum(row == row.max()))) for row in pops)
        if not (isinstance(skew, (int, float)) and math.isfinite(skew) and 1.0 <= skew < reachable):
            raise ConfigError(
                "skew",
                f"{skew!r} cannot be reached by tempering this model's popularity",
                f"a ratio in [1, {reachable:.3g}): busiest expert's top-1 share over the uniform 1/{E}",
            )
        new = np.stack([_temper_to(row, skew) for row in pops])
        trans = (
            np.stack(
                [
                    _normalise_rows(_ipf(pops[l][:, None] * p.transitions[l], new[l], new[l + 1]), new[l + 1])
                    for l in range(p.num_layers - 1)
                ]
            )
            if p.num_layers > 1
            else p.transitions
        )
        secondary = None
        if p.secondary is not None:
            # Other choices move with their expert's change of popularity.
            factor = np.where(pops > 0, new / np.where(pops > 0, pops, 1), 1.0)
            sec = p.secondary * factor[:, None, :]
            secondary = _normalise_rows(sec * (1 - np.eye(E))[None], np.full(E, 1.0 / E))
        origin = dict(p.origin, skew=float(skew))
        return RoutingTraceGenerator(
            replace(p, popularity=new[0], transitions=trans, secondary=secondary, origin=origin)
        )

    # ---- sampling ----------------------------------------------------------------------
    def generate(self, num_tokens: int, seed: int = 0, metadata: dict[str, Any] | None = None) -> RoutingTrace:
        """A trace of ``num_tokens`` tokens in sequences of ``seq_len`` (the last may be short)."""
        if num_tokens < 1:
            raise ConfigError("tokens", f"must be >= 1, got {num_tokens}")
        p = self.params
        E, L, k, S = p.num_experts, p.num_layers, p.top_k, p.seq_len
        rng = np.random.default_rng(seed)
        n_seq = math.ceil(num_tokens / S)
        out = np.empty((S, n_seq, L, k), dtype=np.int64)
        cum_pop = np.cumsum(p.popularity)
        cum_trans = np.cumsum(p.transitions, axis=-1)
        for pos in range(S):
            cur = out[pos]
            for l in range(L):
                if l == 0:
                    top = _sample(cum_pop[None, :], np.zeros(n_seq, dtype=np.int64), rng)
                else:
                    top = _sample(cum_trans[l - 1], cur[:, l - 1, 0], rng)
                cur[:, l, 0] = top
                if k > 1:
                    cur[:, l, 1:] = _sample_others(p.secondary[l], top, k - 1, rng)
                if pos > 0 and p.locality[l] > 0:
                    prev = out[pos - 1]
                    same = np.ones(n_seq, bool) if l == 0 else cur[:, l - 1, 0] == prev[:, l - 1, 0]
                    copy = same & (rng.random(n_seq) < p.locality[l])
                    cur[copy, l] = prev[copy, l]
        experts = out.transpose(1, 0, 2, 3).reshape(n_seq * S, L, k)[:num_tokens]
        seq_ids = np.repeat(np.arange(n_seq, dtype=np.int32), S)[:num_tokens]
        o = p.origin
        meta = {
            "model": f"synthetic ({o.get('kind')}" + (f" to {o.get('model')})" if o.get("model") else ")"),
            "dataset": str(o.get("dataset") or "synthetic"),
            "num_experts": E,
            "top_k": k,
            "source": "lina_sim.routing.generator" + (f", fitted to {o.get('trace')}" if o.get("trace") else ""),
            "license": str(o.get("license") or "Apache-2.0"),
            "made_by": f"RoutingTraceGenerator({json.dumps(o, sort_keys=True)}).generate({num_tokens}, seed={seed})",
        }
        meta.update(metadata or {})
        return make_trace(experts, meta, seq_ids=seq_ids)


def _sample(cum_rows: np.ndarray, state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per token from row ``state`` of cumulative probabilities."""
    u = rng.random(state.shape[0]) * cum_rows[state, -1]
    return np.minimum((cum_rows[state] < u[:, None]).sum(axis=1), cum_rows.shape[-1] - 1)


def _sample_others(rows: np.ndarray, top: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` further distinct experts per token, without replacement, from rows[top]."""
    # A tiny floor keeps every unused expert drawable, so a sparse fitted row never runs
    # out of candidates; it shifts probabilities by about E * 1e-12.
    w = rows[top] + 1e-12
    w[np.arange(top.size), top] = 0.0
    picks = np.empty((top.size, n), dtype=np.int64)
    for j in range(n):
        picks[:, j] = _sample(np.cumsum(w, axis=1), np.arange(top.size), rng)
        w[np.arange(top.size), picks[:, j]] = 0.0
    return picks


def layer_popularities(p: GeneratorParams) -> np.ndarray:
    """Top-1 shares [layers, E] the model produces at each layer (popularity pushed
    through the transitions)."""
    rows = [np.asarray(p.popularity, dtype=np.float64)]
    for t in p.transitions:
        rows.append(rows[-1] @ t)
    return np.stack(rows)


def _temper_to(pop: np.ndarray, skew: float) -> np.ndarray:
    """``pop ** beta`` normalised, with ``beta >= 0`` chosen so that ``max * E == skew``.

    The busiest share grows monotonically with ``beta`` (from uniform at 0 towards the
    tied maxima's share), so bisection finds it; the caller checked it is reachable."""
    E = pop.size
    ratio = np.where(pop > 0, pop / pop.max(), 0.0)

    def busiest(beta: float) -> float:
        w = np.where(ratio > 0, ratio**beta, 0.0) if beta > 0 else np.ones(E)
        return float(E / w.sum())  # the busiest has weight 1

    lo, hi = 0.0, 1.0
    while busiest(hi) < skew and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if busiest(mid) < skew else (lo, mid)
    beta = 0.5 * (lo + hi)
    w = np.where(ratio > 0, ratio**beta, 0.0) if beta > 0 else np.ones(E)
    return w / w.sum()


def _ipf(joint: np.ndarray, rows: np.ndarray, cols: np.ndarray, iters: int = 1000, tol: float = 1e-12) -> np.ndarray:
    """``diag(u) joint diag(v)`` with the given row and column sums (Sinkhorn / iterative
    proportional fitting). A floor of 1e-9 of the mass keeps every cell reachable, so
    marginals that put weight where the fitted joint had none can still be met."""
    j = joint + 1e-9 * max(float(joint.sum()), 1e-300) / joint.size
    for _ in range(iters):
        r = j.sum(axis=1)
        j = j * np.where(r > 0, rows / np.where(r > 0, r, 1), 0.0)[:, None]
        c = j.sum(axis=0)
        j = j * np.where(c > 0, cols / np.where(c > 0, c, 1), 0.0)[None, :]
        if np.abs(j.sum(axis=1) - rows).max() < tol:
            break
    return j


def _fit_locality(trace: RoutingTrace, pop1: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Copy probabilities that reproduce the trace's conditional repeat rates.

    Layer 0: repeat = rho + (1 - rho) * sum_e p_e^2. Layer l: among consecutive pairs that
    agree at l-1 on expert a, repeat = rho + (1 - rho) * sum_b T[a, b]^2. Solve for rho.
    """
    L = trace.num_layers
    top1 = trace.top1.astype(np.int64)
    same_seq = trace.seq_ids[1:] == trace.seq_ids[:-1]
    cur, prev = top1[1:][same_seq], top1[:-1][same_seq]
    rho = np.zeros(L)
    if cur.shape[0] == 0:
        return rho
    eq = cur == prev
    chance0 = float((pop1[0] ** 2).sum())
    rho[0] = _solve_copy(eq[:, 0].mean(), chance0)
    for l in range(1, L):
        agree = eq[:, l - 1]
        if not agree.any():
            continue
        match_prob = (trans[l - 1] ** 2).sum(axis=1)  # per shared state a
        chance = float(match_prob[cur[agree, l - 1]].mean())
        rho[l] = _solve_copy(eq[agree, l].mean(), chance)
    return rho


def _solve_copy(rate: float, chance: float) -> float:
    if chance >= 1:
        return 0.0
    return float(np.clip((rate - chance) / (1 - chance), 0.0, 1.0))


def _scale_layers(p: GeneratorParams, L_new: int) -> GeneratorParams:
    """Fewer layers: the first ``L_new``. More: walk the fitted layers back and forth
    (0, 1, ..., L-1, L-2, ..., 0, 1, ...), going backwards with the reversed transitions
    P(a at l | b at l+1). Every new layer then has exactly a fitted layer's popularity and
    every adjacent pair a fitted pair's joint counts (transposed when walking back)."""
    if L_new < 1:
        raise ConfigError("layers", f"must be >= 1, got {L_new}")
    L, E = p.num_layers, p.num_experts
    if L == 1:  # nothing to walk: every layer draws from the one popularity
        src = [0] * L_new
        trans = np.broadcast_to(p.popularity, (L_new - 1, E, E)).copy()
    else:
        period = 2 * (L - 1)
        src = [min(i % period, period - i % period) for i in range(L_new)]
        pops = [p.popularity]
        for t in p.transitions:
            pops.append(pops[-1] @ t)
        mats = []
        for i in range(L_new - 1):
            a, b = src[i], src[i + 1]
            if b == a + 1:
                mats.append(p.transitions[a])
            else:  # walking back from a to b = a - 1: Bayes on the joint of (b, a)
                joint = pops[b][:, None] * p.transitions[b]
                mats.append(_normalise_rows(joint.T, pops[b]))
        trans = np.stack(mats) if mats else np.zeros((0, E, E))
    secondary = None if p.secondary is None else p.secondary[src]
    origin = dict(p.origin, layers_from=L)
    return replace(p, num_layers=L_new, transitions=trans, secondary=secondary, locality=p.locality[src], origin=origin)


def _scale_experts(p: GeneratorParams, E_new: int) -> GeneratorParams:
    E = p.num_experts
    if E_new % E:
        raise ConfigError("experts", f"{E_new} is not a multiple of the fitted {E} experts")
    m = E_new // E
    # Child (e, j) is expert e * m + j; it takes 1/m of e's tokens.
    pop = np.repeat(p.popularity / m, m)
    same_child = np.eye(m)
    trans = (
        np.stack([np.kron(t, same_child) for t in p.transitions]) if p.num_layers > 1 else np.zeros((0, E_new, E_new))
    )
    secondary = None
    if p.secondary is not None:  # other choices: any child of the parent's other choice
        secondary = np.stack([np.kron(s, np.full((m, m), 1.0 / m)) for s in p.secondary])
    origin = dict(p.origin, experts_from=E)
    return replace(p, num_experts=E_new, popularity=pop, transitions=trans, secondary=secondary, origin=origin)
