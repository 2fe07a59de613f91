"""``lina-sim reproduce``: the paper's experiments in simulation, as figures and a report.

Every experiment is a shipped scenario (``scenarios/paper-*.yaml``). All their points are
validated first, then run as one sweep (so the pool stays busy and points shared by two
experiments run once) with the sweep cache, so a second run only redraws. Each figure
function returns the table it plotted, and REPORT.md shows those tables.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lina_sim.config.scenario import expand, load_yaml
from lina_sim.errors import ConfigError
from lina_sim.experiments.explore import INFERENCE_MAP, TRAINING_MAP
from lina_sim.experiments.kinds import KINDS, kind_of
from lina_sim.experiments.sweep import (
    Cache,
    LocalBackend,
    Progress,
    SweepError,
    SweepPoint,
    package_version,
    plan_points,
    run_sweep,
)
from lina_sim.results.files import atomic_write_text
from lina_sim.results.tables import markdown_table, text_table
from lina_sim.routing.stats import estimation_accuracy_rows
from lina_sim.serving.server import serving_inputs
from lina_sim.serving.setup import resolve_inference

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"


@dataclass(frozen=True)
class Source:
    """A shipped scenario whose sweep some figures read; ``quick`` shrinks it for --quick.
    ``kind`` is its scenario kind (a key of :data:`~lina_sim.experiments.kinds.KINDS`)."""

    name: str
    file: str
    kind: str = "training"
    quick: Callable[[dict], dict] | None = None
    # Points planned elsewhere (a regime map's grid), given --quick; else the file's sweep.
    points: Callable[[bool], list[SweepPoint]] | None = None


@dataclass(frozen=True)
class Figure:
    """One figure of the gallery: ``draw(table, path) -> plotted table``."""

    name: str
    title: str
    source: str
    file: str
    draw: Callable[[pd.DataFrame, Path], pd.DataFrame]
    caption: str


def _keep(field: str, values: list) -> Callable[[dict], dict]:
    """--quick: keep only ``values`` of a grid list (e.g. one of the three models)."""

    def shrink(data: dict) -> dict:
        data = copy.deepcopy(data)
        grid = data["sweep"]["grid"]
        grid[field] = [v for v in grid[field] if v in values]
        return data

    return shrink


def _quick_microop(data: dict) -> dict:
    # GPT-2: besides the 25 MB buckets, its 77 MB embedding gradient is a bucket of its
    # own, so sizes up to 77 MB still cut something.
    data = _keep("model.preset", ["gpt2-moe"])(data)
    keep = [2, 10, 30, 100, 200]
    for path, values in data["sweep"]["zip"].items():
        data["sweep"]["zip"][path] = [v for v in values if v in keep]
    return data


def _draw(name: str) -> Callable:
    """A figure function of plots.reproduce, imported when drawn (matplotlib is slow)."""

    def draw(df: pd.DataFrame, path: Path, **kw: Any) -> pd.DataFrame:
        import plots.reproduce as figs

        return getattr(figs, name)(df, path, **kw)

    return draw


TRAINING_SOURCES = [
    Source("training", "paper-training.yaml"),
    Source("ablation", "paper-ablation.yaml", quick=_keep("model.preset", ["transformer-xl-24"])),
    Source("microop", "paper-microop.yaml", quick=_quick_microop),
    Source(TRAINING_MAP.name, TRAINING_MAP.scenario, points=TRAINING_MAP.points),
]

TRAINING_FIGURES = [
    Figure(
        "speedup",
        "Training: step-time speedup against the number of experts",
        "training",
        "training_speedup_vs_experts.png",
        _draw("training_speedup"),
        "Speedup of each policy's simulated step time over DeepSpeed's, on the paper testbed "
        "(4 A100-40GB per node, one 100 Gb/s NIC per node), one expert per GPU.",
    ),
    Figure(
        "ablation",
        "Training: ablation (priority, then partitioning, then pipelining, then packing)",
        "ablation",
        "training_ablation.png",
        _draw("training_ablation"),
        "Lina's parts added one at a time on 16 GPUs; k = experts per device chosen by packing.",
    ),
    Figure(
        "microop",
        "Training: step time against micro-op size",
        "microop",
        "training_microop_size.png",
        _draw("microop_size"),
        "Gradients cut into micro-ops of 2 to 200 MB (16 GPUs): Lina cuts the 25 MB buckets DeepSpeed reduces, "
        "so sizes at or above a bucket cut nothing (the curve is flat there); DeepSpeed as reference.",
    ),
    Figure(
        "contention",
        "Training: backward all-to-all slowdown under contention",
        "training",
        "training_a2a_slowdown.png",
        _draw("a2a_slowdown"),
        "Each backward all-to-all's time in the step divided by its time alone on an idle network "
        "(rank 0's communicator), at 16 experts; 1.0 = no contention.",
    ),
    Figure(
        TRAINING_MAP.name,
        "Regime map, training: Lina over DeepSpeed by inter-node bandwidth per GPU and compute speed",
        TRAINING_MAP.name,
        "map_training.png",
        TRAINING_MAP.draw,
        "DeepSpeed's simulated step time over Lina's (blue: Lina faster; black line: break-even) on the paper "
        "testbed's 16 GPUs with Transformer-XL-24, as the NIC bandwidth per GPU (bytes/s; the testbed has "
        "3.1e9, a DGX A100 2.5e10) and every peak FLOP/s (a scale on the A100's; an H100 is 3.2) change. "
        "Stars: where the shipped cluster presets lie. `lina-sim explore` draws such maps for any scenario.",
    ),
]


# ---- inference ------------------------------------------------------------------------------
PATH_LENGTHS = (1, 3, 6)


def _quick_serving(data: dict) -> dict:
    """--quick: a quarter of the requests (the tail percentiles get noisier)."""
    data = copy.deepcopy(data)
    data["serving"]["requests"] = max(250, int(data["serving"].get("requests", 1000)) // 4)
    return data


def estimation_accuracy(setup: Any, lengths: tuple[int, ...] = PATH_LENGTHS) -> pd.DataFrame:
    """Per layer and path length: the share of served batches whose estimated top-2k
    expert set equals the actual one, and the mean share of the actual set the estimate
    got. The estimator is fit on the scenario's training slice of the trace and scored on
    batches of ``token_budget`` tokens of the served slice, at the layers Lina schedules
    (``layer >= path length``): out of sample; the ``*_in_sample`` columns score it on
    its own training slice, for contrast
    (:func:`lina_sim.routing.stats.estimation_accuracy_rows`)."""
    sh = serving_inputs(setup)
    # ``serve_experts`` is the whole trace; score on the served pool's rows only.
    serve = sh.serve_experts[sh.pool.token_index(list(range(len(sh.pool))))]
    rows = estimation_accuracy_rows(
        sh.train_experts, serve, setup.model.experts, setup.top_k, setup.serving.batching.token_budget, lengths
    )
    return pd.DataFrame(rows)


def _draw_accuracy(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Estimation accuracy per layer, on the path-length scenario's trace split."""
    import plots.reproduce as figs  # matplotlib: only when drawing

    point = expand(load_yaml(SCENARIO_DIR / "paper-pathlength.yaml"), str(SCENARIO_DIR / "paper-pathlength.yaml"))[0]
    return figs.estimation_accuracy(estimation_accuracy(resolve_inference(point)), path)


