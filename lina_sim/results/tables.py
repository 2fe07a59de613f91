"""Every result table lina-sim prints: per-policy training and inference tables, the
nccl-tests-style collective table, the contention report, and generic text/Markdown
tables for the reproduction report. Pure formatting of result frames; times are printed
in ms (µs for collectives) as each header says.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
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


def _missing(v: Any) -> bool:
    """None, NaN or an infinity: a value a table shows as ``-``."""
    return v is None or (isinstance(v, (float, int)) and not isinstance(v, bool) and not math.isfinite(v))


def aligned(
    columns: dict[str, tuple[Sequence[Any], Callable[[Any], str]]], left: Iterable[str] = (), indent: str = "  "
) -> str:
    """A text table laid out by pandas (``DataFrame.to_string``), so that a column is as
    wide as its widest value or header, however wide: ``columns`` maps each header to its
    values and the format of one value; a missing value (None, NaN, an infinity) shows as
    ``-``. Columns are right-aligned, those in ``left`` left-aligned; every line starts
    with ``indent``. No rows: the header line alone."""
    left = set(left)
    cells: dict[str, list[str]] = {}
    space: dict[str, int] = {}
    for i, (name, (values, fmt)) in enumerate(columns.items()):
        col = ["-" if _missing(v) else fmt(v) for v in values]
        w = max(len(name), *map(len, col)) if col else len(name)
        if name in left:  # pandas right-aligns text: pad it to the column's width first
            col, name = [c.ljust(w) for c in col], name.ljust(w)
        cells[name] = col
        space[name] = w + (1 if i else 0)  # two spaces between columns (pandas puts one)
    if not any(cells.values()):
        return (indent + "  ".join(cells)).rstrip()
    text = pd.DataFrame(cells).to_string(index=False, col_space=space)
    return "\n".join((indent + line).rstrip() for line in text.splitlines())


def _slowdowns(r: Any) -> str:
    """Median / p95 / max of a row's backward all-to-all slowdowns, ``-`` for a missing one
    (no backward all-to-all crossed ranks, or a measured row that has none)."""
    vals = (r.bwd_a2a_slowdown_median, r.bwd_a2a_slowdown_p95, r.bwd_a2a_slowdown_max)
    return "-" if all(_missing(v) for v in vals) else " / ".join("-" if _missing(v) else f"{v:.2f}" for v in vals)


# Shares of the step (%): (label, breakdown column). Totals count a collective whenever it
# runs, hidden or not; exposed ones only while nothing above it in the list runs.
STEP_SHARES = (
    ("compute", "compute_s"),
    ("a2a", "total_a2a_s"),
    ("exposed a2a", "exposed_a2a_s"),
    ("allreduce", "total_allreduce_s"),
    ("exposed allreduce", "exposed_allreduce_s"),
    ("idle", "idle_s"),
)


def step_shares(df: pd.DataFrame) -> pd.DataFrame:
    """Each :data:`STEP_SHARES` column of a training result table as a percentage of the
    row's step time (NaN where a table, e.g. an older measured one, lacks the column)."""
    step = df["step_time_s"]
    return pd.DataFrame(
        {f"{label} %": 100 * df[col] / step if col in df.columns else float("nan") for label, col in STEP_SHARES},
        index=df.index,
    )


