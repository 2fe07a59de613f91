"""Measured collective tables: every shipped file read into the tidy table, pasted text
with junk in it, bad inputs as one line naming file:line and the field, nccl-tests'
sendrecv on the simulator, and measured tables shaped onto a preset."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import simpy

from lina_sim.errors import ConfigError
from lina_sim.experiments.measured import (
    MEASURED_COLUMNS,
    READERS,
    measured_tables,
    read_measured,
    table_config,
)
from lina_sim.experiments.microbench import (
    collective_sweep,
    compare_measured,
    comparison_summary,
    shape_for,
    size_class,
    with_gpus_per_node,
)
from lina_sim.hardware.spec import load_preset
from lina_sim.hardware.topology import Topology
from lina_sim.network.collectives import Collectives
from lina_sim.network.fluid import FluidNetwork

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nccl-measured"


@pytest.fixture
def measured() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"no measured data beside the project ({SHARED})")
    return SHARED


# file -> [(table label, collective, ranks, ranks per node, nodes, rows)]
SHIPPED = {
    "nccl-tests/a100-1x8-allreduce-1.txt": [("a100-1x8-allreduce-1", "allreduce", 8, 8, 1, 28)],
    "nccl-tests/h100-10x1-allreduce-1.txt": [("h100-10x1-allreduce-1", "allreduce", 10, 1, 10, 10)],
    "nccl-tests/h100-1x8-allreduce-1.txt": [("h100-1x8-allreduce-1", "allreduce", 8, 8, 1, 10)],
    "nccl-tests/h100-1x8-alltoall-1.txt": [("h100-1x8-alltoall-1", "all_to_all", 8, 8, 1, 10)],
    "nccl-tests/h100-1x8-sendrecv-1.txt": [("h100-1x8-sendrecv-1", "sendrecv", 8, 8, 1, 10)],
    "nccl-tests/h100-2x8-allreduce-3.txt": [("h100-2x8-allreduce-3", "allreduce", 16, 8, 2, 14)],
    "nccl-tests/h100-2x8-alltoall-1.txt": [("h100-2x8-alltoall-1", "all_to_all", 16, 8, 2, 3)],
    "nccl-tests/h100-2x8-sendrecv-1.txt": [("h100-2x8-sendrecv-1", "sendrecv", 16, 8, 2, 3)],
    "nccl-tests/h100-8x8-allreduce-1.txt": [("h100-8x8-allreduce-1", "allreduce", 64, 8, 8, 14)],
    "vidur/a100_dgx_send_recv.csv": [
        ("a100_dgx_send_recv[2x1]", "sendrecv", 2, 1, 2, 994),
        ("a100_dgx_send_recv[1x2]", "sendrecv", 2, 2, 1, 994),
    ],
    "vidur/a100_pairwise_nvlink_all_reduce.csv": [
        ("a100_pairwise_nvlink_all_reduce[1x2]", "allreduce", 2, 2, 1, 2248),
        ("a100_pairwise_nvlink_all_reduce[1x4]", "allreduce", 4, 4, 1, 2248),
    ],
    "vidur/a100_pairwise_nvlink_send_recv.csv": [
        ("a100_pairwise_nvlink_send_recv[2x1]", "sendrecv", 2, 1, 2, 994),
        ("a100_pairwise_nvlink_send_recv[1x2]", "sendrecv", 2, 2, 1, 994),
    ],
    "vidur/h100_dgx_all_reduce.csv": [
        ("h100_dgx_all_reduce[1x8]", "allreduce", 8, 8, 1, 994),
        ("h100_dgx_all_reduce[1x2]", "allreduce", 2, 2, 1, 994),
        ("h100_dgx_all_reduce[1x4]", "allreduce", 4, 4, 1, 994),
    ],
    "vidur/h100_dgx_send_recv.csv": [
        ("h100_dgx_send_recv[2x1]", "sendrecv", 2, 1, 2, 994),
        ("h100_dgx_send_recv[1x2]", "sendrecv", 2, 2, 1, 994),
    ],
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_file_reads(measured, name):
    path = measured / name
    df = read_measured(path)
    assert list(df.columns) == list(MEASURED_COLUMNS)
    got = [
        (label, c.collective, c.ranks, c.ranks_per_node, c.nodes, len(t))
        for label, t in measured_tables([df])
        for c in [table_config(label, t)]
    ]
    assert got == SHIPPED[name]
    assert (df["time_s"] > 0).all() and np.isfinite(df["time_s"]).all()
    assert (df["nodes"] * df["ranks_per_node"] == df["ranks"]).all()
    # Each row points at its own line: the line starts with (nccl-tests) or holds (CSV) its size.
    lines = path.read_text().splitlines()
    for r in df.itertuples():
        fields = lines[r.line - 1].replace(",", " ").split()
        assert str(r.size_bytes) in fields


def test_nccl_tests_values_and_header(measured):
    df = read_measured(measured / "nccl-tests/h100-10x1-allreduce-1.txt")
    first = df.iloc[0]
    assert first["format"] == "nccl-tests" and first["nccl_version"] == "2.29.2" and first["dtype"] == "double"
    assert first["size_bytes"] == 33554432
    assert first["time_s"] == pytest.approx(1405.25e-6) and first["time_inplace_s"] == pytest.approx(1406.35e-6)
    assert (first["algbw_GBps"], first["busbw_GBps"]) == (23.88, 42.98)
    # No "Collective test starting" line: the op comes from the command line in the paste.
    a100 = read_measured(measured / "nccl-tests/a100-1x8-allreduce-1.txt")
    assert set(a100["collective"]) == {"allreduce"} and a100["nccl_version"].iloc[0] == ""


def test_vidur_median_in_seconds(measured):
    df = read_measured(measured / "vidur/h100_dgx_all_reduce.csv")
    first = df.iloc[0]
    assert first["format"] == "vidur" and first["line"] == 2
    assert first["time_s"] == pytest.approx(0.037e-3)  # the median column, ms -> s
    assert math.isnan(first["algbw_GBps"]) and math.isnan(first["time_inplace_s"])


PASTED = """\
user@login01:~/nccl-tests$ mpirun -np 4 -N 2 -H a:2,b:2 ./build/alltoall_perf -b 1M -e 4M -f 2 -g 1
Warning: Permanently added 'b' (ED25519) to the list of known hosts.
# nThread 1 nGpus 1 minBytes 1048576 maxBytes 4194304 step: 2(factor) warmup iters: 5 iters: 20 agg iters: 1
#
# Using devices
#  Rank  0 Group  0 Pid  111 on nodeA device  0 [0x07] NVIDIA A100-SXM4-80GB
#  Rank  1 Group  0 Pid  112 on nodeA device  1 [0x0b] NVIDIA A100-SXM4-80GB
#  Rank  2 Group  0 Pid  211 on nodeB device  0 [0x07] NVIDIA A100-SXM4-80GB
#  Rank  3 Group  0 Pid  212 on nodeB device  1 [0x0b] NVIDIA A100-SXM4-80GB
nodeA:111:111 [0] NCCL INFO NCCL version 2.18.3+cuda12.2
nodeA:111:150 [0] NCCL INFO Channel 00/02 :    0   1   2   3
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
           0             0     float    none      -1     0.21    0.00    0.00      0     0.20    0.00    0.00    N/A
     1048576         65536     float    none      -1    120.5    8.70    6.53      0    119.9    8.75    6.56    N/A
     2097152        131072     float    none      -1    201.3   10.42    7.81      0    200.7   10.45    7.84    N/A
