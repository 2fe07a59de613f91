"""Simulator against the real runtime: calibrate, profile, simulate, measure, compare.

``lina-sim validate SCENARIO.yaml [--testbed 2x2 --nic 400mbit] [--profile P.yaml]``
(:mod:`runtime.validate_command`) orchestrates, for a training scenario:

1. **calibrate** the testbed with ``lina-run calibrate`` (links, collectives, matmuls), or
   reuse ``--profile``, and fit its links at the workload's sizes
   (:mod:`runtime.testbed_profile`);
2. **profile compute**: every compute op of the scenario's model, for real on all ranks
   at once without the network (:mod:`runtime.compute_profile`);
3. **simulate**: ``lina-sim``'s training simulation with ``cluster.preset`` = the
   calibrated profile and ``compute: {model: profile}`` = that table;
4. **measure**: the same scenario file on the testbed through the ``scenario`` run mode
   (:mod:`runtime.scenario`);
5. **compare**: predicted against measured step time (median over steps) per policy and
   point, error %, whether the policies rank the same (:mod:`runtime.compare`); the
   tables (:mod:`lina_sim.results.tables`), a bar plot and, per policy, the predicted and
   measured timelines of one step side by side (:mod:`runtime.figures`).

An inference scenario skips step 2 and compares the mean batch time.
Nothing here adjusts a simulator parameter to the measurement: the simulator sees only
the calibration (steps 1-2), which runs before and apart from the measured runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from lina_sim.config.scenario import Scenario, load_scenarios
from lina_sim.results.files import atomic_write_text
from lina_sim.results.tables import (
    format_components,
    format_inference_validation_table,
    format_validation_scheduler,
    format_validation_table,
)
from lina_sim.serving.run import run_inference
from lina_sim.serving.setup import resolve_inference
from lina_sim.training.run import resolve_training, run_training
from plots.validation import plot
from runtime.compare import compare, compare_inference, op_classes
from runtime.compute_profile import write_compute_profile
from runtime.launch import run_entry
from runtime.scenario import measured_frame, mode_of
from runtime.testbed import TestbedSpec
from runtime.testbed_profile import (
    calibrated_profile,
    inference_collective_bytes,
    resolved_scenario,
    testbed_for,
    training_collective_bytes,
)


def _title(name: str, spec: TestbedSpec) -> str:
    return f"{name}: testbed {spec.nodes}x{spec.ranks_per_node} at {spec.nic_bps / 1e6:.0f} Mbit/s"


def validate(
    scenario: str,
    out: Path,
    testbed: str | None = None,
    nic: str | None = None,
    profile: str | None = None,
    steps: int | None = None,
    timeout_s: float = 900.0,
    echo: bool = False,
) -> pd.DataFrame:
    """Calibrate (or reuse ``profile``), predict, measure, compare; returns the joined
    table (also written to ``out/validation.csv``)."""
    points = load_scenarios(scenario)
    flow = VALIDATIONS[mode_of(points).kind]
    return flow(points, scenario, out, testbed, nic, profile, steps, timeout_s, echo)


def _calibrated_scenario(
    points: list[Scenario],
    scenario: str,
    out: Path,
    testbed: str | None,
    nic: str | None,
    profile: str | None,
    timeout_s: float,
    resolve: Callable[[Scenario], Any],
    collective_bytes: Callable[[Any], float],
) -> tuple[TestbedSpec, Path, Path]:
    """Step 1 of every flow: the testbed (shaped like the first point's cluster), its
    calibrated profile (or ``profile``) fitted at the points' largest collective per rank
    (``collective_bytes`` of each ``resolve``d point), and the scenario pointed at it,
    ``out/scenario-resolved.yaml``. Returns (testbed, profile, resolved scenario)."""
    first = resolve(points[0])
    spec = testbed_for(testbed, nic, first.cluster)
    largest = max(collective_bytes(s) for s in [first, *(resolve(p) for p in points[1:])])
    calibrated = calibrated_profile(spec, out, profile, first.model, timeout_s, largest)
    return spec, calibrated, resolved_scenario(scenario, calibrated, None, out / "scenario-resolved.yaml")


def validate_training(
    points: list[Scenario],
    scenario: str,
    out: Path,
    testbed: str | None,
    nic: str | None,
    profile: str | None,
    steps: int | None,
    timeout_s: float,
    echo: bool,
) -> pd.DataFrame:
    """Predicted (``run_training``) against measured median step time per policy."""
    spec, profile, base = _calibrated_scenario(
        points, scenario, out, testbed, nic, profile, timeout_s, resolve_training, training_collective_bytes
    )
    # Compute calibration: every op, on the testbed's cores, without the network.
    compute_profile = out / "compute-profile.yaml"
    prof = run_entry(
        "scenario",
        [str(base), "--profile-compute", str(compute_profile)],
        testbed=spec,
        timeout_s=timeout_s,
        echo=echo,
    )
    write_compute_profile(prof, compute_profile)
    resolved = resolved_scenario(scenario, profile, compute_profile, out / "scenario-resolved.yaml")
    setups = [resolve_training(p) for p in load_scenarios(resolved)]
    preds, pred_tls = [], {}
    for pi, setup in enumerate(setups):
        df, runs = run_training(setup)
        df.insert(0, "point", pi)
        preds.append(df)
        for run in runs:
            pred_tls[(pi, run.entry.label)] = run.result.timeline
    pred = pd.concat(preds, ignore_index=True)
    extra = ["--steps", str(steps)] if steps else []
    results = run_entry("scenario", [str(resolved), *extra], testbed=spec, timeout_s=timeout_s, echo=echo)
    meas, meas_tls = measured_frame(results, setups)
    j = compare(pred, meas)
    atomic_write_text(out / "validation.csv", j.to_csv(index=False))
    atomic_write_text(out / "predicted.csv", pred.to_csv(index=False))
    atomic_write_text(out / "measured.csv", meas.to_csv(index=False))
    for (pi, label), tl in meas_tls.items():
        atomic_write_text(out / f"timeline-measured-p{pi}-{label}.csv", tl.to_csv(index=False))
        atomic_write_text(out / f"timeline-predicted-p{pi}-{label}.csv", pred_tls[(pi, label)].to_csv(index=False))
    title = _title(points[0].name, spec)
    print(format_validation_table(j, title))
    print(format_validation_scheduler(j))
    ep_sizes = {(r.point, r.policy): setups[r.point].model.experts // r.experts_per_device_meas for r in j.itertuples()}
    print(
        format_components(
            {
                key: (op_classes(pred_tls[key], ep_sizes[key]), op_classes(tl, ep_sizes[key]))
                for key, tl in meas_tls.items()
            }
        )
    )
    paths = plot(j, pred_tls, meas_tls, out, title)
    print(f"# validation: {out / 'validation.csv'}; figures {', '.join(p.name for p in paths)}")
    return j


def validate_inference(
    points: list[Scenario],
    scenario: str,
    out: Path,
    testbed: str | None,
    nic: str | None,
    profile: str | None,
    steps: int | None,
    timeout_s: float,
    echo: bool,
) -> pd.DataFrame:
    """Predicted (``run_inference``) against measured mean batch time per policy. There is
    no compute profile, and ``steps`` does not apply: a serving run is sized by
    ``serving.requests``."""
    spec, _, resolved = _calibrated_scenario(
        points, scenario, out, testbed, nic, profile, timeout_s, resolve_inference, inference_collective_bytes
    )
    setups = [resolve_inference(p) for p in load_scenarios(resolved)]
    preds = []
    for pi, setup in enumerate(setups):
        df, _ = run_inference(setup)
        df.insert(0, "point", pi)
        preds.append(df[["point", "policy", "batch_time_mean_s", "batches"]])
    pred = pd.concat(preds, ignore_index=True)
    results = run_entry("scenario", [str(resolved)], testbed=spec, timeout_s=timeout_s, echo=echo)
    meas, tls = measured_frame(results, setups)
    for (pi, label), tl in tls.items():
        atomic_write_text(out / f"timeline-measured-p{pi}-{label}.csv", tl.to_csv(index=False))
    j = compare_inference(pred, meas)
    atomic_write_text(out / "validation.csv", j.to_csv(index=False))
    print(format_inference_validation_table(j, _title(points[0].name, spec) + " (mean batch time)"))
    print(f"# validation: {out / 'validation.csv'}")
    return j


# The validation flow of each scenario kind, keyed like runtime.scenario.MODES.
VALIDATIONS = {"training": validate_training, "inference": validate_inference}
