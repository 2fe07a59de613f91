"""Synthetic trace generator: parameters, fitting to a real trace, scaling, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lina_sim.cli.main import main as cli_main
from lina_sim.errors import ConfigError
from lina_sim.routing import stats as ts
from lina_sim.routing import traces as tr
from lina_sim.routing.generator import RoutingTraceGenerator

REPO = Path(__file__).resolve().parent.parent
REAL_TRACES = [REPO / "traces" / "moe12-top1-c4.npz", REPO / "traces" / "moe12-top2-github.npz"]


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("path", REAL_TRACES, ids=lambda p: p.stem)
def test_fitted_generator_reproduces_real_trace_within_10_percent(path):
    real = tr.load(path)
    synth = RoutingTraceGenerator.fit(real).generate(real.num_tokens, seed=7)
    assert (synth.num_layers, synth.num_experts, synth.top_k) == (real.num_layers, real.num_experts, real.top_k)
    for fn in (
        lambda t: ts.skew_from_counts(ts.expert_counts(t.experts, t.num_experts)),
        lambda t: ts.skew_from_counts(ts.expert_counts(t.experts[:, :, :1], t.num_experts)),
    ):
        want, got = fn(real), fn(synth)
        for key in ("max_over_uniform", "cv", "top_share"):
            assert rel_err(got.mean()[key], want.mean()[key]) < 0.10, key
            # and layer by layer
            errs = [rel_err(g, w) for g, w in zip(getattr(got, key), getattr(want, key))]
            assert max(errs) < 0.10, (key, errs)
    a_real, a_syn = ts.affinity(real), ts.affinity(synth)
    errs = [rel_err(g, w) for g, w in zip(a_syn.accuracy, a_real.accuracy)]
    assert max(errs) < 0.10, errs
    assert rel_err(a_syn.mean()["chance"], a_real.mean()["chance"]) < 0.10


def test_generation_is_deterministic():
    g = RoutingTraceGenerator.synthetic(8, 4, top_k=2, locality=0.3, seed=3)
    a, b, c = g.generate(3000, seed=1), g.generate(3000, seed=1), g.generate(3000, seed=2)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert a.metadata == b.metadata
    assert not np.array_equal(a.experts, c.experts)
    g2 = RoutingTraceGenerator.synthetic(8, 4, top_k=2, locality=0.3, seed=3)
    np.testing.assert_array_equal(g2.generate(3000, seed=1).experts, a.experts)


def test_top_k_choices_are_distinct():
    t = RoutingTraceGenerator.synthetic(6, 3, top_k=3, seed=0).generate(2000, seed=0)
    s = np.sort(t.experts, axis=2)
    assert (np.diff(s, axis=2) > 0).all()


def test_zipf_popularity_and_affinity_parameters():
    E = 16
    g = RoutingTraceGenerator.synthetic(E, 4, popularity="zipf", zipf_s=1.0, affinity=1.0, locality=0.0, seed=0)
    t = g.generate(40_000, seed=0)
    harmonic = (1.0 / np.arange(1, E + 1)).sum()
    skew = ts.skew_from_counts(ts.expert_counts(t.experts, E))
    # every layer keeps the Zipf popularity: busiest share is 1/H_E, i.e. E/H_E over uniform
    assert skew.max_over_uniform == pytest.approx([E / harmonic] * 4, rel=0.05)
    assert ts.affinity(t).accuracy == pytest.approx([1.0] * 3)
    flat = RoutingTraceGenerator.synthetic(E, 4, affinity=0.0, locality=0.0, seed=0).generate(40_000, seed=0)
    aff = ts.affinity(flat)
    assert aff.accuracy == pytest.approx(aff.chance, abs=0.02)
    d = RoutingTraceGenerator.synthetic(E, 3, popularity="dirichlet", dirichlet_alpha=0.3, seed=0).generate(100, seed=0)
    assert d.num_experts == E


def test_locality_is_fitted():
    g = RoutingTraceGenerator.synthetic(8, 3, affinity=0.6, locality=0.5, seq_len=64, seed=1)
    t = g.generate(20_000, seed=0)
    fitted = RoutingTraceGenerator.fit(t)
    assert fitted.params.locality == pytest.approx([0.5] * 3, abs=0.04)
    assert fitted.params.seq_len == 64
    again = fitted.generate(20_000, seed=5)
    assert ts.repeat_rate(again).rate == pytest.approx(ts.repeat_rate(t).rate, abs=0.03)


def test_scaling_layers_and_experts():
    base = RoutingTraceGenerator.synthetic(8, 4, top_k=2, affinity=0.7, seed=0)
    t = base.generate(30_000, seed=0)
    g = RoutingTraceGenerator.fit(t)
    bigger = g.scaled(num_layers=10, num_experts=32).generate(30_000, seed=1)
    assert (bigger.num_layers, bigger.num_experts, bigger.top_k) == (10, 32, 2)
    s0 = ts.skew_from_counts(ts.expert_counts(t.experts[:, :, :1], 8)).mean()
    s1 = ts.skew_from_counts(ts.expert_counts(bigger.experts[:, :, :1], 32)).mean()
    assert s1["max_over_uniform"] == pytest.approx(s0["max_over_uniform"], rel=0.15)
    assert ts.affinity(bigger).mean()["accuracy"] == pytest.approx(ts.affinity(t).mean()["accuracy"], rel=0.15)
    with pytest.raises(ConfigError, match="multiple"):
        g.scaled(num_experts=12)


def test_bad_parameters():
    with pytest.raises(ConfigError, match="affinity"):
        RoutingTraceGenerator.synthetic(8, 2, affinity=1.5)
    with pytest.raises(ConfigError, match="popularity"):
        RoutingTraceGenerator.synthetic(8, 2, popularity="pareto")
    with pytest.raises(ConfigError, match="top_k"):
        RoutingTraceGenerator.synthetic(4, 2, top_k=5)


def test_cli_trace_gen(tmp_path, capsys):
    out = tmp_path / "syn.npz"
    assert cli_main(["trace-gen", str(out), "--experts", "8", "--layers", "3", "--tokens", "500", "--seed", "2"]) == 0
    t = tr.load(out)
    assert (t.num_tokens, t.num_layers, t.num_experts) == (500, 3, 8)
    assert t.metadata["made_by"].startswith("lina-sim trace-gen")
    scaled = tmp_path / "scaled.npz"
    assert cli_main(["trace-gen", str(scaled), "--from", str(out), "--experts", "16", "--tokens", "800"]) == 0
    assert tr.load(scaled).num_experts == 16
    assert cli_main(["trace-gen", str(tmp_path / "x.npz")]) == 2
    assert "give --from" in capsys.readouterr().err
    assert cli_main(["trace-stats", str(scaled), "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()


@pytest.mark.parametrize("target", [1.5, 3.0, 6.0])
def test_skew_knob_reaches_the_target_on_every_layer(target):
    """Fitted to a real trace, ``with_skew`` sets each layer's busiest top-1 expert to
    ``target`` times its uniform share (measured on the generated trace)."""
    real = tr.load(REAL_TRACES[0])
    t = RoutingTraceGenerator.fit(real).with_skew(target).generate(real.num_tokens, seed=3)
    skew = ts.skew_from_counts(ts.expert_counts(t.experts[:, :, :1], t.num_experts))
    assert max(rel_err(s, target) for s in skew.max_over_uniform) < 0.05, skew.max_over_uniform
    assert t.metadata["made_by"].count('"skew"') == 1  # the generator's origin records it


def test_skew_knob_keeps_the_cross_layer_paths():
    """At the trace's own skew the paths are the real ones (affinity within 10%), and at
    any skew the next layer's expert is still predicted far above chance."""
    real = tr.load(REAL_TRACES[0])
    gen = RoutingTraceGenerator.fit(real)
    own = float(
        np.mean(ts.skew_from_counts(ts.expert_counts(real.experts[:, :, :1], real.num_experts)).max_over_uniform)
    )
    same = gen.with_skew(own).generate(real.num_tokens, seed=1)
    want, got = ts.affinity(real).mean(), ts.affinity(same).mean()
    assert rel_err(got["accuracy"], want["accuracy"]) < 0.10
    for target in (1.5, 6.0):
        aff = ts.affinity(gen.with_skew(target).generate(real.num_tokens, seed=1)).mean()
        assert aff["accuracy"] > 1.2 * aff["chance"], (target, aff)
    # The odds ratios of each adjacent-layer joint are kept: the log-odds of any 2x2
    # block of experts are the same before and after re-skewing.
    p0, p1 = gen.params, gen.with_skew(4.0).params
    from lina_sim.routing.generator import layer_popularities

    j0 = layer_popularities(p0)[0][:, None] * p0.transitions[0]
    j1 = layer_popularities(p1)[0][:, None] * p1.transitions[0]
    a, b, c, d = 0, 1, 2, 3
    if min(j0[a, b], j0[c, d], j0[a, d], j0[c, b]) > 1e-6:
        lo0 = np.log(j0[a, b] * j0[c, d] / (j0[a, d] * j0[c, b]))
        lo1 = np.log(j1[a, b] * j1[c, d] / (j1[a, d] * j1[c, b]))
        assert lo1 == pytest.approx(lo0, abs=1e-3)


def test_skew_knob_refuses_what_it_cannot_reach():
    gen = RoutingTraceGenerator.synthetic(8, 3, seed=0)
    for bad in (0.5, 8.0, 20.0, float("nan")):
        with pytest.raises(ConfigError, match=r"skew: .* \(allowed: a ratio in \[1, 8\)"):
            gen.with_skew(bad)
