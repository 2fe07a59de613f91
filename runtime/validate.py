"""Simulator against the real runtime: calibrate, predict, measure, compare.

``lina-sim validate SCENARIO.yaml [--testbed 2x2 --nic 400mbit] [--profile P.yaml]``:

1. **calibrate** the testbed with ``lina-run calibrate`` (links, collectives, matmuls), or
   reuse ``--profile``;
2. **profile compute**: run every compute op of the scenario's model for real on all
   ranks at once, without the network (all-to-alls replaced by local copies, no
   gradient reduction), once per pipelining degree the policies use, and write a
   ``ProfileComputeModel`` table (``role.phase`` x tokens -> median seconds);
3. **predict**: ``lina-sim``'s training simulation with ``cluster.preset`` = the
   calibrated profile and ``compute: {model: profile}`` = that table;
4. **measure**: the same scenario file on the testbed through ``lina-run``;
5. **compare**: predicted against measured step time (median over steps) per policy and
   point, error %, whether the policies rank the same; a bar plot and, per policy, the
   predicted and measured timelines of one step side by side.

Nothing here adjusts a simulator parameter to the measurement: the simulator sees only
the calibration (steps 1-2), which runs before and apart from the measured runs.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any, Sequence

import yaml

from lina_sim.errors import ConfigError
from lina_sim.results.files import atomic_write_text

PROFILE_STEPS = 6  # compute-only steps per pipelining degree (the first is a warm-up)


# ---------------------------------------------------------------------------------------
# Compute profile (rank side, through `lina-run SCENARIO --profile-compute OUT`)
# ---------------------------------------------------------------------------------------
class _LocalHandle:
    def __init__(self, t):
        self.t = t

    def wait(self):
        return self.t


def profile_compute_rank(ctx: Any, setup: Any) -> list[dict]:
    """Time the model's compute ops on this rank with a local exchange (the fewest
    experts per rank, receiving as many rows as in the real run, padded dispatch), for
    every pipelining degree of the scenario's policies. Returns rows {op, shape, tokens,
    seconds} (median over steps)."""
    from runtime.dist import one_core_each

    return one_core_each(ctx.info, lambda: _profile_ops(ctx, setup))


def _profile_ops(ctx: Any, setup: Any) -> list[dict]:
    import torch

    from lina_sim.policies.registry import make_training_policy
    from lina_sim.workload.graph import build_training_graph
    from runtime.ep_moe import TORCH_DTYPES, EPTransformer, Layout
    from runtime.executor import Clock, RankExchange, batch

    class LocalExchange(RankExchange):
        def a2a(self, op, send, in_splits, out_splits):
            return _LocalHandle(send)

        def counts_a2a(self, counts):
            return counts

    from lina_sim.workload.graph import packing_candidates

    spec = setup.model
    k = packing_candidates(spec, setup.cluster.world_size)[0]  # the fewest experts per rank
    degrees = sorted({make_training_policy(e.name, **e.params).pipeline_degree for e in setup.policies})
    samples: dict[tuple[str, float], list[float]] = {}
    clock = Clock(ctx.now, ctx.info.device)
    for r in degrees:
        graph = build_training_graph(spec, setup.cluster, experts_per_device=k, pipeline_degree=r)
        ops = {o.name: o for o in graph.ops}
        lay = Layout(k=k, ep_size=spec.experts // k, ep_rank=0, r=r, dispatch="padded")
        model = EPTransformer(spec, lay, setup.scenario.seed).to(ctx.info.device, TORCH_DTYPES[spec.dtype])
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        for step in range(PROFILE_STEPS):
            tokens, targets = (x.to(ctx.info.device) for x in batch(spec, setup.scenario.seed, ctx.info.rank, step))
            ex = LocalExchange(ctx.info.rank, None, {}, None, None, clock, ops)
            opt.zero_grad(set_to_none=True)
            clock.start_step()
            loss = model.loss(tokens, targets, ex)
            ex.mark("head.bwd")
            loss.backward()
            ex.mark("optimizer")
            opt.step()
            if step == 0:
                continue  # warm-up
            per_op: dict[str, float] = {}
            for e in ex.compute_events():  # an op may be cut by marks: sum its pieces
                per_op[e.op] = per_op.get(e.op, 0.0) + e.end - e.start
            for name, sec in per_op.items():
                op = ops[name]
                samples.setdefault((op.profile_key, float(op.tokens)), []).append(sec)
    return [{"op": key, "shape": "", "tokens": tok, "seconds": statistics.median(v)}
            for (key, tok), v in sorted(samples.items())]


def write_compute_profile(results: list, out: str | Path) -> Path:
    """Median over ranks of each (op, tokens) row of the scenario's first point (the
    only one profiled: all points of a validation share one model shape per run)."""
    by: dict[tuple[str, float], list[float]] = {}
    for res in results:
        for row in res["rows"]:
            by.setdefault((row["op"], row["tokens"]), []).append(row["seconds"])
    rows = [{"op": k, "shape": "", "tokens": t, "seconds": statistics.median(v)} for (k, t), v in sorted(by.items())]
    header = ("# Compute profile measured by `lina-sim validate` (lina-run --profile-compute): every compute op of\n"
              "# the model on all ranks at once, no network; seconds = median over steps and ranks.\n")
    return atomic_write_text(out, header + yaml.safe_dump({"rows": rows}, sort_keys=False))


# ---------------------------------------------------------------------------------------
# Launcher side
# ---------------------------------------------------------------------------------------
CALIBRATION_COLLECTIVE_BYTES = "65536,262144,1048576,2097152,4194304"


def refine_profile(profile: str | Path, out: Path, workload_bytes: float | None = None) -> tuple[Path, float, float]:
    """The profile with the inter-node link fitted to the calibration's own collectives
    (ping-pong fits one TCP flow; collectives add many concurrent flows, gloo's
    algorithms and its per-collective overhead), the alpha-beta way calibrate.py fits
    links: bandwidth from the largest messages the workload sends, latency from the
    smallest.

    - ``nic.efficiency``: geometric mean over all-to-all and allreduce of (simulated time
      at efficiency 1) / (measured time) at the smallest calibrated size that covers
      ``workload_bytes`` (the scenario's largest collective per rank; the largest
      calibrated size without it), capped at 1: a shaped TCP link's efficiency falls
      with message size (4 MB all-to-alls reach ~0.65 of it, 1 MB ones ~0.8), so sizes
      far above the workload's would bias every prediction;
    - per-hop ``latency`` of ``nic`` and ``nvlink``: least squares over the smallest
      measured all-to-all and allreduce (simulated time is affine in it), at least 0.
      Not floored at the ping-pong fit: on the testbed a 4 KB ping-pong sometimes takes
      ~2 ms in every repetition of a calibration run (2 of 3 runs once), which as a floor
      made every small collective 8x too slow.

    Returns (path, efficiency, latency s). Nothing here sees a training step."""
    import math

    from lina_sim.hardware.spec import cluster_from_dict
    from lina_sim.network.alone import AloneTimes
    from runtime.calibrate import raw_path

    data = yaml.safe_load(Path(profile).read_text())
    raw = yaml.safe_load(raw_path(profile).read_text())
    rows = raw.get("collectives", [])
    kinds = [k for k in ("all_to_all", "allreduce") if any(r["kind"] == k for r in rows)]
    if data.get("nodes", 1) < 2 or not kinds:
        lat = max(data["nic"].get("latency", 0.0), data["nvlink"].get("latency", 0.0))
        return atomic_write_text(out, yaml.safe_dump(data, sort_keys=False)), data["nic"].get("efficiency", 1.0), lat
    group = tuple(range(data["nodes"] * data["gpus_per_node"]))

    def sim(kind: str, nbytes: float, eff: float, lat: float | None) -> float:
        d = copy.deepcopy(data)
        d["nic"]["efficiency"] = eff
        if lat is not None:
            d["nic"]["latency"] = d["nvlink"]["latency"] = lat
        return AloneTimes(cluster_from_dict(d, where=Path(out).stem))(kind, nbytes, group)

    big = {k: _covering([r for r in rows if r["kind"] == k], workload_bytes) for k in kinds}
    ratios = [sim(k, big[k]["bytes"], 1.0, None) / big[k]["seconds"] for k in kinds]
    eff = min(1.0, math.exp(sum(map(math.log, ratios)) / len(ratios)))
    small = {k: min((r for r in rows if r["kind"] == k), key=lambda r: r["bytes"]) for k in kinds}
    t0 = {k: sim(k, small[k]["bytes"], eff, 0.0) for k in kinds}
    slope = {k: (sim(k, small[k]["bytes"], eff, 1e-3) - t0[k]) / 1e-3 for k in kinds}
    fit = sum(slope[k] * (small[k]["seconds"] - t0[k]) for k in kinds) / max(sum(v * v for v in slope.values()), 1e-30)
    lat = max(fit, 0.0)
    data["nic"]["efficiency"] = eff
    data["nic"]["latency"] = data["nvlink"]["latency"] = lat
    data["source"] = str(data.get("source", "")) + (
        f"; lina-sim validate fitted nic.efficiency {eff:.3f} (simulated/measured time of the largest calibrated "
        f"collectives: {', '.join(f'{x:.3f}' for x in ratios)}) and per-hop latency {lat * 1e6:.0f} us (least "
        f"squares over the smallest calibrated collectives)")
    return atomic_write_text(out, yaml.safe_dump(data, sort_keys=False)), eff, lat


def calibrated_profile(spec: Any, out: Path, profile: str | None, model: Any, timeout_s: float,
                       workload_bytes: float) -> Path:
    """Step 1 of a validation: calibrate the testbed ``spec`` for ``model`` (or reuse
    ``profile``) and fit its links at the workload's sizes; ``out/profile-refined.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    if profile is None:
        profile = str(calibrate(spec, out / "profile.yaml", model_shapes(model), timeout_s))
    elif not Path(profile).is_file():
        raise ConfigError("--profile", f"no such file {profile!r}")
    return prepare_profile(profile, out, workload_bytes)