def format_training_table(df, title: str) -> str:
    """Per policy: step time, speedup over the first policy, where the step went as shares
    of it (compute; all-to-all and allreduce, all of their time / the part nothing hides;
    idle), the packing k and pipelining r, and the backward all-to-all slowdown (median /
    p95 / max)."""
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    pct = lambda v: f"{v:.1f}"  # noqa: E731
    rows = list(df.itertuples())
    sh = step_shares(df)

    def pair(total: str, exposed: str) -> list[str]:
        return [
            "-" if _missing(a) and _missing(b) else f"{'-' if _missing(a) else pct(a)} / {pct(b)}"
            for a, b in zip(sh[f"{total} %"], sh[f"{exposed} %"])
        ]

    table = aligned(
        {
            "policy": ([r.policy for r in rows], str),
            "step(ms)": ([r.step_time_s for r in rows], ms),
            "speedup": ([r.speedup for r in rows], lambda v: f"{v:.2f}x"),
            "compute%": (list(sh["compute %"]), pct),
            "a2a% all/exp": (pair("a2a", "exposed a2a"), str),
            "AR% all/exp": (pair("allreduce", "exposed allreduce"), str),
            "idle%": (list(sh["idle %"]), pct),
            "k": ([r.experts_per_device for r in rows], lambda v: f"{int(v)}"),
            "r": ([r.pipeline_degree for r in rows], lambda v: f"{int(v)}"),
            "bwd a2a slowdown med/p95/max": ([_slowdowns(r) for r in rows], str),
        },
        left=("policy", "bwd a2a slowdown med/p95/max"),
    )
    return "\n".join(
        [
            f"# {title}",
            table,
            "  (shares of the step, %: compute, idle, and each collective's whole time / the part no compute or "
            "all-to-all hides; k = experts per device, r = all-to-all/FFN pipelining degree)",
        ]
    )


def _ms(x: float) -> str:
    return f"{x * 1e3:8.2f}" if math.isfinite(x) else f"{'-':>8}"


def _ratio(x: float) -> str:
    return f"{x:5.2f}x" if math.isfinite(x) else f"{'-':>6}"


def format_inference_table(df, title: str) -> str:
    """Per policy (and per served domain, when a run serves several): p50/p95/p99 latency
    with ratios to static, the batches' skew beside them, and the serving details."""
    lines = [
        f"# {title}",
        f"  {'policy':<17} {'p50(ms)':>8} {'p95(ms)':>8} {'p99(ms)':>8}  {'p50/st':>6} {'p95/st':>6} "
        f"{'p99/st':>6}  {'skew':>5} {'tok/GPU':>7}  {'batch':>7} {'moeL95':>7} {'a2a95':>7} {'swapX':>7} "
        f"{'imbal':>5} {'ph2':>5}",
    ]
    domains = list(dict.fromkeys(df["domain"])) if "domain" in df.columns else [None]
    for domain in domains:
        part = df if domain is None else df[df["domain"] == domain]
        if len(domains) > 1:
            lines.append(f"  [{domain}]")
        for r in part.itertuples():
            skew = getattr(r, "batch_skew_mean", float("nan"))
            per_gpu = getattr(r, "batch_tokens_per_gpu_mean", float("nan"))
            lines.append(
                f"  {r.policy:<17} {_ms(r.latency_p50_s)} {_ms(r.latency_p95_s)} {_ms(r.latency_p99_s)}  "
                f"{_ratio(r.latency_p50_vs_static)} {_ratio(r.latency_p95_vs_static)} "
                f"{_ratio(r.latency_p99_vs_static)}  {skew:5.2f} {per_gpu:7.1f}  "
                f"{r.batch_time_mean_s * 1e3:7.2f} {r.moe_layer_p95_s * 1e3:7.3f} {r.a2a_p95_s * 1e3:7.3f} "
                f"{r.exposed_swap_per_batch_s * 1e3:7.3f} {r.load_imbalance_mean:5.2f} {r.phase2_rate:5.2f}"
            )
    first = df.iloc[0]
    arrival = (
        f"poisson {first.arrival_rate:g} req/s"
        if first.arrival == "poisson"
        else f"closed loop, {int(first.concurrency)} in flight"
    )
    domain = "" if len(domains) > 1 or domains[0] is None else f", domain {domains[0]}"
    lines.append(
        f"  ({int(first.requests)} requests{domain}, {arrival}, token budget {int(first.token_budget)}, "
        f"timeout {first.timeout_s * 1e3:g} ms. skew = busiest expert's tokens / uniform share (T*k/E) per "
        f"batch and layer, mean over batches and layers; tok/GPU = mean batch tokens per GPU; batch = mean "
        f"batch time (ms); moeL95 = p95 MoE-layer time (ms); a2a95 = p95 dispatch+combine per layer (ms); "
        f"swapX = exposed swap per batch (ms); imbal = busiest GPU's expert tokens / mean; ph2 = phase-2 "
        f"re-plan rate)"
    )
    return "\n".join(lines)