INFERENCE_SOURCES = [
    Source("inference", "paper-inference.yaml", "inference", quick=_quick_serving),
    Source("pathlength", "paper-pathlength.yaml", "inference", quick=_quick_serving),
    Source(INFERENCE_MAP.name, INFERENCE_MAP.scenario, "inference", points=INFERENCE_MAP.points),
]

INFERENCE_FIGURES = [
    Figure(
        "inference",
        "Inference: p50 and p95 latency per placement policy, normalised to ideal",
        "inference",
        "inference_latency.png",
        _draw("inference_latency"),
        "Request latency percentiles of each placement policy divided by those of `ideal` (tokens spread "
        "perfectly evenly) at the same point and served domain: domains across (each served on its own, "
        "and `mixed`: all four in one request stream), cluster sizes and any other swept setting (e.g. "
        "`expert_slots`: None = the default few slots per GPU with swaps over PCIe) down. The gate replays "
        "recorded expert choices (`scenarios/paper-inference.yaml`); skew = the busiest expert's tokens "
        "over the uniform share, mean over batches and layers.",
    ),
    Figure(
        "domains",
        "Inference: p50 and p95 latency over static per domain, with the batches' skew",
        "inference",
        "inference_domains.png",
        _draw("domain_ratios"),
        "Each policy's p50 and p95 request latency divided by `static`'s, per served domain (one domain "
        "per request stream, as an inference benchmark runs, and `mixed`), beside the skew of `static`'s "
        "batches there: the busiest expert's tokens over the uniform share (T*k/E), mean over batches and "
        "layers. The figure shows the 16-GPU points; the table every point.",
    ),
    Figure(
        "pathlength",
        "Inference: p95 latency against path length",
        "pathlength",
        "inference_path_length.png",
        lambda df, path: _draw("path_length")(df, path, length_col="policies[lina].path_length"),
        "Lina's p95 request latency (16 GPUs, 16 experts) with its estimator conditioned on the last 1, 3 "
        "or 6 layers of each token's path; `ideal`'s p95 is the dashed reference.",
    ),
    Figure(
        "accuracy",
        "Inference: estimation accuracy per layer",
        "pathlength",
        "inference_estimation_accuracy.png",
        _draw_accuracy,
        "Share of served batches whose estimated top-2k expert set (before the gate) equals the actual one "
        "(after it), per layer, for each path length; what decides whether Lina's phase 2 re-plans.",
    ),
    Figure(
        INFERENCE_MAP.name,
        "Regime map, inference: Lina over static placement by routing skew and batch tokens per GPU",
        INFERENCE_MAP.name,
        "map_inference.png",
        INFERENCE_MAP.draw,
        "`static`'s mean batch time over Lina's (blue: Lina faster; black line: break-even), 16 GPUs and 16 "
        "experts, top-1. Each skew (the busiest expert's top-1 share over uniform) is a trace generated from "
        "the recorded arXiv trace with that skew and its layer-to-layer paths kept "
        "(`RoutingTraceGenerator.with_skew`); `skew_produced` is the skew the generated trace has. A closed "
        "loop keeps every batch full at the budget. The star: the recorded traces' own skew and budget.",
    ),
]