def _covering(rows: list[dict], nbytes: float | None) -> dict:
    """The row of the smallest size >= ``nbytes`` (the largest row if none is, or without ``nbytes``)."""
    above = [r for r in rows if nbytes is not None and r["bytes"] >= nbytes]
    return min(above, key=lambda r: r["bytes"]) if above else max(rows, key=lambda r: r["bytes"])


def training_collective_bytes(setup: Any) -> float:
    """The largest collective per rank a training scenario's policies issue: its
    all-to-alls unpipelined with the fewest experts per device, and every policy's
    gradient micro-ops (buckets, partitions)."""
    from lina_sim.policies.registry import make_training_policy
    from lina_sim.workload.graph import build_training_graph, packing_candidates

    k = packing_candidates(setup.model, setup.cluster.world_size)[0]
    graph = build_training_graph(setup.model, setup.cluster, experts_per_device=k, pipeline_degree=1)
    return max(m.nbytes for e in setup.policies for m in graph.micro_ops(make_training_policy(e.name, **e.params)))


def prepare_profile(profile: str | Path, out: Path, workload_bytes: float | None = None) -> Path:
    """``out/profile-refined.yaml``: ``profile`` with links fitted to its collectives."""
    import shutil

    from runtime.calibrate import raw_path

    shutil.copyfile(raw_path(profile), raw_path(out / "profile-refined.yaml"))  # the raw data travels along
    path, eff, lat = refine_profile(profile, out / "profile-refined.yaml", workload_bytes)
    at = f" at the workload's sizes (<= {workload_bytes / 2**20:.2f} MiB per rank)" if workload_bytes else ""
    print(f"validate: from the calibrated collectives{at}: nic.efficiency {eff:.3f}, per-hop latency "
          f"{lat * 1e6:.0f} us -> {path}")
    return path


