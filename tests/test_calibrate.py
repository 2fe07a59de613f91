"""Calibration: fits, compute probes, and a real testbed run whose profile lina-sim loads."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import load_preset
from runtime.calibrate import effective_flops, fit_alpha_beta, measure_copy, measure_matmul, parse_shapes, raw_path
from tests._netns import PY, ROOT, needs_netns


def test_fit_alpha_beta_recovers_a_line():
    sizes = [4096, 32768, 262144, 2097152]
    alpha, bw = fit_alpha_beta(sizes, [50e-6 + n / 1e8 for n in sizes])
    assert alpha == pytest.approx(50e-6, rel=1e-6) and bw == pytest.approx(1e8, rel=1e-6)
    # Noise cannot make the latency negative.
    assert fit_alpha_beta(sizes, [n / 1e8 * 0.9 if n == 4096 else n / 1e8 for n in sizes])[0] == 0.0


def test_compute_probes_and_shapes():
    rows = measure_matmul([(64, 32, 16)], "fp32", reps=1)
    assert rows[0]["shape"] == [64, 32, 16] and rows[0]["flops_per_s"] > 1e6
    assert effective_flops(rows) == pytest.approx(rows[0]["flops_per_s"])
    assert measure_copy(1 << 20, reps=1) > 1e7
    assert parse_shapes("8x4x2, 1x1x1") == [(8, 4, 2), (1, 1, 1)]
    with pytest.raises(ConfigError, match="--shapes"):
        parse_shapes("8x4")
    assert raw_path("a/p.yaml").name == "p.raw.yaml"


@needs_netns
def test_calibrate_on_testbed_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "profile.yaml"
    p = subprocess.run(
        [
            PY,
            "-m",
            "runtime.cli",
            "calibrate",
            "--testbed",
            "2x2",
            "--nic",
            "400mbit",
            "--quiet",
            "--out",
            str(out),
            "--max-bytes",
            "4e6",
            "--shapes",
            "256x512x2048,256x2048x512",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    spec = load_preset(str(out))
    assert (spec.nodes, spec.gpus_per_node, spec.nics_per_node) == (2, 2, 1)
    assert spec.compute.matmul_efficiency == 1.0 and spec.gpu.flops("fp32") > 1e8
    # 400 Mbit/s = 50 MB/s on the wire; TCP/IP overhead and a busy CPU only lower it.
    assert 20e6 < spec.nic.bandwidth < 55e6, spec.nic
    assert spec.nvlink.bandwidth > spec.nic.bandwidth  # the node's own stack beats the shaped NIC
    assert "lina-run calibrate" in yaml.safe_load(out.read_text())["source"]
    raw = yaml.safe_load(raw_path(out).read_text())
    assert {r["kind"] for r in raw["collectives"]} == {"all_to_all", "allreduce"}
    assert len(raw["inter_node_pingpong"]) >= 2 and len(raw["compute_per_rank"]) == 4
    # 4 CPU ranks on one machine: with fewer cores than ranks the profile says how many
    # they share and how long collectives wait for them while compute holds the cores.
    if len(os.sched_getaffinity(0)) < 4:
        assert spec.host is not None and spec.host.cores == len(os.sched_getaffinity(0)) and spec.shares_cores
        assert set(spec.host.step_delay_s) == {"all_to_all", "allreduce"}
        assert all(v >= 0 for v in spec.host.step_delay_s.values())
        assert {r["kind"] for r in raw["collectives_busy"]} == {"all_to_all", "allreduce"}
    else:
        assert spec.host is None
