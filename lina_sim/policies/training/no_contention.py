"""The no-contention lower bound: a physical reference, not a policy that could run.

Pure: no simpy, no torch.
"""

from __future__ import annotations

from typing import ClassVar

from lina_sim.config.fields import Field
from lina_sim.policies.training.base import pipeline_param
from lina_sim.policies.training.deepspeed import DeepSpeedPolicy


class NoContentionPolicy(DeepSpeedPolicy):
    """DeepSpeed's schedule on a network where allreduce traffic never shares bandwidth
    with all-to-all traffic (``isolated_allreduce = True``: the engine gives allreduce
    flows their own copy of every link). It bounds from below what any launch policy
    for the same buckets and pipelining could achieve by avoiding contention; no real
    cluster can run it, because a real link is shared."""

    PARAMS: ClassVar[dict[str, Field]] = {
        **DeepSpeedPolicy.PARAMS,
        "pipeline_degree": pipeline_param(1),
    }
    isolated_allreduce = True
