"""Regime maps: where one policy beats another, over a grid of two (or three) axes.

``lina-sim explore SCENARIO --x FIELD=RANGE --y FIELD=RANGE [--z FIELD=VALUES]`` runs the
scenario at every grid point through the sweep machinery (validated first, cached,
resumable, local processes or Ray) and tabulates ``policy``'s speedup over ``baseline``
(the baseline's metric over the policy's; the metric is a time, lower is better).

An axis is any field path a sweep accepts (``cluster.nic.bandwidth``,
``policies[lina].micro_op_mb``, ``serving.batching.tokens_per_gpu`` ...) or a derived
knob (:data:`KNOBS`), which sets the fields that realise it:

- ``inter_node_bw_per_gpu`` (bytes/s per GPU): the NIC bandwidth of a node over its GPUs;
- ``compute_speed`` (a scale): every peak FLOP/s of the GPU, times this;
- ``grad_bytes`` (bytes): the non-expert gradient bytes each rank allreduces per step,
  reached by resizing the token embedding (``model.vocab``; the LM head follows it);
- ``experts_per_gpu``: ``model.experts`` over the GPUs;
- ``batch_tokens_per_gpu`` (tokens): inference, the batching budget per GPU; training,
  ``micro_batch x seq_len``;
- ``skew`` (busiest expert's top-1 share over uniform): inference, a trace generated from
  the scenario's first routing trace (:meth:`RoutingTraceGenerator.with_skew`), served
  as one ``mixed`` stream; the skew the trace actually has is a column of the grid.

Knobs that cannot be met exactly (an integer vocabulary, a sampled trace) record what
they produced in ``<knob>_produced``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lina_sim.config.scenario import TOP_LEVEL, Scenario, beside, canonical_path, expand, get_path, load_yaml, set_path
from lina_sim.errors import ConfigError, LinaSimError
from lina_sim.experiments.kinds import kind_of
from lina_sim.experiments.sweep import Backend, Cache, Progress, SweepPoint, SweepResult, plan_points, run_sweep
from lina_sim.hardware.spec import ClusterSpec, available_presets, resolve_cluster
from lina_sim.policies.registry import policy_entries
from lina_sim.workload.model import ModelSpec
from lina_sim.workload.resolve import resolve_cluster_and_model

# The most grid points one map may have: a 50 x 50 map, or 10 panels of 15 x 15.
MAX_POINTS = 2500
# The most values one axis may expand to.
MAX_AXIS_VALUES = 200
# Lower is better for every default metric: speedup = baseline / policy.
DEFAULT_METRIC = {"training": "step_time_s", "inference": "latency_p95_s"}
DEFAULT_KIND = "training"  # a scenario without ``kind:`` (as the loader reads it)
RANGE_WORDS = "START:STOP:log|lin:N (e.g. 1e9:1e11:log:15) or a comma-separated list of numbers"


# ---- derived knobs ----------------------------------------------------------------------
@dataclass
class KnobContext:
    """What a knob needs to set a point: the point's data (cluster and model resolved),
    the scenario file (relative paths) and where generated routing traces go."""

    data: dict
    cluster: ClusterSpec
    model: ModelSpec
    source: str
    trace_dir: Path


@dataclass(frozen=True)
class Knob:
    """A derived axis: ``apply`` sets the scenario fields that give ``value`` (returning
    what it produced when that differs), ``read`` the value a scenario has (None: none)."""

    name: str
    unit: str
    help: str
    kinds: tuple[str, ...]
    apply: Callable[[KnobContext, float], float | None]
    read: Callable[[dict, ClusterSpec, ModelSpec], float | None]


def _cluster_block(data: dict) -> dict:
    block = data.get("cluster")
    if isinstance(block, str) or block is None:
        block = data["cluster"] = {"preset": block}
    return block


def _set_nic_per_gpu(ctx: KnobContext, value: float) -> None:
    c = ctx.cluster
    nic = _cluster_block(ctx.data).setdefault("nic", {})
    nic["bandwidth"] = float(value) * c.gpus_per_node / c.nics_per_node


def _read_nic_per_gpu(data: dict, c: ClusterSpec, m: ModelSpec) -> float:
    return c.nic.bandwidth * c.nics_per_node / c.gpus_per_node


def _set_compute_speed(ctx: KnobContext, value: float) -> None:
    gpu = _cluster_block(ctx.data).setdefault("gpu", {})
    gpu["peak_flops"] = {k: float(v) * float(value) for k, v in ctx.cluster.gpu.peak_flops.items()}


def _grad_bytes(m: ModelSpec) -> int:
    return m.param_counts().non_expert * m.dtype_bytes


def _set_grad_bytes(ctx: KnobContext, value: float) -> float:
    import dataclasses

    m = ctx.model
    per_row = _grad_bytes(dataclasses.replace(m, vocab=m.vocab + 1)) - _grad_bytes(m)  # bytes per vocab row
    rest = _grad_bytes(m) - per_row * m.vocab
    vocab = round((float(value) - rest) / per_row)
    if vocab < 1:
        raise ConfigError(
            "grad_bytes", f"{value:.4g} B is below what this model has without its embedding", f">= {rest + per_row} B"
        )
    ctx.data.setdefault("model", {})["vocab"] = vocab
    return float(rest + per_row * vocab)


def _set_experts_per_gpu(ctx: KnobContext, value: float) -> None:
    n = ctx.cluster.world_size
    experts = float(value) * n
    if experts < 1 or abs(experts - round(experts)) > 1e-6:
        raise ConfigError("experts_per_gpu", f"{value:g} x {n} GPUs is not a whole number of experts", f"k / {n}")
    ctx.data.setdefault("model", {})["experts"] = round(experts)


def _kind_of_data(data: dict) -> str:
    return str(data.get("kind", DEFAULT_KIND))


def _set_serving_budget(ctx: KnobContext, value: float) -> None:
    batching = ctx.data.setdefault("serving", {}).setdefault("batching", {})
    batching.pop("token_budget", None)
    batching["tokens_per_gpu"] = round(float(value))


def _set_micro_batch(ctx: KnobContext, value: float) -> None:
    seq = ctx.model.seq_len
    mb = float(value) / seq
    if mb < 1 or abs(mb - round(mb)) > 1e-6:
        raise ConfigError("batch_tokens_per_gpu", f"{value:g} tokens is not a whole number of {seq}-token sequences")
    ctx.data.setdefault("model", {})["micro_batch"] = round(mb)


def _read_serving_budget(data: dict, c: ClusterSpec, m: ModelSpec) -> float | None:
    batching = (data.get("serving") or {}).get("batching") or {}
    if batching.get("tokens_per_gpu") is not None:
        return float(batching["tokens_per_gpu"])
    return float(batching["token_budget"]) / c.world_size if batching.get("token_budget") else None


# What "batch tokens per GPU" is in each kind of scenario: (set, read).
BATCH_TOKENS = {
    "training": (_set_micro_batch, lambda d, c, m: float(m.tokens)),
    "inference": (_set_serving_budget, _read_serving_budget),
}


def _set_batch_tokens(ctx: KnobContext, value: float) -> None:
    BATCH_TOKENS[_kind_of_data(ctx.data)][0](ctx, value)


def _read_batch_tokens(data: dict, c: ClusterSpec, m: ModelSpec) -> float | None:
    return BATCH_TOKENS[_kind_of_data(data)][1](data, c, m)


def _trace_paths(data: dict, source: str) -> list[Path]:
    written = (data.get("serving") or {}).get("trace")
    written = [written] if isinstance(written, str) else list(written or [])
    if not written:
        raise ConfigError("serving.trace", "the skew knob needs a routing trace to fit", "a .npz trace path")
    return [beside(str(w), source) for w in written]


def _measured_skew(trace: Any) -> float:
    from lina_sim.routing.stats import expert_counts, skew_from_counts

    counts = expert_counts(trace.experts[:, :, :1], trace.num_experts)
    return float(np.mean(skew_from_counts(counts).max_over_uniform))


def _set_skew(ctx: KnobContext, value: float) -> float:
    from lina_sim.routing import traces as tr
    from lina_sim.routing.generator import RoutingTraceGenerator

    src = _trace_paths(ctx.data, ctx.source)[0]
    digest = hashlib.sha256(Path(src).read_bytes()).hexdigest()[:16]
    seed = int(ctx.data.get("seed", 0))
    path = (ctx.trace_dir / f"skew-{digest}-{float(value):.6g}-s{seed}.npz").resolve()
    if path.exists():
        trace = tr.load(path)
    else:
        real = tr.load(src)
        gen = RoutingTraceGenerator.fit(real).with_skew(float(value))
        trace = gen.generate(real.num_tokens, seed=seed, metadata={"made_by": f"lina-sim explore --skew {value:g}"})
        trace.save(path)  # atomic; the name is a content key, so a rerun reuses it
    serving = ctx.data.setdefault("serving", {})
    serving["trace"] = str(path)
    if "domain" in serving:  # one generated stream (the default when unset)
        serving["domain"] = "mixed"
    return _measured_skew(trace)


def _read_skew(data: dict, c: ClusterSpec, m: ModelSpec) -> float | None:
    from lina_sim.routing import traces as tr

    try:
        paths = _trace_paths(data, str(data.get("__source__", "<memory>")))
        return float(np.mean([_measured_skew(tr.load(p)) for p in paths]))
    except LinaSimError:
        return None


KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob(
            "inter_node_bw_per_gpu",
            "B/s",
            "inter-node bandwidth per GPU (NIC bandwidth x NICs per node / GPUs per node)",
            ("training", "inference"),
            _set_nic_per_gpu,
            _read_nic_per_gpu,
        ),
        Knob(
            "compute_speed",
            "x",
            "scale on every peak FLOP/s of the GPU",
            ("training", "inference"),
            _set_compute_speed,
            lambda d, c, m: None,  # relative to the scenario: filled in by the caller
        ),
        Knob(
            "grad_bytes",
            "B",
            "non-expert gradient bytes per rank per step (through model.vocab)",
            ("training",),
            _set_grad_bytes,
            lambda d, c, m: float(_grad_bytes(m)),
        ),
        Knob(
            "experts_per_gpu",
            "",
            "model.experts / GPUs",
            ("training", "inference"),
            _set_experts_per_gpu,
            lambda d, c, m: m.experts / c.world_size,
        ),
        Knob(
            "batch_tokens_per_gpu",
            "tokens",
            "tokens per GPU per batch (inference: the batching budget; training: micro_batch x seq_len)",
            ("training", "inference"),
            _set_batch_tokens,
            _read_batch_tokens,
        ),
        Knob(
            "skew",
            "x",
            "busiest expert's top-1 share over uniform, in a trace generated from the scenario's first trace",
            ("inference",),
            _set_skew,
            _read_skew,
        ),
    )
}


# ---- axes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One axis of a map: a field path or knob, its values, and whether they are spaced
    logarithmically (how the map draws it)."""

    flag: str  # --x, --y or --z
    name: str
    values: tuple[Any, ...]
    log: bool = False

    @property
    def knob(self) -> Knob | None:
        return KNOBS.get(self.name)

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise ConfigError(where, f"{text!r} is not a finite number", RANGE_WORDS)
    return v


