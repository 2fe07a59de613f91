"""The ``lina-run`` command: launch real ranks with torchrun, plainly or inside an
emulated testbed. ``lina-run --help`` lists every sub-command's options.

    lina-run [run] [LAUNCH] SCENARIO.yaml [SCENARIO OPTIONS]   a scenario's policies, for real
    lina-run [LAUNCH] -- MODULE [ARGS...]                      python -m MODULE in every rank
    lina-run module [LAUNCH] MODULE [ARGS...]                  the same, as a sub-command
    lina-run calibrate [LAUNCH] --out P.yaml                   measure the cluster, write a profile
    lina-run selftest [LAUNCH] [--bytes N] [--reps R]          collectives + the contention they suffer
    lina-run cleanup [--all]                                   remove namespaces left by crashed runs

Everything is checked before anything is built or spawned: options, the testbed spec,
whether this machine holds that many ranks, the scenario (loaded and resolved as the
ranks will) and its world size. ``--timeout`` is one deadline for start-up and run.
Under ``torchrun`` (``RANK`` set, no ``--testbed``) a mode runs in this very process, so
``torchrun --nnodes ... -m runtime.cli SCENARIO.yaml`` works across real machines.
Bad input (also when a rank rejects it) exits 2 with one line; a failed or timed-out
run exits 1 with one line; an interrupted one 130.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from lina_sim import __version__
from lina_sim.config.fields import check_known
from lina_sim.errors import ConfigError, LinaSimError
from runtime import entry
from runtime.context import add_scenario_options, check_scenario_options, scenario_argv
from runtime.launch import (
    DEFAULT_TIMEOUT_S,
    LaunchError,
    Progress,
    check_fits,
    enter_testbed,
    launch,
    rank_pythonpath,
    run_entry,
)
from runtime.testbed import TestbedSpec, cleanup_stale, parse_topology, require_netns

SUBCOMMANDS = ("run", "module", "calibrate", "selftest", "cleanup")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(self.prog, message)

    def parse_strict(self, argv: Sequence[str]) -> argparse.Namespace:
        """Parse ``argv``; an unknown option is one error naming it, the closest option
        and every option this (sub-)command takes."""
        ns, extra = self.parse_known_args(list(argv))
        if extra:
            opt = next((x for x in extra if x.startswith("-")), None)
            if opt is None:
                raise ConfigError(self.prog, f"unexpected argument {extra[0]!r}", "the options in --help")
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
            check_known({opt.split("=", 1)[0]: None}, known, "", what=f"option of {self.prog}")
        return ns


def _launch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch")
    g.add_argument("--testbed", metavar="NODESxRANKS", help="emulate NODES nodes of RANKS ranks (needs root)")
    g.add_argument("--nic", metavar="RATE", help="per-node link rate in the testbed, e.g. 400mbit, 10gbit")
    g.add_argument("--delay", metavar="D", help="one-way link delay in the testbed, e.g. 1ms (needs netem)")
    g.add_argument("--nproc", type=int, default=None, help="ranks on this machine without a testbed (default 1)")
    g.add_argument("--ranks-per-node", type=int, default=None, help="without a testbed: ranks per pretend node")
    g.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"wall-clock limit of the whole run, start-up included, s (default {DEFAULT_TIMEOUT_S:.0f})",
    )
    g.add_argument("--quiet", action="store_true", help="do not echo rank output or show progress")


def build_parser() -> tuple[_Parser, dict[str, _Parser], list[argparse.Action]]:
    """The top-level parser, each sub-command's, and the scenario options' actions."""
    top = _Parser(
        prog="lina-run",
        description="Launch real ranks with torchrun, plainly or inside an emulated testbed.",
        allow_abbrev=False,
    )
    top.add_argument("--version", action="version", version=f"lina-run (lina-sim) {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs: dict[str, _Parser] = {}

    def add(name: str, help_: str) -> _Parser:
        subs[name] = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        return subs[name]

    p = add("run", "run a scenario's policies on real ranks (the default: `lina-run SCENARIO.yaml ...`)")
    _launch_options(p)
    p.add_argument("scenario", metavar="SCENARIO.yaml", help="scenario file (kind: training or inference)")
    scenario_actions = add_scenario_options(p.add_argument_group("scenario options (passed to every rank)"))

    p = add("module", "python -m MODULE ARGS in every rank (also `lina-run [LAUNCH] -- MODULE ARGS`)")
    _launch_options(p)
    p.add_argument("module", nargs="?", metavar="MODULE", help="a module that calls runtime.dist.init()")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")

    p = add("calibrate", "measure this cluster and write a hardware profile")
    _launch_options(p)
    p.add_argument("--out", required=True, help="profile YAML to write (raw data goes to <stem>.raw.yaml)")
    p.add_argument("--shapes", help="matmul shapes MxKxN,... (default: the paper's Transformer-XL FFN and attention)")
    p.add_argument("--dtypes", help="comma-separated: fp32, bf16, fp16 (default fp32 on CPU, all on GPU)")
    p.add_argument("--max-bytes", default="32e6", help="largest ping-pong message, bytes (default 32e6)")

    p = add("selftest", "check collectives and measure the contention they suffer")
    _launch_options(p)
    p.add_argument("--bytes", default="16e6", help="all-to-all and allreduce bytes per rank (default 16e6)")
    p.add_argument("--reps", default="3", help="repetitions per measurement (default 3)")

    p = add("cleanup", "remove network namespaces left by crashed lina-run runs")
    p.add_argument("--all", action="store_true", help="also those of runs still alive")
    return top, subs, scenario_actions


def full_help() -> str:
    """``lina-run --help``: the command, then every sub-command with all its options."""
    top, subs, _ = build_parser()
    parts = [__doc__.strip(), top.format_usage() + "\n" + top.format_help().split("\n\n", 2)[-1]]
    parts += [f"{'=' * 20} lina-run {name} {'=' * 20}\n{p.format_help()}" for name, p in subs.items()]
    return "\n\n".join(parts)


# -- checks before anything starts ---------------------------------------------------------
def _positive(value: str, option: str, kind: type = float) -> None:
    try:
        ok = kind(float(value)) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(option, f"bad value {value!r}", "a positive number" if kind is float else "an integer >= 1")


def _testbed_spec(args: argparse.Namespace) -> TestbedSpec | None:
    """Validate launch options, and that this machine holds the ranks they ask for,
    before anything is built; None without --testbed."""
    if args.timeout <= 0:
        raise ConfigError("--timeout", f"must be > 0 s, got {args.timeout:g}")
    if args.testbed is None:
        if args.nic or args.delay:
            raise ConfigError("--nic/--delay", "only apply with --testbed NODESxRANKS")
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError("--nproc", f"must be >= 1, got {args.nproc}")
        world = args.nproc or 1
        rpn = args.ranks_per_node or world
        if rpn < 1 or world % rpn:
            raise ConfigError(
                "--ranks-per-node", f"{world} ranks cannot be split into nodes of {rpn}", "a divisor of the rank count"
            )
        check_fits(world, world // rpn, f"--nproc {world}")
        return None
    if args.nproc is not None:
        raise ConfigError("--nproc", "the testbed sets the rank count (NODESxRANKS); drop --nproc")
    if args.ranks_per_node is not None:
        raise ConfigError("--ranks-per-node", "the testbed sets the ranks per node (NODESxRANKS); drop it")
    nodes, rpn = parse_topology(args.testbed)
    check_fits(nodes * rpn, nodes, f"--testbed {args.testbed}")
    if not args.nic:
        raise ConfigError("--nic", "required with --testbed", "a rate such as 400mbit or 10gbit")
    spec = TestbedSpec.parse(args.testbed, args.nic, args.delay)
    require_netns()
    return spec


def _check_scenario(path: str, a: argparse.Namespace, spec: TestbedSpec | None) -> None:
    """Load and resolve the scenario as every rank will, and check the launch has its
    shape (world size, ranks per node) and its policies, before anything is spawned."""
    # Here, not at the top: the modes import torch, which --help and the option checks
    # above never need (they stay well under a second).
    import torch

    from lina_sim.config.scenario import load_scenarios
    from runtime.dist import DistInfo
    from runtime.dist import _env_int as env_int
    from runtime.scenario import check_launch, mode_of
    from runtime.train import TrainingMode, select_policies

    points = load_scenarios(path)
    mode = mode_of(points)
    setups = [mode.resolve(p) for p in points]
    if spec is not None:
        world, rpn = spec.world_size, spec.ranks_per_node
    elif "RANK" in os.environ:  # a rank of an outside torchrun: its launch's shape
        world = env_int("WORLD_SIZE")
        rpn = env_int("LOCAL_WORLD_SIZE", world)
    else:
        world = a.nproc or 1
        rpn = a.ranks_per_node or world
    # The launch's shape as every rank's DistInfo will describe it.
    info = DistInfo(0, world, 0, rpn, "gloo", torch.device("cpu"))
    for setup in setups:
        check_launch(info, setup.cluster)
        if a.policies and isinstance(mode, TrainingMode):  # only training runs a subset
            select_policies(setup, a.policies)


# -- running -------------------------------------------------------------------------------
def run_mode(
    mode: str, mode_args: Sequence[str], args: argparse.Namespace, spec: TestbedSpec | None, deadline: float
) -> int:
    """Run ``runtime.entry`` MODE in every rank, then the mode's launcher-side finish."""
    entry.check_mode(mode)
    if spec is None and "RANK" in os.environ:  # already a rank (torchrun): run here
        return entry.main([mode, *mode_args])
    if spec is not None and (stale := cleanup_stale()):
        print(f"lina-run: removed {len(stale)} namespaces left by crashed runs", file=sys.stderr)
    progress = Progress(enabled=not args.quiet)
    try:
        results = run_entry(
            mode,
            list(mode_args),
            testbed=spec,
            nprocs=args.nproc or 1,
            ranks_per_node=args.ranks_per_node,
            timeout_s=args.timeout,
            deadline=deadline,
            echo=not args.quiet,
            progress=progress,
        )
    finally:
        progress.close()
    finish = entry.finisher(mode)
    return int(finish(results, list(mode_args)) or 0) if finish else 0


