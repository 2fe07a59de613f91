"""Inference expert placement: the :class:`Placement` data model and the policies.

Pure (numpy only). Policies are looked up by name through
:func:`lina_sim.policies.registry.make_placement_policy`; each MoE layer of each batch
goes through :func:`decide_layer`. Names: ``static``, ``fastermoe-shadow``, ``eplb``,
``lina``, ``lina-no-estimate``, ``lina-no-finetune``, ``lina-cost``, ``oracle``, ``ideal``.

One batch through one MoE layer::

    policy = make_placement_policy("lina", num_experts=16, num_devices=16, top_k=1)
    policy.fit(train_experts)                       # [tokens, layers, k], once
    cbs = counts_by_source(batch[:, layer], 16, 16)  # [devices, experts]
    d = decide_layer(policy, layer, batch[:, :layer], cbs)
    swaps = d.planned.swap_ins(previous[layer])     # hidden behind the previous layer
    late = d.final.swap_ins(d.planned) if d.replanned else None  # on the critical path
    tokens = d.final.send_matrix(d.counts_by_source)  # dispatch; combine is .T
    ffn_tokens = d.final.device_loads(d.counts)
    previous[layer] = d.final
"""

from lina_sim.policies.placement.base import LayerDecision, PlacementPolicy, decide_layer
from lina_sim.policies.placement.layout import (
    Placement,
    counts_by_source,
    token_sources,
    uniform_counts_by_source,
)

__all__ = [
    "LayerDecision",
    "Placement",
    "PlacementPolicy",
    "counts_by_source",
    "decide_layer",
    "token_sources",
    "uniform_counts_by_source",
]
