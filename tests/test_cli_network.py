"""The collective / contention / demo commands, and their one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lina_sim.cli.main import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lina_sim.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def test_collective_table(capsys, tmp_path):
    trace = tmp_path / "t.json"
    assert (
        main(
            [
                "collective",
                "--preset",
                "dgx-a100",
                "--nodes",
                "2",
                "--op",
                "allreduce",
                "--sizes",
                "1K:1G:32",
                "--trace",
                str(trace),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "busbw(GB/s)" in out and "algbw(GB/s)" in out
    rows = [l.split() for l in out.splitlines() if not l.startswith("#")]
    assert [int(r[0]) for r in rows] == [1024, 32768, 1048576, 33554432, 1073741824]
    busbw = [float(r[5]) for r in rows]
    assert busbw == sorted(busbw)  # bandwidth grows with size as latency amortises
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 5 * 16


def test_contention_reports_slowdown_and_bottlenecks(capsys):
    assert main(["contention", "--preset", "paper-testbed", "--size", "16M"]) == 0
    out = capsys.readouterr().out
    assert "slowdown x" in out and "nic_" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["collective", "--preset", "nope", "--op", "allreduce"],
            "allowed: a100-pcie-nvlink-pairs, dgx-a100, dgx-h100, dgx-h100-superpod, paper-testbed",
        ),
        (["collective", "--op", "allreduce", "--algo", "nccl"], "allowed: auto, ring, tree, nvls, hierarchical"),
        (["collective", "--op", "alltoall"], "invalid choice"),
        (["collective", "--op", "allreduce", "--sizes", "-4K"], "--sizes"),
        (["collective", "--op", "allreduce", "--sizes", "12Q"], "--sizes"),
        (["collective", "--op", "allreduce", "--nodes", "0"], "--nodes"),
        (["contention", "--size", "abc"], "--size"),
    ],
)
def test_bad_input_gives_one_line_error(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 4  # argparse prints usage + one error line


def test_bad_preset_file_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\ngpus_per_node: 4\ngpu: {name: g, peak_flops: {bf16: 1e12}, hbm_bandwidth: 1e12, "
        "memory_bytes: 1e9}\nnvlink: {bandwidth: 1e9}\npcie: {bandwidth: 1e9}\nnic: {bandwidth: -1}\n"
    )
    r = run_cli("collective", "--preset", str(bad), "--op", "allreduce")
    assert r.returncode == 2 and "bad.nic.bandwidth" in r.stderr and "Traceback" not in r.stderr


# -- collective --compare: measured tables against the simulator -----------------------------
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nccl-measured"


def test_compare_a_shipped_nccl_tests_file(capsys, tmp_path):
    if not SHARED.is_dir():
        pytest.skip(f"no measured data beside the project ({SHARED})")
    measured = SHARED / "nccl-tests" / "h100-2x8-allreduce-3.txt"
    out = tmp_path / "cmp"
    assert main(["collective", "--compare", str(measured), "--preset", "dgx-h100", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    header = next(l for l in text.splitlines() if "measured(us)" in l)
    assert header.split()[1:] == ["size(B)", "measured(us)", "predicted(us)", "error", "algo"]
    rows = [l.split() for l in text.splitlines() if l and l[0] == " " and l.split()[0].isdigit()]
    # The run forced NCCL_ALGO=Ring on its command line, so the ring is simulated, with
    # NCCL's protocol choice per size: "ring (ring LL128)".
    assert len(rows) == 14 and all(r[3].endswith("%") and r[4] == "ring" and r[5] == "(ring" for r in rows)
    assert "16 ranks = 2 node(s) x 8" in text and "simulated on dgx-h100 2x8" in text
    assert "median |error| (rows): <=1MB" in text
    summary = text.splitlines()[text.splitlines().index(next(l for l in text.splitlines() if "per size class" in l)) :]
    assert all(c in summary[1] for c in ("<=1MB", "1-64MB", ">=64MB")) and "h100-2x8-allreduce-3" in summary[2]
    import pandas as pd

    cmp = pd.read_csv(out / "comparison.csv")
    assert {"time_s", "predicted_s", "error_pct", "algo", "size_class"} <= set(cmp.columns) and len(cmp) == 14
    assert len(pd.read_csv(out / "summary.csv")) == 1
    assert (out / "h100-2x8-allreduce-3.png").stat().st_size > 0


def _measured(tmp_path, ranks_per_node: int, nodes: int) -> Path:
    hosts = "".join(
        f"#  Rank {n * ranks_per_node + l} Pid 1 on host{n} device {l} [0x1] GPU\n"
        for n in range(nodes)
        for l in range(ranks_per_node)
    )
    path = tmp_path / f"m-{nodes}x{ranks_per_node}.txt"
    path.write_text(
        f"# Collective test starting: all_reduce_perf\n{hosts}  67108864  16777216  float  sum  -1  900.0  1  1  0\n"
    )
    return path


def test_compare_ten_single_gpu_nodes_with_and_without_gpus_per_node(tmp_path):
    m = _measured(tmp_path, 1, 10)
    a = run_cli("collective", "--compare", str(m), "--preset", "dgx-h100")
    b = run_cli("collective", "--compare", str(m), "--preset", "dgx-h100", "--gpus-per-node", "1")
    assert a.returncode == b.returncode == 0
    row = lambda r: next(l for l in r.stdout.splitlines() if l.strip().startswith("67108864")).split()  # noqa: E731
    assert row(a)[:4] == row(b)[:4]  # the first GPU of each DGX is a 1-GPU node
    assert "simulated on dgx-h100 10x8" in a.stdout and "simulated on dgx-h100 10x1" in b.stdout


def test_sendrecv_op():
    r = run_cli("collective", "--preset", "dgx-a100", "--nodes", "2", "--op", "sendrecv", "--sizes", "64M")
    assert r.returncode == 0 and "sendrecv (p2p) on dgx-a100" in r.stdout


@pytest.mark.parametrize(
    "make,extra,needle",
    [
        (lambda p: _measured(p, 8, 1), ["--gpus-per-node", "4"], "8 ranks (1 node(s) x 8) do not fit dgx-h100"),
        (lambda p: _measured(p, 8, 2), ["--nodes", "1"], "with 8 GPUs per node and 1 node(s)"),
        (lambda p: _measured(p, 1, 2), ["--gpus-per-node", "9"], "--gpus-per-node: got 9; a dgx-h100 node has 8"),
        (lambda p: _measured(p, 1, 2), ["--gpus-per-node", "0"], "--gpus-per-node: must be >= 1"),
        (lambda p: _measured(p, 1, 2), ["--op", "allreduce"], "--op: not with --compare"),
        (lambda p: _measured(p, 1, 2), ["--algo", "direct"], "allreduce has no algorithm 'direct'"),
        (lambda p: p / "absent.txt", [], "absent.txt: file not found"),
    ],
)
def test_compare_bad_input_is_one_line(tmp_path, make, extra, needle):
    path = make(tmp_path)
    r = run_cli("collective", "--compare", str(path), "--preset", "dgx-h100", *extra)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["collective"], "--op: required (or --compare FILE ...)"),
        (["collective", "--op", "allreduce", "--out", "x"], "--out: only with --compare"),
        (["contention", "--gpus-per-node", "two"], "--gpus-per-node: not an integer"),
    ],
)
def test_collective_flags_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
