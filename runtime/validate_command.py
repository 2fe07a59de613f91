"""``lina-sim validate SCENARIO.yaml``: simulator prediction against a real testbed run.

A ``lina-sim`` command that lives with the runtime: the runtime declares this module in
the ``lina_sim.commands`` entry-point group (pyproject.toml), and ``lina_sim.cli.main``
registers it after its own commands, so the simulator never imports the runtime. Like
the other command modules it exposes ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lina_sim.config.scenario import load_scenarios
from lina_sim.errors import ConfigError
from runtime.launch import LaunchError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="calibrate a testbed, predict, run for real, compare step times")
    p.add_argument("scenario", help="scenario YAML (e.g. scenarios/testbed-training.yaml)")
    p.add_argument(
        "--testbed",
        metavar="NODESxRANKS",
        default=None,
        help="emulated cluster (default: the scenario's cluster shape)",
    )
    p.add_argument("--nic", metavar="RATE", default="400mbit", help="per-node link rate (default 400mbit)")
    p.add_argument("--profile", default=None, help="reuse this calibrated profile instead of calibrating")
    p.add_argument("--steps", type=int, default=None, help="measured steps per policy (default: the scenario's)")
    p.add_argument("--out", default=None, help="output directory (default results/<scenario>-validate)")
    p.add_argument("--timeout", type=float, default=900.0, help="wall-clock limit of each real run, s")
    p.add_argument("--verbose", action="store_true", help="echo the ranks' output")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {args.steps}")
    try:
        # Here, not at the top: torch is optional (the runtime extra) and heavy, and
        # `lina-sim --help` imports this module to list the command.
        from runtime.validate import validate
    except ModuleNotFoundError as e:
        raise ConfigError("validate", f"needs the runtime (torch): {e}", "pip install -e '.[runtime]'") from None
    name = load_scenarios(args.scenario)[0].name
    out = Path(args.out or Path("results") / f"{name}-validate")
    try:
        validate(args.scenario, out, args.testbed, args.nic, args.profile, args.steps, args.timeout, args.verbose)
    except LaunchError as e:
        raise ConfigError("validate", f"real run failed: {e}") from None
    return 0
