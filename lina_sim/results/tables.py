"""Every result table lina-sim prints: per-policy training and inference tables, the
nccl-tests-style collective table, the contention report, and generic text/Markdown
tables for the reproduction report. Pure formatting of result frames; times are printed
in ms (µs for collectives) as each header says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd


def point_title(setup: Any) -> str:
    """One scenario point: cluster, model, experts (and for inference top-k and the routing
    traces), then the swept fields in brackets."""
    c, m = setup.cluster, setup.model
    swept = ", ".join(f"{k}={v}" for k, v in setup.scenario.swept.items())
    detail = ""
    if getattr(setup, "serving", None) is not None:
        traces = "+".join(Path(p).stem for p in setup.serving.trace_paths)
        detail = f" top-{setup.top_k}, trace {traces}"
    return (
        f"{setup.scenario.name}: {c.name} {c.nodes}x{c.gpus_per_node} GPUs, {m.name}, {m.experts} experts"
        + detail
        + (f"  [{swept}]" if swept else "")
    )


def format_training_table(df, title: str) -> str:
    lines = [
        f"# {title}",
        f"  {'policy':<16} {'step(ms)':>9} {'speedup':>8} {'compute':>8} {'exp.a2a':>8} {'exp.AR':>8} "
        f"{'idle':>7} {'k':>3} {'r':>3}  bwd a2a slowdown med/p95/max",
    ]
    for r in df.itertuples():
        lines.append(
            f"  {r.policy:<16} {r.step_time_s * 1e3:>9.2f} {r.speedup:>7.2f}x {r.compute_s * 1e3:>8.2f} "
            f"{r.exposed_a2a_s * 1e3:>8.2f} {r.exposed_allreduce_s * 1e3:>8.2f} {r.idle_s * 1e3:>7.2f} "
            f"{r.experts_per_device:>3d} {r.pipeline_degree:>3d}  "
            f"{r.bwd_a2a_slowdown_median:.2f} / {r.bwd_a2a_slowdown_p95:.2f} / {r.bwd_a2a_slowdown_max:.2f}"
        )
    lines.append("  (times in ms per step; k = experts per device, r = all-to-all/FFN pipelining degree)")
    return "\n".join(lines)


def _ms(x: float) -> str:
    return f"{x * 1e3:8.2f}" if math.isfinite(x) else f"{'-':>8}"


def _ratio(x: float) -> str:
    return f"{x:5.2f}x" if math.isfinite(x) else f"{'-':>6}"


def format_inference_table(df, title: str) -> str:
    """Per policy: p50/p95/p99 latency with ratios to static, and the serving details."""
    lines = [
        f"# {title}",
        f"  {'policy':<17} {'p50(ms)':>8} {'p95(ms)':>8} {'p99(ms)':>8}  {'p50/st':>6} {'p95/st':>6} "
        f"{'p99/st':>6}  {'batch':>7} {'moeL95':>7} {'a2a95':>7} {'swapX':>7} {'imbal':>5} {'ph2':>5}",
    ]
    for r in df.itertuples():
        lines.append(
            f"  {r.policy:<17} {_ms(r.latency_p50_s)} {_ms(r.latency_p95_s)} {_ms(r.latency_p99_s)}  "
            f"{_ratio(r.latency_p50_vs_static)} {_ratio(r.latency_p95_vs_static)} {_ratio(r.latency_p99_vs_static)}  "
            f"{r.batch_time_mean_s * 1e3:7.2f} {r.moe_layer_p95_s * 1e3:7.3f} {r.a2a_p95_s * 1e3:7.3f} "
            f"{r.exposed_swap_per_batch_s * 1e3:7.3f} {r.load_imbalance_mean:5.2f} {r.phase2_rate:5.2f}"
        )
    first = df.iloc[0]
    arrival = (
        f"poisson {first.arrival_rate:g} req/s"
        if first.arrival == "poisson"
        else f"closed loop, {int(first.concurrency)} in flight"
    )
    lines.append(
        f"  ({int(first.requests)} requests, {arrival}, token budget {int(first.token_budget)}, "
        f"timeout {first.timeout_s * 1e3:g} ms. batch = mean batch time (ms); moeL95 = p95 MoE-layer "
        f"time (ms); a2a95 = p95 dispatch+combine per layer (ms); swapX = exposed swap per batch (ms); "
        f"imbal = busiest GPU's expert tokens / mean; ph2 = phase-2 re-plan rate)"
    )
    return "\n".join(lines)


def format_collective_table(df, op: str, algo: str, cluster, proto: str = "auto") -> str:
    """nccl-tests' table of a ``collective_sweep`` frame, with per size the ``algo`` and
    ``proto`` that ran (NCCL's choice for the allreduce, as NCCL_DEBUG=INFO reports it;
    ``-`` where there is none) when the frame has them."""
    asked = f"{algo}, proto {proto}" if op == "allreduce" and proto != "auto" else algo
    has = "algo" in getattr(df, "columns", ())
    lines = [
        f"# {op} ({asked}) on {cluster.name}: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs "
        f"= {cluster.world_size} ranks",
        f"#{'size':>13} {'count':>12} {'type':>6} {'time(us)':>11} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}"
        + (f"  {'algo':<12} proto" if has else ""),
    ]
    for r in df.itertuples():
        lines.append(
            f"{r.size:>14d} {r.count:>12d} {r.type:>6} {r.time_us:>11.2f} {r.algbw_GBps:>12.2f} {r.busbw_GBps:>12.2f}"
            + (f"  {r.algo:<12} {r.proto}" if has else "")
        )
    return "\n".join(lines)


def format_contention(res, cluster, a2a_bytes: int, ar_bytes: int, a2a_algo: str, ar_algo: str, top: int) -> str:
    lines = [
        f"# contention on {cluster.name}: {cluster.world_size} ranks; all-to-all ({a2a_algo}) "
        f"{a2a_bytes / 2**20:.1f} MiB/rank, allreduce ({ar_algo}) {ar_bytes / 2**20:.1f} MiB/rank",
        f"  all-to-all alone          {res.a2a_alone_s * 1e3:10.3f} ms",
        f"  all-to-all + allreduce    {res.a2a_shared_s * 1e3:10.3f} ms   slowdown x{res.slowdown:.2f}",
        f"  allreduce alone           {res.allreduce_alone_s * 1e3:10.3f} ms",
        f"  allreduce + all-to-all    {res.allreduce_shared_s * 1e3:10.3f} ms",
        "  bottleneck links while the all-to-all ran (load = bytes / capacity):",
        f"    {'link':<22} {'kind':<7} {'GB/s':>7} {'MB':>10} {'load(ms)':>9} {'util':>6}",
    ]
    for r in res.links.head(top).itertuples():
        lines.append(
            f"    {r.link:<22} {r.kind:<7} {r.capacity_Bps / 1e9:>7.2f} {r.bytes / 1e6:>10.2f} "
            f"{r.load_s * 1e3:>9.3f} {r.utilisation:>6.2f}"
        )
    return "\n".join(lines)


def format_sweep_plan(points) -> str:
    """``lina-sim sweep --dry-run``: each planned point's index, cache key (first 12 hex
    digits) and swept values."""
    lines = [f"point {p.index:>4}  {p.key[:12]}  " + ", ".join(f"{k}={v}" for k, v in p.swept.items()) for p in points]
    return "\n".join([*lines, f"# {len(points)} points, all valid"])


def format_failures(failed, limit: int = 5) -> str:
    """The first ``limit`` failed sweep points, ``(index, error)``, one line each."""
    failed = list(failed)
    lines = [f"  point {i}: {msg}" for i, msg in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"  ... and {len(failed) - limit} more (see the error column)")
    return "\n".join(lines)


def format_side_by_side(table: pd.DataFrame, metric: str, sources) -> str:
    """``lina-sim compare``: one metric of several result tables side by side;
    ``sources`` are (label, path) of each table's column."""
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.max_columns", 50):
        return (
            f"# {metric}: "
            + ", ".join(f"{label} = {path}" for label, path in sources)
            + "\n"
            + table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def text_table(df: pd.DataFrame, max_rows: int = 40) -> str:
    """A plain-text table for the terminal (3 significant digits for floats)."""
    body = df.head(max_rows).to_string(index=False, formatters={c: _fmt for c in df.columns if df[c].dtype.kind == "f"})
    more = f"\n  ... {len(df) - max_rows} more rows in REPORT.md" if len(df) > max_rows else ""
    return "\n".join("  " + line for line in body.splitlines()) + more


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (3 significant digits for floats)."""
    cols = [str(c) for c in df.columns]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if df[c].dtype.kind in "fiu" else "---" for c in df.columns) + "|",
    ]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


# -- measured runs (lina-run) and validations (lina-sim validate) ---------------------------
def format_scheduler_cost(df) -> str:
    """Per policy of a measured training table: the scheduler thread's share of the step,
    the all-to-all hand-off's, and the one-off partitioning and launch-plan time (ms)."""
    return (
        "  scheduler per step: "
        + ", ".join(
            f"{r.policy} {r.sched_busy_frac * 100:.2f}% thread + {r.handoff_total_s / r.step_time_s * 100:.2f}% "
            f"hand-off (median {r.handoff_median_s * 1e3:.2f} ms)"
            for r in df.itertuples()
        )
        + "; partitioning and launch plan once per run: "
        + ", ".join(f"{r.policy} {r.partition_s * 1e3:.1f} ms" for r in df.itertuples())
    )


def format_measured_inference_table(df, name: str) -> str:
    """Per point and policy of a measured inference run: batch time (mean, median),
    all-to-all time per batch (ms), expert swaps and re-planned layers."""
    lines = [f"# {name} [measured]: batch time per policy"]
    for r in df.itertuples():
        lines.append(
            f"  {r.point:>2} {r.policy:<18} mean {r.batch_time_mean_s * 1e3:8.2f} ms  median "
            f"{r.batch_time_p50_s * 1e3:8.2f} ms  a2a/batch {r.a2a_s * 1e3:7.2f} ms  swaps {r.swaps}  "
            f"re-planned layers {r.replanned_layers}  ({r.batches} batches)"
        )
    return "\n".join(lines)


def ranking_summary(j) -> str:
    """Whether predicted and measured times order the policies alike, per point: the
    strict order (``ranking_match``) and the pairs the measurement resolves
    (``pairs_agree`` of ``pairs_resolved``)."""
    first = j.groupby("point").first()
    k = int(first["ranking_match"].sum())
    return (
        f"strict order of the policies the same at {k} of {len(first)} point(s); pairs of policies "
        f"the measurement resolves (> 2 s.e. apart) ordered alike: {int(first['pairs_agree'].sum())}/"
        f"{int(first['pairs_resolved'].sum())}"
    )


def _median_abs_error(j) -> str:
    """The validation's closing line: median |error| over rows, and the ranking summary."""
    return f"  median |error| {float(j['error_pct'].abs().median()):.1f}% (target <= 10%); " + ranking_summary(j)


def format_validation_table(j, title: str) -> str:
    """Predicted against measured step time (ms; measured min..max) per point and
    policy, the error and whether the ranking holds."""
    lines = [
        f"# {title}",
        f"  {'pt':>2} {'policy':<12} {'k':>2} {'r':>2} {'predicted ms':>12} {'measured ms':>12} "
        f"{'(min..max)':>15} {'error':>8}  ranking",
    ]
    for r in j.itertuples():
        lines.append(
            f"  {r.point:>2} {r.policy:<12} {r.experts_per_device_meas:>2} {r.pipeline_degree_meas:>2} "
            f"{r.step_time_s_pred * 1e3:>12.1f} {r.step_time_s_meas * 1e3:>12.1f} "
            f"{f'({r.step_time_min_s * 1e3:.0f}..{r.step_time_max_s * 1e3:.0f})':>15} "
            f"{r.error_pct:>+7.1f}%  {'same' if r.ranking_match else 'DIFFERS'}"
        )
    lines.append(_median_abs_error(j))
    return "\n".join(lines)


def format_validation_scheduler(j) -> str:
    """Per policy of a training validation: the measured scheduler thread's and the
    all-to-all hand-off's share of the step."""
    return "  measured scheduler cost per step: " + ", ".join(
        f"{r.policy} {r.sched_busy_frac * 100:.2f}% (thread) + {r.handoff_total_s / r.step_time_s_meas * 100:.2f}% "
        f"(a2a hand-off, median {r.handoff_median_s * 1e3:.2f} ms)"
        for r in j.itertuples()
    )


def format_inference_validation_table(j, title: str) -> str:
    """Predicted against measured mean batch time (ms) per point and policy, the error
    and whether the ranking holds."""
    lines = [f"# {title}", f"  {'pt':>2} {'policy':<18} {'predicted ms':>12} {'measured ms':>12} {'error':>8}  ranking"]
    for r in j.itertuples():
        lines.append(
            f"  {r.point:>2} {r.policy:<18} {r.batch_time_mean_s_pred * 1e3:>12.2f} "
            f"{r.batch_time_mean_s_meas * 1e3:>12.2f} {r.error_pct:>+7.1f}%  "
            f"{'same' if r.ranking_match else 'DIFFERS'}"
        )
    lines.append(_median_abs_error(j))
    return "\n".join(lines)


COMPONENTS = ("compute fwd", "compute bwd+opt", "a2a fwd", "a2a bwd", "allreduce", "step", "a2a skew", "a2a xfer")


def format_components(classes) -> str:
    """Side by side, per (point, policy): where the predicted and the measured step spend
    time. ``classes`` maps (point, policy) to (predicted, measured) seconds per
    :data:`COMPONENTS` key (``runtime.compare.op_classes``); printed in ms."""
    lines = [
        "# per rank and step, ms: predicted / measured (busy time of each stream; overlaps counted in each;"
        " a2a skew / xfer: mean per all-to-all, last arrival - first arrival / end - last arrival)",
        f"  {'pt policy':<16}" + "".join(f"{k:>18}" for k in COMPONENTS),
    ]
    for key, (p, m) in classes.items():
        lines.append(
            f"  {key[0]:<2} {key[1]:<13}" + "".join(f"{p[k] * 1e3:>9.1f} /{m[k] * 1e3:>6.1f} " for k in COMPONENTS)
        )
    return "\n".join(lines)


def format_stats(s: Any) -> str:
    """``lina-sim trace-stats``: skew, repeat rate, affinity and path-estimation accuracy
    of one routing trace (a :class:`~lina_sim.routing.stats.RoutingStats`)."""
    m = s.summary
    out = [
        f"{m['file']}: {m['model']} on {m['dataset']}: {m['tokens']} tokens in {m['sequences']} sequences, "
        f"{m['layers']} layers, top-{m['top_k']} of {m['experts']} experts",
        "",
        f"layer  busiest/uniform  CV    top-{s.skew.top_experts} share   (all {m['top_k']} choices)   repeat  (chance)",
    ]
    for i, l in enumerate(s.skew.layers):
        out.append(
            f"{l:5d}  {s.skew.max_over_uniform[i]:15.2f}  {s.skew.cv[i]:4.2f}  {s.skew.top_share[i]:11.3f}"
            f"   {'':21s}{s.repeat.rate[i]:6.3f}  ({s.repeat.chance[i]:.3f})"
        )
    mean, mean1 = s.skew.mean(), s.skew_top1.mean()
    out.append(
        f" mean  {mean['max_over_uniform']:15.2f}  {mean['cv']:4.2f}  {mean['top_share']:11.3f}"
        f"   top-1 only: {mean1['max_over_uniform']:.2f} / {mean1['cv']:.2f} / {mean1['top_share']:.3f}"
    )
    if s.affinity.pairs:
        a = s.affinity
        out += ["", "inter-layer affinity (predict top-1 at l+1 from top-1 at l)", "pair     accuracy  chance  uniform"]
        for (x, y), acc, ch in zip(a.pairs, a.accuracy, a.chance):
            out.append(f"{x:2d}->{y:<3d}  {acc:8.3f}  {ch:6.3f}  {a.uniform:7.3f}")
        am = a.mean()
        out.append(f" mean    {am['accuracy']:8.3f}  {am['chance']:6.3f}  {a.uniform:7.3f}")
    if s.path:
        p = s.path
        out += [
            "",
            f"path-based estimation: batches of {p.batch_tokens} held-out tokens ({p.batches} batches, "
            f"layers {p.first_layer}+, trained on {p.train_tokens} tokens); estimated top-{p.set_size} set == actual",
            "path length  exact  mean overlap",
        ]
        for L, e, o in zip(p.lengths, p.exact, p.overlap):
            label = f"{L}" if L else "0 (popularity)"
            out.append(f"{label:>11s}  {e:5.3f}  {o:12.3f}")
    return "\n".join(out)


def format_comparison(rows: Sequence[Any]) -> str:
    """``trace-stats --compare-real``, one line per :class:`~lina_sim.routing.stats.RealRow`:
    skew at the first recorded layer, mean skew, cross-layer affinity."""
    out = [
        "side by side with real routing at the recorded layers (a trace: the layers at the same "
        "relative depth). Skew over all k choices, averaged over those layers except the first "
        "column; affinity from top-1 choices across the non-adjacent layer pairs",
        f"{'model':28s} {'domain':10s} {'E':>3s} {'k':>2s}  {'max/unif L0':>11s} {'mean':>5s}  "
        f"{'CV mean':>7s}  {'top12.5% share':>14s}  {'affinity (chance) per pair':s}",
    ]
    for r in rows:
        aff = "  ".join(
            f"{a}->{b} {acc:.3f} ({ch:.3f})"
            for (a, b), acc, ch in zip(r.affinity.pairs, r.affinity.accuracy, r.affinity.chance)
        )
        sm = r.skew.mean()
        out.append(
            f"{r.name[:28]:28s} {r.domain[:10]:10s} {r.experts:3d} {r.top_k:2d}  "
            f"{r.skew.max_over_uniform[0]:11.2f} {sm['max_over_uniform']:5.2f}  {sm['cv']:7.2f}  "
            f"{sm['top_share']:14.3f}  {aff}"
        )
    return "\n".join(out)


# -- simulated against measured collectives (lina-sim collective --compare) -------------------
# The comparison summary's columns per size class: ERROR_COLUMN + label (median |error|, %)
# and ROWS_COLUMN + label (rows in the class); lina_sim.experiments.microbench writes them.
ERROR_COLUMN, ROWS_COLUMN = "median_abs_error_pct:", "rows:"


def _error(x: float) -> str:
    return f"{x:+8.1f}%" if math.isfinite(x) else f"{'-':>9}"


def _size_classes(summary_row: pd.Series) -> list[tuple[str, float, int]]:
    """(label, median |error| %, rows) per size class of one summary row, whose columns
    are ``median_abs_error_pct:<label>`` and ``rows:<label>``."""
    n = len(ERROR_COLUMN)
    return [
        (col[n:], float(summary_row[col]), int(summary_row[ROWS_COLUMN + col[n:]]))
        for col in summary_row.index
        if str(col).startswith(ERROR_COLUMN)
    ]


def format_measured_comparison(t: pd.DataFrame, summary_row: pd.Series) -> str:
    """One measured table against the simulator: per size, measured and predicted time
    (µs), the error (predicted / measured - 1) and the simulated algorithm; then the
    median |error| per size class (from the table's row of the comparison summary)."""
    first = t.iloc[0]
    version = f"NCCL {first['nccl_version']}" if first["nccl_version"] else ""
    detail = ", ".join(v for v in (str(first["dtype"]), version) if v)
    lines = [
        f"# {first['table']}: {first['collective']}, {first['ranks']} ranks = {first['nodes']} node(s) x "
        f"{first['ranks_per_node']}{f' ({detail})' if detail else ''}; simulated on {first['preset']} "
        f"{first['sim_nodes']}x{first['sim_gpus_per_node']}  [{first['source']}]",
        f"#{'size(B)':>13} {'measured(us)':>13} {'predicted(us)':>14} {'error':>9}  algo",
    ]
    for r in t.itertuples():
        run = getattr(r, "ran", "")  # what ran at this size (NCCL's choice), when it says more
        shown = f"{r.algo} ({run})" if isinstance(run, str) and run and run != f"{r.algo} -" else r.algo
        lines.append(
            f"{r.size_bytes:>14d} {r.time_s * 1e6:>13.2f} {r.predicted_s * 1e6:>14.2f} {_error(r.error_pct)}  {shown}"
        )
    classes = ", ".join(
        f"{label} {err:.1f}% ({n})" if n else f"{label} -" for label, err, n in _size_classes(summary_row)
    )
    lines.append(f"  median |error| (rows): {classes}")
    return "\n".join(lines)


def format_comparison_summary(summary: pd.DataFrame) -> str:
    """Every compared table: its collective and shape, the simulated preset and algorithm,
    and the median |error| (%) and rows per size class; error = predicted / measured - 1."""
    classes = [label for label, _, _ in _size_classes(summary.iloc[0])] if len(summary) else []
    if "proto" in summary.columns:  # a forced allreduce protocol beside its algorithm: ring/LL128
        pairs = zip(summary["algo"], summary["proto"])
        summary = summary.assign(algo=[a if p in ("auto", "-") or pd.isna(p) else f"{a}/{p}" for a, p in pairs])
    w = {c: max([len(c), *(len(str(x)) for x in summary[c])]) for c in ("table", "collective", "preset", "algo")}
    lines = [
        "# simulated against measured: median |error| (rows) per size class; error = predicted / measured - 1",
        f"  {'table':<{w['table']}} {'collective':<{w['collective']}} {'shape':>6} {'preset':<{w['preset']}} "
        f"{'algo':<{w['algo']}}" + "".join(f" {label:>14}" for label in classes),
    ]
    for _, r in summary.iterrows():
        cells = "".join(f" {f'{err:.1f}% ({n})' if n else '-':>14}" for _, err, n in _size_classes(r))
        shape = f"{r['nodes']}x{r['ranks_per_node']}"
        lines.append(
            f"  {r['table']:<{w['table']}} {r['collective']:<{w['collective']}} {shape:>6} "
            f"{r['preset']:<{w['preset']}} {r['algo']:<{w['algo']}}{cells}"
        )
    return "\n".join(lines)


def format_calibration(fits: Sequence[Any]) -> str:
    """Per fit stage (:class:`lina_sim.experiments.calibration.StageFit`): each knob's
    value before -> after (latency scales only when the tables identified them), the loss
    before and after, and the tables it was fitted to."""

    def show(name: str, v: float) -> str:
        return f"{v / 1e9:.1f} GB/s" if name.endswith("bandwidth") else f"{v:.3g}"

    lines = ["# calibrated: loss = mean over tables of mean squared log(predicted / measured)"]
    for f in fits:
        knobs = "; ".join(f"{k} {show(k, f.before[k])} -> {show(k, v)}" for k, v in f.after.items())
        lines.append(f"  {f.stage:<7} {knobs}")
        lines.append(f"  {'':<7} loss {f.loss_before:.4f} -> {f.loss_after:.4f}  tables: {', '.join(f.tables)}")
    return "\n".join(lines)