def parse_values(text: str, where: str, numeric: bool = True) -> tuple[tuple[Any, ...], bool]:
    """``START:STOP:log|lin:N`` or ``a,b,c`` -> (values, log-spaced?). Non-numeric list
    items are allowed only when ``numeric`` is false (a third axis of categories)."""
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 4 or parts[2] not in ("log", "lin"):
            raise ConfigError(where, f"cannot parse range {text!r}", RANGE_WORDS)
        lo, hi = _number(parts[0], where), _number(parts[1], where)
        try:
            n = int(parts[3])
        except ValueError:
            raise ConfigError(where, f"{parts[3]!r} is not a whole number of values", RANGE_WORDS) from None
        if not 2 <= n <= MAX_AXIS_VALUES:
            raise ConfigError(where, f"{n} values", f"2 to {MAX_AXIS_VALUES} values per axis")
        if parts[2] == "log":
            if lo <= 0 or hi <= 0:
                raise ConfigError(where, f"a log range needs START and STOP > 0, got {text!r}", RANGE_WORDS)
            return tuple(float(v) for v in np.geomspace(lo, hi, n)), True
        return tuple(float(v) for v in np.linspace(lo, hi, n)), False
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(where, "no values", RANGE_WORDS)
    if len(items) > MAX_AXIS_VALUES:
        raise ConfigError(where, f"{len(items)} values", f"at most {MAX_AXIS_VALUES} values per axis")
    values: list[Any] = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            if numeric:
                raise ConfigError(where, f"{t!r} is not a number", RANGE_WORDS) from None
            values.append(t)
            continue
        if not math.isfinite(v):
            raise ConfigError(where, f"{t!r} is not a finite number", RANGE_WORDS)
        values.append(int(v) if v.is_integer() and "." not in t and "e" not in t.lower() else v)
    nums = [v for v in values if isinstance(v, (int, float))]
    log = len(nums) == len(values) >= 3 and min(nums) > 0 and max(nums) / min(nums) >= 20
    return tuple(values), log


