"""RoutingTrace statistics on hand-made traces with known answers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lina_sim.errors import RoutingTraceError
from lina_sim.policies.path_estimator import PathEstimator, top_experts
from lina_sim.results import tables
from lina_sim.routing import stats as ts
from lina_sim.routing.traces import make_trace

META = {"model": "m", "dataset": "d", "source": "test", "license": "CC0", "made_by": "hand"}


def trace_of(top1, experts, seq_ids=None, k_extra=None):
    ex = np.asarray(top1)[:, :, None]
    if k_extra is not None:
        ex = np.concatenate([ex, np.asarray(k_extra)[:, :, None]], axis=2)
    return make_trace(ex, dict(META, num_experts=experts), seq_ids=seq_ids)


def test_skew_known_answer():
    s = ts.skew_from_counts(np.array([[4, 2, 1, 1], [2, 2, 2, 2]]))
    assert s.max_over_uniform == pytest.approx([2.0, 1.0])
    assert s.cv == pytest.approx([np.sqrt(1.5) / 2, 0.0])
    assert s.top_experts == 1  # 12.5% of 4 experts, rounded up
    assert s.top_share == pytest.approx([0.5, 0.25])
    assert ts.skew_from_counts(np.ones((1, 64))).top_experts == 8


def test_skew_of_trace_counts_all_choices():
    t = trace_of([[0], [0], [1], [2]], 4, k_extra=[[1], [1], [0], [3]])
    counts = ts.expert_counts(t.experts, 4)
    assert counts.tolist() == [[3, 3, 1, 1]]
    assert ts.compute(t).skew.max_over_uniform == pytest.approx([1.5])


def test_affinity_known_answers():
    # layer 1 = layer 0 + 1 (mod 4): perfectly predictable
    l0 = np.array([0, 1, 2, 3, 0, 0, 1, 2])
    t = trace_of(np.stack([l0, (l0 + 1) % 4], axis=1), 4)
    a = ts.affinity(t)
    assert a.accuracy == [1.0]
    assert a.chance == [3 / 8]  # expert 1 is the most popular at layer 1 (3 of 8)
    assert a.uniform == 0.25
    np.testing.assert_array_equal(ts.transition_matrices(t)[0], np.roll(np.eye(4), 1, axis=1))
    # [0,0,1,1] -> [0,1,1,1]: best predictor gets 3 of 4, same as always guessing expert 1
    t2 = trace_of([[0, 0], [0, 1], [1, 1], [1, 1]], 2)
    a2 = ts.affinity(t2)
    assert a2.accuracy == [0.75] and a2.chance == [0.75]
    m = ts.transition_matrices(t2)[0]
    np.testing.assert_allclose(m, [[0.5, 0.5], [0.0, 1.0]])


def test_repeat_rate_ignores_sequence_boundaries():
    t = trace_of([[2], [2], [3], [3], [3]], 4, seq_ids=[0, 0, 0, 1, 1])
    r = ts.repeat_rate(t)
    assert r.pairs == 3
    assert r.rate == [pytest.approx(2 / 3)]  # (2,2), (2,3) in seq 0; (3,3) in seq 1
    assert r.chance == [pytest.approx((2 / 5) ** 2 + (3 / 5) ** 2)]


def xor_trace(n=4000, seed=0):
    """Layer 2's expert is (layer 0 + layer 1) mod 4: needs a path of 2 to predict."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 4, n), rng.integers(0, 4, n)
    return trace_of(np.stack([a, b, (a + b) % 4], axis=1), 4, seq_ids=np.arange(n) // 50)


def test_path_estimator_exact_with_long_enough_path():
    t = xor_trace()
    est = PathEstimator(2, 4).fit(t.experts)
    batch = t.top1[:300]
    np.testing.assert_allclose(est.estimate(2, batch[:, :2]), np.bincount(batch[:, 2], minlength=4))
    short = PathEstimator(1, 4).fit(t.experts).distribution(2, batch[:, 1:2])
    assert np.abs(short - 0.25).max() < 0.05  # one layer back says nothing about the xor
    # an unseen path backs off to the layer's popularity
    sparse = PathEstimator(2, 8).fit(t.experts)
    np.testing.assert_allclose(sparse.distribution(2, np.array([[7, 7]]))[0][:4], 0.25, atol=0.05)
    assert PathEstimator(2, 4).fit(t.experts).estimate(0, np.zeros((5, 0), int)).sum() == pytest.approx(5)


def test_path_accuracy_needs_the_path():
    p = ts.path_accuracy(xor_trace(), lengths=(0, 1, 3), batch_tokens=200)
    assert p.first_layer == 2 and p.set_size == 2
    exact = dict(zip(p.lengths, p.exact))
    assert exact[3] == 1.0  # the path of 2 (3 capped by the layer) determines every count
    assert exact[0] < 0.7 and exact[1] < 0.7


def test_top_experts_breaks_ties_by_id():
    assert top_experts(np.array([1, 3, 3, 0]), 1) == {1}
    assert top_experts(np.array([2, 2, 2, 2]), 2) == {0, 1}


def test_path_estimator_is_pure():
    code = (
        "import sys, lina_sim.policies.path_estimator, lina_sim.routing.stats; "
        "bad = {'torch', 'simpy'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_counts_comparison(tmp_path):
    try:
        real = ts.load_real()
    except RoutingTraceError as e:  # a clone without ../shared beside it
        pytest.skip(f"real routing counts not available: {e}")
    rows = ts.real_rows(real)
    by = {(r.name, r.domain): r for r in rows}
    # the README's own summary of this data: OLMoE layer 0 from 3.0x (c4) to 7.8x (arxiv)
    assert by[("olmoe", "c4")].skew.max_over_uniform[0] == pytest.approx(3.0, abs=0.05)
    assert by[("olmoe", "arxiv")].skew.max_over_uniform[0] == pytest.approx(7.8, abs=0.05)
    assert all(r.affinity.pairs == [(0, 7), (7, 15)] for r in rows)
    assert ("olmoe", "tulu") not in by  # counts only, no cross-layer data
    # a tiny hand-made file with a known answer
    small = {
        "layers": [0, 3],
        "layer_pairs": [[0, 3]],
        "models": {
            "toy": {
                "experts": 2,
                "top_k": 1,
                "domains": {
                    "x": {
                        "expert_counts": [[3, 1], [2, 2]],
                        "expert_counts_top1": [[3, 1], [2, 2]],
                        "expert_counts_crosslayer": [[[2, 1], [0, 1]]],
                        "expert_counts_crosslayer_top1": [[[2, 1], [0, 1]]],
                    }
                },
            }
        },
    }
    (tmp_path / "r.json").write_text(json.dumps(small))
    (row,) = ts.real_rows(ts.load_real(tmp_path / "r.json"))
    assert row.skew.max_over_uniform == [1.5, 1.0]
    assert row.affinity.accuracy == [0.75] and row.affinity.chance == [0.5]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RoutingTraceError, match="bad.json"):
        ts.load_real(tmp_path / "bad.json")
    with pytest.raises(RoutingTraceError, match="unexpected layout"):
        ts.real_rows({"layers": [0]})


def test_trace_row_maps_layers_by_depth():
    rng = np.random.default_rng(0)
    t = trace_of(rng.integers(0, 4, (100, 12)), 4)
    row = ts.trace_row(t)
    assert row.layers == [0, 5, 11] and row.affinity.pairs == [(0, 5), (5, 11)]


def test_report_and_plot(tmp_path):
    t = xor_trace(n=2000)
    s = ts.compute(t, path_lengths=(0, 1, 3), batch_tokens=100)
    text = tables.format_stats(s)
    assert "busiest/uniform" in text and "path length" in text
    from plots.trace_plots import plot_trace_stats

    png = plot_trace_stats(s, tmp_path / "stats.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
