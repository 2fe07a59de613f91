"""Rank-side entry point: ``python -m runtime.entry MODE [ARGS...]`` in every rank.

It initialises torch.distributed from the launcher's environment, calls the callable
registered for ``MODE`` with a :class:`runtime.context.RankContext`, writes its return
value where the launcher collects it (:func:`runtime.launch.run_entry` returns them by
rank), and destroys the process groups. Errors print one line and exit 2 (user errors) or 1.

``ENTRIES`` is the hook for new run modes: a name maps to ``(rank_fn, finish_fn)``, both
``"module:function"``. ``rank_fn(ctx: RankContext)`` runs in every rank and returns
something picklable (e.g. a list of :class:`lina_sim.results.timeline.Event`);
``finish_fn(results: list, args: list[str]) -> int`` runs once in the launcher with the
results by rank (write files, print a table) and returns the exit code; it may be None.
``lina-run SCENARIO.yaml ARGS`` runs the ``scenario`` mode (:mod:`runtime.scenario`)
with ARGS = [SCENARIO, ...]; ``selftest`` and ``idle`` are :mod:`runtime.selftest`'s,
``calibrate`` :mod:`runtime.calibrate`'s. Modes are loaded by name, when run.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lina_sim.errors import LinaSimError
from runtime.launch import write_result

if TYPE_CHECKING:  # annotations only: runtime.context imports torch (see main)
    from runtime.context import RankContext

ENTRIES: dict[str, tuple[str, str | None]] = {
    "selftest": ("runtime.selftest:selftest", "runtime.selftest:print_selftest"),
    "idle": ("runtime.selftest:idle", None),
    "calibrate": ("runtime.calibrate:rank_main", "runtime.calibrate:finish"),
    "scenario": ("runtime.scenario:rank_main", "runtime.scenario:finish"),
}


def check_mode(mode: str) -> None:
    if mode not in ENTRIES:
        hint = (
            " (scenario runs need runtime/scenario.py registered as 'scenario' in runtime/entry.py ENTRIES)"
            if mode == "scenario"
            else ""
        )
        raise LinaSimError(f"unknown run mode {mode!r}{hint}; allowed: {', '.join(sorted(ENTRIES))}")


def _load(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def resolve(mode: str) -> Callable[[RankContext], Any]:
    """The rank-side callable of ``mode``."""
    check_mode(mode)
    return _load(ENTRIES[mode][0])


def finisher(mode: str) -> Callable[[list, list[str]], int] | None:
    """The launcher-side callable of ``mode`` (None if it has none)."""
    check_mode(mode)
    ref = ENTRIES[mode][1]
    return _load(ref) if ref else None


def _die_with_launcher() -> None:
    """Belt and braces for ``setpriv --pdeathsig``: die with the torchrun agent that
    started this rank, and exit now if ``lina-run`` (``LINA_LAUNCHER_PID``) is already gone."""
    launcher = os.environ.get("LINA_LAUNCHER_PID")
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if launcher and (os.getppid() == 1 or not os.path.exists(f"/proc/{launcher}")):
        os._exit(3)


def _common_t0(barrier: Callable[[], Any]) -> float:
    """The run's time origin (``time.monotonic()`` s), the same on every rank."""
    if "LINA_CLOCK_T0" in os.environ:  # one machine: CLOCK_MONOTONIC is shared by all ranks
        return float(os.environ["LINA_CLOCK_T0"])
    barrier()  # several machines (torchrun): align origins at a barrier
    return time.monotonic()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # torch here, not at the top: the launcher imports this module for ENTRIES and never
    # needs torch (lina-run -- MODULE, cleanup and one-line errors stay fast).
    import torch
    import torch.distributed as dist

    from runtime import dist as ldist
    from runtime.context import RankContext

    torch.set_num_threads(1)  # ranks share a few cores; intra-op threads only contend
    rank = os.environ.get("RANK", "?")
    try:
        _die_with_launcher()
        if not argv:
            raise LinaSimError(f"usage: python -m runtime.entry MODE [ARGS...]; modes: {', '.join(sorted(ENTRIES))}")
        fn = resolve(argv[0])
        info = ldist.init()
        try:
            ctx = RankContext(info, argv[1:], _common_t0(dist.barrier))
            result = fn(ctx)
            if os.environ.get("LINA_RUN_DIR"):
                write_result(os.environ["LINA_RUN_DIR"], info.rank, result)
        finally:
            ldist.destroy()
        return 0
    except LinaSimError as e:
        print(f"rank {rank}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        traceback.print_exc()
        print(f"rank {rank}: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
