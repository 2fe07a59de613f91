"""How well the compute model predicts real kernels: the shipped dgx-a100 / dgx-h100
presets' roofline, with tile and wave quantization for GEMMs, against Vidur's measured
A100 and H100 op times (``../shared/data/gpu-kernels/``). Prints median |error| per GPU,
op kind and token band, for the kernel's busy time and for what the simulator charges
(launch overhead included), and the GEMM rows again without wave quantization.

    python benchmarks/bench_compute_accuracy.py [--root ../shared/data/gpu-kernels/vidur]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lina_sim.experiments import kernel_accuracy as ka
from lina_sim.results.tables import text_table

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpu-kernels" / "vidur"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    if not ka.tables(args.root):
        raise SystemExit(f"no Vidur tables under {args.root} (see shared/data/gpu-kernels/README.md)")
    rows = ka.kernel_accuracy(args.root)
    print("# compute model vs measured kernels (median over rows; bias: + the model is slow)")
    print(text_table(ka.band_errors(rows).round(1)))

    flat = ka.kernel_accuracy(args.root, waves=False)
    print("\n# GEMMs without tile and wave quantization (plain roofline), for contrast")
    print(text_table(ka.band_errors(flat[flat["kind"] == "GEMM"]).round(1)))


if __name__ == "__main__":
    main()
