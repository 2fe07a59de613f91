"""``lina-sim tune``: search Lina's knobs on a training scenario with the simulator.

The knobs (:func:`search_space`): the largest allreduce micro-op (``micro_op_mb``, the
scenario's value times 1/4 ... 4), the all-to-all/FFN pipelining degree (1, 2, 4), how
many experts a device may hold (packing off, i.e. one; or packed by estimated cost up
to 2 or 4, ``max_experts_per_device``) and how micro-ops launch (``planned`` or
``local``). Every setting is one sweep point (validated first, cached, run in parallel);
settings that resolve to the same scenario run once. The result ranks them by
simulated step time against the scenario's own Lina entry (the default).

:func:`check_scenario` writes the scenario with two Lina entries, ``lina-default`` and
``lina-tuned``, which ``lina-sim validate`` (the runtime's command) measures on the
emulated testbed, the policies taking turns step by step; :func:`check_report` reads
its ``validation.csv`` back and says whether the tuned setting measured faster.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lina_sim.config.scenario import Scenario
from lina_sim.errors import ConfigError
from lina_sim.experiments.explore import load_base
from lina_sim.experiments.sweep import Backend, Cache, Progress, SweepPoint, SweepResult, plan_points, run_sweep
from lina_sim.policies.registry import policy_entries
from lina_sim.policies.training.lina import MIN_MICRO_OP_MB
from lina_sim.results.files import atomic_write_text
from lina_sim.workload.resolve import resolve_cluster_and_model

MICRO_OP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
PIPELINE_DEGREES = (1, 2, 4)
# (packing, max_experts_per_device): one expert per device, or packed by cost up to 2 / 4.
EXPERT_CHOICES: tuple[tuple[str, int], ...] = (("off", 1), ("cost", 2), ("cost", 4))
LAUNCHES = ("planned", "local")
DEFAULT_LABEL = "lina-default"
TUNED_LABEL = "lina-tuned"
TUNABLE_KINDS = ("training",)  # Lina's training knobs; placement has its own
# Steps closer than this (s) are the same step: the simulator is deterministic, and equal
# settings differ only by float rounding.
TIE_S = 1e-7


@dataclass(frozen=True)
class Setting:
    """One combination of Lina's knobs (``micro_op_mb`` in MB = 10^6 bytes)."""

    micro_op_mb: float
    pipeline_degree: int
    packing: str
    max_experts_per_device: int
    launch: str

    def describe(self) -> str:
        experts = "1 expert/device" if self.packing == "off" else f"<= {self.max_experts_per_device} experts/device"
        return (
            f"micro_op_mb={self.micro_op_mb:g}, pipeline_degree={self.pipeline_degree}, "
            f"{experts} ({self.packing}), launch={self.launch}"
        )


def search_space(micro_op_mb: float, world_size: int) -> list[Setting]:
    """Every setting tried: micro-op sizes around the scenario's ``micro_op_mb``, and the
    expert choices a world of ``world_size`` devices can hold."""
    sizes = sorted({max(MIN_MICRO_OP_MB, round(micro_op_mb * f, 6)) for f in MICRO_OP_FACTORS})
    experts = [(p, k) for p, k in EXPERT_CHOICES if k <= world_size]
    return [
        Setting(mo, r, p, k, launch)
        for mo, r, (p, k), launch in itertools.product(sizes, PIPELINE_DEGREES, experts, LAUNCHES)
    ]


@dataclass
class TunePlan:
    """The scenario, its Lina entry (the default) and one validated point per setting;
    point 0 is the default."""

    name: str
    base: dict
    source: str
    entry: dict
    settings: list[Setting]
    points: list[SweepPoint]


def _lina_entry(data: dict, label: str | None) -> dict:
    """A copy of the scenario's Lina entry (as a mapping) labelled ``label``, else the first."""
    entries = policy_entries(data.get("policies"), "training")
    lina = [i for i, e in enumerate(entries) if e.name == "lina" and (label is None or e.label == label)]
    if not lina:
        want = f"labelled {label!r}" if label else "named lina"
        raise ConfigError("--policy", f"no lina policy {want} in the scenario", [e.label for e in entries])
    raw = data["policies"][lina[0]]
    return {"name": raw} if isinstance(raw, str) else dict(raw)


