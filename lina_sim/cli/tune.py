"""``lina-sim tune``: the best Lina setting of a training scenario, and its check on a testbed."""

from __future__ import annotations

import argparse
from pathlib import Path

TUNE_HELP = """\
Search Lina's knobs for a training scenario with the simulator: micro-op size (the
scenario's micro_op_mb x 1/4 ... 4), pipeline degree (1, 2, 4), experts per device (one,
or packed by estimated cost up to 2 or 4) and launch mode (planned, local). Prints the
fastest settings, the best one's predicted step time and the runner-up, and writes
DIR/tune.parquet (every setting) and DIR/tuned.yaml (the scenario with two Lina entries,
lina-default and lina-tuned).

--check then measures both on the emulated testbed with `lina-sim validate` (the
runtime's command: calibrate, predict, run the two interleaved step by step, compare; needs
root) and says whether the tuned setting is measured faster, by how much, with the spread.

Example:
  lina-sim tune scenarios/testbed-training.yaml --check --testbed 2x2 --nic 400mbit"""


def register(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="search Lina's knobs with the simulator (and --check the best on a testbed)",
        description=TUNE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", help="training scenario YAML with a lina policy")
    p.add_argument("--policy", default=None, help="label of the Lina entry to tune (default: the first lina)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="fix a field first")
    p.add_argument("--out", default=None, help="output directory (default: results/<name>-tune)")
    p.add_argument("--top", type=int, default=5, help="settings listed (default 5)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: CPU count)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="local processes or Ray")
    p.add_argument("--address", default=None, help="Ray cluster address, HOST:PORT or ray://HOST:PORT")
    p.add_argument("--cache", default=None, help="cache directory (default: results/.cache/points)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    c = p.add_argument_group("check on the emulated testbed (lina-sim validate)")
    c.add_argument("--check", action="store_true", help="measure the default and the tuned setting")
    c.add_argument("--testbed", metavar="NODESxRANKS", default=None, help="emulated cluster (default: the scenario's)")
    c.add_argument("--nic", metavar="RATE", default="400mbit", help="per-node link rate (default 400mbit)")
    c.add_argument("--profile", default=None, help="reuse this calibrated profile instead of calibrating")
    c.add_argument("--steps", type=int, default=None, help="measured steps per setting (default: the scenario's)")
    c.add_argument("--timeout", type=float, default=900.0, help="wall-clock limit of each real run, s")
    p.set_defaults(func=cmd_tune)


def validate_argv(args: argparse.Namespace, scenario: Path, out: Path) -> list[str]:
    """The ``lina-sim validate`` command line that checks ``scenario``."""
    argv = ["validate", str(scenario), "--nic", args.nic, "--out", str(out), "--timeout", str(args.timeout)]
    for flag, value in (("--testbed", args.testbed), ("--profile", args.profile), ("--steps", args.steps)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def cmd_tune(args: argparse.Namespace) -> int:
    from lina_sim.cli.explore import parse_sets
    from lina_sim.errors import ConfigError
    from lina_sim.experiments import tune as tn
    from lina_sim.experiments.sweep import DEFAULT_CACHE, Cache, make_backend, write_parquet

    if args.top < 1:
        raise ConfigError("--top", f"must be >= 1, got {args.top}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {args.steps}")
    plan = tn.plan_tune(args.scenario, args.policy, parse_sets(args.set))
    out = Path(args.out or Path("results") / f"{plan.name}-tune")
    if args.check:
        check_parser = _validate_command()  # before simulating: a missing runtime fails at once
    cache = None if args.no_cache else Cache(args.cache or DEFAULT_CACHE)
    backend = make_backend(args.backend, args.workers, args.address)
    try:
        result = tn.run_tune(plan, backend, cache, progress=not args.quiet)
    finally:
        backend.close()
    sw = result.sweep
    print(
        f"# {len(plan.settings)} settings of {plan.name} ({sw.points} points: {sw.ran} ran, {sw.cached} from cache, "
        f"{len(sw.failed)} failed) in {sw.wall_s:.1f} s"
    )
    print(tn.format_result(result, args.top))
    write_parquet(result.table, out / "tune.parquet")
    scenario = tn.check_scenario(result, out / "tuned.yaml", args.steps)
    print(f"# settings: {out / 'tune.parquet'}; scenario with both: {scenario}")
    if not args.check:
        return 0
    check_args = check_parser.parse_args(validate_argv(args, scenario, out / "validate"))
    rc = int(check_args.func(check_args) or 0)
    if rc:
        return rc
    print(tn.check_report(out / "validate" / "validation.csv").format())
    return 0


def _validate_command() -> argparse.ArgumentParser:
    """The ``lina-sim`` parser, if it has the runtime's ``validate`` command (an entry
    point: the simulator does not import the runtime)."""
    from lina_sim.cli.main import build_parser
    from lina_sim.errors import ConfigError

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "validate" not in sub.choices:
        raise ConfigError("--check", "needs the runtime's `lina-sim validate` command", "pip install -e '.[runtime]'")
    return parser
