"""Requests, their arrivals, and the batcher of a single-model inference server.

- :class:`RequestPool` turns a trace's sequences into requests: request ``i`` is one
  sequence (all its tokens, all its MoE layers), drawn without replacement from a seeded
  permutation of the serving sequences and starting a fresh permutation when they run out.
- Arrivals are **open loop** (:class:`PoissonArrivals`: exponential gaps at a rate in
  requests/s) or **closed loop** (:class:`ClosedLoopArrivals`: ``concurrency`` clients,
  each sending its next request the moment its previous one completes).
- :class:`Batcher` is dynamic batching under a token budget and a timeout (as Triton's
  ``max_queue_delay``): when the server is free, it takes waiting requests first come
  first served while their tokens fit the budget, starting at once if the queue already
  fills the budget, else at the earlier of "the budget fills" and "the oldest waiting
  request has waited ``timeout``". A request longer than the whole budget runs alone.

Units: seconds, tokens.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lina_sim.config.fields import Field, check_fields, declare

_PROCESS = Field(str, "poisson", choices=("poisson", "closed"), help="open loop (poisson) or closed loop")
# The fields of an ``arrival:`` block, per process.
ARRIVAL_FIELDS: dict[str, dict[str, Field]] = {
    "poisson": {
        "process": _PROCESS,
        "rate": Field(
            float,
            minimum=0,
            exclusive_minimum=True,
            allowed="a number > 0 (requests/s)",
            help="mean arrival rate, requests/s",
        ),
    },
    "closed": {"process": _PROCESS, "concurrency": Field(int, minimum=1, help="requests in flight (clients)")},
}


@dataclass(frozen=True)
class ArrivalSpec:
    """How requests arrive: ``process`` is ``poisson`` (``rate`` requests/s) or
    ``closed`` (``concurrency`` requests in flight)."""

    process: str
    rate: float | None = None
    concurrency: int | None = None

    @classmethod
    def from_block(cls, block: Mapping[str, Any], where: str = "arrival") -> ArrivalSpec:
        """The spec of an ``arrival:`` block: its process, then that process's fields
        (:data:`ARRIVAL_FIELDS`); errors name ``<where>.<field>``."""
        process = _PROCESS.get(block, "process", where)
        return cls(**check_fields(block, ARRIVAL_FIELDS[process], where))


@dataclass(frozen=True)
class BatchingSpec:
    """Dynamic batching: at most ``token_budget`` tokens per batch, and no request waits
    more than ``timeout`` seconds for its batch to fill (it may wait longer for the
    server to become free). ``tokens_per_gpu``, when set, is the budget per GPU instead
    (the resolved spec's ``token_budget`` is then that times the GPUs), so that one sweep
    over it means the same batch per GPU on every cluster size."""

    token_budget: int = declare(Field(int, 8192, minimum=1, help="most tokens in one batch"))
    timeout: float = declare(Field(float, 0.01, minimum=0, help="longest a request waits for its batch to fill, s"))
    tokens_per_gpu: int | None = declare(
        Field(int, None, minimum=1, allow_none=True, help="most tokens per GPU in one batch (instead of token_budget)")
    )

    def per_gpu(self, gpus: int) -> BatchingSpec:
        """This spec with ``token_budget`` resolved for ``gpus`` GPUs (unchanged when
        ``tokens_per_gpu`` is not set)."""
        if self.tokens_per_gpu is None:
            return self
        return dataclasses.replace(self, token_budget=self.tokens_per_gpu * gpus)


@dataclass
class Request:
    """One inference request: sequence ``seq`` of the trace, ``tokens`` long, arriving at
    ``arrival`` (s); ``start``/``end`` of the batch that served it, and that batch's index."""

    rid: int
    seq: int
    tokens: int
    arrival: float
    start: float = float("nan")
    end: float = float("nan")
    batch: int = -1

    @property
    def latency(self) -> float:
        return self.end - self.arrival


class RequestPool:
    """Sequences of a trace as request payloads (token index ranges)."""

    def __init__(self, seq_starts: np.ndarray, seq_lengths: np.ndarray, seed: int):
        self.starts = np.asarray(seq_starts, dtype=np.int64)
        self.lengths = np.asarray(seq_lengths, dtype=np.int64)
        self._rng = np.random.default_rng(seed)
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._pos = 0

    def __len__(self) -> int:
        return int(self.starts.size)

    def draw(self) -> int:
        """The next sequence (index into this pool)."""
        if self._pos >= self._order.size:
            self._order = self._rng.permutation(self.starts.size)
            self._pos = 0
        s = int(self._order[self._pos])
        self._pos += 1
        return s

    def token_index(self, seqs: list[int]) -> np.ndarray:
        """Token rows of the trace for these sequences, concatenated in order."""
        return np.concatenate([np.arange(self.starts[s], self.starts[s] + self.lengths[s]) for s in seqs])


class PoissonArrivals:
    """Open loop: ``count`` requests with exponential inter-arrival gaps (mean 1/rate)."""

    def __init__(self, rate: float, count: int, seed: int):
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
        self.times = np.cumsum(gaps)

    def initial(self) -> list[float]:
        return list(self.times)

    def on_complete(self, n_done: int, now: float) -> list[float]:
        return []


class ClosedLoopArrivals:
    """Closed loop: ``concurrency`` requests at t=0, then one new request per completion
    (zero think time), ``count`` in all."""

    def __init__(self, concurrency: int, count: int):
        self.concurrency = concurrency
        self.count = count
        self._issued = 0

    def initial(self) -> list[float]:
        n = min(self.concurrency, self.count)
        self._issued = n
        return [0.0] * n

    def on_complete(self, n_done: int, now: float) -> list[float]:
        n = min(n_done, self.count - self._issued)
        self._issued += n
        return [now] * n


def make_arrivals(spec: ArrivalSpec, count: int, seed: int):
    if spec.process == "poisson":
        return PoissonArrivals(float(spec.rate), count, seed)
    return ClosedLoopArrivals(int(spec.concurrency), count)


class Batcher:
    """FIFO queue of arrived requests and the batch-formation rule (module docstring)."""

    def __init__(self, spec: BatchingSpec):
        self.spec = spec
        self.waiting: deque[Request] = deque()
        self.future: deque[Request] = deque()  # not yet arrived, in arrival order

    def add_future(self, requests: list[Request]) -> None:
        self.future.extend(requests)

    def pending(self) -> bool:
        return bool(self.waiting or self.future)

    def _admit(self, now: float) -> None:
        while self.future and self.future[0].arrival <= now:
            self.waiting.append(self.future.popleft())

    def next_batch(self, free_at: float) -> tuple[float, list[Request]]:
        """The start time (s) and requests of the next batch on a server free at
        ``free_at``. Requires :meth:`pending`."""
        budget, timeout = self.spec.token_budget, self.spec.timeout
        now = free_at
        self._admit(now)
        if not self.waiting:
            now = self.future[0].arrival
            self._admit(now)
        # Wait for the budget to fill, or for the oldest request's timeout.
        deadline = max(now, self.waiting[0].arrival + timeout)
        queued = sum(r.tokens for r in self.waiting)
        while queued < budget and self.future and self.future[0].arrival <= deadline:
            r = self.future.popleft()
            self.waiting.append(r)
            queued += r.tokens
            now = max(now, r.arrival)
        if queued < budget:
            now = deadline
        batch: list[Request] = [self.waiting.popleft()]
        tokens = batch[0].tokens
        while self.waiting and tokens + self.waiting[0].tokens <= budget:
            r = self.waiting.popleft()
            batch.append(r)
            tokens += r.tokens
        return now, batch