def plan_tune(scenario: str | Path, label: str | None = None, overrides: dict[str, Any] | None = None) -> TunePlan:
    """Every setting of the scenario's Lina entry (``label``: which one, default the first
    ``lina``), resolved before any runs; the scenario's ``sweep:`` block is dropped."""
    source, base = load_base(scenario, overrides)
    kind = str(base.get("kind", TUNABLE_KINDS[0]))
    if kind not in TUNABLE_KINDS:
        raise ConfigError("kind", f"tune searches a training scenario's Lina knobs, got {kind!r}", TUNABLE_KINDS)
    entry = _lina_entry(base, label)
    entry.pop("label", None)
    cluster, _ = resolve_cluster_and_model(base, source)
    micro = float(entry.get("micro_op_mb", 30.0))
    settings = search_space(micro, cluster.world_size)
    scenarios = [_with_entry(base, source, {**entry, "label": "lina"}, {})]
    for s in settings:
        params = asdict(s)
        scenarios.append(_with_entry(base, source, {**entry, **params, "label": "lina"}, params))
    return TunePlan(str(base.get("name", Path(scenario).stem)), base, source, entry, settings, plan_points(scenarios))


def _with_entry(base: dict, source: str, entry: dict, swept: dict[str, Any]) -> Scenario:
    data = copy.deepcopy(base)
    data["policies"] = [entry]
    return Scenario(data, swept, source)


@dataclass
class TuneResult:
    """Every setting's simulated step (s), fastest first, and the default's."""

    plan: TunePlan
    table: pd.DataFrame  # one row per setting: the knobs, step_time_s, experts/pipeline as run
    default_step_s: float
    sweep: SweepResult

    @property
    def best(self) -> pd.Series:
        return self.table.iloc[0]

    @property
    def ties(self) -> int:
        """Other settings with the best's step time."""
        return int((self.table["step_time_s"] - self.best.step_time_s).abs().lt(TIE_S).sum()) - 1

    @property
    def runner_up(self) -> pd.Series | None:
        """The best setting with a different (slower) step time than the best's."""
        slower = self.table[(self.table["step_time_s"] - self.best.step_time_s) >= TIE_S]
        return slower.iloc[0] if len(slower) else None

    def setting(self, row: pd.Series) -> Setting:
        return Setting(**{k: row[k] for k in Setting.__dataclass_fields__})


def run_tune(
    plan: TunePlan, backend: Backend | None = None, cache: Cache | None = None, progress: Progress | bool = True
) -> TuneResult:
    """Simulate every setting (cached points are read back) and rank them."""
    res = run_sweep(plan.points, backend, cache, progress)
    t = res.table
    ok = t[t["status"] == "ok"]
    default = ok[ok["point"] == 0]
    if default.empty:
        raise ConfigError(
            "policies[lina]", f"the scenario's own Lina setting failed: {t.loc[t['point'] == 0, 'error'].iloc[0]}"
        )
    knobs = list(Setting.__dataclass_fields__)
    rows = ok[ok["point"] > 0][["point", *knobs, "step_time_s", "experts_per_device", "pipeline_degree"]]
    rows = rows.rename(columns={"experts_per_device": "experts_per_device_run"})
    # pipeline_degree is both a knob and what ran; they are equal by construction.
    rows = rows.loc[:, ~rows.columns.duplicated()].copy()
    # Many settings simulate to the same step (a micro-op larger than every bucket cuts
    # nothing more): among equal steps (to 0.1 us) the one changing fewest knobs of the
    # default ranks first, so the tuned setting is the smallest change that gains.
    own = _defaults(plan.entry)
    rows["knobs_changed"] = [sum(row[k] != own[k] for k in knobs) for _, row in rows.iterrows()]
    rows["step_key"] = (rows["step_time_s"] / TIE_S).round()
    rows = rows.sort_values(["step_key", "knobs_changed", "point"], kind="stable").drop(columns="step_key")
    return TuneResult(plan, rows.reset_index(drop=True), float(default["step_time_s"].iloc[0]), res)


def _defaults(entry: dict) -> dict[str, Any]:
    """The default entry's value of every knob (its own, else Lina's default)."""
    from lina_sim.policies.training.lina import LinaPolicy

    out = {k: entry.get(k, LinaPolicy.PARAMS[k].default) for k in Setting.__dataclass_fields__}
    if isinstance(out["packing"], bool):
        out["packing"] = "cost" if out["packing"] else "off"
    return out


def format_result(result: TuneResult, top: int = 5) -> str:
    """The fastest settings, then the best, its predicted step and the runner-up."""
    t, d = result.table, result.default_step_s
    lines = [f"{'rank':>4}  {'step ms':>8}  {'vs default':>10}  setting (experts/device as run)"]
    for i, row in t.head(top).iterrows():
        s = result.setting(row)
        lines.append(
            f"{i + 1:>4}  {row.step_time_s * 1e3:8.2f}  {d / row.step_time_s:9.3f}x  {s.describe()} "
            f"({int(row.experts_per_device_run)})"
        )
    best, second = result.best, result.runner_up
    lines.append(f"# default (the scenario's lina): {d * 1e3:.2f} ms per step")
    lines.append(
        f"# best: {result.setting(best).describe()}: {best.step_time_s * 1e3:.2f} ms predicted "
        f"({d / best.step_time_s:.3f}x the default; {result.ties} other settings simulate the same)"
    )
    if second is not None:
        lines.append(
            f"# runner-up: {result.setting(second).describe()}: {second.step_time_s * 1e3:.2f} ms predicted "
            f"({d / second.step_time_s:.3f}x the default)"
        )
    return "\n".join(lines)


