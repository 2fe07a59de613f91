"""Collective-model accuracy against real NCCL measurements (issue 12's targets).

For every measured table beside the project (``../shared/data/nccl-measured``), grouped by
the cluster it was measured on: median |predicted / measured - 1| per size band on the
shipped preset, and on a profile calibrated on the cluster's *other* tables (``role``
"held out"; "train" rows are the fit's own residuals, shown for reference). Targets:
median |error| <= 25% for 8 KiB-8 MiB and <= 10% for >= 64 MiB.

    python benchmarks/bench_collective_accuracy.py [--data DIR] [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from lina_sim.experiments.accuracy import TARGETS, accuracy, meets_targets

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nccl-measured"


def cell(v: float, rows: int) -> str:
    return "-" if not rows or not math.isfinite(v) else f"{v:.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="the nccl-measured folder")
    ap.add_argument("--csv", type=Path, help="also write the table as CSV")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"no measured data at {args.data}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    df = accuracy(args.data)
    print(
        "# median |error| per band; preset -> calibrated on the cluster's other tables"
        f" ({time.perf_counter() - t0:.0f} s)"
    )
    print(f"# targets: {', '.join(f'{b} <= {t:g}%' for b, t in TARGETS.items())}")
    print("# per band: preset | held out (calibrated on the cluster's other tables) | profile (calibrated on all)")
    head = f"{'table':<38} {'preset':<23}" + "".join(f" {b:>24}" for b in TARGETS) + "  target"
    print(head)
    cluster = None
    for _, r in df.iterrows():
        if r["cluster"] != cluster:
            cluster = r["cluster"]
            print(f"## {cluster}")
        cells = []
        for b in TARGETS:
            rows = r[f"rows {b}"]
            held = cell(r.get(f"held-out {b}", math.nan), rows)
            cells.append(f" {cell(r[b], rows) + ' | ' + held + ' | ' + cell(r[f'profile {b}'], rows):>24}")
        print(f"{r['table']:<38} {r['preset']:<23}" + "".join(cells) + f"  {'met' if meets_targets(r) else 'MISSED'}")
    if args.csv:
        df.to_csv(args.csv, index=False)
        print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