def format_collective_table(df, op: str, algo: str, cluster, proto: str = "auto") -> str:
    """nccl-tests' table of a ``collective_sweep`` frame, with per size the ``algo`` and
    ``proto`` that ran (NCCL's choice for the allreduce, as NCCL_DEBUG=INFO reports it;
    ``-`` where there is none) when the frame has them."""
    asked = f"{algo}, proto {proto}" if op == "allreduce" and proto != "auto" else algo
    has = "algo" in getattr(df, "columns", ())
    rows = list(df.itertuples())
    num = lambda v: f"{v:.2f}"  # noqa: E731
    columns: dict[str, tuple[Sequence[Any], Callable[[Any], str]]] = {
        # The header line starts with "#" (as nccl-tests' does, so that the measured-table
        # reader can read this table back): a space for it to replace.
        " size": ([r.size for r in rows], lambda v: f"{int(v)}"),
        "count": ([r.count for r in rows], lambda v: f"{int(v)}"),
        "type": ([r.type for r in rows], str),
        "time(us)": ([r.time_us for r in rows], num),
        "algbw(GB/s)": ([r.algbw_GBps for r in rows], num),
        "busbw(GB/s)": ([r.busbw_GBps for r in rows], num),
    }
    if has:
        columns["algo"] = ([r.algo for r in rows], str)
        columns["proto"] = ([r.proto for r in rows], str)
    header, *body = aligned(columns, left=("algo", "proto"), indent="").splitlines()
    return "\n".join(
        [
            f"# {op} ({asked}) on {cluster.name}: {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs "
            f"= {cluster.world_size} ranks",
            "#" + header[1:],
            *body,
        ]
    )


def format_contention(res, cluster, a2a_bytes: int, ar_bytes: int, a2a_algo: str, ar_algo: str, top: int) -> str:
    lines = [
        f"# contention on {cluster.name}: {cluster.world_size} ranks; all-to-all ({a2a_algo}) "
        f"{a2a_bytes / 2**20:.1f} MiB/rank, allreduce ({ar_algo}) {ar_bytes / 2**20:.1f} MiB/rank",
        f"  all-to-all alone          {res.a2a_alone_s * 1e3:10.3f} ms",
        f"  all-to-all + allreduce    {res.a2a_shared_s * 1e3:10.3f} ms   slowdown x{res.slowdown:.2f}",
        f"  allreduce alone           {res.allreduce_alone_s * 1e3:10.3f} ms",
        f"  allreduce + all-to-all    {res.allreduce_shared_s * 1e3:10.3f} ms",
        "  bottleneck links while the all-to-all ran (load = bytes / capacity):",
    ]
    links = res.links.head(top)
    table = aligned(
        {
            "link": (links["link"].tolist(), str),
            "kind": (links["kind"].tolist(), str),
            "GB/s": (links["capacity_Bps"].tolist(), lambda v: f"{v / 1e9:.2f}"),
            "MB": (links["bytes"].tolist(), lambda v: f"{v / 1e6:.2f}"),
            "load(ms)": (links["load_s"].tolist(), lambda v: f"{v * 1e3:.3f}"),
            "util": (links["utilisation"].tolist(), lambda v: f"{v:.2f}"),
        },
        left=("link", "kind"),
        indent="    ",
    )
    return "\n".join([*lines, table])


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
        if not math.isfinite(v):
            return "-"  # as in every other table: no value, not "nan"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def text_table(df: pd.DataFrame, max_rows: int = 40) -> str:
    """A plain-text table for the terminal (3 significant digits for floats)."""
    body = df.head(max_rows).to_string(
        index=False, na_rep="-", formatters={c: _fmt for c in df.columns if df[c].dtype.kind == "f"}
    )
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
    rows = list(df.itertuples())
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    table = aligned(
        {
            "pt": ([r.point for r in rows], str),
            "policy": ([r.policy for r in rows], str),
            "batch mean ms": ([r.batch_time_mean_s for r in rows], ms),
            "median ms": ([r.batch_time_p50_s for r in rows], ms),
            "a2a/batch ms": ([r.a2a_s for r in rows], ms),
            "swaps": ([r.swaps for r in rows], str),
            "re-planned layers": ([r.replanned_layers for r in rows], str),
            "batches": ([r.batches for r in rows], str),
        },
        left=("policy",),
    )
    return f"# {name} [measured]: batch time per policy\n{table}"


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