def check_scenario(result: TuneResult, path: str | Path, steps: int | None = None) -> Path:
    """The scenario with two Lina entries, the default and the best setting (labels
    :data:`DEFAULT_LABEL`, :data:`TUNED_LABEL`), for ``lina-sim validate``. Relative
    paths in it are made absolute, so the file works from anywhere."""
    from lina_sim.config.scenario import beside

    plan = result.plan
    data = copy.deepcopy(plan.base)
    tuned = {k: _plain(v) for k, v in asdict(result.setting(result.best)).items()}
    data["policies"] = [
        {**plan.entry, "label": DEFAULT_LABEL},
        {**plan.entry, **tuned, "label": TUNED_LABEL},
    ]
    data["name"] = f"{plan.name}-tuned"
    if steps:
        data["steps"] = steps
    cluster = data.get("cluster")
    if isinstance(cluster, dict) and str(cluster.get("preset", "")).endswith((".yaml", ".yml")):
        cluster["preset"] = str(beside(str(cluster["preset"]), plan.source).resolve())
    compute = data.get("compute")
    if isinstance(compute, dict) and compute.get("profile"):
        compute["profile"] = str(beside(str(compute["profile"]), plan.source).resolve())
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _plain(v: Any) -> Any:
    """numpy scalars from a table as plain YAML numbers."""
    return v.item() if hasattr(v, "item") else v


@dataclass
class CheckReport:
    """Measured median step (s) of the default and the tuned setting, their standard
    errors, and the predictions; ``resolved`` when the difference exceeds twice its
    standard error (the testbed's noise cannot order closer pairs)."""

    default_s: float
    tuned_s: float
    default_se_s: float
    tuned_se_s: float
    steps: int
    predicted_default_s: float
    predicted_tuned_s: float

    @property
    def gain(self) -> float:
        """Measured default / tuned (above 1: the tuned setting is faster)."""
        return self.default_s / self.tuned_s

    @property
    def diff_se_s(self) -> float:
        return math.hypot(self.default_se_s, self.tuned_se_s)

    @property
    def resolved(self) -> bool:
        return abs(self.default_s - self.tuned_s) > 2 * self.diff_se_s

    def format(self) -> str:
        verdict = (
            ("faster" if self.tuned_s < self.default_s else "slower")
            if self.resolved
            else "not resolved (within twice the standard error)"
        )
        pct = (self.default_s / self.tuned_s - 1) * 100
        spread = 2 * self.diff_se_s / self.tuned_s * 100
        return (
            f"# measured ({self.steps} steps each, interleaved): default {self.default_s * 1e3:.1f} ms "
            f"(± {self.default_se_s * 1e3:.1f}), tuned {self.tuned_s * 1e3:.1f} ms (± {self.tuned_se_s * 1e3:.1f})\n"
            f"# predicted: default {self.predicted_default_s * 1e3:.1f} ms, "
            f"tuned {self.predicted_tuned_s * 1e3:.1f} ms ({self.predicted_default_s / self.predicted_tuned_s:.3f}x)\n"
            f"# tuned setting measured {verdict}: {self.gain:.3f}x the default ({pct:+.1f}% ± {spread:.1f}% at 2 s.e.)"
        )


def check_report(validation_csv: str | Path) -> CheckReport:
    """The default and tuned rows of a ``validation.csv`` written by ``lina-sim validate``."""
    from lina_sim.config.fields import read_text

    read_text(validation_csv, "validation table")  # one line if missing or a directory
    j = pd.read_csv(validation_csv)
    rows = {}
    for label in (DEFAULT_LABEL, TUNED_LABEL):
        r = j[j["policy"] == label]
        if r.empty:
            raise ConfigError(str(validation_csv), f"no row for policy {label!r}", sorted(map(str, j["policy"])))
        rows[label] = r.iloc[0]
    d, t = rows[DEFAULT_LABEL], rows[TUNED_LABEL]

    def se(r: pd.Series) -> float:
        return float(r["step_time_std_s"]) / math.sqrt(max(1, int(r["steps"])))

    return CheckReport(
        float(d["step_time_s_meas"]),
        float(t["step_time_s_meas"]),
        se(d),
        se(t),
        int(min(d["steps"], t["steps"])),
        float(d["step_time_s_pred"]),
        float(t["step_time_s_pred"]),
    )