def run_module(argv: Sequence[str], args: argparse.Namespace, spec: TestbedSpec | None, deadline: float) -> int:
    """``python -m MODULE ARGS`` in every rank; the module calls ``runtime.dist.init()``."""
    if spec is None and "RANK" in os.environ:
        sys.argv = list(argv)
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        return 0
    progress = Progress(enabled=not args.quiet)
    with ExitStack() as stack:
        stack.callback(progress.close)
        tb = None
        if spec is not None:
            cleanup_stale()
            tb = enter_testbed(stack, spec, deadline, args.timeout, progress)
        launch(
            [sys.executable, "-m", *argv],
            args.nproc or 1,
            testbed=tb,
            ranks_per_node=args.ranks_per_node,
            timeout_s=args.timeout,
            deadline=deadline,
            echo=not args.quiet,
            progress=progress,
            env={"PYTHONPATH": rank_pythonpath()},
        )
    return 0


def _normalise(argv: list[str]) -> list[str]:
    """Today's spellings onto the sub-commands: ``[LAUNCH] SCENARIO.yaml ...`` is ``run``,
    ``[LAUNCH] -- MODULE ARGS`` is ``module``."""
    if not argv:
        raise ConfigError("lina-run", "give a SCENARIO.yaml, -- MODULE, or a sub-command", SUBCOMMANDS)
    if argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    if "--" in argv:
        i = argv.index("--")
        if i + 1 == len(argv):
            raise ConfigError("lina-run", "nothing to run after --", "-- MODULE [ARGS...]")
        return ["module", *argv]
    return ["run", *argv]


