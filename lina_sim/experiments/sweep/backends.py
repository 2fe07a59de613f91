"""Where sweep points run: :class:`LocalBackend` (a process pool) or :class:`RayBackend`
(an existing Ray cluster, or a local one). Both yield ``(index, outcome)`` as points
finish, and turn a dead worker into a recorded error."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Protocol

from lina_sim.errors import ConfigError
from lina_sim.experiments.sweep.lifeline import die_with_parent, sigint_blocked
from lina_sim.experiments.sweep.plan import SweepError, SweepPoint
from lina_sim.experiments.sweep.worker import Outcome, execute_safely


class Backend(Protocol):
    """Runs points and yields ``(index, outcome)`` as they finish, in any order."""

    workers: int

    def run(self, points: Sequence[SweepPoint]) -> Iterator[tuple[int, Outcome]]: ...

    def close(self) -> None: ...


class LocalBackend:
    """A pool of ``workers`` local processes (in-process when ``workers == 1``)."""

    def __init__(self, workers: int | None = None):
        if workers is None:
            workers = os.cpu_count() or 1
        if workers < 1:
            raise ConfigError("--workers", f"must be >= 1, got {workers}")
        self.workers = workers

    def run(self, points: Sequence[SweepPoint]) -> Iterator[tuple[int, Outcome]]:
        if not points:
            return
        if self.workers == 1 or len(points) == 1:
            for p in points:
                yield p.index, execute_safely(p.scenario)
            return
        import multiprocessing as mp

        # spawn, not forkserver: a spawned worker is a child of this process, so the
        # kernel's parent-death signal (see .lifeline) ends it when this process dies,
        # however it dies. A fork-server worker is a child of the fork server, which
        # itself lives as long as its workers hold its pipe: after a SIGKILL all of them
        # stayed. The price is each worker importing the simulator itself (about 1 s of
        # CPU each, in parallel), where the fork server imported it once.
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(
            min(self.workers, len(points)), mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),)
        )
        finished = False
        try:
            with sigint_blocked():  # the workers start inside submit(); see .lifeline
                futures = {pool.submit(execute_safely, p.scenario): p.index for p in points}
            pending = set(futures)
            while pending:
                try:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:
                    # Points that finished while we waited are handed on before the
                    # interrupt is, so the caller keeps them (caches them).
                    _kill_workers(pool)
                    for f in pending:
                        if f.done() and not f.cancelled() and f.exception() is None:
                            yield futures[f], f.result()
                    raise
                for f in done:
                    try:
                        yield futures[f], f.result()
                    except Exception as e:  # noqa: BLE001 - a worker died (OOM kill, segfault)
                        yield futures[f], Outcome(None, f"worker process failed: {type(e).__name__}: {e}", 0.0)
            finished = True
        finally:
            # Interrupted (Ctrl-C, an error, the caller stopped early): the running points
            # are abandoned at once rather than waited for.
            if not finished:
                _kill_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        pass


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL a process pool's workers and reap them (they hold no state worth saving:
    every finished point is already in the parent)."""
    kill = getattr(pool, "kill_workers", None)  # Python 3.14+
    if kill is not None:
        kill()
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())  # before 3.14: no public way
    for p in procs:
        p.kill()
    for p in procs:
        p.join(timeout=5)


def _probe_ray_address(address: str, timeout_s: float) -> None:
    """Fail fast (bounded time) if nothing listens at a ``host:port`` Ray address."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise SweepError(f"--address: cannot parse Ray address {address!r} (allowed: HOST:PORT, ray://HOST:PORT, auto)")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise SweepError(
            f"--address: cannot reach a Ray cluster at {address} ({reason}); start one with "
            f"`ray start --head`, or leave out --address to start a local one"
        ) from None


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 (what C/C++ code writes to) to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RayBackend:
    """Points as Ray tasks on an existing cluster (``address``) or, without an address,
    on a local one that ``ray.init()`` starts (and :meth:`close` stops).

    The cluster's nodes need lina-sim (same version) and its dependencies installed.
    """

    def __init__(self, address: str | None = None, connect_timeout_s: float = 5.0):
        try:
            import ray
        except ImportError as e:
            raise SweepError(f"--backend ray: ray is not installed ({e}); pip install 'lina-sim[ray]'") from None
        self._ray = ray
        if address:
            _probe_ray_address(address, connect_timeout_s)
        self._owns = not ray.is_initialized()
        if self._owns:
            t0 = time.monotonic()
            try:
                with _stderr_silenced():  # Ray's C++ core logs each connection retry there
                    ray.init(
                        address=address,
                        include_dashboard=False,
                        logging_level="ERROR",
                        log_to_driver=False,
                        configure_logging=True,
                    )
            except Exception as e:  # noqa: BLE001 - ray raises many types; report one line
                raise SweepError(
                    f"--address: cannot connect to Ray at {address or 'a new local cluster'} "
                    f"(gave up after {time.monotonic() - t0:.0f} s): {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}"
                ) from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1)(execute_safely)

    def run(self, points: Sequence[SweepPoint]) -> Iterator[tuple[int, Outcome]]:
        ray = self._ray
        refs = {self._task.remote(p.scenario): p.index for p in points}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield refs[ref], ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost worker or node
                    yield (
                        refs[ref],
                        Outcome(None, f"ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}", 0.0),
                    )

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def make_backend(name: str = "local", workers: int | None = None, address: str | None = None) -> Backend:
    """The backend ``--backend NAME`` asks for (``local`` | ``ray``)."""
    if name == "local":
        if address:
            raise ConfigError("--address", "only with --backend ray")
        return LocalBackend(workers)
    if name == "ray":
        return RayBackend(address)
    raise ConfigError("--backend", f"unknown backend {name!r}", ["local", "ray"])
