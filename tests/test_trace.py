"""RoutingTrace format: round trips, slicing, concatenation, importers, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lina_sim.cli.main import main as cli_main
from lina_sim.errors import LinaSimError, RoutingTraceError
from lina_sim.routing import traces as tr

META = {"model": "m", "dataset": "d", "source": "test", "license": "CC0", "made_by": "hand"}


def make(tokens=40, layers=3, k=2, experts=6, probs=True, seed=0) -> tr.Trace:
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.permutation(experts)[:k] for _ in range(layers)]) for _ in range(tokens)])
    p = rng.random((tokens, layers, k)) if probs else None
    return tr.make_trace(ex, dict(META, num_experts=experts), seq_ids=np.arange(tokens) // 10, probs=p)


def test_round_trip_with_and_without_probs(tmp_path):
    for probs in (True, False):
        t = make(probs=probs)
        path = t.save(tmp_path / f"t{probs}.npz")
        u = tr.load(path)
        assert u.experts.dtype == np.int16 and u.seq_ids.dtype == np.int32
        np.testing.assert_array_equal(u.experts, t.experts)
        np.testing.assert_array_equal(u.seq_ids, t.seq_ids)
        assert u.metadata == t.metadata
        if probs:
            assert u.probs.dtype == np.float16
            np.testing.assert_array_equal(u.probs, t.probs)
        else:
            assert u.probs is None
        assert u.origin == str(path)
        assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_slices_and_concatenate():
    t = make(tokens=40, layers=4)
    s = t.slice_tokens(5, 25)
    assert s.num_tokens == 20 and s.num_layers == 4
    np.testing.assert_array_equal(s.experts, t.experts[5:25])
    lay = t.slice_layers(1, 3)
    assert lay.num_layers == 2 and lay.probs.shape == (40, 2, 2)
    np.testing.assert_array_equal(lay.top1, t.experts[:, 1:3, 0])
    c = tr.concatenate([t, t.slice_tokens(0, 20)])
    assert c.num_tokens == 60
    # sequences of the two parts stay distinct even though their ids collided
    assert np.unique(c.seq_ids).size == np.unique(t.seq_ids).size + 2
    with pytest.raises(RoutingTraceError, match="num_experts"):
        tr.concatenate([t, make(experts=8)])
    with pytest.raises(RoutingTraceError, match="layers"):
        tr.concatenate([t, lay])


def test_import_jsonl(tmp_path):
    # two sequences with string ids, records out of order, token_pos spelling in one seq
    recs = []
    want = {("a", 0): [[1, 2], [3, 0]], ("a", 1): [[2, 1], [0, 3]], ("b", 0): [[3, 1], [1, 2]]}
    for (seq, tok), layers in want.items():
        for layer, experts in enumerate(layers):
            key = "token_pos" if seq == "b" else "token_idx"
            recs.append({"problem_id": seq, key: tok, "layer": layer, "experts": experts, "gating_probs": [0.6, 0.3]})
    recs.reverse()
    path = tmp_path / "routing.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    t = tr.load(path)
    assert (t.num_tokens, t.num_layers, t.top_k) == (3, 2, 2)
    assert t.num_experts == 4
    # sequences in order of first appearance ("b" comes first after the reversal)
    np.testing.assert_array_equal(t.experts[0], want[("b", 0)])
    np.testing.assert_array_equal(t.experts[1], want[("a", 0)])
    np.testing.assert_array_equal(t.experts[2], want[("a", 1)])
    assert t.seq_ids.tolist() == [0, 1, 1]
    np.testing.assert_allclose(t.probs[..., 0], 0.6, rtol=1e-3)
    t2 = tr.import_jsonl(path, num_experts=16)
    assert t2.num_experts == 16


def test_import_npy_both_layouts(tmp_path):
    a2 = np.array([[0, 1, 2], [3, 1, 0], [2, 2, 2], [1, 0, 3]], dtype=np.int64)
    np.save(tmp_path / "two.npy", a2)
    t = tr.load(tmp_path / "two.npy")
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_experts) == (4, 3, 1, 4)
    np.testing.assert_array_equal(t.top1, a2)
    a3 = np.stack([a2, (a2 + 1) % 4], axis=2).astype(np.int32)
    np.save(tmp_path / "three.npy", a3)
    t3 = tr.import_npy(tmp_path / "three.npy", num_experts=8, tokens_per_seq=2)
    assert t3.top_k == 2 and t3.num_experts == 8
    assert t3.seq_ids.tolist() == [0, 0, 1, 1]


# ---- bad input: every case names the file and the problem -------------------------------------
def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _arrays(t: tr.Trace) -> dict:
    return {"experts": t.experts, "seq_ids": t.seq_ids, "metadata": np.array(json.dumps(t.metadata))}


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("dtype", lambda a: a.update(experts=a["experts"].astype(np.float32)), "int16"),
        ("shape", lambda a: a.update(experts=a["experts"][:, :, 0]), "shape"),
        ("seqlen", lambda a: a.update(seq_ids=a["seq_ids"][:-1]), "seq_ids"),
        ("range", lambda a: a["experts"].__setitem__((3, 1, 0), 6), "out of range"),
        ("negative", lambda a: a["experts"].__setitem__((0, 0, 1), -1), "out of range"),
        ("meta", lambda a: a.update(metadata=np.array(json.dumps({"model": "m"}))), "missing metadata"),
        ("json", lambda a: a.update(metadata=np.array("{not json")), "not valid JSON"),
        ("noarray", lambda a: a.pop("seq_ids"), "missing array 'seq_ids'"),
        ("probs", lambda a: a.update(probs=np.zeros((2, 2), np.float16)), "probs"),
        ("topk", lambda a: a.update(metadata=np.array(json.dumps(dict(META, num_experts=6, top_k=3)))), "top_k"),
    ],
)
def test_malformed_npz(tmp_path, case, change, message):
    arrays = _arrays(make(probs=False))
    change(arrays)
    path = _write_npz(tmp_path / f"{case}.npz", **arrays)
    with pytest.raises(RoutingTraceError, match=message) as e:
        tr.load(path)
    assert str(path) in str(e.value)


def test_truncated_and_garbage_files(tmp_path):
    path = make().save(tmp_path / "good.npz")
    data = path.read_bytes()
    for name, content in (("cut.npz", data[: len(data) // 2]), ("garbage.npz", b"hello world"), ("empty.npz", b"")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(RoutingTraceError, match="truncated or corrupt") as e:
            tr.load(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(RoutingTraceError, match="no such file"):
        tr.load(tmp_path / "missing.npz")


def test_malformed_jsonl_and_npy(tmp_path):
    good = {"problem_id": 1, "token_idx": 0, "layer": 0, "experts": [1], "gating_probs": [0.9]}
    cases = {
        "trunc.jsonl": json.dumps(good) + "\n" + json.dumps(dict(good, token_idx=1))[:20],
        "nolayer.jsonl": json.dumps({k: v for k, v in good.items() if k != "layer"}),
        "missing.jsonl": json.dumps(good)
        + "\n"
        + json.dumps(dict(good, layer=1))
        + "\n"
        + json.dumps(dict(good, token_idx=1)),
        "k.jsonl": json.dumps(good) + "\n" + json.dumps(dict(good, token_idx=1, experts=[1, 2])),
        "empty.jsonl": "",
    }
    messages = {
        "trunc.jsonl": "line 2: invalid JSON",
        "nolayer.jsonl": "missing field layer",
        "missing.jsonl": "ragged trace: 1 of 2 tokens lack a record .* at layer 1",
        "k.jsonl": "earlier records have 1",
        "empty.jsonl": "no records",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(RoutingTraceError, match=messages[name]) as e:
            tr.load(path)
        assert str(path) in str(e.value)
    np.save(tmp_path / "float.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "four.npy", np.zeros((3, 2, 1, 1), np.int64))
    for name, message in (("float.npy", "integer"), ("four.npy", "shape")):
        with pytest.raises(RoutingTraceError, match=message) as e:
            tr.load(tmp_path / name)
        assert name in str(e.value)


def test_expert_count_must_match_scenario(tmp_path):
    t = tr.load(make(experts=6).save(tmp_path / "six.npz"))
    tr.check_num_experts(t, 6)
    with pytest.raises(RoutingTraceError, match="6 experts but the scenario expects 8") as e:
        tr.check_num_experts(t, 8)
    assert "six.npz" in str(e.value)
    assert isinstance(e.value, LinaSimError) and isinstance(e.value, ValueError)


def test_cli_reports_bad_trace_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert cli_main(["trace-stats", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and str(bad) in err and "truncated or corrupt" in err
