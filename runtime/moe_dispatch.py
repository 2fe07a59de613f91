"""The two ways an MoE layer moves tokens into its experts' capacity buffer and back,
as the systems the baselines are named after run them:

- ``einsum`` (DeepSpeed-MoE, ``deepspeed/moe/sharded_moe.py`` ``MOELayer.forward``): a
  one-hot ``dispatch_mask`` [S, E, C] and ``combine_weights`` [S, E, C] built from the
  routing, then ``einsum("sec,sm->ecm")`` into the buffer and ``einsum("sec,ecm->sm")``
  back: dense products over tokens x experts x capacity x d_model;
- ``sparse`` (Tutel, ``tutel/impls/fast_dispatch.py`` ``fast_encode`` / ``fast_decode``,
  the same idea DeepSpeed switches to with ``use_tutel``): scatter each kept (token,
  choice) row into its slot and gather it back, work proportional to the kept rows.

Both take the same :class:`Routing` (which slot of which expert each kept (token,
choice) takes, and its gate weight) and produce the same buffer and output; the einsum
form differs only in float summation order. ``runtime.op_census`` profiles both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DISPATCH_KERNELS = ("einsum", "sparse")


@dataclass(frozen=True)
class Routing:
    """The kept (token, choice) pairs of a batch of ``tokens`` rows: ``slot`` (expert x
    capacity + position), ``tok`` (row index) and ``weight`` (gate weight), for
    ``experts`` experts of ``capacity`` slots each; ``counts`` per expert before the
    capacity cut."""

    slot: torch.Tensor
    tok: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    tokens: int
    experts: int
    capacity: int


def route(top_i: torch.Tensor, top_p: torch.Tensor, capacity: int, experts: int) -> Routing:
    """Slots for the gate's top-k choices ``top_i``/``top_p`` [S, k]: each expert's queue
    takes first choices before second ones, and drops what exceeds ``capacity``."""
    n, k = top_i.shape
    w = top_p / top_p.sum(-1, keepdim=True) if k > 1 else top_p
    flat_e, flat_w = top_i.reshape(-1), w.reshape(-1)
    dev = top_i.device
    flat_tok = torch.arange(n, device=dev).repeat_interleave(k)
    order = torch.argsort(flat_e * k + torch.arange(k, device=dev).repeat(n), stable=True)
    sorted_e = flat_e[order]
    counts = torch.bincount(sorted_e, minlength=experts)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    keep = pos < capacity
    return Routing(flat_e[keep] * capacity + pos[keep], flat_tok[keep], flat_w[keep], counts, n, experts, capacity)


def _masks(r: Routing, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed's ``dispatch_mask`` and ``combine_weights`` [S, E, C]."""
    mask = torch.zeros(r.tokens, r.experts * r.capacity, dtype=dtype, device=r.slot.device)
    mask[r.tok, r.slot] = 1.0
    weights = torch.zeros_like(mask)
    weights[r.tok, r.slot] = r.weight.to(dtype)
    shape = (r.tokens, r.experts, r.capacity)
    return mask.view(shape), weights.view(shape)


def dispatch(h: torch.Tensor, r: Routing, kernels: str) -> torch.Tensor:
    """The capacity buffer [E * C, d] of rows ``h`` [S, d] (empty slots zero)."""
    if kernels == "einsum":
        mask, _ = _masks(r, h.dtype)
        return torch.einsum("sec,sm->ecm", mask, h).reshape(r.experts * r.capacity, h.shape[1])
    return h.new_zeros(r.experts * r.capacity, h.shape[1]).index_copy(0, r.slot, h.index_select(0, r.tok))


def combine(out_buf: torch.Tensor, r: Routing, kernels: str) -> torch.Tensor:
    """Each row's gate-weighted sum of its experts' outputs [S, d] from the buffer."""
    d = out_buf.shape[1]
    if kernels == "einsum":
        _, weights = _masks(r, out_buf.dtype)
        return torch.einsum("sec,ecm->sm", weights, out_buf.view(r.experts, r.capacity, d))
    rows = out_buf.index_select(0, r.slot) * r.weight.to(out_buf.dtype).unsqueeze(1)
    return out_buf.new_zeros(r.tokens, d).index_add(0, r.tok, rows)