def _main(argv: list[str], deadline_from: float) -> int:
    argv = _normalise(argv)
    if argv[0] in ("-h", "--help"):
        print(full_help())
        return 0
    top, subs, scenario_actions = build_parser()
    if argv[0] == "--version":
        top.parse_args(["--version"])  # prints and exits 0
    cmd, rest, after = argv[0], argv[1:], None
    if cmd == "module" and "--" in rest:  # [LAUNCH] -- MODULE ARGS: nothing but options before --
        i = rest.index("--")
        rest, after = rest[:i], rest[i + 1 :]
    a = subs[cmd].parse_strict(rest)
    if after is not None:
        if a.module is not None:
            raise ConfigError("lina-run", f"unexpected {a.module!r} before --", "launch options only")
        a.module, a.args = (after[0], after[1:]) if after else (None, [])
    if cmd == "cleanup":
        require_netns()
        removed = cleanup_stale(all_runs=a.all)
        print(f"lina-run cleanup: removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
        return 0
    spec = _testbed_spec(a)
    deadline = deadline_from + a.timeout
    if cmd == "module":
        if a.module is None:
            raise ConfigError("lina-run module", "give the MODULE to run in every rank", "MODULE [ARGS...]")
        return run_module([a.module, *a.args], a, spec, deadline)
    if cmd == "calibrate":
        _positive(a.max_bytes, "--max-bytes")
        if a.shapes:
            # Here, not at the top: runtime.calibrate imports torch, which no other
            # sub-command's launcher needs (lina-run --help, cleanup, errors stay fast).
            from runtime.calibrate import parse_shapes

            parse_shapes(a.shapes)  # fail here, not in every rank
        note = f"testbed {a.testbed} at {a.nic}" + (f", delay {a.delay}" if a.delay else "") if a.testbed else ""
        mode_args = ["--out", str(Path(a.out).resolve()), "--max-bytes", a.max_bytes, "--note", note]
        mode_args += (["--shapes", a.shapes] if a.shapes else []) + (["--dtypes", a.dtypes] if a.dtypes else [])
        return run_mode("calibrate", mode_args, a, spec, deadline)
    if cmd == "selftest":
        _positive(a.bytes, "--bytes")
        _positive(a.reps, "--reps", int)
        return run_mode("selftest", [a.bytes, a.bytes, a.reps], a, spec, deadline)
    # run: SCENARIO.yaml and its options, all checked here before any rank starts
    check_scenario_options(a)
    if not Path(a.scenario).is_file():
        raise ConfigError("scenario", f"no such file {a.scenario!r}")
    path = str(Path(a.scenario).resolve())
    _check_scenario(path, a, spec)
    return run_mode("scenario", [path, *scenario_argv(a, scenario_actions)], a, spec, deadline)


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP tear down like Ctrl-C: the launcher's finally-blocks stop every rank.
    raise KeyboardInterrupt(f"got {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # --timeout counts from here: start-up is part of the run
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():  # tests call main() from threads too
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
    try:
        return _main(argv, started)
    except LaunchError as e:
        print(f"lina-run: error: {e}", file=sys.stderr)
        return 2 if e.exit_code == 2 else 1  # a rank that rejected its input is bad input too
    except LinaSimError as e:
        print(f"lina-run: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lina-run --help | head`
        return 0
    except KeyboardInterrupt:
        print("lina-run: interrupted; all ranks stopped and the testbed removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
