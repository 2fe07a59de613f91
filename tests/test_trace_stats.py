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
                "num_layers": 4,
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


def memorised_trace(seqs=200, seq_len=32, seed=0):
    """Each sequence routes every token along its own path (a, b) at layers 0-1 and then to
    one expert c at layer 2: a fitted path of 2 knows c for its training sequences only."""
    rng = np.random.default_rng(seed)
    codes = rng.permutation(16 * 16)[:seqs]  # distinct (a, b) per sequence
    a, b, c = codes // 16, codes % 16, rng.integers(0, 16, seqs)
    top1 = np.repeat(np.stack([a, b, c], axis=1), seq_len, axis=0)
    return trace_of(top1, 16, seq_ids=np.repeat(np.arange(seqs), seq_len))


def test_split_sequences_is_disjoint_seeded_and_whole():
    seq_ids = np.repeat(np.arange(40), 5)
    s = ts.split_sequences(seq_ids, 0.25, seed=3)
    assert (s.train_sequences, s.test_sequences, s.how) == (10, 30, "by sequence")
    train_seqs, test_seqs = set(seq_ids[s.train]), set(seq_ids[s.test])
    assert not train_seqs & test_seqs and len(train_seqs | test_seqs) == 40
    assert np.array_equal(np.sort(np.r_[s.train, s.test]), np.arange(200))
    again = ts.split_sequences(seq_ids, 0.25, seed=3)
    assert np.array_equal(again.train, s.train)
    assert not np.array_equal(ts.split_sequences(seq_ids, 0.25, seed=4).train, s.train)
    one = ts.split_sequences(np.zeros(10, np.int32), 0.3)
    assert one.train.tolist() == [0, 1, 2] and one.how.startswith("1 sequence")


def test_path_accuracy_is_scored_out_of_sample():
    p = ts.path_accuracy(memorised_trace(), lengths=(0, 2), batch_tokens=64, seed=1)
    assert p.first_layer == 2 and p.train_sequences == p.test_sequences == 100
    exact, exact_in = dict(zip(p.lengths, p.exact)), dict(zip(p.lengths, p.exact_in_sample))
    assert exact_in[2] == 1.0  # every training path was seen: in sample it is perfect
    assert exact[2] < 0.2  # held-out sequences' paths were never seen: popularity only
    assert p.batches == p.batches_in_sample == 3200 // 64  # 100 sequences of 32 tokens each side


def test_estimation_accuracy_rows_for_reproduce():
    t = memorised_trace()
    split = ts.split_sequences(t.seq_ids, 0.5, seed=0)
    rows = ts.estimation_accuracy_rows(t.experts[split.train], t.experts[split.test], 16, 1, 64, (0, 2))
    assert [(r["path_length"], r["layer"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (2, 2)]
    (m2,) = [r for r in rows if r["path_length"] == 2]
    assert m2["exact_in_sample"] == 1.0 and m2["exact"] < 0.2
    assert m2["batches"] == split.test.size // 64 and m2["batches_in_sample"] == split.train.size // 64


def test_trace_stats_reports_held_out_and_in_sample(tmp_path, capsys):
    from lina_sim.cli.main import main as cli_main

    path = memorised_trace().save(tmp_path / "mem.npz")
    assert cli_main(["trace-stats", str(path), "--path-lengths", "0", "2", "--batch-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "exact held-out  exact in-sample" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("path length"))
    row = lines[header + 2].split()  # after the popularity row
    assert row[0] == "2"
    held_out, in_sample = float(row[1]), float(row[2])
    assert in_sample == 1.0 and held_out < 0.2
    assert "fit on 100 sequences" in out and "seed 0" in out


def test_trace_row_maps_layers_at_each_real_models_depth():
    rng = np.random.default_rng(0)
    t32 = trace_of(rng.integers(0, 8, (200, 32)), 8)
    assert ts.trace_row(t32, (0, 7, 15), 32).layers == [0, 7, 15]  # Mixtral: 0, 7, 15 of 32
    assert ts.trace_row(t32, (0, 7, 15), 16).layers == [0, 14, 31]  # OLMoE: 0, 7, 15 of 16


def toy_real(depths: dict[str, int]) -> dict:
    counts = [[3, 1], [2, 2], [1, 3]]
    cross = [[[2, 1], [0, 1]], [[1, 1], [1, 1]]]
    domain = {
        "expert_counts": counts,
        "expert_counts_top1": counts,
        "expert_counts_crosslayer": cross,
        "expert_counts_crosslayer_top1": cross,
    }
    return {
        "layers": [0, 7, 15],
        "layer_pairs": [[0, 7], [7, 15]],
        "models": {k: {"experts": 2, "top_k": 1, "num_layers": n, "domains": {"x": domain}} for k, n in depths.items()},
    }


def test_compare_real_cli_maps_a_32_layer_trace(tmp_path, capsys):
    from lina_sim.cli.main import main as cli_main

    rng = np.random.default_rng(0)
    path = trace_of(rng.integers(0, 8, (600, 32)), 8, seq_ids=np.arange(600) // 60).save(tmp_path / "t32.npz")
    real = tmp_path / "real.json"
    real.write_text(json.dumps(toy_real({"deep": 32, "shallow": 16})))
    assert cli_main(["trace-stats", str(path), "--compare-real", "--real", str(real)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("model ")) + 1 :]
    assert [line.split()[:4] for line in table] == [
        ["trace", "at", "deep's", "depth"],
        ["deep", "x", "2", "1"],
        ["trace", "at", "shallow's", "depth"],
        ["shallow", "x", "2", "1"],
    ]
    assert "0,7,15/32" in table[0] and "0,7,15/32" in table[1]
    assert "0,14,31/32" in table[2] and "0,7,15/16" in table[3]
    assert "top-12.5% share" in lines[next(i for i, line in enumerate(lines) if line.startswith("model "))]


def test_compare_real_with_the_shared_data(tmp_path, capsys):
    from lina_sim.cli.main import main as cli_main

    if not ts.DEFAULT_REAL.exists():
        pytest.skip(f"real routing counts not available: {ts.DEFAULT_REAL}")
    rng = np.random.default_rng(0)
    path = trace_of(rng.integers(0, 8, (600, 32)), 8, seq_ids=np.arange(600) // 60).save(tmp_path / "t32.npz")
    assert cli_main(["trace-stats", str(path), "--compare-real"]) == 0
    out = capsys.readouterr().out
    mistral = next(line for line in out.splitlines() if line.startswith("trace at mistral's depth"))
    olmoe = next(line for line in out.splitlines() if line.startswith("trace at olmoe's depth"))
    assert "0,7,15/32" in mistral and "0->7" in mistral and "7->15" in mistral
    assert "0,14,31/32" in olmoe


def test_headers_say_what_they_measure():
    t = xor_trace(n=2000)
    text = tables.format_stats(ts.compute(t, path_lengths=(0, 1), batch_tokens=100))
    assert "top-1 share" not in text  # that read as "the first choice's share"
    assert "top-12.5% share: share of (token, choice) pairs taken by the busiest 1 of 4 experts" in text