SOURCES = TRAINING_SOURCES + INFERENCE_SOURCES
FIGURES = TRAINING_FIGURES + INFERENCE_FIGURES


# ---- running ------------------------------------------------------------------------------
def _plan(sources: list[Source], quick: bool, points: list[SweepPoint], owner: dict[str, list[int]]) -> None:
    """Validate every point of ``sources`` and append them to ``points`` with global
    indices, recording source -> indices in ``owner``; nothing is appended on error."""
    added: list[SweepPoint] = []
    for src in sources:
        path = SCENARIO_DIR / src.file
        data = load_yaml(path)
        if quick and src.quick:
            data = src.quick(data)
        try:
            planned = src.points(quick) if src.points else plan_points(expand(data, str(path)))
        except (ConfigError, SweepError) as e:
            raise SweepError(f"{path.name}: {e}") from None
        start = len(points) + len(added)
        owner[src.name] = list(range(start, start + len(planned)))
        added += [dataclasses.replace(p, index=start + i) for i, p in enumerate(planned)]
    points += added


def _split(table: pd.DataFrame, indices: list[int]) -> pd.DataFrame:
    part = table[table["point"].isin(indices)]
    return part.dropna(axis=1, how="all").reset_index(drop=True)


def reproduce(
    out: Path = Path("plots/gallery"),
    quick: bool = False,
    workers: int | None = None,
    cache: Cache | None = None,
    only: str | None = None,
    stream=None,
) -> int:
    """Run the experiments, draw the figures into ``out`` and write ``out/REPORT.md``."""
    stream = stream or sys.stdout
    t0 = time.perf_counter()
    sources, figures = SOURCES, FIGURES
    if only:
        wanted = {s.strip() for s in only.split(",") if s.strip()}
        unknown = wanted - {f.name for f in figures}
        if unknown:
            raise ConfigError("--only", f"unknown experiment(s) {sorted(unknown)}", [f.name for f in figures])
        figures = [f for f in figures if f.name in wanted]
        sources = [s for s in sources if s.name in {f.source for f in figures}]
    points: list[SweepPoint] = []
    owner: dict[str, list[int]] = {}
    skipped: dict[str, str] = {}  # kind -> why its experiments are skipped
    for kind in KINDS.values():  # every point valid before any runs
        try:
            _plan([s for s in sources if s.kind == kind.name], quick, points, owner)
        except SweepError as e:
            if not kind.optional:
                raise
            skipped[kind.name] = str(e)  # e.g. traces not recorded yet: the other kinds still stand
    sources = [s for s in sources if s.name in owner]
    figures = [f for f in figures if f.source in owner]
    for name, why in skipped.items():
        print(f"# {name} experiments skipped: {why}", file=stream)
    backend = LocalBackend(workers)
    cached = sum(cache.path(p.key).exists() for p in points) if cache else 0
    print(
        f"# reproduce{' --quick' if quick else ''}: {len(points)} points from "
        f"{', '.join(s.file for s in sources)} ({cached} cached), {backend.workers} workers",
        file=stream,
    )
    order = sorted(points, key=lambda p: not kind_of(p.scenario.kind).start_first)
    res = run_sweep(order, backend, cache, progress=Progress(len(points), cached, label="reproduce"))
    sections = []
    for fig in figures:
        table = _split(res.table, owner[fig.source])
        failed = table[table["status"] != "ok"]
        if len(failed) == len(table):
            sections.append((fig, None, failed, "every point of its scenario failed (see below)"))
        else:
            try:
                plotted = fig.draw(table, out / fig.file)
                sections.append((fig, plotted, failed, None))
            except Exception as e:  # noqa: BLE001 - one broken figure must not lose the others
                sections.append((fig, None, failed, f"{type(e).__name__}: {e}"))
        print(f"# {out / fig.file}" + (f"  (FAILED: {sections[-1][3]})" if sections[-1][3] else ""), file=stream)
    for fig, plotted, _, error in sections:
        if plotted is not None and not error:
            print(f"\n## {fig.title}\n{text_table(plotted)}", file=stream)
    print(file=stream)
    wall = time.perf_counter() - t0
    sim_s = float(res.table["sim_wall_s"].sum()) if "sim_wall_s" in res.table.columns else float("nan")
    report = render_report(
        sections, quick=quick, points=len(points), ran=res.ran, wall_s=wall, sim_s=sim_s, skipped=skipped
    )
    path = atomic_write_text(out / "REPORT.md", report)
    print(
        f"# report: {path}; {res.ran} points ran, {res.cached} from cache, {len(res.failed)} failed, {wall:.0f} s",
        file=stream,
    )
    return 1 if res.failed or any(s[3] for s in sections) else 0


