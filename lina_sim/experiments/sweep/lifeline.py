"""Worker processes that die with the sweep that started them, whatever kills it.

A sweep's local workers are ``spawn``-ed children of the sweep process. Without help
they outlive a SIGKILLed sweep: each finishes its point (100 % CPU) and then waits
forever on the task queue, whose write end it holds itself; and the multiprocessing
resource tracker waits for every holder of its pipe (the workers) to exit. So each
worker ties its life to its parent, in :func:`die_with_parent` (the pool's initializer):

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment
  its parent dies, even inside a long C call;
- everywhere, a daemon thread that polls the parent pid (every ``poll_s`` seconds) and
  exits the process once the worker has been re-parented (the portable fallback).

Once the workers are gone the resource tracker sees end-of-file and exits by itself.

Ctrl-C reaches the whole foreground process group. The sweep process handles it (kills
the workers, keeps the finished points), so workers ignore SIGINT: the parent blocks
SIGINT while it spawns them (:func:`sigint_blocked`; the mask is inherited through
fork and exec, so a Ctrl-C during a worker's imports cannot print a traceback there),
and :func:`die_with_parent` ignores it and unblocks it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCHDOG_POLL_S = 0.5
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows has no SIGKILL


def set_parent_death_signal(sig: int = KILL) -> bool:
    """Ask the Linux kernel to send ``sig`` to this process when its parent dies.

    Returns False where that is not available (not Linux, no libc): the watchdog thread
    of :func:`die_with_parent` is then the only guard.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    # A dead parent re-parents us (to init or a subreaper): getppid() changes.
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)  # no clean-up: the parent that would read our results is gone


def die_with_parent(parent_pid: int, poll_s: float = WATCHDOG_POLL_S) -> None:
    """Worker initializer: end this process when ``parent_pid`` (the sweep) dies.

    ``parent_pid`` is the sweep's pid as the sweep saw it; if the sweep died before this
    ran (between spawn and here) the worker exits at once.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # before unblocking: a pending Ctrl-C is dropped
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    set_parent_death_signal(KILL)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, poll_s), name="lina-parent-watchdog", daemon=True).start()


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """Hold SIGINT back in this thread (and in the processes it starts) for a while.

    A Ctrl-C that arrives meanwhile is delivered when the block ends, so the caller still
    sees its KeyboardInterrupt, just after the processes have been started.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
