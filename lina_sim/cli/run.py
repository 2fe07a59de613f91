"""``lina-sim run SCENARIO.yaml``: simulate every policy of a scenario (and its sweep points).

One code path for every kind of scenario: what differs between kinds (resolving, running,
the printed table, traces and figures) comes from :mod:`lina_sim.experiments.kinds`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# A point expected to take longer than this (s of one core) is announced before it runs.
LONG_POINT_S = 120.0


def register(sub) -> None:
    p = sub.add_parser("run", help="simulate a training or inference scenario and compare its policies")
    p.add_argument("scenario", help="scenario YAML (see scenarios/)")
    p.add_argument("--out", default=None, help="results directory (default: results/<scenario name>)")
    p.add_argument("--trace", action="store_true", help="write a Chrome trace per policy (training)")
    p.add_argument("--plots", action="store_true", help="write figures into the results directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar (drawn only on a terminal, for 2+ points)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """Print each point's table and write ``results.csv`` (with ``--trace`` a Chrome trace
    per point and policy, with ``--plots`` the kind's figures) into the results directory.

    Everything is written into a temporary directory beside the results directory and
    published at the end (:func:`~lina_sim.results.files.staged_dir`), so a run that fails
    or is interrupted after validation leaves no partial files."""
    import pandas as pd

    from lina_sim.config.scenario import load_scenarios
    from lina_sim.experiments.kinds import kind_of
    from lina_sim.experiments.sweep.progress import Progress
    from lina_sim.results.files import atomic_write_text, staged_dir
    from lina_sim.results.tables import point_title
    from lina_sim.results.timeline import write_chrome_trace

    points = load_scenarios(args.scenario)
    kinds = [kind_of(p.kind) for p in points]
    setups = [kind.resolve(p) for kind, p in zip(kinds, points)]  # every point validated before any runs
    out = Path(args.out or Path("results") / points[0].name)
    for i, (kind, setup) in enumerate(zip(kinds, setups)):
        cpu_s = kind.expected_cpu_s(setup) if kind.expected_cpu_s else 0.0
        if cpu_s > LONG_POINT_S:  # say so up front: a large point prints nothing until it ends
            print(
                f"lina-sim run: point {i} ({setup.cluster.world_size} GPUs, {len(setup.policies)} "
                f"{'policy' if len(setup.policies) == 1 else 'policies'}) "
                f"takes about {cpu_s / 60:.0f} min of one core's time; Ctrl-C stops it and writes nothing",
                file=sys.stderr,
            )
    progress = Progress(len(setups), label="run", enabled=len(setups) > 1 and not args.quiet)
    try:
        with staged_dir(out) as stage:
            frames = []
            progress.show()
            for i, (kind, setup) in enumerate(zip(kinds, setups)):
                df, runs = kind.run(setup)
                df.insert(0, "point", i)
                frames.append(df)
                title = point_title(setup)
                progress.write(kind.table(df, title) + "\n")
                suffix = f"-p{i}" if len(setups) > 1 else ""
                if args.trace:
                    for label, events in kind.timelines(runs):
                        write_chrome_trace(events, stage / f"trace{suffix}-{label}.json")
                if args.plots:
                    kind.plot_point(df, runs, stage, suffix, title)
                progress.update()
            progress.close()
            results = pd.concat(frames, ignore_index=True)
            atomic_write_text(stage / "results.csv", results.to_csv(index=False))
            if args.plots:
                for kind in dict.fromkeys(kinds):  # figures across points, each kind over its own points
                    kind.plot_results(results[[kinds[i] is kind for i in results["point"]]], stage)
    finally:
        progress.close()
    path = out / "results.csv"
    print(f"# results: {path}" + (f"; figures and traces in {out}/" if args.plots or args.trace else ""))
    return 0