def resolved_scenario(src: str | Path, profile: str | Path, compute_profile: str | Path | None, out: Path) -> Path:
    """The scenario with ``cluster.preset`` = the profile (other cluster overrides kept)
    and, if given, ``compute: {model: profile}``; written to ``out``."""
    from lina_sim.config.scenario import load_yaml

    data = copy.deepcopy(load_yaml(src))
    cluster = data.get("cluster")
    cluster = {"preset": cluster} if isinstance(cluster, str) else dict(cluster or {})
    cluster["preset"] = str(Path(profile).resolve())
    for k in ("nodes", "gpus_per_node"):  # the profile describes the testbed's shape
        cluster.pop(k, None)
    data["cluster"] = cluster
    serving = data.get("serving")
    if isinstance(serving, dict) and serving.get("trace") is not None:  # paths were relative to the source
        traces = serving["trace"] if isinstance(serving["trace"], list) else [serving["trace"]]
        resolved = [str((Path(src).parent / t).resolve()) for t in traces]
        serving["trace"] = resolved if isinstance(serving["trace"], list) else resolved[0]
    if compute_profile is not None:
        data["compute"] = {"model": "profile", "profile": str(Path(compute_profile).resolve())}
    return atomic_write_text(out, yaml.safe_dump(data, sort_keys=False))


