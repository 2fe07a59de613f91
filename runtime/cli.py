"""The ``lina-run`` command: launch real ranks, plainly or inside an emulated testbed.

    lina-run [LAUNCH] SCENARIO.yaml [ARGS...]   run a scenario's policies (scenario mode)
    lina-run [LAUNCH] -- MODULE [ARGS...]       python -m MODULE in every rank
    lina-run calibrate [LAUNCH] --out P.yaml    measure the cluster, write a profile
    lina-run selftest [LAUNCH] [--bytes N]      collectives + the contention they suffer
    lina-run cleanup [--all]                    remove namespaces left by crashed runs

    LAUNCH: --testbed NODESxRANKS --nic RATE [--delay D] | --nproc N [--ranks-per-node R]
            [--timeout S] [--quiet]

Under ``torchrun`` (``RANK`` set, no ``--testbed``) a mode runs in this very process, so
``torchrun --nnodes ... -m runtime.cli SCENARIO.yaml`` works across real machines.
Bad input (also when a rank rejects it) exits 2 with one line; a failed or timed-out
run exits 1 with one line.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from lina_sim.errors import ConfigError, LinaSimError
from runtime import entry
from runtime.launch import DEFAULT_TIMEOUT_S, LaunchError, launch, rank_pythonpath, run_entry
from runtime.testbed import Testbed, TestbedSpec, cleanup_stale, require_netns

SUBCOMMANDS = ("calibrate", "selftest", "cleanup")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(self.prog, message)


def _launch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch")
    g.add_argument("--testbed", metavar="NODESxRANKS", help="emulate NODES nodes of RANKS ranks (needs root)")
    g.add_argument("--nic", metavar="RATE", help="per-node link rate in the testbed, e.g. 400mbit, 10gbit")
    g.add_argument("--delay", metavar="D", help="one-way link delay in the testbed, e.g. 1ms (needs netem)")
    g.add_argument("--nproc", type=int, default=None, help="ranks on this machine without a testbed (default 1)")
    g.add_argument("--ranks-per-node", type=int, default=None, help="without a testbed: ranks per pretend node")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="wall-clock limit of the run, s")
    g.add_argument("--quiet", action="store_true", help="do not echo rank output")


def _testbed_spec(args: argparse.Namespace) -> TestbedSpec | None:
    """Validate launch options before anything is built; None without --testbed."""
    if args.testbed is None:
        if args.nic or args.delay:
            raise ConfigError("--nic/--delay", "only apply with --testbed NODESxRANKS")
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError("--nproc", f"must be >= 1, got {args.nproc}")
        return None
    if args.nproc is not None:
        raise ConfigError("--nproc", "the testbed sets the rank count (NODESxRANKS); drop --nproc")
    if not args.nic:
        raise ConfigError("--nic", "required with --testbed", "a rate such as 400mbit or 10gbit")
    spec = TestbedSpec.parse(args.testbed, args.nic, args.delay)
    require_netns()
    return spec


def run_mode(mode: str, mode_args: Sequence[str], args: argparse.Namespace) -> int:
    """Run ``runtime.entry`` MODE in every rank, then the mode's launcher-side finish."""
    entry.check_mode(mode)
    spec = _testbed_spec(args)
    if spec is None and "RANK" in os.environ:  # already a rank (torchrun): run here
        return entry.main([mode, *mode_args])
    if spec is not None and (stale := cleanup_stale()):
        print(f"lina-run: removed {len(stale)} namespaces left by crashed runs", file=sys.stderr)
    results = run_entry(
        mode,
        list(mode_args),
        testbed=spec,
        nprocs=args.nproc or 1,
        ranks_per_node=args.ranks_per_node,
        timeout_s=args.timeout,
        echo=not args.quiet,
    )
    finish = entry.finisher(mode)
    return int(finish(results, list(mode_args)) or 0) if finish else 0