# ---- the report ---------------------------------------------------------------------------
def render_report(
    sections: list, quick: bool, points: int, ran: int, wall_s: float, sim_s: float, skipped: dict[str, str]
) -> str:
    """REPORT.md: each figure with its caption and the table it plots; ``skipped`` maps a
    scenario kind to why its experiments were left out."""
    mode = "lina-sim reproduce --quick" if quick else "lina-sim reproduce"
    out = [
        "# Lina in simulation: reproduced experiments",
        "",
        f"Written by `{mode}` (lina-sim {package_version()}): {points} scenario points "
        f"({ran} simulated in this run, the rest from the cache), {wall_s:.0f} s; simulating every point "
        f"takes {sim_s:.0f} s of one core in all. Each figure below is "
        "followed by the table it plots. The scenarios are `scenarios/paper-*.yaml`; hardware numbers "
        "come from datasheets, never from fitting the paper's results, so where the simulator disagrees "
        "with the paper the disagreement is a finding, not a tuning target.",
        "",
    ]
    if quick:
        out += [
            "*Quick run:* the ablation covers Transformer-XL only, the micro-op sweep GPT-2 only at five "
            "sizes, and inference serves a quarter of the requests; run `lina-sim reproduce` for all three "
            "models, eight sizes and full-length inference.",
            "",
        ]
    for name, why in skipped.items():
        out += [f"*{name.capitalize()} experiments skipped:* {why}.", ""]
    for fig, table, failed, error in sections:
        out += [f"## {fig.title}", "", f"![{fig.name}]({fig.file})", "", fig.caption, ""]
        if error:
            out += [f"**Figure failed:** `{error}`", ""]
        if table is not None and len(table):
            out += [markdown_table(table), ""]
        if len(failed):
            errs = failed.drop_duplicates("point")[["point", "error"]]
            out += (
                [f"**{len(errs)} point(s) failed:**", ""]
                + [f"- point {r.point}: `{r.error}`" for r in errs.itertuples()]
                + [""]
            )
    return "\n".join(out)
