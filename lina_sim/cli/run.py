"""``lina-sim run SCENARIO.yaml``: simulate every policy of a scenario (and its sweep points).

One code path for every kind of scenario: what differs between kinds (resolving, running,
the printed table, traces and figures) comes from :mod:`lina_sim.experiments.kinds`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lina_sim.results.tables import point_title


def register(sub) -> None:
    p = sub.add_parser("run", help="simulate a training or inference scenario and compare its policies")
    p.add_argument("scenario", help="scenario YAML (see scenarios/)")
    p.add_argument("--out", default=None, help="results directory (default: results/<scenario name>)")
    p.add_argument("--trace", action="store_true", help="write a Chrome trace per policy (training)")
    p.add_argument("--plots", action="store_true", help="write figures into the results directory")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """Print each point's table and write ``results.csv`` (with ``--trace`` a Chrome trace
    per point and policy, with ``--plots`` the kind's figures) into the results directory."""
    import pandas as pd

    from lina_sim.config.scenario import load_scenarios
    from lina_sim.experiments.kinds import kind_of
    from lina_sim.results.files import atomic_write_text
    from lina_sim.results.timeline import write_chrome_trace

    points = load_scenarios(args.scenario)
    kinds = [kind_of(p.kind) for p in points]
    setups = [kind.resolve(p) for kind, p in zip(kinds, points)]  # every point validated before any runs
    out = Path(args.out or Path("results") / points[0].name)
    frames = []
    for i, (kind, setup) in enumerate(zip(kinds, setups)):
        df, runs = kind.run(setup)
        df.insert(0, "point", i)
        frames.append(df)
        title = point_title(setup)
        print(kind.table(df, title))
        print()
        suffix = f"-p{i}" if len(setups) > 1 else ""
        if args.trace:
            for label, events in kind.timelines(runs):
                write_chrome_trace(events, out / f"trace{suffix}-{label}.json")
        if args.plots:
            kind.plot_point(df, runs, out, suffix, title)
    results = pd.concat(frames, ignore_index=True)
    path = atomic_write_text(out / "results.csv", results.to_csv(index=False))
    if args.plots:
        for kind in dict.fromkeys(kinds):  # figures across points, each kind over its own points
            kind.plot_results(results[[kinds[i] is kind for i in results["point"]]], out)
    print(f"# results: {path}" + (f"; figures and traces in {out}/" if args.plots or args.trace else ""))
    return 0
