"""``lina-sim run`` for inference scenarios: serve, print the latency table, write results.

:mod:`lina_sim.commands.run` hands inference scenarios here; this module has no
sub-command of its own.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _ms(x: float) -> str:
    return f"{x * 1e3:8.2f}" if math.isfinite(x) else f"{'-':>8}"


def _ratio(x: float) -> str:
    return f"{x:5.2f}x" if math.isfinite(x) else f"{'-':>6}"


def format_inference_table(df, title: str) -> str:
    """Per policy: p50/p95/p99 latency with ratios to static, and the serving details."""
    lines = [f"# {title}",
             f"  {'policy':<17} {'p50(ms)':>8} {'p95(ms)':>8} {'p99(ms)':>8}  {'p50/st':>6} {'p95/st':>6} "
             f"{'p99/st':>6}  {'batch':>7} {'moeL95':>7} {'a2a95':>7} {'swapX':>7} {'imbal':>5} {'ph2':>5}"]
    for r in df.itertuples():
        lines.append(
            f"  {r.policy:<17} {_ms(r.latency_p50_s)} {_ms(r.latency_p95_s)} {_ms(r.latency_p99_s)}  "
            f"{_ratio(r.latency_p50_vs_static)} {_ratio(r.latency_p95_vs_static)} {_ratio(r.latency_p99_vs_static)}  "
            f"{r.batch_time_mean_s * 1e3:7.2f} {r.moe_layer_p95_s * 1e3:7.3f} {r.a2a_p95_s * 1e3:7.3f} "
            f"{r.exposed_swap_per_batch_s * 1e3:7.3f} {r.load_imbalance_mean:5.2f} {r.phase2_rate:5.2f}")
    first = df.iloc[0]
    arrival = (f"poisson {first.arrival_rate:g} req/s" if first.arrival == "poisson"
               else f"closed loop, {int(first.concurrency)} in flight")
    lines.append(f"  ({int(first.requests)} requests, {arrival}, token budget {int(first.token_budget)}, "
                 f"timeout {first.timeout_s * 1e3:g} ms. batch = mean batch time (ms); moeL95 = p95 MoE-layer "
                 f"time (ms); a2a95 = p95 dispatch+combine per layer (ms); swapX = exposed swap per batch (ms); "
                 f"imbal = busiest GPU's expert tokens / mean; ph2 = phase-2 re-plan rate)")
    return "\n".join(lines)


def point_title(setup) -> str:
    c, m = setup.cluster, setup.model
    swept = ", ".join(f"{k}={v}" for k, v in setup.scenario.swept.items())
    traces = "+".join(Path(p).stem for p in setup.serving.trace_paths)
    return (f"{setup.scenario.name}: {c.name} {c.nodes}x{c.gpus_per_node} GPUs, {m.name}, {m.experts} experts "
            f"top-{setup.top_k}, trace {traces}" + (f"  [{swept}]" if swept else ""))


def run_inference_points(points, args: argparse.Namespace) -> int:
    import pandas as pd

    from lina_sim.serving import resolve_inference, run_inference
    from lina_sim.timeline import atomic_write_text, write_chrome_trace

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