def run_module(argv: Sequence[str], args: argparse.Namespace) -> int:
    """``python -m MODULE ARGS`` in every rank; the module calls ``runtime.dist.init()``."""
    if not argv:
        raise ConfigError("lina-run", "nothing to run after --", "-- MODULE [ARGS...]")
    spec = _testbed_spec(args)
    if spec is None and "RANK" in os.environ:
        sys.argv = list(argv)
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        return 0
    with ExitStack() as stack:
        tb = None
        if spec is not None:
            cleanup_stale()
            tb = stack.enter_context(Testbed(spec))
        launch(
            [sys.executable, "-m", *argv],
            args.nproc or 1,
            testbed=tb,
            ranks_per_node=args.ranks_per_node,
            timeout_s=args.timeout,
            echo=not args.quiet,
            env={"PYTHONPATH": rank_pythonpath()},
        )
    return 0


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "cleanup":
        p = _Parser(prog="lina-run cleanup", description="remove namespaces left by crashed lina-run runs")
        p.add_argument("--all", action="store_true", help="also those of runs still alive")
        a = p.parse_args(argv[1:])
        require_netns()
        removed = cleanup_stale(all_runs=a.all)
        print(f"lina-run cleanup: removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
        return 0
    if argv and argv[0] == "calibrate":
        p = _Parser(prog="lina-run calibrate", description="measure this cluster and write a hardware profile")
        _launch_options(p)
        p.add_argument("--out", required=True, help="profile YAML to write (raw data goes to <stem>.raw.yaml)")
        p.add_argument(
            "--shapes", help="matmul shapes MxKxN,... (default: the paper's Transformer-XL FFN and attention)"
        )
        p.add_argument("--dtypes", help="comma-separated: fp32, bf16, fp16 (default fp32 on CPU, all on GPU)")
        p.add_argument("--max-bytes", default="32e6", help="largest ping-pong message, bytes")
        a = p.parse_args(argv[1:])
        if a.shapes:
            # Here, not at the top: runtime.calibrate imports torch, which no other
            # sub-command's launcher needs (lina-run --help, cleanup, errors stay fast).
            from runtime.calibrate import parse_shapes

            parse_shapes(a.shapes)  # fail here, not in every rank
        note = f"testbed {a.testbed} at {a.nic}" + (f", delay {a.delay}" if a.delay else "") if a.testbed else ""
        mode_args = ["--out", str(Path(a.out).resolve()), "--max-bytes", a.max_bytes, "--note", note]
        mode_args += (["--shapes", a.shapes] if a.shapes else []) + (["--dtypes", a.dtypes] if a.dtypes else [])
        return run_mode("calibrate", mode_args, a)
    if argv and argv[0] == "selftest":
        p = _Parser(prog="lina-run selftest", description="check collectives and measure contention")
        _launch_options(p)
        p.add_argument("--bytes", default="16e6", help="all-to-all and allreduce bytes per rank")
        p.add_argument("--reps", default="3")
        a = p.parse_args(argv[1:])
        return run_mode("selftest", [a.bytes, a.bytes, a.reps], a)

    # lina-run [LAUNCH] SCENARIO.yaml [ARGS] | lina-run [LAUNCH] -- MODULE [ARGS]
    module = None
    if "--" in argv:
        i = argv.index("--")
        argv, module = argv[:i], argv[i + 1 :]
    p = _Parser(prog="lina-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _launch_options(p)
    p.add_argument("scenario", nargs="?", help="scenario YAML (or use a sub-command: " + ", ".join(SUBCOMMANDS) + ")")
    a, rest = p.parse_known_args(argv)
    if module is not None:
        if a.scenario or rest:
            raise ConfigError("lina-run", f"unexpected {(a.scenario or rest[0])!r} before --", "options only")
        return run_module(module, a)
    if not a.scenario:
        raise ConfigError("lina-run", "give a SCENARIO.yaml, -- MODULE, or a sub-command", SUBCOMMANDS)
    if not Path(a.scenario).is_file():
        raise ConfigError("scenario", f"no such file {a.scenario!r}")
    return run_mode("scenario", [str(Path(a.scenario).resolve()), *rest], a)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        return _main(argv)
    except LaunchError as e:
        print(f"lina-run: error: {e}", file=sys.stderr)
        return 2 if e.exit_code == 2 else 1  # a rank that rejected its input is bad input too
    except LinaSimError as e:
        print(f"lina-run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lina-run: interrupted; all ranks stopped and the testbed removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