def _testbed(spec_text: str | None, nic: str | None, cluster: Any):
    from runtime.testbed import TestbedSpec, require_netns

    if spec_text is None:
        spec_text = f"{cluster.nodes}x{cluster.gpus_per_node}"
    spec = TestbedSpec.parse(spec_text, nic or "400mbit")
    require_netns()
    return spec


CALIBRATIONS = 3  # calibration runs merged by median: one run on a shared 2-core box is noisy
_MEDIAN_FIELDS = (("nic", "bandwidth"), ("nic", "latency"), ("nvlink", "bandwidth"), ("nvlink", "latency"),
                  ("gpu", "hbm_bandwidth"), ("compute", "kernel_launch_s"))


def calibrate(spec: Any, out: Path, shapes: str, timeout_s: float, runs: int = CALIBRATIONS) -> Path:
    """``lina-run calibrate`` on the testbed ``runs`` times; ``out`` gets the median of
    every link, memory and launch figure and of every peak FLOP/s, and ``out``'s raw
    sibling the median time of every collective size (each run's files are kept as
    ``out.<i>.yaml``)."""
    from runtime.calibrate import finish, raw_path
    from runtime.launch import run_entry

    note = f"testbed {spec.nodes}x{spec.ranks_per_node} at {spec.nic_bps / 1e6:.0f} Mbit/s"
    profiles, raws = [], []
    for i in range(runs):
        path = out.with_name(f"{out.stem}.{i}{out.suffix}")
        res = run_entry("calibrate", ["--out", str(path), "--max-bytes", "8e6", "--shapes", shapes, "--note", note,
                                      "--collective-bytes", CALIBRATION_COLLECTIVE_BYTES],
                        testbed=spec, timeout_s=timeout_s, echo=False)
        finish(res, ["--out", str(path)])
        profiles.append(yaml.safe_load(path.read_text()))
        raws.append(yaml.safe_load(raw_path(path).read_text()))
    merged, raw = copy.deepcopy(profiles[0]), copy.deepcopy(raws[0])
    for sec, key in _MEDIAN_FIELDS:
        merged[sec][key] = statistics.median(p[sec][key] for p in profiles)
    for dtype in merged["gpu"]["peak_flops"]:
        merged["gpu"]["peak_flops"][dtype] = statistics.median(p["gpu"]["peak_flops"][dtype] for p in profiles)
    for i, row in enumerate(raw["collectives"]):
        row["seconds"] = statistics.median(r["collectives"][i]["seconds"] for r in raws)
    if merged.get("host"):
        for kind in merged["host"]["step_delay_s"]:
            merged["host"]["step_delay_s"][kind] = statistics.median(p["host"]["step_delay_s"][kind] for p in profiles)
    merged["source"] += f"; median of {runs} calibration runs (lina-sim validate)"
    atomic_write_text(raw_path(out), yaml.safe_dump(raw, sort_keys=False))
    return atomic_write_text(out, yaml.safe_dump(merged, sort_keys=False))


def model_shapes(model: Any) -> str:
    """The expert FFN and attention matmuls of ``model`` (calibrate's --shapes)."""
    T, d, f = model.tokens, model.d_model, model.d_ff
    return f"{T}x{d}x{f},{T}x{f}x{d},{T}x{d}x{3 * d},{T}x{d}x{d}"