def _same(match: Any) -> str:
    return "same" if match else "DIFFERS"


def format_validation_table(j, title: str) -> str:
    """Predicted against measured step time (ms; measured min..max) per point and
    policy, the error and whether the ranking holds."""
    rows = list(j.itertuples())
    ms = lambda v: f"{v * 1e3:.1f}"  # noqa: E731
    spread = [
        None
        if _missing(r.step_time_min_s) or _missing(r.step_time_max_s)
        else f"({r.step_time_min_s * 1e3:.0f}..{r.step_time_max_s * 1e3:.0f})"
        for r in rows
    ]
    table = aligned(
        {
            "pt": ([r.point for r in rows], str),
            "policy": ([r.policy for r in rows], str),
            "k": ([r.experts_per_device_meas for r in rows], lambda v: f"{int(v)}"),
            "r": ([r.pipeline_degree_meas for r in rows], lambda v: f"{int(v)}"),
            "predicted ms": ([r.step_time_s_pred for r in rows], ms),
            "measured ms": ([r.step_time_s_meas for r in rows], ms),
            "(min..max)": (spread, str),
            "error": ([r.error_pct for r in rows], lambda v: f"{v:+.1f}%"),
            "ranking": ([r.ranking_match for r in rows], _same),
        },
        left=("policy", "ranking"),
    )
    return "\n".join([f"# {title}", table, _median_abs_error(j)])


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
    rows = list(j.itertuples())
    ms = lambda v: f"{v * 1e3:.2f}"  # noqa: E731
    table = aligned(
        {
            "pt": ([r.point for r in rows], str),
            "policy": ([r.policy for r in rows], str),
            "predicted ms": ([r.batch_time_mean_s_pred for r in rows], ms),
            "measured ms": ([r.batch_time_mean_s_meas for r in rows], ms),
            "error": ([r.error_pct for r in rows], lambda v: f"{v:+.1f}%"),
            "ranking": ([r.ranking_match for r in rows], _same),
        },
        left=("policy", "ranking"),
    )
    return "\n".join([f"# {title}", table, _median_abs_error(j)])


COMPONENTS = ("compute fwd", "compute bwd+opt", "a2a fwd", "a2a bwd", "allreduce", "step", "a2a skew", "a2a xfer")


def format_components(classes) -> str:
    """Side by side, per (point, policy): where the predicted and the measured step spend
    time. ``classes`` maps (point, policy) to (predicted, measured) seconds per
    :data:`COMPONENTS` key (``runtime.compare.op_classes``); printed in ms."""

    def pm(p: float, m: float) -> str:
        return f"{'-' if _missing(p) else f'{p * 1e3:.1f}'} / {'-' if _missing(m) else f'{m * 1e3:.1f}'}"

    keys = list(classes)
    cols: dict[str, tuple[Sequence[Any], Callable[[Any], str]]] = {
        "pt": ([k[0] for k in keys], str),
        "policy": ([k[1] for k in keys], str),
    }
    for c in COMPONENTS:
        cols[c] = ([pm(classes[k][0][c], classes[k][1][c]) for k in keys], str)
    return "\n".join(
        [
            "# per rank and step, ms: predicted / measured (busy time of each stream; overlaps counted in each;"
            " a2a skew / xfer: mean per all-to-all, last arrival - first arrival / end - last arrival)",
            aligned(cols, left=("policy",)),
        ]
    )


