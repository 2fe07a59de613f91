"""Baselines: DeepSpeed-MoE and Tutel (plus a2a/FFN pipelining), each with a choice of how
its gradients are reduced (``grad_sync``).

Neither coordinates the gradient allreduce with the all-to-all: every micro-op launches
the moment it is submitted, so a bucket's allreduce shares link bandwidth with whatever
all-to-all is running. Pure: no simpy, no torch.

``grad_sync`` (docs/gradient-sync-research.md, section 5):

- ``"ddp-25mb"`` (the default of both): gradients fused in ready order into buckets that
  close once they hold ``bucket_mb`` MB (10^6 bytes, default 25), each launched as soon
  as its last tensor is ready, during backward
  (:func:`~lina_sim.policies.training.base.bucket_requests`). This is the
  configuration the Lina comparison assumed for its DeepSpeed baseline (Lina only helps
  if the allreduce overlaps the backward all-to-alls); it is neither DeepSpeed's nor
  PyTorch DDP's default.
- ``"zero"`` (deepspeed): DeepSpeed's default path, ZeRO stage 0/1: after backward, dense
  then expert gradients in buckets of ``bucket_elems`` elements
  (:func:`~lina_sim.policies.training.grad_sync.zero_buckets`).
- ``"ddp"`` (tutel): PyTorch DDP as Tutel's examples use it: 1 MiB first bucket, 25 MiB
  after, launched in bucket order during backward
  (:func:`~lina_sim.policies.training.grad_sync.ddp_buckets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from lina_sim.config.fields import Field
from lina_sim.policies.training.base import TrainingPolicy, bucket_requests, dispatch_kernels_param, pipeline_param
from lina_sim.policies.training.grad_sync import DS_BUCKET_ELEMS, WIRE_BYTES_PER_ELEM, ddp_buckets, zero_buckets
from lina_sim.workload.comm import MB, GradRequest, MicroOp

BUCKET_MB = Field(
    float,
    25.0,
    minimum=0,
    exclusive_minimum=True,
    allowed="a number of MB > 0",
    help="with grad_sync: ddp-25mb, gradient bucket size, MB (10^6 bytes)",
)


def grad_sync_field(real: str, says: str, default: str = "ddp-25mb") -> Field:
    """A baseline's ``grad_sync`` parameter: ``ddp-25mb`` (25 MB buckets during backward,
    as the Lina comparison assumed) or ``real``, the system's own path, described by
    ``says``; ``default`` is one of the two."""
    return Field(
        str,
        default,
        choices=("ddp-25mb", real),
        help=f"how gradients are reduced: ddp-25mb (25 MB buckets during backward, as the Lina comparison "
        f"assumed) or {says}",
    )


class DeepSpeedPolicy(TrainingPolicy):
    """DeepSpeed-MoE. No pipelining (r = 1), one expert per device. Gradients, by
    ``grad_sync``:

    - ``"ddp-25mb"`` (default; today's behaviour and the configuration the Lina
      comparison assumed): DDP-style buckets of ``bucket_mb`` MB (10^6 bytes, default
      25) in the order the backward produces them; each bucket's allreduce launches as
      soon as the bucket is full (its last tensor is ready), concurrently with any
      all-to-all.
    - ``"zero"``: DeepSpeed's own default, ZeRO stage 0 (``engine.py``
      ``allreduce_gradients`` -> ``buffered_allreduce_fallback``) and stage 1 without
      ``overlap_comm`` (``zero/stage_1_and_2.py`` ``reduce_gradients``): after the
      whole backward, the dense gradients, then each expert communicator's, in buckets
      of at most ``bucket_elems`` elements (default 5e8, ``MEMORY_OPT_ALLREDUCE_SIZE``)
      of ``bytes_per_elem`` wire bytes, one allreduce each, one at a time
      (:func:`~lina_sim.policies.training.grad_sync.zero_buckets`).
    """

    PARAMS: ClassVar[dict[str, Field]] = {
        "bucket_mb": BUCKET_MB,
        # deepspeed/moe/sharded_moe.py MOELayer.forward: einsum("sec,sm->ecm") and back.
        "dispatch_kernels": dispatch_kernels_param("einsum"),
        "grad_sync": grad_sync_field("zero", "zero (DeepSpeed's default: ZeRO 0/1 buckets after backward)"),
        "bucket_elems": Field(
            float,
            DS_BUCKET_ELEMS,
            minimum=0,
            exclusive_minimum=True,
            allowed="a number of elements > 0",
            help="with grad_sync: zero, largest bucket, elements (DeepSpeed's default 5e8)",
        ),
        "bytes_per_elem": Field(
            int,
            WIRE_BYTES_PER_ELEM,
            choices=(2, 4),
            help="with grad_sync: zero, gradient bytes per element on the wire (2: fp16/bf16, 4: fp32), "
            "to count bucket_elems",
        ),
    }
    bucket_mb: float
    dispatch_kernels: str
    grad_sync: str
    bucket_elems: float
    bytes_per_elem: int

    def check_combination(self, where: str) -> None:
        self.only_with(where, "bucket_mb", "grad_sync", ("ddp-25mb",))
        for p in ("bucket_elems", "bytes_per_elem"):
            if p in self.PARAMS:
                self.only_with(where, p, "grad_sync", ("zero",))

    def partition_gradients(self, requests: Sequence[GradRequest]) -> tuple[MicroOp, ...]:
        if self.grad_sync == "zero":
            return zero_buckets(requests, self.bucket_elems, self.bytes_per_elem)
        if self.grad_sync == "ddp":
            return ddp_buckets(requests)
        return bucket_requests(requests, self.bucket_mb * MB)


class TutelPolicy(DeepSpeedPolicy):
    """Tutel: all-to-all/FFN pipelining of degree ``pipeline_degree`` (default 2): each
    dispatch all-to-all, expert FFN and combine all-to-all is split into r chunks along
    tokens so chunk i's FFN overlaps chunk i+1's all-to-all. Gradients, by ``grad_sync``:

    - ``"ddp"`` (default): PyTorch DDP as Tutel's examples wrap the model
      (``tutel/examples/helloworld_ddp.py``; ``torch/csrc/distributed/c10d/reducer.cpp``
      ``compute_bucket_assignment_by_size``, ``Reducer::rebuild_buckets``,
      ``Reducer::mark_bucket_ready``): steady-state buckets in gradient-ready order, the
      first closing at >= 1 MiB and the rest at >= 25 MiB (2^20-byte MiB), bucket i
      submitted at max(its ready time, bucket i-1's submission)
      (:func:`~lina_sim.policies.training.grad_sync.ddp_buckets`). Tutel tags expert
      parameters ``skip_allreduce`` and leaves them out of DDP
      (``_ddp_params_and_buffers_to_ignore``): with one expert set per rank (no
      ``expert_dp`` communicator, experts >= GPUs) they are never reduced. When the
      configuration does give experts replicas (an ``expert_dp`` communicator of more
      than one rank, which real Tutel would shard instead), they are reduced with the
      same DDP buckets on their own communicator, as a second reducer would.
    - ``"ddp-25mb"``: the ``deepspeed`` baseline's buckets of ``bucket_mb`` MB, launched
      during backward (what every baseline used before; kept to compare).
    """

    PARAMS: ClassVar[dict[str, Field]] = {
        "bucket_mb": BUCKET_MB,
        # tutel/impls/fast_dispatch.py fast_encode / fast_decode: scatter and gather kernels.
        "dispatch_kernels": dispatch_kernels_param("sparse"),
        "grad_sync": grad_sync_field(
            "ddp", "ddp (PyTorch DDP: 1 MiB first bucket, 25 MiB after, in-order launches)", default="ddp"
        ),
        "pipeline_degree": pipeline_param(2),
    }
