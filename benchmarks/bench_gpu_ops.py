"""The runtime's MoE model op by op on a real device, against the compute model.

Runs one rank's training step of a model (the paper's shapes by default: GPT-2-MoE with
16 experts over 16 GPUs, one expert per GPU; the runtime has no Transformer-XL
attention) on this machine's GPU, with the network replaced by local copies, and times
every compute op with CUDA events, once per dispatch style (DeepSpeed's einsum, Tutel's
sparse) and dtype. Beside each op: what the roofline compute model of ``--preset``
predicts for it. Writes ``ops.csv`` and one compute profile per dtype
(``profile-<dtype>.yaml``, loadable as ``compute: {model: profile}``) into ``--out``,
headed with the device's name.

    python benchmarks/bench_gpu_ops.py --preset dgx-h100 --out results/gpu-ops   # on a GPU
    python benchmarks/bench_gpu_ops.py --device cpu --layers 2 --dtypes fp32   # a dry run

Without a GPU and without ``--device cpu`` it says so and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from lina_sim.errors import LinaSimError
from lina_sim.results.files import atomic_write_text
from lina_sim.results.tables import text_table
from lina_sim.workload.model import model_preset
from runtime.calibrate import device_name
from runtime.compute_profile import compare_ops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-moe", help="model preset (default: gpt2-moe)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layers (a quicker run)")
    ap.add_argument("--gpus", type=int, default=16, help="GPUs the step is cut for (default 16: the paper's)")
    ap.add_argument("--preset", default="dgx-a100", help="cluster preset whose compute model predicts")
    ap.add_argument("--dtypes", default="fp16,fp32")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=6, help="steps per style and dtype (the first is a warm-up)")
    ap.add_argument("--out", type=Path, default=Path("results/gpu-ops"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_ops: no CUDA device here (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = device_name(device)
    frames = []
    for dtype in args.dtypes.split(","):
        try:
            spec = dataclasses.replace(model_preset(args.model), dtype=dtype)
            if args.layers:
                spec = dataclasses.replace(spec, layers=args.layers)
            df = compare_ops(spec, args.gpus, args.preset, device, args.steps)
        except LinaSimError as e:
            print(f"bench_gpu_ops: error: {e}", file=sys.stderr)
            return 2
        frames.append(df)
        header = (
            f"# measured by benchmarks/bench_gpu_ops.py on {name}, {args.model}, {dtype}, torch {torch.__version__}\n"
        )
        rows = df[["op", "shape", "tokens", "measured_ms"]].drop_duplicates(["op", "shape", "tokens"])
        table = [
            {"op": r.op, "shape": r.shape, "tokens": r.tokens, "seconds": r.measured_ms / 1e3}
            for r in rows.itertuples()
        ]
        atomic_write_text(args.out / f"profile-{dtype}.yaml", header + yaml.safe_dump({"rows": table}, sort_keys=False))
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "device", name)
    atomic_write_text(args.out / "ops.csv", out.to_csv(index=False))
    print(f"# {name}: {args.model} op by op, measured vs the {args.preset} compute model")
    print(text_table(out.drop(columns=["device", "shape"]).round(3), max_rows=200))
    med = out.groupby(["dispatch", "dtype"])["error_%"].apply(lambda e: float(np.median(np.abs(e))))
    print("\n# median |error| % per dispatch and dtype")
    print(text_table(med.round(1).reset_index()))
    print(f"# written: {args.out}/ops.csv, profile-<dtype>.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
