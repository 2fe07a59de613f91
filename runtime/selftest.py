"""Run modes that check a launch rather than run a scenario (``runtime.entry`` ENTRIES).

- ``selftest`` (``lina-run selftest``): collectives are correct on every rank, and the
  contention Lina attacks, measured: an all-to-all alone and beside an allreduce;
- ``idle`` (tests): ranks that stay in small collectives for a while, to be killed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from runtime.context import RankContext


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

    for name, fn in (
        ("a2a_alone", a2a),
        ("allreduce_alone", lambda: dist.all_reduce(c, group=g.dp)),
        ("a2a_with_allreduce", None),
    ):
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
    until = time.monotonic() + (float(ctx.args[0]) if ctx.args else 60.0)
    x = torch.zeros(1)
    dist.all_reduce(x)
    print(f"idle: rank {ctx.info.rank} in collectives", flush=True)
    while time.monotonic() < until:
        dist.all_reduce(x)
        time.sleep(0.05)
