"""``lina-sim run`` for inference scenarios: serve, print the latency table, write results.

:mod:`lina_sim.cli.run` hands inference scenarios here; this module has no
sub-command of its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lina_sim.results.tables import format_inference_table, point_title


def run_inference_points(points, args: argparse.Namespace) -> int:
    import pandas as pd

    from lina_sim.serving.setup import resolve_inference
    from lina_sim.serving.run import run_inference
    from lina_sim.results.timeline import write_chrome_trace
    from lina_sim.results.files import atomic_write_text

    setups = [resolve_inference(p) for p in points]  # every point validated before any runs
    out = Path(getattr(args, "out", None) or Path("results") / points[0].name)
    frames, all_runs = [], []
    for i, setup in enumerate(setups):
        df, runs = run_inference(setup)
        df.insert(0, "point", i)
        frames.append(df)
        all_runs.append((setup, df, runs))
        print(format_inference_table(df, point_title(setup)))
        print()
        suffix = f"-p{i}" if len(setups) > 1 else ""
        if getattr(args, "trace", False):
            for run in runs:
                write_chrome_trace(run.timeline.to_frame(), out / f"trace{suffix}-{run.entry.label}.json")
        if getattr(args, "plots", False):
            from plots.inference import latency_cdf, layer_tail

            latency_cdf(runs, out / f"latency_cdf{suffix}.png", point_title(setup))
            layer_tail(runs, out / f"a2a_tail_per_layer{suffix}.png", point_title(setup))
    results = pd.concat(frames, ignore_index=True)
    path = atomic_write_text(out / "results.csv", results.to_csv(index=False))
    if getattr(args, "plots", False):
        from plots.inference import p95_bars

        p95_bars(results, out / "p95_per_policy.png")
    print(f"# results: {path}" + (f"; figures and traces in {out}/" if args.plots or args.trace else ""))
    return 0
