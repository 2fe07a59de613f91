"""``lina-sim run SCENARIO.yaml``: simulate every policy of a scenario (and its sweep points)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lina_sim.results.tables import format_training_table, point_title


def register(sub) -> None:
    p = sub.add_parser("run", help="simulate a training or inference scenario and compare its policies")
    p.add_argument("scenario", help="scenario YAML (see scenarios/)")
    p.add_argument("--out", default=None, help="results directory (default: results/<scenario name>)")
    p.add_argument("--trace", action="store_true", help="write a Chrome trace per policy (training)")
    p.add_argument("--plots", action="store_true", help="write figures into the results directory")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    import pandas as pd

    from lina_sim.config.scenario import load_scenarios
    from lina_sim.results.timeline import write_chrome_trace
    from lina_sim.results.files import atomic_write_text

    points = load_scenarios(args.scenario)
    kinds = {p.kind for p in points}
    if kinds == {"inference"}:
        from lina_sim.cli.serve import run_inference_points

        return run_inference_points(points, args)
    from lina_sim.training.run import resolve_training, run_training

    setups = [resolve_training(p) for p in points]  # every point validated before any runs
    out = Path(args.out or Path("results") / points[0].name)
    frames = []
    for i, setup in enumerate(setups):
        df, runs = run_training(setup)
        df.insert(0, "point", i)
        frames.append(df)
        print(format_training_table(df, point_title(setup)))
        print()
        suffix = f"-p{i}" if len(setups) > 1 else ""
        if args.trace:
            for run in runs:
                write_chrome_trace(run.result.timeline, out / f"trace{suffix}-{run.entry.label}.json")
        if args.plots:
            from plots.training import breakdown_bars, timeline_figure

            breakdown_bars(df, out / f"breakdown{suffix}.png", point_title(setup))
            last = runs[-1] if len(runs) == 1 else next((r for r in runs if r.entry.name == "lina"), runs[0])
            timeline_figure(last.result.timeline, out / f"timeline{suffix}-{last.entry.label}.png",
                            f"{last.entry.label}: {point_title(setup)}")
    results = pd.concat(frames, ignore_index=True)
    path = atomic_write_text(out / "results.csv", results.to_csv(index=False))
    if args.plots and results["experts"].nunique() > 1:
        from plots.training import speedup_vs_experts

        speedup_vs_experts(results, out / "speedup_vs_experts.png")
    print(f"# results: {path}" + (f"; figures and traces in {out}/" if args.plots or args.trace else ""))
    return 0
