"""Routing-trace input held to account: every bad trace is refused in one line naming
where it is wrong (file and line, or token and layer), through the reader and through
the real ``lina-sim trace-stats`` entry point; JSON arrays, gzip and ragged dumps are read."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lina_sim.cli.main import main as cli_main
from lina_sim.errors import RoutingTraceError
from lina_sim.routing import traces as tr

META = {"model": "m", "dataset": "d", "source": "test", "license": "CC0", "made_by": "hand"}


def records(tokens: int = 4, layers: int = 3, seqs: int = 1) -> list[dict]:
    """Top-2 of 8 experts, gate probabilities, ``seqs`` sequences of ``tokens`` tokens;
    one record per (sequence, token, layer), in that order (line = index + 1)."""
    return [
        {
            "seq_id": s,
            "token_idx": t,
            "layer": l,
            "experts": [(t + l + s) % 8, (t + l + s + 1) % 8],
            "gating_probs": [0.6, 0.3],
        }
        for s in range(seqs)
        for t in range(tokens)
        for l in range(layers)
    ]


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def edited(change: Callable[[list[dict]], None]) -> list[dict]:
    recs = records()
    change(recs)
    return recs


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli_main(["trace-stats", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(capsys, path: Path, where: str, *extra: str) -> None:
    """Exit 2, one line on stderr naming the file and ``where``, no traceback."""
    rc, out, err = run_cli(capsys, str(path), *extra)
    assert rc == 2, out
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and where in err, err


# Record index 5 is line 6: token 1, layer 2.
JSONL_CASES = {
    "id-at-count": (lambda r: r[5].update(experts=[8, 1]), ["--experts", "8"], "line 6: expert id 8 out of range"),
    "id-negative": (lambda r: r[5].update(experts=[-1, 1]), [], "line 6: expert id -1 out of range"),
    "duplicate": (lambda r: r[5].update(experts=[2, 2]), [], "line 6: expert 2 chosen twice"),
    "nan-prob": (lambda r: r[5].update(gating_probs=[float("nan"), 0.3]), [], "line 6: gate probability nan"),
    "negative-prob": (lambda r: r[5].update(gating_probs=[-0.1, 0.3]), [], "line 6: gate probability -0.1"),
    "prob-above-1": (lambda r: r[5].update(gating_probs=[1.5, 0.3]), [], "line 6: gate probability 1.5"),
    "missing-layer": (
        lambda r: r.__setitem__(slice(None), [x for x in r if x["layer"] != 1]),
        [],
        "layer 1 has no records",
    ),
    "ragged": (lambda r: r.pop(5), [], "ragged trace: 1 of 4 tokens lack a record"),
    "seq-field": (lambda r: None, ["--seq-field", "request"], "line 1: missing sequence id field 'request'"),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_bad_jsonl_refused_naming_the_line(tmp_path, capsys, case):
    change, extra, where = JSONL_CASES[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", edited(change))
    assert_one_line_error(capsys, path, where, *extra)
    with pytest.raises(RoutingTraceError, match=where) as e:
        tr.load(
            path,
            num_experts=8 if "--experts" in extra else None,
            seq_field="request" if "--seq-field" in extra else None,
        )
    assert str(path) in str(e.value)


def test_ragged_trace_names_the_first_gap(tmp_path):
    path = write_jsonl(tmp_path / "ragged.jsonl", edited(lambda r: r.pop(5)))
    with pytest.raises(RoutingTraceError, match=r"first: token 1 of sequence 0 at layer 2"):
        tr.load(path)


def test_id_at_or_above_the_count_without_experts_is_flagged_as_inferred(tmp_path, capsys):
    path = write_jsonl(tmp_path / "id8.jsonl", edited(lambda r: r[5].update(experts=[8, 1])))
    rc, out, _ = run_cli(capsys, str(path))
    assert rc == 0
    assert "of 9 experts (expert count inferred as largest id + 1: pass --experts" in out.splitlines()[0]
    assert tr.load(path).metadata["num_experts_inferred"] is True


def npz_of(tmp_path: Path, name: str, experts: np.ndarray, probs: np.ndarray | None = None, **meta) -> Path:
    """An .npz written directly (bypassing the checked constructor), as a foreign tool would."""
    arrays = {
        "experts": experts.astype(np.int16),
        "seq_ids": np.zeros(experts.shape[0], np.int32),
        "metadata": np.array(json.dumps(dict(META, num_experts=8, top_k=experts.shape[2], **meta))),
    }
    if probs is not None:
        arrays["probs"] = probs.astype(np.float16)
    path = tmp_path / name
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def good_arrays(tokens: int = 6, layers: int = 3) -> tuple[np.ndarray, np.ndarray]:
    t, l = np.meshgrid(np.arange(tokens), np.arange(layers), indexing="ij")
    experts = np.stack([(t + l) % 8, (t + l + 1) % 8], axis=2)
    return experts, np.full(experts.shape, 0.4)


@pytest.mark.parametrize(
    "case, where",
    [
        ("id-at-count", "expert id 8 out of range [0, 8) at token 3, layer 1"),
        ("duplicate", "token 3, layer 1: the same expert chosen twice"),
        ("nan-prob", "token 3, layer 1: gate probability nan"),
        ("negative-prob", "token 3, layer 1: gate probability -0.5"),
    ],
)
def test_bad_npz_refused_naming_token_and_layer(tmp_path, capsys, case, where):
    experts, probs = good_arrays()
    if case == "id-at-count":
        experts[3, 1, 0] = 8
    elif case == "duplicate":
        experts[3, 1, 1] = experts[3, 1, 0]
    else:
        probs[3, 1, 1] = np.nan if case == "nan-prob" else -0.5
    path = npz_of(tmp_path, f"{case}.npz", experts, probs)
    assert_one_line_error(capsys, path, where)
    with pytest.raises(RoutingTraceError, match=where.replace("[", r"\[").replace(")", r"\)")):
        tr.load(path)


def test_experts_option_must_agree_with_npz_metadata(tmp_path, capsys):
    path = npz_of(tmp_path, "eight.npz", good_arrays()[0])
    assert_one_line_error(
        capsys, path, "given 16 experts but the trace's metadata says num_experts=8", "--experts", "16"
    )
    assert_one_line_error(capsys, path, "applies only to JSON records", "--seq-field", "request")
    rc, out, _ = run_cli(capsys, str(path), "--experts", "8", "--model", "olmoe-1b-7b")
    assert rc == 0 and out.startswith(f"{path}: olmoe-1b-7b on d:")


def test_json_array_and_gzip_are_read(tmp_path, capsys):
    recs = records(tokens=5, seqs=2)
    want = tr.load(write_jsonl(tmp_path / "plain.jsonl", recs))
    (tmp_path / "array.json").write_text(json.dumps(recs, indent=1))
    with gzip.open(tmp_path / "lines.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    with gzip.open(tmp_path / "array.json.gz", "wt") as f:
        json.dump(recs, f)
    (tmp_path / "trace.npz.gz").write_bytes(gzip.compress(want.save(tmp_path / "t.npz").read_bytes()))
    np.save(tmp_path / "ids.npy", want.experts)
    (tmp_path / "ids.npy.gz").write_bytes(gzip.compress((tmp_path / "ids.npy").read_bytes()))
    for name in ("array.json", "lines.jsonl.gz", "array.json.gz", "trace.npz.gz", "ids.npy.gz"):
        got = tr.load(tmp_path / name)
        np.testing.assert_array_equal(got.experts, want.experts)
        rc, out, err = run_cli(capsys, str(tmp_path / name), "--experts", "8")
        assert rc == 0, err
        assert out.startswith(f"{tmp_path / name}: ") and "10 tokens" in out.splitlines()[0]
    assert tr.load(tmp_path / "lines.jsonl.gz").metadata["dataset"] == "lines"
    assert tr.load(tmp_path / "array.json").seq_ids.tolist() == [0] * 5 + [1] * 5


def test_bad_json_array_and_gzip_name_the_problem(tmp_path, capsys):
    recs = records()
    recs[2] = {"layer": 2, "experts": [1, 2]}
    (tmp_path / "array.json").write_text(json.dumps(recs))
    assert_one_line_error(capsys, tmp_path / "array.json", "record 3: missing field token_idx or token_pos")
    (tmp_path / "cut.json").write_text(json.dumps(records())[:-40])
    assert_one_line_error(capsys, tmp_path / "cut.json", "invalid JSON array, truncated or corrupt")
    data = gzip.compress(json.dumps(records()).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert_one_line_error(capsys, tmp_path / "cut.jsonl.gz", "truncated or corrupt gzip")
    write_jsonl(tmp_path / "plain.jsonl.gz", records())
    assert_one_line_error(capsys, tmp_path / "plain.jsonl.gz", "named .gz but not gzip-compressed")
    (tmp_path / "trace.bin").write_bytes(b"\x00\x01binary")
    assert_one_line_error(capsys, tmp_path / "trace.bin", "unknown trace format (allowed: .npz, .jsonl")


def test_ragged_trace_read_with_drop_incomplete(tmp_path, capsys):
    recs = records(tokens=4, seqs=2)
    recs = [r for r in recs if not (r["seq_id"] == 1 and r["token_idx"] in (0, 3) and r["layer"] == 2)]
    path = write_jsonl(tmp_path / "ragged.jsonl", recs)
    with pytest.raises(RoutingTraceError, match="ragged trace: 2 of 8 tokens"):
        tr.load(path)
    t = tr.load(path, drop_incomplete=True)
    assert t.num_tokens == 6 and t.metadata["dropped_incomplete"] == 2
    assert t.seq_ids.tolist() == [0, 0, 0, 0, 1, 1]
    np.testing.assert_array_equal(t.experts[4, 0], [2, 3])  # sequence 1's token 1 at layer 0
    rc, out, _ = run_cli(capsys, str(path), "--drop-incomplete")
    assert rc == 0 and "6 tokens in 2 sequences" in out and "dropped 2 incomplete tokens" in out


def test_seq_field_option_names_the_sequence_id(tmp_path, capsys):
    recs = [dict(r, request=f"r{r['token_idx'] // 2}") for r in records()]
    path = write_jsonl(tmp_path / "req.jsonl", recs)
    assert tr.load(path).seq_ids.tolist() == [0, 0, 0, 0]  # the seq_id field: one sequence
    assert tr.load(path, seq_field="request").seq_ids.tolist() == [0, 0, 1, 1]
    rc, out, _ = run_cli(capsys, str(path), "--seq-field", "request", "--model", "toy")
    assert rc == 0 and out.startswith(f"{path}: toy on req: 4 tokens in 2 sequences")


@pytest.mark.parametrize(
    "args, where",
    [
        (["--experts", "0"], "--experts: must be >= 1"),
        (["--train-fraction", "1.5"], "--train-fraction: must lie strictly between 0 and 1"),
        (["--path-lengths", "0", "-1"], "--path-lengths: must be >= 0"),
    ],
)
def test_bad_options_refused_in_one_line(tmp_path, capsys, args, where):
    path = write_jsonl(tmp_path / "ok.jsonl", records())
    rc, _, err = run_cli(capsys, str(path), *args)
    assert rc == 2 and err.count("\n") == 1 and where in err, err
