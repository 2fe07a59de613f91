"""Gradient reduction as each framework issues it: the buckets a step's gradient
requests are fused into, and when each bucket may be submitted.

The facts and their sources are in docs/gradient-sync-research.md (sections 1-2, model
in section 5). Three bucketings, each a pure function of the step's
:class:`~lina_sim.workload.comm.GradRequest` s returning allreduce
:class:`~lina_sim.workload.comm.MicroOp` s in submission order:

- :func:`zero_buckets`: DeepSpeed's engine, ZeRO stage 0/1 (its default path): after
  the whole backward, dense gradients, then each expert group's, in buckets of at most
  ``bucket_elems`` elements;
- :func:`ddp_buckets`: PyTorch DDP's steady-state reducer: gradient-ready order, a
  1 MiB first bucket and 25 MiB buckets after it, launched in bucket order during
  backward;
- :func:`partition_buckets`: Lina's "partition the framework's buckets": each bucket
  cut into equal micro-ops no larger than a micro-op size.

(:func:`~lina_sim.policies.training.base.bucket_requests` is the fourth, the
"ddp-25mb" configuration every policy used until now: 25 MB = 10^6-byte buckets in
ready order, no smaller first bucket.)

Every rank's requests are the same (SPMD), so every rank builds the same buckets in the
same order. Buckets never mix communicators (a collective runs on exactly one). The
simulator's engine runs a rank's allreduces one at a time on its single ``allreduce``
stream (both communicators share it) and the optimizer step waits for all of them, so
"serial, then the optimizer" needs nothing more here.

Pure: imports neither simpy nor torch. Units: bytes, elements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from lina_sim.policies.training.base import _ready_sorted, bucket_requests, submission_order
from lina_sim.workload.comm import ALLREDUCE, MB, GradRequest, MicroOp

MIB = 2**20
# DeepSpeed engine.py:111 MEMORY_OPT_ALLREDUCE_SIZE = 500000000 (elements); ZeRO's
# reduce_bucket_size defaults to the same 5e8 (zero/config.py:109).
DS_BUCKET_ELEMS = 5e8
# Wire bytes per gradient element: DeepSpeed's communication_data_type (engine.py:939-951)
# is fp16/bf16 for mixed-precision training, 2 B.
WIRE_BYTES_PER_ELEM = 2
# PyTorch DDP: dist._DEFAULT_FIRST_BUCKET_BYTES (1 MiB) and _DEFAULT_BUCKET_CAP_MB = 25
# with _MB_TO_BYTES = 1024 * 1024 (torch/nn/parallel/distributed.py:31-33).
DDP_FIRST_BUCKET_BYTES = 1 * MIB
DDP_BUCKET_CAP_BYTES = 25 * MIB

FRAMEWORKS = ("ddp-25mb", "zero", "ddp")  # the bucketings :func:`framework_buckets` builds


def _communicators(requests: Iterable[GradRequest]) -> list[str]:
    # ``dp`` (dense) first, then the expert communicators by name: DeepSpeed reduces the
    # non-expert gradients before the expert ones (engine.py buffered_allreduce_fallback).
    names = {r.communicator for r in requests}
    return sorted(names, key=lambda c: (c != "dp", c))


def _bucket(comm: str, seq: int, members: Sequence[GradRequest], ready_after: int) -> MicroOp:
    return MicroOp(
        id=f"{comm}.bucket{seq}",
        kind=ALLREDUCE,
        communicator=comm,
        seq=seq,
        nbytes=sum(m.nbytes for m in members),
        layer=members[-1].layer,
        ready_after=ready_after,
        pieces=tuple((m.name, m.nbytes) for m in members),
    )


def zero_buckets(
    requests: Sequence[GradRequest],
    bucket_elems: float = DS_BUCKET_ELEMS,
    bytes_per_elem: float = WIRE_BYTES_PER_ELEM,
) -> tuple[MicroOp, ...]:
    """DeepSpeed ZeRO stage 0 (and stage 1 without ``overlap_comm``, its default): one
    bucketed allreduce pass after the whole backward.

    Source (DeepSpeed 0.16.5, same structure in v0.6.0 and v0.8.0):
    ``deepspeed/runtime/engine.py`` ``backward`` runs autograd to the end, then
    ``allreduce_gradients`` -> ``buffered_allreduce_fallback``, which takes
    ``_get_gradients_for_reduction`` (``named_parameters()`` order, experts split off by
    ``is_moe_param``), reduces the non-expert gradients (``_reduce_non_expert_gradients``)
    and then each expert group's (``_reduce_expert_gradients``) with
    ``allreduce_no_retain(numel_per_bucket=5e8)``: a bucket is flushed after the tensor
    that takes it past ``numel_per_bucket`` elements, one blocking ``all_reduce`` each.
    Stage 1 (``deepspeed/runtime/zero/stage_1_and_2.py`` ``reduce_gradients``) walks the
    same gradients at the same moment with the same 5e8-element default; it flushes
    *before* an overflowing tensor instead, which only matters above 5e8 elements
    (no preset comes near: the research note, 1.3).

    Modelled as: every bucket's ``ready_after`` is the last backward compute op (the
    largest ``ready_after`` of all requests, the op after which backward is done);
    ``dp`` buckets first, then each other communicator's (``expert_dp``), each in
    **registration order**, approximated by the reverse of gradient-ready order (the
    requests carry no registration index; backward produces gradients in reverse
    forward order, and within a module the graph lists them reversed too). Elements are
    ``nbytes / bytes_per_elem`` (the wire dtype: 2 for fp16/bf16, 4 for fp32); a bucket
    closes after the tensor that takes it past ``bucket_elems``. For every preset this
    is one ``dp`` allreduce plus one per expert communicator.
    """
    if not requests:
        return ()
    end = max(r.ready_after for r in requests)
    registration = list(reversed(_ready_sorted(requests)))
    out: list[MicroOp] = []
    for comm in _communicators(requests):
        members: list[GradRequest] = []
        elems, seq = 0.0, 0
        for r in registration:
            if r.communicator != comm:
                continue
            members.append(r)
            elems += r.nbytes / bytes_per_elem
            if elems > bucket_elems:
                out.append(_bucket(comm, seq, members, end))
                members, elems, seq = [], 0.0, seq + 1
        if members:
            out.append(_bucket(comm, seq, members, end))
    return submission_order(out)


def ddp_buckets(
    requests: Sequence[GradRequest],
    first_bucket_bytes: float = DDP_FIRST_BUCKET_BYTES,
    cap_bytes: float = DDP_BUCKET_CAP_BYTES,
) -> tuple[MicroOp, ...]:
    """PyTorch DDP's reducer in steady state (iteration >= 2), one reducer per
    communicator.

    Source: ``torch/csrc/distributed/c10d/reducer.cpp``
    ``compute_bucket_assignment_by_size`` (a bucket closes after the tensor that makes
    its bytes ``>= limit``; the limits are ``[first_bucket_bytes, cap_bytes, ...]``),
    called by ``Reducer::rebuild_buckets`` after the first iteration with the
    parameters in the order their gradients became ready and limits
    ``[kDefaultFirstBucketBytes = 1 MiB, bucket_bytes_cap_ = 25 MiB]``
    (``torch/nn/parallel/distributed.py``: ``_DEFAULT_BUCKET_CAP_MB = 25``,
    ``_MB_TO_BYTES = 1024 * 1024``); and ``Reducer::mark_bucket_ready`` ("buckets are
    reduced in sequence"): bucket i is submitted at
    ``max(ready(bucket i), submit(bucket i - 1))``.

    Modelled as: per communicator, requests in gradient-ready order fill buckets (the
    first closes at ``>= first_bucket_bytes``, later ones at ``>= cap_bytes``; the last
    takes the remainder); a bucket is ready when all its tensors are, and its
    ``ready_after`` is the running maximum over the buckets before it (op ids are a
    total order on the rank's compute stream). With buckets cut from the ready-sorted
    list that maximum is already the bucket's own last tensor, so the in-order rule
    only shows in the ``seq`` order the scheduler enforces anyway. (Used for Tutel's
    dense parameters; an ``expert_dp`` communicator, which Tutel never has, gets its own
    reducer with the same limits: see :class:`~lina_sim.policies.training.deepspeed.TutelPolicy`.)
    """
    out: list[MicroOp] = []
    for comm in _communicators(requests):
        members: list[GradRequest] = []
        size, ready, seq = 0.0, -1, 0
        for r in _ready_sorted(x for x in requests if x.communicator == comm):
            members.append(r)
            size += r.nbytes
            if size >= (first_bucket_bytes if seq == 0 else cap_bytes):
                ready = max(ready, *(m.ready_after for m in members))
                out.append(_bucket(comm, seq, members, ready))
                members, size, seq = [], 0.0, seq + 1
        if members:
            ready = max(ready, *(m.ready_after for m in members))
            out.append(_bucket(comm, seq, members, ready))
    return submission_order(out)


def partition_buckets(buckets: Sequence[MicroOp], micro_op_bytes: float) -> tuple[MicroOp, ...]:
    """Lina's tensor partitioning applied to the framework's fused buckets
    (``partition_of = "bucket"``): each bucket is cut into
    ``ceil(bytes / micro_op_bytes)`` equal micro-ops on the bucket's communicator, each
    ready when its bucket is (``ready_after`` of the bucket), numbered per communicator
    in bucket order. A micro-op's ``pieces`` are the byte ranges of the bucket's tensors
    it carries.

    Source: Lina (ATC'23) has no public code (the research note, section 3); its abstract
    says it "prioritizes all-to-all over the concurrent allreduce ... using tensor
    partitioning" and it is built on DeepSpeed-MoE, whose allreduce is the fused buffer
    of ``engine.py`` ``allreduce_bucket`` (``flatten`` then one ``all_reduce``). Whether
    Lina cuts those buffers or individual tensors is **not** known: this is the
    "buffer" reading, :func:`~lina_sim.policies.training.base.cut_requests` the
    "tensor" one.
    """
    out: list[MicroOp] = []
    seq: dict[str, int] = {}
    for b in sorted(buckets, key=lambda m: (m.communicator, m.seq)):
        n = 1 if math.isinf(micro_op_bytes) else max(1, math.ceil(b.nbytes / micro_op_bytes - 1e-9))
        size = b.nbytes / n
        bounds = []  # (tensor, start, end) byte ranges inside the bucket
        at = 0.0
        for name, nb in b.pieces or ((b.id, b.nbytes),):
            bounds.append((name, at, at + nb))
            at += nb
        for i in range(n):
            lo, hi = i * size, b.nbytes if i == n - 1 else (i + 1) * size
            pieces = tuple((name, min(e, hi) - max(s, lo)) for name, s, e in bounds if min(e, hi) > max(s, lo))
            s = seq.get(b.communicator, 0)
            seq[b.communicator] = s + 1
            out.append(
                MicroOp(
                    id=b.id + (f".p{i}" if n > 1 else ""),
                    kind=ALLREDUCE,
                    communicator=b.communicator,
                    seq=s,
                    nbytes=size,
                    layer=b.layer,
                    chunk=i,
                    chunks=n,
                    ready_after=b.ready_after,
                    pieces=pieces,
                )
            )
    return submission_order(out)


def framework_buckets(
    requests: Sequence[GradRequest], framework: str, bucket_bytes: float = 25 * MB
) -> tuple[MicroOp, ...]:
    """The buckets ``framework`` reduces: ``"ddp-25mb"``
    (:func:`~lina_sim.policies.training.base.bucket_requests` of ``bucket_bytes``, by
    default 25 MB = 25·10^6 B, the configuration the Lina comparison assumed), ``"zero"``
    (:func:`zero_buckets`, 5e8 elements of 2 B) or ``"ddp"`` (:func:`ddp_buckets`, 1 MiB
    then 25 MiB)."""
    if framework == "ddp-25mb":
        return bucket_requests(requests, bucket_bytes)
    if framework == "zero":
        return zero_buckets(requests)
    if framework == "ddp":
        return ddp_buckets(requests)
    raise ValueError(f"unknown framework {framework!r} (allowed: {', '.join(FRAMEWORKS)})")