def ranking(values: Sequence[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: values[i])


def resolved_pairs(pred: Sequence[float], meas: Sequence[float], std: Sequence[float], n: Sequence[int]) -> tuple[int, int]:
    """(pairs ordered alike, pairs the measurement resolves) over every pair of policies.
    A measured pair is resolved when its difference exceeds twice the standard error of
    the difference (``std / sqrt(n)`` per policy); closer pairs are ties the testbed's
    noise cannot order, so no prediction can be right or wrong about them."""
    agree = resolved = 0
    for a in range(len(pred)):
        for b in range(a + 1, len(pred)):
            se = ((std[a] ** 2 / max(n[a], 1)) + (std[b] ** 2 / max(n[b], 1))) ** 0.5
            if abs(meas[a] - meas[b]) > 2 * se:
                resolved += 1
                agree += (pred[a] - pred[b]) * (meas[a] - meas[b]) > 0
    return agree, resolved


def mark_rankings(j: Any, pred_col: str, meas_col: str, std_col: str, n_col: str) -> None:
    """Add ``ranking_match`` (the strict order of every policy is the same) and
    ``pairs_agree`` / ``pairs_resolved`` (see :func:`resolved_pairs`) per point, in place."""
    strict, agree, resolved = {}, {}, {}
    for p, g in j.groupby("point"):
        strict[p] = ranking(list(g[pred_col])) == ranking(list(g[meas_col]))
        agree[p], resolved[p] = resolved_pairs(list(g[pred_col]), list(g[meas_col]), list(g[std_col]), list(g[n_col]))
    j["ranking_match"] = j["point"].map(strict)
    j["pairs_agree"] = j["point"].map(agree)
    j["pairs_resolved"] = j["point"].map(resolved)


def ranking_summary(j: Any) -> str:
    first = j.groupby("point").first()
    k = int(first["ranking_match"].sum())
    return (f"ranking {'matches' if k == len(first) else 'differs'} at {k}/{len(first)} points; pairs of policies "
            f"the measurement resolves (> 2 s.e. apart) ordered alike: {int(first['pairs_agree'].sum())}/"
            f"{int(first['pairs_resolved'].sum())}")


def compare(pred: Any, meas: Any) -> Any:
    """Join predicted and measured results by (point, policy); error = (pred - meas) / meas."""
    keys = ["point", "policy"]
    cols = ["step_time_s", "compute_s", "exposed_a2a_s", "exposed_allreduce_s", "idle_s", "experts_per_device",
            "pipeline_degree"]
    j = pred[keys + cols].merge(meas[keys + cols + ["step_time_min_s", "step_time_max_s", "step_time_std_s", "steps",
                                                    "sched_busy_frac",
                                                    "handoff_median_s", "handoff_total_s"]],
                                on=keys, suffixes=("_pred", "_meas"))
    j["error_pct"] = (j["step_time_s_pred"] - j["step_time_s_meas"]) / j["step_time_s_meas"] * 100
    mark_rankings(j, "step_time_s_pred", "step_time_s_meas", "step_time_std_s", "steps")
    return j


def format_table(j: Any, title: str) -> str:
    lines = [f"# {title}",
             f"  {'pt':>2} {'policy':<12} {'k':>2} {'r':>2} {'predicted ms':>12} {'measured ms':>12} "
             f"{'(min..max)':>15} {'error':>8}  ranking"]
    for r in j.itertuples():
        lines.append(f"  {r.point:>2} {r.policy:<12} {r.experts_per_device_meas:>2} {r.pipeline_degree_meas:>2} "
                     f"{r.step_time_s_pred * 1e3:>12.1f} {r.step_time_s_meas * 1e3:>12.1f} "
                     f"{f'({r.step_time_min_s * 1e3:.0f}..{r.step_time_max_s * 1e3:.0f})':>15} "
                     f"{r.error_pct:>+7.1f}%  {'same' if r.ranking_match else 'DIFFERS'}")
    med = statistics.median(abs(e) for e in j["error_pct"])
    lines.append(f"  median |error| {med:.1f}% (target <= 10%); " + ranking_summary(j))
    return "\n".join(lines)


def op_classes(tl: Any, ep_size: int) -> dict[str, float]:
    """Mean seconds per rank spent in each class of op of one step's timeline: forward
    and backward compute, forward and backward all-to-all, allreduce (busy time, overlap
    included), and the step time; plus per all-to-all the mean arrival skew and
    transfer time."""
    d = tl.assign(dur=tl["end"] - tl["start"], phase=tl["op"].str.contains(".bwd.") | tl["op"].str.startswith("head.bwd"))
    ranks = max(1, d["rank"].nunique())
    pick = {"compute fwd": (d["kind"] == "compute") & ~d["phase"] & (d["op"] != "optimizer"),
            "compute bwd+opt": (d["kind"] == "compute") & (d["phase"] | (d["op"] == "optimizer")),
            "a2a fwd": (d["kind"] == "all_to_all") & ~d["phase"], "a2a bwd": (d["kind"] == "all_to_all") & d["phase"],
            "allreduce": d["kind"] == "allreduce"}
    out = {k: float(d.loc[m, "dur"].sum()) / ranks for k, m in pick.items()}
    out["step"] = float(d["end"].max())
    # Per all-to-all: how long its first rank waited for its last one (arrival skew) and
    # how long it then took (transfer); groups of ep_size consecutive ranks.
    a = d[d["kind"] == "all_to_all"].assign(group=lambda x: x["rank"] // ep_size)
    g = a.groupby(["op", "group"]).agg(first=("start", "min"), last=("start", "max"), end=("end", "max"))
    out["a2a skew"] = float((g["last"] - g["first"]).mean()) if len(g) else 0.0
    out["a2a xfer"] = float((g["end"] - g["last"]).mean()) if len(g) else 0.0
    return out


def format_components(pred_tls: dict, meas_tls: dict, ep_sizes: dict) -> str:
    """Side by side, per policy: where the predicted and the measured step spend time."""
    keys = ("compute fwd", "compute bwd+opt", "a2a fwd", "a2a bwd", "allreduce", "step", "a2a skew", "a2a xfer")
    lines = ["# per rank and step, ms: predicted / measured (busy time of each stream; overlaps counted in each;"
             " a2a skew / xfer: mean per all-to-all, last arrival - first arrival / end - last arrival)",
             f"  {'pt policy':<16}" + "".join(f"{k:>18}" for k in keys)]
    for key in meas_tls:
        p, m = op_classes(pred_tls[key], ep_sizes[key]), op_classes(meas_tls[key], ep_sizes[key])
        lines.append(f"  {key[0]:<2} {key[1]:<13}" + "".join(f"{p[k] * 1e3:>9.1f} /{m[k] * 1e3:>6.1f} " for k in keys))
    return "\n".join(lines)


def plot(j: Any, pred_tls: dict, meas_tls: dict, out: Path, title: str) -> list[Path]:
    """Bars of predicted vs measured step time, and per policy the two timelines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(j), 3.6))
    x = np.arange(len(j))
    ax.bar(x - 0.2, j["step_time_s_pred"] * 1e3, 0.4, label="predicted (simulator)")
    ax.bar(x + 0.2, j["step_time_s_meas"] * 1e3, 0.4, label="measured (testbed, median)",
           yerr=[(j["step_time_s_meas"] - j["step_time_min_s"]) * 1e3, (j["step_time_max_s"] - j["step_time_s_meas"]) * 1e3])
    for i, e in enumerate(j["error_pct"]):
        ax.text(i, max(j["step_time_s_pred"].iloc[i], j["step_time_max_s"].iloc[i]) * 1e3 * 1.02, f"{e:+.0f}%",
                ha="center", fontsize=8)
    ax.set_xticks(x, [f"{p}\n{pol}" if j["point"].nunique() > 1 else pol for p, pol in zip(j["point"], j["policy"])])
    ax.set_ylabel("step time (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "validation.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    colors = {"compute": "tab:blue", "all_to_all": "tab:orange", "allreduce": "tab:green"}
    for key in meas_tls:
        fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
        for ax, name, tl in ((axes[0], "predicted", pred_tls.get(key)), (axes[1], "measured", meas_tls[key])):
            if tl is None:
                continue
            rows = [(r, s) for r in sorted(tl["rank"].unique()) for s in ("compute", "a2a", "allreduce")]
            for yi, (rank, stream) in enumerate(rows):
                d = tl[(tl["rank"] == rank) & (tl["stream"] == stream)]
                ax.broken_barh(list(zip(d["start"] * 1e3, (d["end"] - d["start"]) * 1e3)), (yi - 0.4, 0.8),
                               color=[colors.get(k, "gray") for k in d["kind"]])
            ax.set_yticks(range(len(rows)), [f"r{r} {s}" for r, s in rows], fontsize=6)
            ax.set_title(f"{name}: {key[1]} (point {key[0]})", fontsize=9)
        axes[1].set_xlabel("time in step (ms)")
        fig.tight_layout()
        paths.append(out / f"timelines-p{key[0]}-{key[1]}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def validate(scenario: str, out: Path, testbed: str | None = None, nic: str | None = None,
             profile: str | None = None, steps: int | None = None, timeout_s: float = 900.0,
             echo: bool = False) -> Any:
    """Calibrate (or reuse ``profile``), predict, measure, compare; returns the joined
    table (also written to ``out/validation.csv``)."""
    import pandas as pd

    from lina_sim.config.scenario import load_scenarios
    from lina_sim.training.run import resolve_training, run_training
    from runtime.executor import measured_frame
    from runtime.launch import run_entry

    points = load_scenarios(scenario)
    if {p.kind for p in points} != {"training"}:
        from runtime.infer import validate_inference

        return validate_inference(scenario, out, testbed, nic, profile, timeout_s, echo)
    first = resolve_training(points[0])
    spec = _testbed(testbed, nic, first.cluster)
    profile = calibrated_profile(spec, out, profile, first.model, timeout_s,
                                 max(training_collective_bytes(resolve_training(p)) for p in points))
    base = resolved_scenario(scenario, profile, None, out / "scenario-resolved.yaml")
    extra = ["--steps", str(steps)] if steps else []
    # Compute calibration: every op, on the testbed's cores, without the network.
    prof = run_entry("scenario", [str(base), "--profile-compute", str(out / "compute-profile.yaml")],
                     testbed=spec, timeout_s=timeout_s, echo=echo)
    write_compute_profile(prof, out / "compute-profile.yaml")
    resolved = resolved_scenario(scenario, profile, out / "compute-profile.yaml", out / "scenario-resolved.yaml")
    setups = [resolve_training(p) for p in load_scenarios(resolved)]
    preds, pred_tls = [], {}
    for pi, setup in enumerate(setups):
        df, runs = run_training(setup)
        df.insert(0, "point", pi)
        preds.append(df)
        for run in runs:
            pred_tls[(pi, run.entry.label)] = run.result.timeline
    pred = pd.concat(preds, ignore_index=True)
    results = run_entry("scenario", [str(resolved), *extra], testbed=spec, timeout_s=timeout_s, echo=echo)
    meas, meas_tls = measured_frame(results, setups)
    j = compare(pred, meas)
    atomic_write_text(out / "validation.csv", j.to_csv(index=False))
    atomic_write_text(out / "predicted.csv", pred.to_csv(index=False))
    atomic_write_text(out / "measured.csv", meas.to_csv(index=False))
    for (pi, label), tl in meas_tls.items():
        atomic_write_text(out / f"timeline-measured-p{pi}-{label}.csv", tl.to_csv(index=False))
        atomic_write_text(out / f"timeline-predicted-p{pi}-{label}.csv", pred_tls[(pi, label)].to_csv(index=False))
    title = f"{points[0].name}: testbed {spec.nodes}x{spec.ranks_per_node} at {spec.nic_bps / 1e6:.0f} Mbit/s"
    print(format_table(j, title))
    print("  measured scheduler cost per step: " + ", ".join(
        f"{r.policy} {r.sched_busy_frac * 100:.2f}% (thread) + {r.handoff_total_s / r.step_time_s_meas * 100:.2f}% "
        f"(a2a hand-off, median {r.handoff_median_s * 1e3:.2f} ms)" for r in j.itertuples()))
    ep_sizes = {(r.point, r.policy): setups[r.point].model.experts // r.experts_per_device_meas for r in j.itertuples()}
    print(format_components(pred_tls, meas_tls, ep_sizes))
    paths = plot(j, pred_tls, meas_tls, out, title)
    print(f"# validation: {out / 'validation.csv'}; figures {', '.join(p.name for p in paths)}")
    return j