-f 2 -g 1
     4194304        262144     float    none      -1    370.0   11.34    8.50      0    371.2   11.30    8.47    N/A
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 7.61
user@login01:~/nccl-tests$
"""


def test_pasted_snippet_with_junk_lines(tmp_path):
    path = tmp_path / "paste.log"
    path.write_text(PASTED)
    df = read_measured(path)
    assert list(df["size_bytes"]) == [1048576, 2097152, 4194304]  # the 0-byte row times only a launch
    assert set(df["collective"]) == {"all_to_all"}  # from the command line
    assert {(r.ranks, r.ranks_per_node, r.nodes) for r in df.itertuples()} == {(4, 2, 2)}  # 2 hosts
    assert df["nccl_version"].iloc[0] == "2.18.3" and list(df["line"]) == [17, 18, 20]
    assert df["time_s"].iloc[2] == pytest.approx(370.0e-6)


def test_rows_pasted_without_their_header(tmp_path):
    """Fields counted: an old nccl-tests row (redop, no root) and one with neither."""
    rank_lines = "#  Rank  0 Pid 1 on h0 device 0 [0x1] GPU\n#  Rank  1 Pid 2 on h0 device 1 [0x2] GPU\n"
    path = tmp_path / "allreduce-old.txt"
    path.write_text(rank_lines + "  1048576  262144  float  sum  90.1  11.6  11.6  0e+00  89.7  11.7  11.7  0e+00\n")
    df = read_measured(path)
    # The faster of the out-of-place (90.1 us) and in-place (89.7 us) columns.
    assert (df["collective"].iloc[0], df["ranks"].iloc[0], df["time_s"].iloc[0]) == ("allreduce", 2, 89.7e-6)
    path.write_text(rank_lines + "  1048576  262144  float  90.1  11.6  11.6  0\n")
    assert math.isnan(read_measured(path)["time_inplace_s"].iloc[0])


def _text(tmp_path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


NCCL_HEAD = """\
# Collective test starting: all_reduce_perf
#  Rank  0 Group  0 Pid 1 on h0 device  0 [0x1] GPU
#  Rank  1 Group  0 Pid 2 on h0 device  1 [0x2] GPU
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
"""
VIDUR_HEAD = (
    ",time_stats.all_reduce.min,time_stats.all_reduce.max,time_stats.all_reduce.mean,time_stats.all_reduce.median,"
    "time_stats.all_reduce.std,rank,num_workers,size,collective,devices_per_node,max_devices_per_node\n"
)


@pytest.mark.parametrize(
    "name,body,needle",
    [
        ("empty.txt", "", "empty.txt:1: empty file"),
        ("blank.txt", "\n  \n", "blank.txt:1: empty file"),
        ("nodata.txt", NCCL_HEAD + "# Out of bounds values : 0 OK\n", "nodata.txt:5: no data rows"),
        (
            "garbled.txt",
            NCCL_HEAD + "  1048576  262144  float  sum  -1  90.1  11.6  11.6  0  89.7\n",
            "garbled.txt:5: a data row with 10 fields",
        ),
        (
            "badnum.txt",
            NCCL_HEAD + "  1048576  262144  float  sum  -1  9o.1  11.6  11.6  0  89.7  11.7  11.7  0\n",
            "badnum.txt:5: out-of-place time (us): must be a number, got '9o.1'",
        ),
        (
            "nan.txt",
            NCCL_HEAD + "  1048576  262144  float  sum  -1  nan  11.6  11.6  0  89.7  11.7  11.7  0\n",
            "nan.txt:5: out-of-place time (us): must be a finite number, got nan",
        ),
        (
            "zero.txt",
            NCCL_HEAD + "  1048576  262144  float  sum  -1  0.00  11.6  11.6  0  89.7  11.7  11.7  0\n",
            "zero.txt:5: out-of-place time (us): got 0.0 (allowed: a finite number > 0 (us))",
        ),
        (
            "inplace.txt",
            NCCL_HEAD + "  1048576  262144  float  sum  -1  90.1  11.6  11.6  0  inf  11.7  11.7  0\n",
            "inplace.txt:5: in-place time (us): must be a finite number",
        ),
        (
            "noranks.txt",
            "# Collective test starting: all_reduce_perf\n  1048576  262144  float  sum  -1  90.1  11.6  11.6  0\n",
            "noranks.txt:2: cannot tell how many ranks ran",
        ),
        (
            "mystery.txt",
            "#  Rank  0 Pid 1 on h0 device 0 [0x1] GPU\n  1048576  262144  float  sum  -1  90.1  11.6  11.6  0\n",
            "mystery.txt:2: cannot tell which collective this row measures",
        ),
        (
            "uneven.txt",
            "# Collective test starting: all_reduce_perf\n#  Rank  0 Pid 1 on a device 0 [0x1] GPU\n"
            "#  Rank  1 Pid 1 on a device 1 [0x1] GPU\n#  Rank  2 Pid 1 on b device 0 [0x1] GPU\n"
            "  1048576  262144  float  sum  -1  90.1  11.6  11.6  0\n",
            "uneven.txt:5: ranks are spread unevenly over the hosts (a: 2, b: 1)",
        ),
        ("vidur-missing.csv", VIDUR_HEAD.replace(",num_workers", ",workers"), "vidur-missing.csv:1: missing column"),
        (
            "vidur-nan.csv",
            VIDUR_HEAD
            + "0,0.01,0.02,0.015,0.012,0.001,0,2,2048,all_reduce,2,8\n"
            + "1,0.01,0.02,0.015,NaN,0.001,0,2,4096,all_reduce,2,8\n",
            "vidur-nan.csv:3: time_stats.all_reduce.median: must be a finite number, got nan",
        ),
        (
            "vidur-short.csv",
            VIDUR_HEAD + "0,0.01,0.02,0.015,0.012,0.001,0,2,2048\n",
            "vidur-short.csv:2: 9 values (allowed: 12, one per column of line 1)",
        ),
        (
            "vidur-ranks.csv",
            VIDUR_HEAD + "0,0.01,0.02,0.015,0.012,0.001,0,3,2048,all_reduce,2,8\n",
            "vidur-ranks.csv:2: 3 ranks do not divide into nodes of 2",
        ),
        ("notes.txt", "just some notes\nabout nothing\n", "notes.txt:1: not a measured collective table"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, name, body, needle):
    path = _text(tmp_path, name, body)
    with pytest.raises(ConfigError) as e:
        read_measured(path)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert msg.startswith(str(path))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        read_measured(tmp_path / "absent.txt")
    path = _text(tmp_path, "x.txt", "1 2 3\n")
    with pytest.raises(ConfigError, match="format: unknown format 'excel'"):
        read_measured(path, "excel")


def test_own_csv_and_collective_output_feed_back(tmp_path):
    """A `lina-sim collective` table read as a measurement predicts itself exactly, and
    the comparison CSV reads back as the same measured rows."""
    cluster = load_preset("dgx-h100", nodes=2)
    sim = collective_sweep(cluster, "allreduce", "auto", [1 << 20, 64 << 20])
    # NCCL's choice per size, as NCCL_DEBUG=INFO would report it (a tree at 1 MiB on 2 nodes)
    assert sim["algo"].iloc[0] == "tree" and set(sim["proto"]) <= {"LL", "LL128", "Simple"}
    from lina_sim.results.tables import format_collective_table

    text = _text(tmp_path, "sim.txt", format_collective_table(sim, "allreduce", "auto", cluster) + "\n")
    [(label, t)] = measured_tables([read_measured(text)])
    c = table_config(label, t)
    assert (c.collective, c.ranks, c.ranks_per_node, c.nodes) == ("allreduce", 16, 8, 2)
    cmp = compare_measured(shape_for(cluster, c), t)
    assert np.allclose(cmp["error_pct"], 0, atol=0.01)  # the printed times have 2 decimals in µs
    csv = _text(tmp_path, "cmp.csv", cmp.to_csv(index=False))
    back = read_measured(csv)
    assert back["format"].iloc[0] == "lina-sim-csv" and list(back["table"]) == ["sim", "sim"]
    assert np.allclose(back["time_s"], cmp["time_s"]) and list(back["line"]) == [2, 3]


def test_calibrate_raw_yaml(tmp_path):
    path = _text(
        tmp_path,
        "prof.raw.yaml",
        "world_size: 4\nranks_per_node: 2\nintra_node_pingpong: []\ncollectives:\n"
        "- {kind: all_to_all, bytes: 65536, seconds: 0.002, seconds_median: 0.0019}\n"
        "- kind: allreduce\n  bytes: 65536\n  seconds: 0.003\n",
    )
    df = read_measured(path)
    assert df["format"].iloc[0] == "calibrate-raw"
    assert list(df["collective"]) == ["all_to_all", "allreduce"] and list(df["line"]) == [5, 6]
    assert (df["nodes"].iloc[0], df["time_s"].iloc[1]) == (2, 0.003)
    path.write_text(path.read_text().replace("seconds: 0.003", "seconds: .nan"))
    with pytest.raises(ConfigError, match=r"prof.raw.yaml:6: seconds: must be a finite number"):
        read_measured(path)


def test_readers_are_chosen_by_content_not_extension(tmp_path):
    assert set(READERS) == {"lina-sim-csv", "vidur", "calibrate-raw", "nccl-tests"}
    vidur = _text(tmp_path, "profile.txt", VIDUR_HEAD + "0,0.01,0.02,0.015,0.012,0.001,0,2,2048,all_reduce,2,8\n")
    assert read_measured(vidur)["format"].iloc[0] == "vidur"
    nccl = _text(tmp_path, "allreduce.csv", NCCL_HEAD + "  1048576  262144  float  sum  -1  90.1  11.6  11.6  0\n")
    with pytest.raises(ConfigError, match="allreduce.csv:5: a data row with 9 fields"):
        read_measured(nccl)  # nccl-tests by content; its header promises 13 fields


# -- sendrecv on the simulator ---------------------------------------------------------------
def _send_recv(cluster, ranks, size, algo="flat"):
    env = simpy.Environment()
    coll = Collectives(FluidNetwork(env, Topology(cluster)))
    p = coll.send_recv(ranks, size, algo=algo)
    env.run()
    return p.value


@pytest.mark.parametrize("size", [1 << 20, 64 << 20])
def test_send_recv_matches_closed_form(size):
    c = load_preset("dgx-h100", nodes=2)
    # A pair across nodes: GPU -> PCIe -> NIC -> switch -> NIC -> PCIe -> GPU, both ways at once.
    inter = 2 * c.pcie.latency + 2 * c.nic.latency + c.switch_latency
    bw = min(c.nic.effective_bandwidth, c.pcie.effective_bandwidth)
    res = _send_recv(c, [0, 8], size)
    assert (res.op, res.algo, res.steps) == ("sendrecv", "flat", 1)
    assert res.duration == pytest.approx(inter + size / bw, rel=1e-6)
    # A ring of 8 on one node: each GPU's NVSwitch port carries one send and one receive.
    ring = _send_recv(c, list(range(8)), size).duration
    assert ring == pytest.approx(c.nvlink.latency + size / c.nvlink.effective_bandwidth, rel=1e-6)
    # 16 ranks on 2 nodes: two of the ring's hops cross a NIC, and those set the time.
    assert _send_recv(c, list(range(16)), size).duration == pytest.approx(res.duration, rel=1e-6)
    assert _send_recv(c, [3], size).duration == 0.0  # to itself: no link


def test_send_recv_in_sweep_and_bad_algo():
    c = load_preset("dgx-a100")
    df = collective_sweep(c, "sendrecv", "p2p", [1 << 20], ranks=[0, 1])
    assert df["busbw_GBps"].iloc[0] == pytest.approx(df["algbw_GBps"].iloc[0])  # busbw factor 1
    with pytest.raises(ConfigError, match="algo: unknown sendrecv algorithm 'ring'"):
        collective_sweep(c, "sendrecv", "ring", [1 << 20])
    with pytest.raises(ConfigError, match="op: unknown collective 'gather'"):
        collective_sweep(c, "gather", "ring", [1 << 20])


# -- shaping a measured table onto a preset --------------------------------------------------
def _table(tmp_path, ranks_per_node: int, nodes: int, op: str = "allreduce"):
    hosts = "".join(
        f"#  Rank {n * ranks_per_node + l} Pid 1 on host{n} device {l} [0x1] GPU\n"
        for n in range(nodes)
        for l in range(ranks_per_node)
    )
    body = f"# Collective test starting: {op}_perf\n{hosts}  67108864  16777216  float  sum  -1  900.0  1  1  0\n"
    [(label, t)] = measured_tables([read_measured(_text(tmp_path, f"t-{nodes}x{ranks_per_node}.txt", body))])
    return table_config(label, t), t


def test_one_gpu_per_node_on_a_dgx_is_the_same_as_gpus_per_node_1(tmp_path):
    cfg, t = _table(tmp_path, 1, 10)
    dgx = load_preset("dgx-h100")
    auto = compare_measured(shape_for(dgx, cfg), t)
    one = with_gpus_per_node(dgx, 1)
    assert (one.gpus_per_node, one.nic_of_gpu, one.nics_per_node) == (1, (0,), 8)
    shaped = compare_measured(shape_for(one, cfg), t)
    assert auto["predicted_s"].iloc[0] == pytest.approx(shaped["predicted_s"].iloc[0], rel=1e-9)
    assert (shaped["sim_nodes"].iloc[0], shaped["sim_gpus_per_node"].iloc[0]) == (10, 1)
    summary = comparison_summary(shaped)
    assert summary["rows:>=64MB"].iloc[0] == 1 and summary["rows:<=1MB"].iloc[0] == 0
    assert math.isnan(summary["median_abs_error_pct:<=1MB"].iloc[0])


def test_a_table_that_does_not_fit_is_refused(tmp_path):
    cfg, _ = _table(tmp_path, 8, 2)
    narrow = with_gpus_per_node(load_preset("dgx-h100"), 4)
    with pytest.raises(ConfigError) as e:
        shape_for(narrow, cfg)
    msg = str(e.value)
    assert msg.startswith(cfg.source) and "16 ranks (2 node(s) x 8) do not fit dgx-h100 with 4 GPUs per node" in msg
    with pytest.raises(ConfigError, match="with 8 GPUs per node and 1 node"):
        shape_for(load_preset("dgx-h100"), cfg, fixed_nodes=True)
    with pytest.raises(ConfigError, match="--gpus-per-node: got 9; a dgx-h100 node has 8 GPUs"):
        with_gpus_per_node(load_preset("dgx-h100"), 9)
    gather, _ = _table(tmp_path, 2, 1, op="all_gather")
    with pytest.raises(ConfigError, match="collective 'all_gather' is not simulated"):
        shape_for(load_preset("dgx-h100"), gather)


def test_size_classes():
    assert [size_class(s) for s in (1, 1 << 20, (1 << 20) + 1, (64 << 20) - 1, 64 << 20)] == [
        "<=1MB",
        "<=1MB",
        "1-64MB",
        "1-64MB",
        ">=64MB",
    ]


def test_forced_nccl_algo_and_proto_are_read_and_simulated(tmp_path):
    """A run made with NCCL_ALGO / NCCL_PROTO set (on the command line or in an
    NCCL_DEBUG env dump) is simulated with the same algorithm and protocol; a list or an
    exclusion leaves NCCL's choice to the model."""
    body = (
        "# nThread 1 nGpus 1 minBytes 1048576 maxBytes 2097152 step: 2(factor)\n"
        + "".join(f"#  Rank {r} Group  0 Pid {100 + r} on host{r // 8} device {r % 8} [0] H100\n" for r in range(16))
        + "     1048576        262144     float     sum      -1    156.9    6.68   12.53      0\n"
    )
    cases = {
        "mpirun -x NCCL_ALGO=Ring -x NCCL_PROTO=simple ./build/all_reduce_perf -b 1M\n": ("ring", "Simple"),
        "NCCL INFO NCCL_ALGO set by environment to Tree\n./build/all_reduce_perf\n": ("tree", "auto"),
        "mpirun -x NCCL_ALGO=^NVLS ./build/all_reduce_perf\n": ("auto", "auto"),
    }
    for i, (head, (algo, proto)) in enumerate(cases.items()):
        path = tmp_path / f"run{i}.txt"
        path.write_text(head + body)
        ((label, rows),) = measured_tables([read_measured(path)])
        shape = shape_for(load_preset("dgx-h100"), table_config(label, rows))
        assert (shape.algo, shape.proto) == (algo, proto), head


