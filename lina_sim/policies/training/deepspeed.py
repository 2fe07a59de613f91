"""Baselines: DeepSpeed-MoE (DDP-style gradient buckets) and Tutel (plus a2a/FFN pipelining).

Neither coordinates the gradient allreduce with the all-to-all: every micro-op launches
the moment it is submitted, so a bucket's allreduce shares link bandwidth with whatever
all-to-all is running. Pure: no simpy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from lina_sim.config.fields import Field
from lina_sim.policies.training.base import TrainingPolicy, bucket_requests, pipeline_param
from lina_sim.workload.comm import MB, GradRequest, MicroOp


class DeepSpeedPolicy(TrainingPolicy):
    """DeepSpeed-MoE as the paper ran it: gradients fused into DDP-style buckets of
    ``bucket_mb`` MB (10^6 bytes, default 25, PyTorch DDP's ``bucket_cap_mb``) in the
    order the backward produces them; each bucket's allreduce launches as soon as the
    bucket is full (its last tensor is ready), concurrently with any all-to-all. No
    pipelining (r = 1), one expert per device."""

    PARAMS: ClassVar[dict[str, Field]] = {
        "bucket_mb": Field(
            float,
            25.0,
            minimum=0,
            exclusive_minimum=True,
            allowed="a number of MB > 0",
            help="gradient bucket size, MB (10^6 bytes)",
        ),
    }
    bucket_mb: float

    def partition_gradients(self, requests: Sequence[GradRequest]) -> tuple[MicroOp, ...]:
        return bucket_requests(requests, self.bucket_mb * MB)


class TutelPolicy(DeepSpeedPolicy):
    """Tutel: DeepSpeed's buckets plus all-to-all/FFN pipelining of degree
    ``pipeline_degree`` (default 2): each dispatch all-to-all, expert FFN and combine
    all-to-all is split into r chunks along tokens so chunk i's FFN overlaps chunk i+1's
    all-to-all."""

    PARAMS: ClassVar[dict[str, Field]] = {
        **DeepSpeedPolicy.PARAMS,
        "pipeline_degree": pipeline_param(2),
    }