def parse_axis(text: str, flag: str, numeric: bool = True) -> Axis:
    """``FIELD=RANGE`` (see :func:`parse_values`); the field is a knob or a field path."""
    name, sep, rng = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(flag, f"cannot parse {text!r}", "FIELD=RANGE, e.g. inter_node_bw_per_gpu=1e9:1e11:log:15")
    where = f"{flag} {name}"
    if name not in KNOBS:
        top = re.split(r"[.\[]", name, maxsplit=1)[0]
        if top not in TOP_LEVEL or top == "sweep" or (top == "policies" and "[" not in name):
            raise ConfigError(where, "unknown field or knob", _axis_words())
    values, log = parse_values(rng, where, numeric or name in KNOBS)  # knobs are numbers
    return Axis(flag, name, values, log)


def _axis_words() -> str:
    return (
        "a derived knob ("
        + ", ".join(KNOBS)
        + ") or a field path as sweeps take it (cluster.nic.bandwidth, policies[lina].micro_op_mb, ...)"
    )


# ---- the plan ---------------------------------------------------------------------------
@dataclass
class MapPlan:
    """A validated map: its points (one per grid cell and panel), what knobs produced per
    point, and the markers: where the scenario and the cluster presets lie (label, x, y)."""

    name: str
    kind: str
    axes: tuple[Axis, ...]  # x, y[, z]
    policy: str
    baseline: str
    metric: str
    points: list[SweepPoint]
    produced: dict[int, dict[str, float]] = field(default_factory=dict)
    markers: list[dict[str, Any]] = field(default_factory=list)


