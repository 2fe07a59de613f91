"""``lina-sim sweep``, ``lina-sim reproduce`` and ``lina-sim compare``."""

from __future__ import annotations

import argparse
from pathlib import Path

REPRODUCE_HELP = """\
Run the paper's experiments in simulation (scenarios/paper-*.yaml) and write the figures
and REPORT.md (the tables behind them) to --out. Points are cached in --cache, so a second
run only redraws. The full run covers the three models at 2, 4, 8 and 16 experts, the
ablation for all three models, eight micro-op sizes from 10 to 200 MB for all three, and
the inference experiments at full length. --quick keeps Transformer-XL only for the
ablation, GPT-2 only at five sizes for the micro-op sweep, and a quarter of the inference
requests (noisier tail percentiles).

Experiments (for --only): speedup, ablation, microop, contention, inference, pathlength,
accuracy."""


def register(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="run every point of a scenario's sweep (parallel, cached, resumable)",
        description="Run every point of a scenario's sweep: all points are validated first, "
        "finished points are cached by content hash, and a re-run resumes.",
    )
    p.add_argument("scenario", help="scenario YAML with a sweep: block (see scenarios/)")
    p.add_argument("--out", default=None, help="results Parquet file (default: results/<name>/sweep.parquet)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: CPU count)")
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local processes, or Ray (an existing cluster with --address, else a local one)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address, HOST:PORT or ray://HOST:PORT")
    p.add_argument("--cache", default=None, help="cache directory (default: results/.cache/points)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--dry-run", action="store_true", help="validate and list the points, run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    p.set_defaults(func=cmd_sweep)

    r = sub.add_parser(
        "reproduce",
        help="run the paper's experiments and write figures and REPORT.md",
        description=REPRODUCE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--quick", action="store_true", help="fewer points and shorter inference runs (see above)")
    r.add_argument("--out", default="plots/gallery", help="figures and REPORT.md (default: plots/gallery)")
    r.add_argument("--workers", type=int, default=None, help="local worker processes (default: CPU count)")
    r.add_argument("--cache", default=None, help="cache directory (default: results/.cache/points)")
    r.add_argument("--no-cache", action="store_true", help="recompute every point")
    r.add_argument("--only", default=None, help="comma-separated experiments to run (default: all; names above)")
    r.set_defaults(func=cmd_reproduce)

    c = sub.add_parser(
        "compare",
        help="put result tables side by side (sweeps, runs, lina-run measurements)",
        description="Align result tables (CSV or Parquet with lina-sim run's columns) on their "
        "common key columns and compare one metric, with a figure.",
    )
    c.add_argument("results", nargs="+", help="result tables; LABEL=PATH names a column (default: file name)")
    c.add_argument("--metric", default=None, help="column to compare (default: step_time_s, else p95/p50 latency)")
    c.add_argument("--key", default=None, help="comma-separated key columns (default: the common ones)")
    c.add_argument("--out", default=None, help="write the table (.csv) and figure (.png) with this path stem")
    c.set_defaults(func=cmd_compare)


def cmd_sweep(args: argparse.Namespace) -> int:
    import sys

    from lina_sim.experiments.sweep import (
        DEFAULT_CACHE,
        Cache,
        SweepInterrupted,
        load_plan,
        make_backend,
        run_sweep,
        write_parquet,
    )
    from lina_sim.results.tables import format_failures, format_sweep_plan

    name, points = load_plan(args.scenario)  # every point resolved before anything runs
    if args.dry_run:
        print(format_sweep_plan(points))
        return 0
    out = Path(args.out or Path("results") / name / "sweep.parquet")
    cache = None if args.no_cache else Cache(args.cache or DEFAULT_CACHE)
    backend = make_backend(args.backend, args.workers, args.address)
    try:
        res = run_sweep(points, backend, cache, progress=not args.quiet)
    except SweepInterrupted as e:
        # The table of an interrupted sweep would be partial: --out is left as it was,
        # and the finished points wait in the cache for the re-run.
        print(f"lina-sim sweep: {e.summary(cache.root if cache else None)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports Ctrl-C
    finally:
        backend.close()
    write_parquet(res.table, out)
    print(
        f"# {res.points} points: {res.ran} ran, {res.cached} from cache, {len(res.failed)} failed "
        f"in {res.wall_s:.1f} s ({backend.workers} {args.backend} worker{'s' * (backend.workers > 1)})"
    )
    if res.failed:
        print(format_failures(res.failed))
    print(f"# results: {out} ({len(res.table)} rows)")
    return 1 if res.failed else 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from lina_sim.experiments.reproduce import reproduce
    from lina_sim.experiments.sweep import DEFAULT_CACHE, Cache

    cache = None if args.no_cache else Cache(args.cache or DEFAULT_CACHE)
    return reproduce(out=Path(args.out), quick=args.quick, workers=args.workers, cache=cache, only=args.only)


def cmd_compare(args: argparse.Namespace) -> int:
    from lina_sim.experiments.compare import compare_files

    return compare_files(args.results, metric=args.metric, key=args.key, out=args.out)
