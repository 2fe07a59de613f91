"""Rank-side entry point: ``python -m runtime.entry MODE [ARGS...]`` in every rank.

It initialises torch.distributed from the launcher's environment, calls the callable
registered for ``MODE`` with a :class:`RankContext`, writes its return value where the
launcher collects it (:func:`runtime.launch.run_entry` returns them by rank), and
destroys the process groups. Errors print one line and exit 2 (user errors) or 1.

``ENTRIES`` is the hook for new run modes: a name maps to ``(rank_fn, finish_fn)``, both
``"module:function"``. ``rank_fn(ctx: RankContext)`` runs in every rank and returns
something picklable (e.g. a list of :class:`lina_sim.results.timeline.Event`);
``finish_fn(results: list, args: list[str]) -> int`` runs once in the launcher with the
results by rank (write files, print a table) and returns the exit code; it may be None.
``lina-run SCENARIO.yaml ARGS`` runs the ``scenario`` mode with ARGS = [SCENARIO, ...];
the executor registers it. This module imports torch only inside functions, so the
launcher can read ``ENTRIES`` cheaply.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from lina_sim.errors import LinaSimError

if TYPE_CHECKING:
    from runtime import dist as ldist

ENTRIES: dict[str, tuple[str, str | None]] = {
    "selftest": ("runtime.entry:selftest", "runtime.entry:print_selftest"),
    "idle": ("runtime.entry:idle", None),
    "calibrate": ("runtime.calibrate:rank_main", "runtime.calibrate:finish"),
    "scenario": ("runtime.executor:rank_main", "runtime.executor:finish"),
}


@dataclass
class RankContext:
    """What a mode function gets: who it is, its arguments, a shared clock, and lazily
    built process groups (``ctx.groups()`` is collective: call it on every rank)."""

    info: "ldist.DistInfo"
    args: list[str]
    t0: float  # time.monotonic() origin shared by all ranks on this machine
    _groups: dict = field(default_factory=dict)

    def groups(self, ep_size: int | None = None) -> "ldist.Groups":
        """Expert-parallel and data-parallel communicators (built once per ep_size)."""
        from runtime import dist as ldist

        if ep_size not in self._groups:
            self._groups[ep_size] = ldist.make_groups(self.info, ep_size)
        return self._groups[ep_size]

    def now(self) -> float:
        """Seconds since the run's common origin (the timeline's ``start``/``end`` clock).
        On GPU, synchronise the stream (or use CUDA events) before reading it."""
        return time.monotonic() - self.t0


def check_mode(mode: str) -> None:
    if mode not in ENTRIES:
        hint = (" (scenario runs need runtime/executor.py to register 'scenario' in runtime/entry.py ENTRIES)"
                if mode == "scenario" else "")
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
    """Belt and braces for ``setpriv --pdeathsig``: exit if the launcher is already gone."""
    launcher = os.environ.get("LINA_LAUNCHER_PID")
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if launcher and os.getppid() != int(launcher):
        os._exit(3)


def _common_t0() -> float:
    import torch.distributed as dist

    if "LINA_CLOCK_T0" in os.environ:  # one machine: CLOCK_MONOTONIC is shared by all ranks
        return float(os.environ["LINA_CLOCK_T0"])
    dist.barrier()  # several machines (torchrun): align origins at a barrier
    return time.monotonic()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    from runtime import dist as ldist

    torch.set_num_threads(1)  # ranks share a few cores; intra-op threads only contend
    rank = os.environ.get("RANK", "?")
    try:
        _die_with_launcher()
        if not argv:
            raise LinaSimError(f"usage: python -m runtime.entry MODE [ARGS...]; modes: {', '.join(sorted(ENTRIES))}")
        fn = resolve(argv[0])
        info = ldist.init()
        try:
            ctx = RankContext(info, argv[1:], _common_t0())
            result = fn(ctx)
            if os.environ.get("LINA_RUN_DIR"):
                from runtime.launch import write_result
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


# -- built-in modes -----------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def selftest(ctx: RankContext) -> dict[str, float]:
    """Check the data path and measure the contention Lina attacks.

    Args (optional): ``A2A_BYTES`` per rank (default 4 MB), ``P2P_BYTES`` (default 4 MB),
    ``REPS`` (default 3). Returns seconds (median over reps): ``p2p`` (rank 0 -> the first
    rank of the last node, one way, once), ``a2a_alone``, ``allreduce_alone`` (same size,
    dp communicator), ``a2a_with_allreduce`` (the all-to-all while that allreduce, launched
    just before it, runs), and ``allreduce_ok`` / ``a2a_ok`` correctness flags.
    """
    import torch
    import torch.distributed as dist

    info, g = ctx.info, ctx.groups()
    a2a_bytes = int(float(ctx.args[0])) if ctx.args else 4 << 20
    p2p_bytes = int(float(ctx.args[1])) if len(ctx.args) > 1 else 4 << 20
    reps = int(ctx.args[2]) if len(ctx.args) > 2 else 3
    w, r = info.world_size, info.rank
    out: dict[str, float] = {}

    x = torch.full((4,), float(r))
    dist.all_reduce(x, group=g.dp)
    out["allreduce_ok"] = float(torch.all(x == sum(range(w))).item())
    send = torch.arange(w, dtype=torch.float32) + 100 * r
    recv = torch.empty(w)
    dist.all_to_all_single(recv, send, group=g.ep)
    out["a2a_ok"] = float(torch.equal(recv, torch.arange(w, dtype=torch.float32) * 100 + r))

    peer = w - info.local_world_size  # first rank of the last node (crosses the NIC if nodes > 1)
    buf = torch.empty(p2p_bytes // 4)
    dist.barrier()
    if r == 0 and peer != 0:
        out["p2p"] = _timed(lambda: (dist.send(buf, peer), dist.recv(buf[:1], peer)))
    elif r == peer and peer != 0:
        _timed(lambda: (dist.recv(buf, 0), dist.send(buf[:1], 0)))

    n = a2a_bytes // 4 // w * w
    a, b, c = torch.ones(n), torch.empty(n), torch.ones(n)

    def a2a() -> None:
        dist.all_to_all_single(b, a, group=g.ep)

    for name, fn in (("a2a_alone", a2a), ("allreduce_alone", lambda: dist.all_reduce(c, group=g.dp)),
                     ("a2a_with_allreduce", None)):
        times = []
        for _ in range(reps):
            dist.barrier()
            if fn is None:  # time the all-to-all only, with the allreduce launched just before it
                work = dist.all_reduce(c, group=g.dp, async_op=True)
                times.append(_timed(a2a))
                work.wait()
            else:
                times.append(_timed(fn))
        out[name] = statistics.median(times)
    return out


def print_selftest(results: list, args: list[str]) -> int:
    r0 = results[0]
    ok = all(r["allreduce_ok"] and r["a2a_ok"] for r in results)
    print(f"selftest: allreduce and all_to_all {'correct' if ok else 'WRONG'} on {len(results)} ranks")
    for k in ("p2p", "a2a_alone", "allreduce_alone", "a2a_with_allreduce"):
        if k in r0:
            print(f"  {k:20s} {r0[k] * 1e3:9.1f} ms (rank 0)")
    return 0 if ok else 1


def idle(ctx: RankContext) -> None:
    """For tests: stay in small allreduces for ARGS[0] seconds (default 60)."""
    import torch
    import torch.distributed as dist

    until = time.monotonic() + (float(ctx.args[0]) if ctx.args else 60.0)
    x = torch.zeros(1)
    dist.all_reduce(x)
    print(f"idle: rank {ctx.info.rank} in collectives", flush=True)
    while time.monotonic() < until:
        dist.all_reduce(x)
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
