"""Process-group setup in one place: init from torchrun-style env, world-size checks,
the expert- and data-parallel groups, destroy; and the host's cores.

Every rank process calls :func:`init` once (it reads ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), then
:func:`make_groups` (collective: every rank calls it, in the same order), and
:func:`destroy` at the end (the communicators of one step graph are
:func:`runtime.comm.comm_groups`'). The backend is NCCL when CUDA is available, gloo
otherwise. Timeouts are bounded, so a missing peer or an unreachable master turns into
a one-line :class:`DistError` instead of a hang.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from lina_sim.errors import LinaSimError
from runtime.comm import new_group

# Override with LINA_CONNECT_TIMEOUT_S / LINA_OP_TIMEOUT_S in the ranks' environment.
DEFAULT_CONNECT_TIMEOUT_S = 30.0  # reaching the master and waiting for all ranks to join
DEFAULT_OP_TIMEOUT_S = 120.0  # any one collective
T = TypeVar("T")


class DistError(LinaSimError):
    """A process-group problem: bad env, unreachable master, world size mismatch."""


@dataclass(frozen=True)
class DistInfo:
    """Who this process is (ranks are node-major: ``local_world_size`` per node)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device


@dataclass(frozen=True)
class Groups:
    """Communicators a rank runs with. ``ep`` (expert-parallel all-to-all) and ``dp``
    (data-parallel gradient allreduce) are *different* communicators even when they span
    the same ranks, so their collectives run concurrently and contend for links, as
    DeepSpeed-MoE's do."""

    ep: dist.ProcessGroup
    dp: dist.ProcessGroup


def _env_int(name: str, default: int | None = None) -> int:
    v = os.environ.get(name)
    if v is None:
        if default is None:
            raise DistError(f"dist: environment variable {name} is not set (launch with lina-run or torchrun)")
        return default
    try:
        return int(v)
    except ValueError:
        raise DistError(f"dist: {name}={v!r} is not an integer") from None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(
    backend: str | None = None,
    connect_timeout_s: float | None = None,
    op_timeout_s: float | None = None,
    expected_world_size: int | None = None,
) -> DistInfo:
    """Initialise the default process group from the environment.

    ``expected_world_size``: fail with a clear error if the launch has another size
    (e.g. a scenario written for 4 ranks launched with 2).
    """
    connect_timeout_s = connect_timeout_s or float(os.environ.get("LINA_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S))
    op_timeout_s = op_timeout_s or float(os.environ.get("LINA_OP_TIMEOUT_S", DEFAULT_OP_TIMEOUT_S))
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 29500)
    if expected_world_size is not None:
        check_world_size(world, expected_world_size)
    if not (0 <= rank < world) or world % local_world:
        raise DistError(f"dist: inconsistent RANK={rank} WORLD_SIZE={world} LOCAL_WORLD_SIZE={local_world}")
    backend = backend or default_backend()
    if backend == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    store = _connect_store(addr, port, rank, world, connect_timeout_s)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=op_timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    _barrier_or_fail(world, connect_timeout_s)
    _mark_up(rank)
    return DistInfo(rank, world, local_rank, local_world, backend, device)


def check_world_size(world: int, expected: int, what: str = "the run") -> None:
    """One-line error when the launch's world size (``WORLD_SIZE``) does not match what
    ``what`` needs."""
    if world != expected:
        raise DistError(
            f"dist: world size mismatch: launched with WORLD_SIZE={world}, but {what} needs {expected} ranks"
        )


def _connect_store(addr: str, port: int, rank: int, world: int, timeout_s: float) -> dist.Store:
    """The rendezvous store, reached by every rank within ``timeout_s``.

    Under torch's elastic launcher (``torchrun``, which ``lina-run`` uses) the node-0
    agent already serves a TCPStore at ``MASTER_ADDR:MASTER_PORT``
    (``TORCHELASTIC_USE_AGENT_STORE=True``, torch/distributed/rendezvous.py does the
    same): every rank is a client and checks in on a counter. Otherwise rank 0 hosts it.
    """
    t0 = time.monotonic()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        if agent_store:
            store = dist.TCPStore(addr, port, world_size=world, is_master=False, timeout=timedelta(seconds=timeout_s))
            _wait_for_all(store, world, t0 + timeout_s)
            return store
        return dist.TCPStore(
            addr,
            port,
            world_size=world,
            is_master=(rank == 0),
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=True,
        )
    except Exception as e:  # DistNetworkError / DistStoreError / RuntimeError, by torch version
        waited = time.monotonic() - t0
        if isinstance(e, TimeoutError) or (rank == 0 and not agent_store):
            what = f"not all {world} ranks joined the master at {addr}:{port} within {waited:.0f} s"
        else:
            what = (
                f"cannot reach the master at {addr}:{port} within {waited:.0f} s "
                "(is rank 0 running and MASTER_ADDR reachable?)"
            )
        raise DistError(f"dist: rank {rank}: {what} [{type(e).__name__}: {str(e).splitlines()[0][:160]}]") from None


def _wait_for_all(store: dist.Store, world: int, deadline: float) -> None:
    """Check in on the agent's store and wait until all ``world`` ranks have."""
    # The agent store outlives one attempt; the restart count keeps attempts apart.
    key = f"lina/joined/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    joined = store.add(key, 1)
    while joined < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{joined} of {world} ranks checked in")
        time.sleep(0.02)
        joined = store.add(key, 0)


def _mark_up(rank: int) -> None:
    """Tell the launcher this rank is through rendezvous (a file in ``LINA_UP_DIR``; its
    progress display counts them)."""
    up_dir = os.environ.get("LINA_UP_DIR")
    if up_dir:
        try:
            open(os.path.join(up_dir, f"up.{rank}"), "w").close()
        except OSError:
            pass  # progress only: never fail a rank for it


def report_progress(rank: int, done: int, total: int, what: str) -> None:
    """Rank 0 tells the launcher how far the run is (``done`` of ``total`` units of
    ``what``, e.g. training steps): one small file in ``LINA_UP_DIR`` replaced
    atomically, which the launcher's progress line reads. Other ranks, and runs without
    a launcher, do nothing."""
    up_dir = os.environ.get("LINA_UP_DIR")
    if rank != 0 or not up_dir:
        return
    try:
        tmp = os.path.join(up_dir, ".progress.tmp")
        with open(tmp, "w") as f:
            f.write(f"{done} {total} {what}")
        os.replace(tmp, os.path.join(up_dir, "progress"))
    except OSError:
        pass  # progress only: never fail a rank for it


def _barrier_or_fail(world: int, timeout_s: float) -> None:
    """A first collective, so that a broken data path (not just the store) fails here."""
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s)) if dist.get_backend() == "gloo" else dist.barrier()
    except Exception as e:
        raise DistError(
            f"dist: rank {dist.get_rank()}: the first barrier over {world} ranks failed: {str(e).splitlines()[0][:200]}"
        ) from None


