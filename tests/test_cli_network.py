"""The collective / contention / demo commands, and their one-line errors."""

import json
import subprocess
import sys

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
        (["collective", "--preset", "nope", "--op", "allreduce"], "allowed: dgx-a100, dgx-h100, paper-testbed"),
        (["collective", "--op", "allreduce", "--algo", "tree"], "allowed: ring, hierarchical"),
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