# The policy family each kind of scenario lists (lina_sim.policies.registry).
POLICY_FAMILY = {"training": "training", "inference": "placement"}


def _labels(data: dict, kind: str) -> list[str]:
    return [e.label for e in policy_entries(data.get("policies"), POLICY_FAMILY[kind])]


def _keep_policies(data: dict, kind: str, policy: str, baseline: str) -> None:
    """Only the two policies compared run (their labels), baseline first."""
    labels = _labels(data, kind)
    for flag, label in (("--baseline", baseline), ("--policy", policy)):
        if label not in labels:
            raise ConfigError(flag, f"policy {label!r} is not in the scenario", labels)
    if policy == baseline:
        raise ConfigError("--policy", f"is the baseline ({baseline!r}): compare two different policies", labels)
    entries = data["policies"]
    data["policies"] = [entries[labels.index(baseline)], entries[labels.index(policy)]]


def _apply(data: dict, axes: Sequence[Axis], values: Sequence[Any], source: str, trace_dir: Path) -> dict[str, float]:
    """Set each axis's value on ``data``: field paths first, then knobs (which read the
    cluster and model those fields give). Returns what the knobs produced."""
    for ax, v in zip(axes, values):
        if ax.knob is None:
            try:
                set_path(data, *canonical_path(ax.name, v))
            except ConfigError as e:
                raise ConfigError(f"{ax.flag} {ax.name}", e.problem, e.allowed) from None
    produced: dict[str, float] = {}
    # grad_bytes last: the gate's and other knobs' parameters (experts, ...) count in it.
    knobs = sorted(
        ((ax, v) for ax, v in zip(axes, values) if ax.knob is not None), key=lambda t: t[0].name == "grad_bytes"
    )
    for ax, v in knobs:
        cluster, model = resolve_cluster_and_model(data, source)
        try:
            got = ax.knob.apply(KnobContext(data, cluster, model, source, trace_dir), v)
        except ConfigError as e:
            raise ConfigError(f"{ax.flag} {ax.name}", e.problem, e.allowed) from None
        if got is not None:
            produced[f"{ax.name}_produced"] = got
    return produced