def format_stats(s: Any) -> str:
    """``lina-sim trace-stats``: skew, repeat rate, affinity and path-estimation accuracy
    of one routing trace (a :class:`~lina_sim.routing.stats.RoutingStats`)."""
    m = s.summary
    notes = ""
    if m.get("experts_inferred"):
        notes += " (expert count inferred as largest id + 1: pass --experts to check the ids)"
    if m.get("dropped_incomplete") is not None:
        notes += f"; dropped {m['dropped_incomplete']} incomplete tokens"
    top = f"top-{s.skew.top_fraction * 100:g}% share"
    out = [
        f"{m['file']}: {m['model']} on {m['dataset']}: {m['tokens']} tokens in {m['sequences']} sequences, "
        f"{m['layers']} layers, top-{m['top_k']} of {m['experts']} experts{notes}",
        "",
        f"skew over all {m['top_k']} choices per token; {top}: share of (token, choice) pairs taken by the "
        f"busiest {s.skew.top_experts} of {m['experts']} experts; repeat: consecutive tokens of a sequence "
        "with the same first choice",
        f"layer  busiest/uniform    CV  {top}  repeat  (chance)",
    ]
    w = len(top)
    for i, l in enumerate(s.skew.layers):
        out.append(
            f"{l:5d}  {s.skew.max_over_uniform[i]:15.2f}  {s.skew.cv[i]:4.2f}  {s.skew.top_share[i]:{w}.3f}"
            f"  {s.repeat.rate[i]:6.3f}  ({s.repeat.chance[i]:.3f})"
        )
    mean, mean1 = s.skew.mean(), s.skew_top1.mean()
    out.append(f" mean  {mean['max_over_uniform']:15.2f}  {mean['cv']:4.2f}  {mean['top_share']:{w}.3f}")
    out.append(
        f"first choices only, mean: busiest/uniform {mean1['max_over_uniform']:.2f}, CV {mean1['cv']:.2f}, "
        f"{top} {mean1['top_share']:.3f}"
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
            f"path-based estimation: fit on {p.train_sequences} sequences ({p.train_tokens} tokens; split "
            f"{p.split}, seed {p.seed}); scored on batches of {p.batch_tokens} tokens of the other "
            f"{p.test_sequences} sequences (held out: {p.batches} batches) and of the training tokens "
            f"(in sample: {p.batches_in_sample} batches), layers {p.first_layer}+; "
            f"share of cases whose estimated top-{p.set_size} set == actual",
            f"{'path length':>14s}  exact held-out  exact in-sample  overlap held-out  overlap in-sample",
        ]
        for L, e, ei, o, oi in zip(p.lengths, p.exact, p.exact_in_sample, p.overlap, p.overlap_in_sample):
            label = f"{L}" if L else "0 (popularity)"
            out.append(f"{label:>14s}  {e:14.3f}  {ei:15.3f}  {o:16.3f}  {oi:17.3f}")
    elif getattr(s, "path_skipped", ""):
        out += ["", f"path-based estimation: skipped ({s.path_skipped})"]
    return "\n".join(out)


