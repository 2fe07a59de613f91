"""Calibration of link parameters from measured collective tables
(``lina-sim collective --calibrate``): recovery of known parameters from synthetic
tables, the written profile, one-line errors, and (when the measured data are beside the
project) a fit on some shipped H100 tables that predicts others it did not see."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lina_sim.cli.main import main
from lina_sim.experiments.accuracy import CLUSTERS, cluster_accuracy
from lina_sim.experiments.calibration import (
    calibrate,
    fit_tables,
    nelder_mead,
    profile,
    stages,
    subsample,
    with_links,
    write_profile,
)
from lina_sim.experiments.measured import measured_tables, read_measured
from lina_sim.experiments.microbench import (
    collective_sweep,
    compare_measured,
    shape_for,
)
from lina_sim.hardware.spec import load_preset, read_preset, resolve_cluster

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nccl-measured"
SIZES = [1 << k for k in range(10, 31, 2)]  # 1 KiB .. 1 GiB, x4
# The "true" cluster the synthetic tables are simulated on: effective bandwidths (B/s) and
# NCCL's latency scales (the links' own latencies are not fitted: NCCL's model ignores them).
TRUTH = {"nvlink": (3e-6, 225e9), "nic": (2.5e-6, 35e9)}
TRUTH_NCCL = {"intra_latency_scale": 2.0, "net_latency_scale": 1.5}


def truth_cluster():
    c = with_links(load_preset("dgx-h100"), TRUTH)
    return dataclasses.replace(c, nccl=dataclasses.replace(c.nccl, **TRUTH_NCCL))


def synthetic_csv(path: Path) -> Path:
    """Tables in lina-sim's own CSV form, timed on dgx-h100 with the TRUTH links and NCCL
    corrections: a 1x8 allreduce (NVLink) and a 2x4 allreduce (NIC), NCCL choosing."""
    truth = truth_cluster()
    rows = []
    for op, nodes, per_node in (("allreduce", 1, 8), ("allreduce", 2, 4)):
        cluster = truth.with_nodes(nodes)
        ranks = (np.arange(nodes)[:, None] * cluster.gpus_per_node + np.arange(per_node)[None, :]).ravel()
        sweep = collective_sweep(cluster, op, "auto", SIZES, ranks=ranks)
        rows += [
            {
                "collective": op,
                "size_bytes": s,
                "ranks": nodes * per_node,
                "ranks_per_node": per_node,
                "nodes": nodes,
                "time_s": t / 1e6,
            }
            for s, t in zip(sweep["size"], sweep["time_us"])
        ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_recovers_known_links_and_writes_a_loadable_profile(tmp_path, capsys):
    csv = synthetic_csv(tmp_path / "synthetic.csv")
    out = tmp_path / "profile.yaml"
    assert main(["collective", "--calibrate", str(csv), "--preset", "dgx-h100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "# calibrated" in printed and "# wrote" in printed
    fitted = load_preset(str(out))
    for link, (_, effective) in TRUTH.items():
        assert getattr(fitted, link).effective_bandwidth == pytest.approx(effective, rel=0.05), link
    for name, scale in TRUTH_NCCL.items():
        assert getattr(fitted.nccl, name) == pytest.approx(scale, rel=0.2), name
    # The profile keeps everything else of the preset, and records its provenance.
    base = load_preset("dgx-h100")
    assert (fitted.gpu, fitted.pcie, fitted.gpus_per_node) == (base.gpu, base.pcie, base.gpus_per_node)
    block = yaml.safe_load(out.read_text())["calibration"]
    assert block["sources"][0]["file"] == str(csv)
    assert {t["table"] for t in block["sources"][0]["tables"]} == {
        "synthetic[1x8]",
        "synthetic[2x4]",
    }
    for stage in TRUTH:
        assert block["fitted"][stage]["loss_after"] < block["fitted"][stage]["loss_before"]
        assert block["fitted"][stage]["latency_fitted"]
    assert set(block["residuals_after"]) == {"synthetic[1x8]", "synthetic[2x4]"}
    # A scenario's cluster block loads it too, overrides and all.
    spec = resolve_cluster({"preset": str(out), "nodes": 2})
    assert spec.nodes == 2 and spec.nvlink == fitted.nvlink


def test_profile_round_trips(tmp_path):
    csv = synthetic_csv(tmp_path / "s.csv")
    base = load_preset("dgx-h100")
    result = calibrate(base, measured_tables([read_measured(csv)]), max_rows=6)
    raw, _ = read_preset("dgx-h100")
    path = write_profile(tmp_path / "p.yaml", profile(result, raw, "dgx-h100"))
    again = load_preset(str(path))
    assert again.nvlink == result.cluster.nvlink and again.nic == result.cluster.nic
    assert again.nccl == result.cluster.nccl
    assert again.name == "dgx-h100-calibrated"


def test_subsample_spreads_over_sizes():
    t = pd.DataFrame({"size_bytes": np.arange(100, 0, -1)})
    s = subsample(t, 5)
    sizes = list(s["size_bytes"])
    assert len(sizes) == 5 and sizes == sorted(sizes) and (sizes[0], sizes[-1]) == (1, 100)
    assert len(subsample(t, 200)) == 100


def test_nelder_mead_finds_a_quadratic_minimum():
    x, fx, _ = nelder_mead(lambda v: float(((v - [1.0, -2.0]) ** 2).sum()), np.zeros(2), np.ones(2), iters=200)
    assert np.allclose(x, [1.0, -2.0], atol=1e-2) and fx < 1e-3


@pytest.mark.parametrize(
    "args, names",
    [
        (["--calibrate", "/no/such.txt", "--out", "p.yaml"], "/no/such.txt"),
        (["--calibrate", "{csv}", "--out", "profile.txt"], "--out"),
        (["--calibrate", "{csv}"], "--out"),
        (["--calibrate", "{csv}", "--out", "p.yaml", "--algo", "nope"], "--algo"),
        (["--calibrate", "{csv}", "--out", "p.yaml", "--op", "allreduce"], "--op"),
        (["--calibrate", "{csv}", "--out", "p.yaml", "--nodes", "2"], "--nodes"),
        (["--calibrate", "{csv}", "--compare", "{csv}"], "--calibrate"),
    ],
)
def test_bad_inputs_are_one_line(tmp_path, capsys, args, names):
    csv = tmp_path / "ok.csv"
    csv.write_text("collective,size_bytes,ranks,ranks_per_node,nodes,time_s\nallreduce,1024,8,8,1,1e-5\n")
    args = [a.replace("{csv}", str(csv)) for a in args]
    assert main(["collective", "--preset", "dgx-h100", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and names in err


def test_bad_measured_row_names_file_and_column(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("collective,size_bytes,ranks,ranks_per_node,nodes,time_s\nallreduce,1024,8,8,1,oops\n")
    out = tmp_path / "p.yaml"
    assert main(["collective", "--preset", "dgx-h100", "--calibrate", str(csv), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(csv) in err and "time_s" in err
    assert not out.exists()


# -- held out: fit on some shipped tables, predict others ---------------------------------
@pytest.fixture
def measured() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"no measured data beside the project ({SHARED})")
    return SHARED


def test_held_out_prediction(measured):
    """One- and two-node runs of one H100 cluster predict its ten-node allreduce; a
    two-node forced-ring run predicts the same cluster's eight-node default allreduce
    (lina_sim.experiments.accuracy, the README's table). Large messages, which see the
    fitted bandwidths, must stay close; the fit must lower its own loss."""
    rows = pd.concat([cluster_accuracy(measured, mc) for mc in CLUSTERS[:2]], ignore_index=True)
    print("\n" + rows[["table", "role", ">=64MB", "held-out >=64MB", "profile >=64MB"]].to_string())
    held = rows[rows["role"] == "held out"].set_index("table")
    assert held.loc["h100-10x1-allreduce-1", "held-out >=64MB"] <= 10
    # The 2x8 run forced NCCL_ALGO=Ring and NCCL_MIN_CTAS=24; its latency corrections
    # carry over to NCCL's default 8-node choice only roughly (README, "Against real NCCL").
    assert held.loc["h100-8x8-allreduce-1", "held-out >=64MB"] <= 20
    # The profile fitted on all of a cluster's tables fits its large messages.
    assert (rows["profile >=64MB"].dropna() <= 15).all(), rows[["table", "profile >=64MB"]]


def test_p2p_and_collective_tables_fit_in_separate_stages(tmp_path):
    """With one-node p2p and one-node allreduce tables, the p2p tables fix NVLink and the
    allreduces fit their own NVLink fraction, latency factor and NVLS efficiency (NCCL
    prices them apart); without p2p tables the stages are as before."""
    rows = [
        {"collective": op, "size_bytes": s, "ranks": n, "ranks_per_node": n, "nodes": 1, "time_s": 1e-5 + s / 2e11}
        for op, n in (("sendrecv", 2), ("allreduce", 8))
        for s in SIZES
    ]
    path = tmp_path / "mixed.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    cluster = load_preset("dgx-h100")
    tables = measured_tables([read_measured(path)])
    planned = stages(cluster, fit_tables(tables, cluster, None, 24))
    names = {stage: ([k.name for k in knobs], [t.config.collective for t in mine]) for stage, knobs, mine, _ in planned}
    assert list(names) == ["nvlink", "collective"]
    assert names["nvlink"] == (
        ["nvlink.effective_bandwidth", "nccl.intra_latency_scale", "nccl.simple_latency_scale"],
        ["sendrecv"],
    )
    assert names["collective"] == (
        ["nccl.collective_efficiency", "nccl.nvls_efficiency", "nccl.collective_latency_scale"],
        ["allreduce"],
    )
    only = [t for t in tables if t[1]["collective"].iloc[0] == "allreduce"]
    assert [s for s, *_ in stages(cluster, fit_tables(only, cluster, None, 24))] == ["nvlink"]


def test_tree_and_overhead_knobs_fit_where_the_tables_identify_them(measured):
    """nccl-tests issue 309's two runs of one H100 cluster: a forced ring on 2 nodes and
    NCCL's default on 8 (a tree at 1-8 MiB). Rings at two node counts identify NCCL's
    per-step network overhead, and the tree's rows its efficiency and latency; with them
    one profile fits both tables' small and medium sizes (the README's target: median
    |error| <= 25% at 8 KiB-8 MiB), which the ring-and-latency knobs alone could not."""
    files = [measured / "nccl-tests" / f for f in ("h100-2x8-allreduce-3.txt", "h100-8x8-allreduce-1.txt")]
    cluster = load_preset("dgx-h100")
    tables = measured_tables([read_measured(f) for f in files])
    planned = {
        stage: [k.name for k in knobs] for stage, knobs, _, _ in stages(cluster, fit_tables(tables, cluster, None, 24))
    }
    assert {"nccl.net_overhead_scale", "nccl.tree_efficiency", "nccl.tree_latency_scale"} <= set(planned["nic"])
    fitted = calibrate(cluster, tables).cluster
    assert fitted.nccl.tree_efficiency < 1
    rows = pd.concat(
        [compare_measured(shape_for(fitted, t.config), t.rows) for t in fit_tables(tables, fitted, None, 24)]
    )
    small = rows[(rows["size_bytes"] >= 8 << 10) & (rows["size_bytes"] <= 8 << 20)]
    errors = small.groupby("table")["error_pct"].apply(lambda e: e.abs().median())
    assert (errors <= 25).all(), errors
    # Only the forced ring's table: one node count, no tree rows, so neither knob moves.
    ring_only = measured_tables([read_measured(files[0])])
    planned = {
        stage: [k.name for k in knobs]
        for stage, knobs, _, _ in stages(cluster, fit_tables(ring_only, cluster, None, 24))
    }
    assert not {"nccl.net_overhead_scale", "nccl.tree_efficiency"} & set(planned["nic"])


def test_a_profile_keeps_what_nccls_tuning_reads_of_the_host(tmp_path):
    """A profile is the preset under another name: NCCL's host-CPU terms (network overhead,
    LL bandwidth row) come from ``host_cpu``, not from the name, so a DGX A100 profile keeps
    its AMD hosts and predicts what its calibration did."""
    csv = synthetic_csv(tmp_path / "s.csv")
    base = load_preset("dgx-a100")
    result = calibrate(base, measured_tables([read_measured(csv)]), max_rows=4)
    raw, _ = read_preset("dgx-a100")
    again = load_preset(str(write_profile(tmp_path / "p.yaml", profile(result, raw, "dgx-a100"))))
    assert again == dataclasses.replace(result.cluster, name=again.name)
    assert again.host_cpu == "amd" and load_preset("dgx-h100").host_cpu == "intel"