def load_base(scenario: str | Path, overrides: dict[str, Any] | None = None) -> tuple[str, dict]:
    """(absolute source, data) of a scenario without its ``sweep:`` block (the axes are
    the sweep), with ``overrides`` (field path -> value) set."""
    source = str(Path(scenario).resolve())
    raw = load_yaml(scenario)
    raw.pop("sweep", None)
    base = expand(raw, source)[0].data
    for path, v in (overrides or {}).items():
        try:
            set_path(base, *canonical_path(path, v))
        except ConfigError as e:
            raise ConfigError(f"--set {path}", e.problem, e.allowed) from None
    return source, base


def plan_map(
    scenario: str | Path,
    axes: Sequence[Axis],
    policy: str,
    baseline: str,
    metric: str | None = None,
    overrides: dict[str, Any] | None = None,
    trace_dir: str | Path = "results/.cache/traces",
    max_points: int = MAX_POINTS,
) -> MapPlan:
    """Every point of the map, resolved (so validated) before anything runs. The
    scenario's own ``sweep:`` block is dropped: the axes are the sweep."""
    source, base = load_base(scenario, overrides)
    kind = _kind_of_data(base)
    kind_of(kind)
    for ax in axes:
        if ax.knob is not None and kind not in ax.knob.kinds:
            raise ConfigError(
                f"{ax.flag} {ax.name}",
                f"is not a knob of a {kind} scenario",
                [k.name for k in KNOBS.values() if kind in k.kinds],
            )
    names = [ax.name for ax in axes]
    if len(set(names)) != len(names):
        raise ConfigError(axes[-1].flag, f"{names} name the same field twice", "a different field per axis")
    for ax in axes[:2]:
        if not ax.numeric:
            raise ConfigError(f"{ax.flag} {ax.name}", "a map axis must be numeric", RANGE_WORDS)
    total = math.prod(len(ax.values) for ax in axes)
    if total > max_points:
        shape = " x ".join(str(len(ax.values)) for ax in axes)
        where = " x ".join(f"{ax.flag} {ax.name}" for ax in axes)
        raise ConfigError(where, f"{shape} = {total} points is over the limit", f"at most {max_points} points")
    _keep_policies(base, kind, policy, baseline)
    metric = metric or DEFAULT_METRIC[kind]
    trace_dir = Path(trace_dir)
    if any(ax.name == "skew" for ax in axes):
        trace_dir.mkdir(parents=True, exist_ok=True)
    # One cell per combination: z outermost, then y, x fastest.
    scenarios, produced = [], {}
    order = list(reversed(axes))
    for i, combo in enumerate(_product([ax.values for ax in order])):
        values = list(reversed(combo))
        data = copy.deepcopy(base)
        got = _apply(data, axes, values, source, trace_dir)
        produced[i] = got
        # Knobs are not field paths, so the sweep's check that each swept path matters
        # sees only the field-path axes; the knobs join the swept columns after it.
        scenarios.append(Scenario(data, {ax.name: v for ax, v in zip(axes, values) if ax.knob is None}, source))
    # What knobs produced rides along as swept columns, so every row of the sweep's table
    # carries it (the cache key is the resolved scenario's: unaffected).
    points = [
        SweepPoint(
            p.index,
            Scenario(
                p.scenario.data,
                {**{ax.name: v for ax, v in zip(axes, _values(axes, p.index))}, **produced[p.index]},
                source,
            ),
            p.key,
            p.policies,
        )
        for p in plan_points(scenarios)
    ]
    plan = MapPlan(
        Path(scenario).stem if "name" not in base else str(base["name"]),
        kind,
        tuple(axes),
        policy,
        baseline,
        metric,
        points,
        produced,
    )
    plan.markers = _markers(base, axes, source)
    return plan


