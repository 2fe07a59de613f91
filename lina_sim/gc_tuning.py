"""Fewer garbage collections while a simulation runs.

A training step at 16,384 GPUs keeps millions of live objects (timeline events, simpy
events, per-rank queues) and allocates hundreds of thousands more, nearly none of them in
reference cycles. CPython's default thresholds (700, 10, 10) then run a full collection,
which walks every live object, every 70,000 net allocations: measured on
``benchmarks/bench_frontier.py`` (one core), that was 20-35% of a DeepSpeed or Tutel step's
CPU time. :func:`fewer_collections` raises the youngest generation's threshold while a
simulation runs and restores the caller's thresholds after; cyclic garbage is still
collected, only less often (the measured peak RSS did not change).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Net allocations between young collections, and young (middle) collections between
# middle (full) ones, while a simulation runs.
SIM_THRESHOLDS = (50_000, 20, 100)


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the body with :data:`SIM_THRESHOLDS`, never lowering a threshold the caller set
    higher; the previous thresholds come back however the body exits."""
    before = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(SIM_THRESHOLDS, before)))
    try:
        yield
    finally:
        gc.set_threshold(*before)
