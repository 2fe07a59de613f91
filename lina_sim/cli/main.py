"""The ``lina-sim`` command: a thin dispatcher over the ``lina_sim.cli.*`` command modules.

Each command module exposes ``register(subparsers)`` and keeps heavy imports inside its
handlers, so ``lina-sim --help`` stays fast and no module imports everything.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lina_sim.errors import LinaSimError

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = [
    "lina_sim.cli.run",
    "lina_sim.cli.network",
    "lina_sim.cli.trace",
    "lina_sim.cli.validate",
    "lina_sim.cli.sweep",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lina-sim",
        description="Simulate MoE communication scheduling and expert placement on GPU clusters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command module not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LinaSimError as e:
        print(f"lina-sim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lina-sim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