def _values(axes: Sequence[Axis], index: int) -> list[Any]:
    """The axis values of point ``index`` (x fastest, then y, then z)."""
    out = []
    for ax in axes:
        index, i = divmod(index, len(ax.values))
        out.append(ax.values[i])
    return out


def _product(lists: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    import itertools

    return list(itertools.product(*lists))


def _read_axis(ax: Axis, data: dict, cluster: ClusterSpec, model: ModelSpec, base_cluster: ClusterSpec) -> float | None:
    if ax.name == "compute_speed":
        dtype = model.dtype if model.dtype in cluster.gpu.peak_flops else next(iter(cluster.gpu.peak_flops))
        return (
            cluster.gpu.flops(dtype) / base_cluster.gpu.flops(dtype) if dtype in base_cluster.gpu.peak_flops else None
        )
    if ax.knob is not None:
        return ax.knob.read(data, cluster, model)
    path, _ = canonical_path(ax.name, 0)
    try:
        v = get_path(data, path)
    except (KeyError, LinaSimError):
        v = None
    if v is None and path.startswith("cluster."):
        v = getattr_path(cluster, path.split(".")[1:])
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def getattr_path(obj: Any, names: Sequence[str]) -> Any:
    for n in names:
        obj = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if obj is None:
            return None
    return obj


CLUSTER_KNOBS = ("inter_node_bw_per_gpu", "compute_speed")


def _markers(base: dict, axes: Sequence[Axis], source: str) -> list[dict[str, Any]]:
    """Where the scenario itself and, when an axis is a cluster's (a cluster knob or a
    ``cluster.`` field), each shipped cluster preset lie on the map's x and y (other
    axes keep the scenario's values). Those an axis cannot place are left out; presets
    at the same place share one marker."""
    cluster0, model = resolve_cluster_and_model(base, source)
    data0 = {**base, "__source__": source}
    own = f"{base.get('name', Path(source).stem)} (this scenario)"
    candidates: list[tuple[str, dict, ClusterSpec]] = [(own, data0, cluster0)]
    if any(ax.name in CLUSTER_KNOBS or ax.name.startswith("cluster.") for ax in axes[:2]):
        block = base.get("cluster") if isinstance(base.get("cluster"), dict) else {}
        keep = {k: block[k] for k in ("nodes",) if k in block}
        for preset in available_presets():
            try:
                c = resolve_cluster({"preset": preset, **keep})
            except LinaSimError:
                continue
            candidates.append((preset, {**data0, "cluster": {"preset": preset, **keep}}, c))
    out: list[dict[str, Any]] = []
    for label, data, cluster in candidates:
        xy = [_read_axis(ax, data, cluster, model, cluster0) for ax in axes[:2]]
        if any(v is None for v in xy):
            continue
        same = next((m for m in out if math.isclose(m["x"], xy[0]) and math.isclose(m["y"], xy[1])), None)
        if same is not None:
            same["label"] += f", {label}"
        else:
            out.append({"label": label, "x": xy[0], "y": xy[1]})
    return out


# ---- running and the grid ---------------------------------------------------------------
@dataclass
class MapResult:
    """A finished map: one grid row per point, and the sweep's accounting."""

    plan: MapPlan
    grid: pd.DataFrame
    sweep: SweepResult


def run_map(
    plan: MapPlan, backend: Backend | None = None, cache: Cache | None = None, progress: Progress | bool = True
) -> MapResult:
    """Run (or read from ``cache``) every point, then one grid row per point: the axes,
    both policies' metric, ``speedup`` = baseline / policy, and what knobs produced."""
    res = run_sweep(plan.points, backend, cache, progress)
    names = [ax.name for ax in plan.axes]
    return MapResult(plan, grid_of(res.table, names, plan.policy, plan.baseline, plan.metric), res)


def grid_of(table: pd.DataFrame, names: Sequence[str], policy: str, baseline: str, metric: str) -> pd.DataFrame:
    """The sweep's rows (one per point, policy and, for inference, domain) as one row
    per point: the axes (``names``), what knobs produced, both policies' ``metric`` and
    ``speedup`` = baseline / policy; several rows of one policy (domains) average."""
    if metric not in table.columns and (table["status"] == "ok").any():
        numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
        raise ConfigError("--metric", f"{metric!r} is not a result column", numeric)
    produced_cols = [c for c in table.columns if c.endswith("_produced")]
    extra = [
        c
        for c in ("batch_skew_mean", "batch_tokens_per_gpu_mean", "experts_per_device", "pipeline_degree")
        if c in table.columns
    ]
    rows = []
    for point, sub in table.groupby("point", sort=True):
        first = sub.iloc[0]
        row: dict[str, Any] = {"point": point, **{n: first[n] for n in [*names, *produced_cols]}}
        # A table without failures may have lost its all-empty error column (reproduce).
        errors = sub.loc[sub["status"] != "ok", "error"].dropna() if "error" in sub else pd.Series([], dtype=object)
        row["status"] = "ok" if errors.empty else "error"
        row["error"] = None if errors.empty else str(errors.iloc[0])
        for who, label in (("baseline", baseline), ("policy", policy)):
            own = sub[(sub["policy"] == label) & (sub["status"] == "ok")]
            row[f"{who}_{metric}"] = float(own[metric].mean()) if len(own) else math.nan
            for c in extra:
                row[f"{who}_{c}"] = float(own[c].mean()) if len(own) else math.nan
        b, p = row[f"baseline_{metric}"], row[f"policy_{metric}"]
        row["speedup"] = b / p if p and math.isfinite(p) and math.isfinite(b) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def summary(result: MapResult) -> str:
    """Where the policy wins, in a line."""
    g, plan = result.grid, result.plan
    s = g["speedup"].dropna()
    if s.empty:
        return f"# {plan.policy} vs {plan.baseline}: no point finished"
    wins = int((s > 1.0).sum())
    return (
        f"# {plan.policy} vs {plan.baseline} ({plan.metric}): faster on {wins} of {len(s)} points, "
        f"speedup {s.min():.3f}x to {s.max():.3f}x (median {s.median():.3f}x)"
    )


def format_grid(result: MapResult, panel: Any = None) -> str:
    """The speedup as a text table: y down, x across (one z panel)."""
    plan, g = result.plan, result.grid
    x, y = plan.axes[0].name, plan.axes[1].name
    if len(plan.axes) > 2:
        g = g[g[plan.axes[2].name] == panel]
    t = g.pivot_table(index=y, columns=x, values="speedup", aggfunc="first").sort_index(ascending=False)
    head = f"{y} \\ {x}"
    cols = [f"{c:.3g}" for c in t.columns]
    width = max([len(head)] + [len(f"{i:.4g}") for i in t.index])
    lines = [head.ljust(width) + " " + " ".join(c.rjust(6) for c in cols)]
    for idx, r in t.iterrows():
        cells = ["   nan" if not math.isfinite(v) else f"{v:6.3f}" for v in r.to_numpy(dtype=float)]
        lines.append(f"{idx:.4g}".ljust(width) + " " + " ".join(cells))
    return "\n".join(lines)


def write_map(result: MapResult, out: str | Path, title: str | None = None) -> list[Path]:
    """``out/grid.parquet`` (one row per point), ``out/markers.csv`` and ``out/map.png``,
    published together (nothing half-written if drawing fails)."""
    from lina_sim.experiments.sweep import write_parquet
    from lina_sim.results.files import staged_dir
    from plots.maps import speedup_map

    plan = result.plan
    out = Path(out)
    with staged_dir(out) as tmp:
        write_parquet(result.grid, tmp / "grid.parquet")
        pd.DataFrame(plan.markers, columns=["label", "x", "y"]).to_csv(tmp / "markers.csv", index=False)
        speedup_map(
            result.grid,
            tmp / "map.png",
            x=plan.axes[0].name,
            y=plan.axes[1].name,
            z=plan.axes[2].name if len(plan.axes) > 2 else None,
            xlog=plan.axes[0].log,
            ylog=plan.axes[1].log,
            title=title or f"{plan.name}: {plan.policy} over {plan.baseline} ({plan.metric})",
            markers=plan.markers,
        )
    return [out / "grid.parquet", out / "markers.csv", out / "map.png"]


# ---- the maps of ``lina-sim reproduce`` -------------------------------------------------
SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"


@dataclass(frozen=True)
class MapSpec:
    """A map the reproduction draws: a shipped scenario, the axes (full and --quick) and
    the fields fixed for every point."""

    name: str
    scenario: str  # a file in scenarios/
    x: str
    y: str
    quick_x: str
    quick_y: str
    policy: str
    baseline: str
    metric: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def axes(self, quick: bool) -> list[Axis]:
        return [
            parse_axis(self.quick_x if quick else self.x, "--x"),
            parse_axis(self.quick_y if quick else self.y, "--y"),
        ]

    def plan(self, quick: bool, trace_dir: str | Path = "results/.cache/traces") -> MapPlan:
        return plan_map(
            SCENARIO_DIR / self.scenario,
            self.axes(quick),
            self.policy,
            self.baseline,
            self.metric,
            dict(self.overrides),
            trace_dir,
        )

    def points(self, quick: bool) -> list[SweepPoint]:
        """The map's validated points (for the reproduction's one sweep)."""
        return self.plan(quick).points

    def draw(self, table: pd.DataFrame, path: Path) -> pd.DataFrame:
        """The figure from the reproduction's rows of this map; returns the speedup table
        (y down, x across) with what the knobs produced."""
        from plots.maps import speedup_map

        names = [c for c in (self.x.partition("=")[0], self.y.partition("=")[0])]
        grid = grid_of(table, names, self.policy, self.baseline, self.metric)
        source, base = load_base(SCENARIO_DIR / self.scenario, dict(self.overrides))
        axes = self.axes(quick=False)
        speedup_map(
            grid,
            path,
            x=names[0],
            y=names[1],
            xlog=axes[0].log,
            ylog=axes[1].log,
            title=f"{self.policy} over {self.baseline}: speedup ({self.metric})",
            markers=_markers(base, axes, source),
        )
        return speedup_table(grid, names[0], names[1])


def speedup_table(grid: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The speedup with y down (largest first) and x across; a knob's produced values
    (which follow x) as a last row."""
    t = grid.pivot_table(index=y, columns=x, values="speedup", aggfunc="first").sort_index(ascending=False)
    t = t.round(3)
    t.index = [f"{y}={v:.4g}" for v in t.index]
    produced = f"{x}_produced"
    if produced in grid.columns:
        t.loc[produced] = grid.groupby(x)[produced].first().reindex(t.columns).round(3).to_numpy()
    t.columns = [f"{c:.3g}" for c in t.columns]
    return t.rename_axis(f"{y} \\ {x}").reset_index()


# Lina against DeepSpeed on the paper testbed (Transformer-XL-24, 16 GPUs): the NIC per
# GPU from 0.5 to 50 GB/s (the testbed has 3.1, a DGX A100 25) and peak FLOP/s from 1/4
# to 8 times an A100's (an H100 is 3.2).
TRAINING_MAP = MapSpec(
    "map-training",
    "paper-training.yaml",
    "inter_node_bw_per_gpu=5e8:5e10:log:8",
    "compute_speed=0.25:8:log:8",
    "inter_node_bw_per_gpu=5e8:5e10:log:5",
    "compute_speed=0.25:8:log:5",
    "lina",
    "deepspeed",
    "step_time_s",
)
# Lina against static placement (16 GPUs, 16 experts, top-1): traces generated from the
# arXiv trace at each skew, a closed loop that keeps batches full at the budget, and the
# mean batch time (the map is about serving a batch, not queueing).
INFERENCE_MAP = MapSpec(
    "map-inference",
    "paper-inference.yaml",
    "skew=1.25:8:log:8",
    "batch_tokens_per_gpu=64:1024:log:8",
    "skew=1.25:8:log:5",
    "batch_tokens_per_gpu=64:1024:log:5",
    "lina",
    "static",
    "batch_time_mean_s",
    (
        ("serving.trace", "traces/moe12-top1-arxiv.npz"),
        ("serving.requests", 448),
        ("serving.arrival", {"process": "closed", "concurrency": 256}),
    ),
)
REPRODUCE_MAPS = (TRAINING_MAP, INFERENCE_MAP)
