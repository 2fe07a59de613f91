"""The communication a training step asks for, as plain data: gradient allreduce requests
and the collectives (micro-ops) that carry them and the all-to-alls; and what a packing
of experts costs (:class:`PackingEstimate`).

The workload layer produces these (:mod:`lina_sim.workload.graph`); training policies
partition and order them (:mod:`lina_sim.policies.training.base`); the simulator's engine
and the torch.distributed runtime execute them. Frozen dataclasses only, so policies stay
free of simpy and torch (docs/ARCHITECTURE.md, "pure policies").

Units: bytes, seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ALL_TO_ALL = "all_to_all"
ALLREDUCE = "allreduce"
MB = 1e6  # policy sizes are given in MB = 10^6 bytes (PyTorch DDP's bucket_cap_mb is MiB; the 5% does not matter here)


@dataclass(frozen=True, slots=True)
class GradRequest:
    """One parameter tensor's gradient that must be allreduced (bytes).

    ``ready_after`` is the id of the compute op whose completion produces the gradient.
    All such ops run on one rank's compute stream in program order, so "ready after op
    X" is a total order. ``communicator`` is ``dp`` (non-expert parameters, all ranks)
    or ``expert_dp`` (an expert's replicas only). ``order`` is the tensor's position in
    the order the backward pass produces gradients.
    """

    name: str
    communicator: str
    nbytes: float
    ready_after: int
    layer: int
    order: int


@dataclass(frozen=True, slots=True)
class MicroOp:
    """One collective as issued to NCCL: an all-to-all chunk or an allreduce micro-op.

    - ``seq``: its position in its communicator's program order. Every rank must launch
      the micro-ops of a communicator in increasing ``seq``.
    - ``nbytes``: the buffer size on each rank (all-to-all: the whole send buffer,
      including the share that stays local; allreduce: the tensor bytes).
    - ``op_id``: for an all-to-all, the graph op it executes; -1 for gradients.
    - ``ready_after``: for an allreduce, the compute op after whose completion every
      tensor it carries is ready, so it may be submitted; -1 for all-to-alls, which are
      submitted when their graph op's dependencies are done.
    - ``pieces``: (tensor name, bytes) carried by an allreduce micro-op.
    - ``role``: ``dispatch`` / ``combine`` for all-to-alls, ``grad`` for allreduces.
    - ``gap``: for a planned allreduce micro-op, the gap between all-to-alls it runs in:
      it launches only after the all-to-alls with ``seq < gap`` have completed, and the
      all-to-all with ``seq == gap`` waits until it has completed. -1: not planned.
    """

    id: str
    kind: str
    communicator: str
    seq: int
    nbytes: float
    layer: int = -1
    phase: str = "bwd"
    role: str = "grad"
    chunk: int = 0
    chunks: int = 1
    op_id: int = -1
    ready_after: int = -1
    pieces: tuple[tuple[str, float], ...] = ()
    gap: int = -1

    @property
    def stream(self) -> str:
        """The stream it runs on: ``a2a`` or ``allreduce``."""
        return "a2a" if self.kind == ALL_TO_ALL else "allreduce"

    @property
    def is_a2a(self) -> bool:
        return self.kind == ALL_TO_ALL


def piece_ranges(mops: Iterable[MicroOp]) -> dict[str, tuple[tuple[str, float, float], ...]]:
    """Per allreduce micro-op id, the part of each tensor it carries, as fractions
    ``(name, lo, hi)`` of that tensor's elements: a piece of ``b`` bytes is the next ``b``
    bytes of its tensor after what the micro-ops before it (per communicator, in ``seq``
    order) carried. One rule for every cut: a whole tensor, chunk i of one tensor, a
    fused run of small tensors, or a byte range of a framework bucket that starts or ends
    inside a tensor. Fractions, not bytes, so an executor whose gradients have another
    dtype than the graph's still covers each tensor exactly once."""
    mops = sorted((m for m in mops if not m.is_a2a), key=lambda m: (m.communicator, m.seq))
    total: dict[str, float] = {}
    for m in mops:
        for name, b in m.pieces:
            total[name] = total.get(name, 0.0) + b
    done: dict[str, float] = {}
    out = {}
    for m in mops:
        ranges = []
        for name, b in m.pieces:
            lo = done.get(name, 0.0)
            done[name] = lo + b
            whole = total[name]
            ranges.append((name, lo / whole if whole else 0.0, min(done[name] / whole, 1.0) if whole else 1.0))
        out[m.id] = tuple(ranges)
    return out


@dataclass(frozen=True)
class PackingEstimate:
    """What one packing k costs, from the caller's timing functions (s), each op or
    collective timed alone:

    - ``ffn_micro_op_s`` / ``a2a_micro_op_s``: one forward expert-FFN micro-op and one
      dispatch all-to-all micro-op (what the paper's packing rule compares);
    - per step: ``compute_s`` (every compute op), ``backward_compute_s`` (those of the
      backward), ``a2a_s`` (every all-to-all, one after another), ``dense_allreduce_s``
      and ``expert_allreduce_s`` (each communicator's gradients as one allreduce; 0 where
      the communicator has one rank).
    """

    ffn_micro_op_s: float
    a2a_micro_op_s: float
    compute_s: float = 0.0
    backward_compute_s: float = 0.0
    a2a_s: float = 0.0
    dense_allreduce_s: float = 0.0
    expert_allreduce_s: float = 0.0

    @property
    def step_s(self) -> float:
        """The step time of a schedule that never runs an allreduce beside an all-to-all
        (Lina's) and hides allreduce behind backward compute where it can: compute, then
        all-to-all, then the allreduce the backward compute cannot cover (s). An
        estimate for comparing packings, not a prediction: pipelining's overlap of
        all-to-all and FFN is left out (it is the same r for every k)."""
        allreduce = self.dense_allreduce_s + self.expert_allreduce_s
        return self.compute_s + self.a2a_s + max(0.0, allreduce - self.backward_compute_s)
