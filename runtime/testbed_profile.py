"""The testbed's hardware profile for a validation, and the scenario pointed at it.

Step 1 of a validation (:mod:`runtime.validate`), launcher side:

- :func:`calibrate`: ``lina-run calibrate`` on the testbed several times, merged by median;
- :func:`refine_profile`: the inter-node link fitted to the calibration's own
  collectives at the sizes the workload sends (:func:`training_collective_bytes`,
  :func:`inference_collective_bytes`);
- :func:`resolved_scenario`: the scenario with ``cluster.preset`` = that profile (and,
  for training, ``compute: {model: profile}`` = the measured compute table).

Nothing here sees a training step or a served batch: the simulator's inputs come from
the calibration only, which runs before and apart from the measured runs.
"""

from __future__ import annotations

import copy
import math
import shutil
import statistics
from pathlib import Path

import yaml

from lina_sim.config.fields import load_yaml
from lina_sim.config.scenario import load_yaml as load_scenario_yaml
from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec, cluster_from_dict
from lina_sim.network.alone import AloneTimes
from lina_sim.policies.registry import make_training_policy
from lina_sim.results.files import atomic_write_text
from lina_sim.serving.setup import InferenceSetup
from lina_sim.training.run import TrainingSetup
from lina_sim.workload.graph import build_training_graph, packing_candidates
from lina_sim.workload.model import ModelSpec
from runtime.calibrate import finish as summarise_calibration
from runtime.calibrate import raw_path
from runtime.launch import run_entry
from runtime.testbed import TestbedSpec, require_netns

CALIBRATION_COLLECTIVE_BYTES = "65536,262144,1048576,2097152,4194304"
CALIBRATIONS = 3  # calibration runs merged by median: one run on a shared 2-core box is noisy
_MEDIAN_FIELDS = (
    ("nic", "bandwidth"),
    ("nic", "latency"),
    ("nvlink", "bandwidth"),
    ("nvlink", "latency"),
    ("gpu", "hbm_bandwidth"),
    ("compute", "kernel_launch_s"),
)


def testbed_for(spec_text: str | None, nic: str | None, cluster: ClusterSpec) -> TestbedSpec:
    """The testbed to validate on: ``--testbed NODESxRANKS`` (default: the scenario's
    cluster shape) at ``--nic`` (default 400mbit); checks namespaces can be made."""
    if spec_text is None:
        spec_text = f"{cluster.nodes}x{cluster.gpus_per_node}"
    spec = TestbedSpec.parse(spec_text, nic or "400mbit")
    require_netns()
    return spec


def model_shapes(model: ModelSpec) -> str:
    """The expert FFN and attention matmuls of ``model`` (calibrate's --shapes)."""
    T, d, f = model.tokens, model.d_model, model.d_ff
    return f"{T}x{d}x{f},{T}x{f}x{d},{T}x{d}x{3 * d},{T}x{d}x{d}"


def training_collective_bytes(setup: TrainingSetup) -> float:
    """The largest collective per rank (bytes) a training scenario's policies issue: its
    all-to-alls unpipelined with the fewest experts per device, and every policy's
    gradient micro-ops (buckets, partitions)."""
    k = packing_candidates(setup.model, setup.cluster.world_size)[0]
    graph = build_training_graph(setup.model, setup.cluster, experts_per_device=k, pipeline_degree=1)
    return max(m.nbytes for e in setup.policies for m in graph.micro_ops(make_training_policy(e.name, **e.params)))


def inference_collective_bytes(setup: InferenceSetup) -> float:
    """The largest dispatch per rank (bytes) of an inference scenario: a full batch's
    tokens, spread evenly over the ranks, each sent top_k times."""
    s = setup
    return s.serving.batching.token_budget * s.top_k * s.model.d_model * s.model.dtype_bytes / s.cluster.world_size


def calibrate(spec: TestbedSpec, out: Path, shapes: str, timeout_s: float, runs: int = CALIBRATIONS) -> Path:
    """``lina-run calibrate`` on the testbed ``runs`` times; ``out`` gets the median of
    every link, memory and launch figure and of every peak FLOP/s, and ``out``'s raw
    sibling the median time of every collective size (each run's files are kept as
    ``out.<i>.yaml``)."""
    note = f"testbed {spec.nodes}x{spec.ranks_per_node} at {spec.nic_bps / 1e6:.0f} Mbit/s"
    profiles, raws = [], []
    for i in range(runs):
        path = out.with_name(f"{out.stem}.{i}{out.suffix}")
        res = run_entry(
            "calibrate",
            [
                "--out",
                str(path),
                "--max-bytes",
                "8e6",
                "--shapes",
                shapes,
                "--note",
                note,
                "--collective-bytes",
                CALIBRATION_COLLECTIVE_BYTES,
            ],
            testbed=spec,
            timeout_s=timeout_s,
            echo=False,
        )
        summarise_calibration(res, ["--out", str(path)])
        profiles.append(load_yaml(path, "profile"))
        raws.append(load_yaml(raw_path(path), "raw profile"))
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


def _covering(rows: list[dict], nbytes: float | None) -> dict:
    """The row of the smallest size >= ``nbytes`` (the largest row if none is, or without ``nbytes``)."""
    above = [r for r in rows if nbytes is not None and r["bytes"] >= nbytes]
    return min(above, key=lambda r: r["bytes"]) if above else max(rows, key=lambda r: r["bytes"])


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
    data = load_yaml(profile, "profile")
    raw = load_yaml(raw_path(profile), "raw profile")
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
        f"squares over the smallest calibrated collectives)"
    )
    return atomic_write_text(out, yaml.safe_dump(data, sort_keys=False)), eff, lat


def prepare_profile(profile: str | Path, out: Path, workload_bytes: float | None = None) -> Path:
    """``out/profile-refined.yaml``: ``profile`` with links fitted to its collectives."""
    shutil.copyfile(raw_path(profile), raw_path(out / "profile-refined.yaml"))  # the raw data travels along
    path, eff, lat = refine_profile(profile, out / "profile-refined.yaml", workload_bytes)
    at = f" at the workload's sizes (<= {workload_bytes / 2**20:.2f} MiB per rank)" if workload_bytes else ""
    print(
        f"validate: from the calibrated collectives{at}: nic.efficiency {eff:.3f}, per-hop latency "
        f"{lat * 1e6:.0f} us -> {path}"
    )
    return path


def calibrated_profile(
    spec: TestbedSpec, out: Path, profile: str | None, model: ModelSpec, timeout_s: float, workload_bytes: float
) -> Path:
    """Step 1 of a validation: calibrate the testbed ``spec`` for ``model`` (or reuse
    ``profile``) and fit its links at the workload's sizes; ``out/profile-refined.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    if profile is None:
        profile = str(calibrate(spec, out / "profile.yaml", model_shapes(model), timeout_s))
    elif not Path(profile).is_file():
        raise ConfigError("--profile", f"no such file {profile!r}")
    return prepare_profile(profile, out, workload_bytes)


def resolved_scenario(src: str | Path, profile: str | Path, compute_profile: str | Path | None, out: Path) -> Path:
    """The scenario with ``cluster.preset`` = the profile (other cluster overrides kept)
    and, if given, ``compute: {model: profile}``; written to ``out``."""
    data = copy.deepcopy(load_scenario_yaml(src))
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
