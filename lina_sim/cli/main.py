"""The ``lina-sim`` command: a thin dispatcher over the ``lina_sim.cli.*`` command modules
and the command modules other packages declare.

Each command module exposes ``register(subparsers)`` and keeps heavy imports inside its
handlers, so ``lina-sim --help`` stays fast and no module imports everything. A package
adds a command without lina_sim importing it by naming its module in the
``lina_sim.commands`` entry-point group (the runtime's ``validate``, see pyproject.toml).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from lina_sim import __version__
from lina_sim.errors import LinaSimError

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = [
    "lina_sim.cli.run",
    "lina_sim.cli.network",
    "lina_sim.cli.trace",
    "lina_sim.cli.sweep",
    "lina_sim.cli.explore",
    "lina_sim.cli.tune",
]
# Entry-point group of command modules from other packages; listed after ours, by name.
COMMAND_GROUP = "lina_sim.commands"


def command_modules() -> list[str]:
    """Our command modules, then the installed packages' (each once)."""
    plugins = sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
    return list(dict.fromkeys(COMMAND_MODULES + [ep.module for ep in plugins]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lina-sim",
        description="Simulate MoE communication scheduling and expert placement on GPU clusters.",
    )
    parser.add_argument("--version", action="version", version=f"lina-sim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in command_modules():
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command module not written yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = "lina-sim"
    try:  # building the parser imports every command (pandas, ...): Ctrl-C may land there too
        args = build_parser().parse_args(argv)
        command = f"lina-sim {args.command}"
        return int(args.func(args) or 0)
    except LinaSimError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
