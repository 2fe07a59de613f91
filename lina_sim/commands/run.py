"""``lina-sim run SCENARIO.yaml``: simulate every policy of a scenario (and its sweep points)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("run", help="simulate a training or inference scenario and compare its policies")
    p.add_argument("scenario", help="scenario YAML (see scenarios/)")
    p.add_argument("--out", default=None, help="results directory (default: results/<scenario name>)")
    p.add_argument("--trace", action="store_true", help="write a Chrome trace per policy (training)")
    p.add_argument("--plots", action="store_true", help="write figures into the results directory")
    p.set_defaults(func=cmd_run)


def format_training_table(df, title: str) -> str:
    lines = [f"# {title}",
             f"  {'policy':<16} {'step(ms)':>9} {'speedup':>8} {'compute':>8} {'exp.a2a':>8} {'exp.AR':>8} "
             f"{'idle':>7} {'k':>3} {'r':>3}  bwd a2a slowdown med/p95/max"]
    for r in df.itertuples():
        lines.append(
            f"  {r.policy:<16} {r.step_time_s * 1e3:>9.2f} {r.speedup:>7.2f}x {r.compute_s * 1e3:>8.2f} "
            f"{r.exposed_a2a_s * 1e3:>8.2f} {r.exposed_allreduce_s * 1e3:>8.2f} {r.idle_s * 1e3:>7.2f} "
            f"{r.experts_per_device:>3d} {r.pipeline_degree:>3d}  "
            f"{r.bwd_a2a_slowdown_median:.2f} / {r.bwd_a2a_slowdown_p95:.2f} / {r.bwd_a2a_slowdown_max:.2f}")
    lines.append("  (times in ms per step; k = experts per device, r = all-to-all/FFN pipelining degree)")
    return "\n".join(lines)


def point_title(setup) -> str:
    c, m = setup.cluster, setup.model
    swept = ", ".join(f"{k}={v}" for k, v in setup.scenario.swept.items())
    return (f"{setup.scenario.name}: {c.name} {c.nodes}x{c.gpus_per_node} GPUs, {m.name}, {m.experts} experts"
            + (f"  [{swept}]" if swept else ""))


def cmd_run(args: argparse.Namespace) -> int:
    import pandas as pd

    from lina_sim.scenario import load_scenarios
    from lina_sim.timeline import atomic_write_text, write_chrome_trace

    points = load_scenarios(args.scenario)
    kinds = {p.kind for p in points}
    if kinds == {"inference"}:
        from lina_sim.commands.serve import run_inference_points

        return run_inference_points(points, args)
    from lina_sim.training import resolve_training, run_training

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
