"""The compute model against real kernels (Vidur's A100/H100 op times; skipped without
../shared) and the tile and wave quantization it prices GEMMs with."""

from __future__ import annotations

from pathlib import Path

import pytest

from lina_sim.experiments import kernel_accuracy as ka
from lina_sim.hardware.compute import GEMM_TILES, RooflineComputeModel, gemm_flops
from lina_sim.hardware.spec import load_preset

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpu-kernels" / "vidur"
needs_data = pytest.mark.skipif(not ka.tables(ROOT), reason="../shared/data/gpu-kernels is absent")


def test_tiles_and_waves():
    sms = 108
    # A GEMM that fills whole tiles in whole waves costs exactly its FLOP.
    m, n = 128 * 108, 256
    assert gemm_flops(m, n, 64, 1, sms) == 2 * m * n * 64
    # One row more opens a new row of tiles and, here, a new wave.
    assert gemm_flops(m + 1, n, 64, 1, sms) > gemm_flops(m, n, 64, 1, sms)
    # A tiny GEMM runs on one SM: one wave of the smallest tile, a 1/108 share of the GPU.
    smallest = min(a * b for a, b in GEMM_TILES)
    assert gemm_flops(1, 1, 64, 1, sms) == 2 * 64 * smallest * sms
    # Without an SM count it is the plain 2 m n k.
    assert gemm_flops(100.5, 3, 7, 2, None) == 2 * 100.5 * 3 * 7 * 2


def test_gemm_time_never_below_the_plain_roofline():
    cl = load_preset("dgx-a100")
    rl = RooflineComputeModel.from_cluster(cl, "fp16")
    for m, n, k in [(1, 4096, 4096), (300, 11008, 4096), (4096, 4096, 4096), (17, 33, 65)]:
        flops, nbytes = 2 * m * n * k, (m * k + k * n + m * n) * 2
        assert rl.device_time(flops, nbytes, (m, n, k, 1)) >= rl.device_time(flops, nbytes) - 1e-18


@needs_data
def test_gemms_within_tolerance_and_better_with_waves():
    """What the simulator charges for a GEMM (busy time + launch) is within 20% median in
    every token band on both GPUs, and tile/wave quantization is no worse than the plain
    roofline in any band (both use the presets as shipped: nothing is fitted)."""
    waves = ka.band_errors(ka.kernel_accuracy(ROOT)).set_index(["gpu", "kind", "tokens"])
    plain = ka.band_errors(ka.kernel_accuracy(ROOT, waves=False)).set_index(["gpu", "kind", "tokens"])
    gemm = waves.xs("GEMM", level="kind")
    assert (gemm["charged |error| %"] <= 20).all(), gemm
    flat = plain.xs("GEMM", level="kind")
    assert (gemm["device |error| %"] <= flat["device |error| %"] + 0.5).all()
    # Streaming kernels are reported, not held to a bound: the model misses them by up
    # to ~45% (README); only guard against it getting worse.
    stream = waves.xs("streaming", level="kind")
    assert (stream["charged |error| %"] <= 50).all(), stream