def format_comparison(rows: Sequence[Any]) -> str:
    """``trace-stats --compare-real``, one line per :class:`~lina_sim.routing.stats.RealRow`:
    the layers compared, skew at the first of them, mean skew, cross-layer affinity."""
    pct = f"{rows[0].skew.top_fraction * 100:g}%" if rows else "12.5%"
    top = f"top-{pct} share"
    out = [
        "side by side with real routing at the recorded layers (l/L: layer l of L MoE layers; a trace "
        "row: the trace's layers at the same relative depth as the real rows below it). Skew over all "
        "k choices, averaged over those layers except the first column; "
        f"{top}: share of (token, choice) pairs taken by the busiest {pct} of experts (rounded up); "
        "affinity from top-1 choices across the non-adjacent layer pairs",
        f"{'model':28s} {'domain':10s} {'E':>3s} {'k':>2s}  {'layers':>10s}  {'max/unif 1st':>12s} {'mean':>5s}  "
        f"{'CV mean':>7s}  {top:>15s}  {'affinity (chance) per pair':s}",
    ]
    for r in rows:
        aff = "  ".join(
            f"{a}->{b} {acc:.3f} ({ch:.3f})"
            for (a, b), acc, ch in zip(r.affinity.pairs, r.affinity.accuracy, r.affinity.chance)
        )
        sm = r.skew.mean()
        where = ",".join(map(str, r.layers)) + f"/{r.num_layers}"
        out.append(
            f"{r.name[:28]:28s} {r.domain[:10]:10s} {r.experts:3d} {r.top_k:2d}  {where:>10s}  "
            f"{r.skew.max_over_uniform[0]:12.2f} {sm['max_over_uniform']:5.2f}  {sm['cv']:7.2f}  "
            f"{sm['top_share']:15.3f}  {aff}"
        )
    return "\n".join(out)


# -- simulated against measured collectives (lina-sim collective --compare) -------------------
# The comparison summary's columns per size class: ERROR_COLUMN + label (median |error|, %)
# and ROWS_COLUMN + label (rows in the class); lina_sim.experiments.microbench writes them.
ERROR_COLUMN, ROWS_COLUMN = "median_abs_error_pct:", "rows:"


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
    ]
    if first.get("timed", "") == "sender":
        lines.append("# timed on the sender's kernel of a one-way send (Vidur): predicted as the sender sees it")
    rows = list(t.itertuples())
    shown = []
    for r in rows:
        run = getattr(r, "ran", "")  # what ran at this size (NCCL's choice), when it says more
        shown.append(f"{r.algo} ({run})" if isinstance(run, str) and run and run != f"{r.algo} -" else r.algo)
    us = lambda v: f"{v * 1e6:.2f}"  # noqa: E731
    header, *body = aligned(
        {
            "size(B)": ([r.size_bytes for r in rows], lambda v: f"{int(v)}"),
            "measured(us)": ([r.time_s for r in rows], us),
            "predicted(us)": ([r.predicted_s for r in rows], us),
            "error": ([r.error_pct for r in rows], lambda v: f"{v:+.1f}%"),
            "algo": (shown, str),
        },
        left=("algo",),
        indent=" ",
    ).splitlines()
    lines += ["#" + header[1:], *body]  # a "#" header line, as nccl-tests prints one
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
    rows = [r for _, r in summary.iterrows()]
    columns: dict[str, tuple[Sequence[Any], Callable[[Any], str]]] = {
        "table": ([r["table"] for r in rows], str),
        "collective": ([r["collective"] for r in rows], str),
        "shape": ([f"{r['nodes']}x{r['ranks_per_node']}" for r in rows], str),
        "preset": ([r["preset"] for r in rows], str),
        "algo": ([r["algo"] for r in rows], str),
    }
    for i, label in enumerate(classes):
        cells = [_size_classes(r)[i] for r in rows]
        columns[label] = ([f"{err:.1f}% ({n})" if n else "-" for _, err, n in cells], str)
    table = aligned(columns, left=("table", "collective", "preset", "algo"))
    return "\n".join(
        ["# simulated against measured: median |error| (rows) per size class; error = predicted / measured - 1", table]
    )


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