def test_channel_bounds_on_the_command_line_are_simulated(tmp_path):
    """NCCL_MIN_CTAS / NCCL_MAX_CTAS (or the legacy NCCL_MIN/MAX_NCHANNELS) on a pasted
    command line bound the simulated comm->nChannels as NCCL combines them (the largest
    minimum, the smallest maximum); a value that is not a whole number is one error
    naming the file and line."""
    from lina_sim.network import nccl

    body = (
        "# nThread 1 nGpus 1 minBytes 1048576 maxBytes 2097152 step: 2(factor)\n"
        + "".join(f"#  Rank {r} Group  0 Pid {100 + r} on host{r // 8} device {r % 8} [0] H100\n" for r in range(16))
        + "     1048576        262144     float     sum      -1    156.9    6.68   12.53      0\n"
    )
    cases = {
        "mpirun -x NCCL_ALGO=Ring -x NCCL_MIN_CTAS=24 ./build/all_reduce_perf -b 1M\n": (24, None, 24.0),
        "mpirun -x NCCL_MIN_NCHANNELS=4 -x NCCL_MIN_CTAS=20 -x NCCL_MAX_CTAS=32 ./all_reduce_perf\n": (20, 32, 20.0),
        "mpirun -x NCCL_MAX_NCHANNELS=8 ./build/all_reduce_perf\n": (None, 8, 8.0),
        "mpirun ./build/all_reduce_perf\n": (None, None, None),
    }
    for i, (head, (lo, hi, comm)) in enumerate(cases.items()):
        path = tmp_path / f"run{i}.txt"
        path.write_text(head + body)
        ((label, rows),) = measured_tables([read_measured(path)])
        config = table_config(label, rows)
        assert (config.min_ctas, config.max_ctas) == (lo, hi), head
        shape = shape_for(load_preset("dgx-h100"), config)
        assert (shape.cluster.nccl.min_ctas, shape.cluster.nccl.max_ctas) == (lo, hi)
        topo = Topology(shape.cluster)
        model, _ = nccl.model_for(topo, [np.arange(8), np.arange(8, 16)])
        default = nccl.comm_channels(dataclasses.replace(model.shape, min_ctas=None, max_ctas=None), model.channels, 45)
        assert model.comm_channels == (default if comm is None else comm), head
    bad = tmp_path / "bad.txt"
    bad.write_text("mpirun -x NCCL_MIN_CTAS=lots ./build/all_reduce_perf\n" + body)
    ((label, rows),) = measured_tables([read_measured(bad)])
    with pytest.raises(ConfigError, match=r"bad\.txt:\d+.*NCCL_MIN_CTAS|channel setting"):
        table_config(label, rows)