def make_groups(info: DistInfo, ep_size: int | None = None) -> Groups:
    """Build the expert-parallel and data-parallel groups (collective).

    Expert parallelism spans blocks of ``ep_size`` consecutive ranks (default: the whole
    world, one expert group as in the Lina paper). The data-parallel group for the
    non-expert gradients always spans the whole world, as its own communicator.
    """
    world = info.world_size
    ep_size = ep_size or world
    if world % ep_size:
        raise DistError(f"dist: ep_size={ep_size} does not divide the world size {world}")
    ep_blocks = [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]
    # new_group is collective over the default group: every rank creates every group, in order.
    ep = {tuple(b): new_group(b) for b in ep_blocks}
    dp = new_group(range(world))
    my_ep = next(b for b in ep if info.rank in b)
    return Groups(ep=ep[my_ep], dp=dp)


def destroy() -> None:
    """Tear the process groups down (safe to call twice or when never initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def host_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_id() -> str:
    """An id of the machine (kernel boot id): ranks that print the same one share its cores."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return socket.gethostname()


def one_core_each(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn()`` on every rank with at most one rank per core of the host at a time
    (collective): CPU ranks that outnumber the cores take turns, the others wait at a
    barrier. Measures one-core speed, which the simulator shares among ranks itself
    (``cluster.host``); on GPUs every rank runs at once. Returns ``fn()``'s value."""
    if info.device.type != "cpu":
        return fn()
    cores = max(1, min(host_cores(), info.world_size))
    turns = -(-info.world_size // cores)
    out = None
    for turn in range(turns):
        if info.rank % turns == turn:
            out = fn()
        dist.barrier()
    return out
