"""An expert-parallel MoE transformer built from the simulator's :class:`ModelSpec`.

The same decoder as ``runtime/moe.py`` (its attention, gate and expert FFN modules are
reused), cut the way DeepSpeed-MoE cuts it: every rank holds all non-expert weights and
``k`` experts of each MoE layer (global experts ``ep_rank*k .. ep_rank*k + k - 1``), and
tokens reach their experts through all-to-alls on the expert-parallel group.

One MoE layer on one rank, with ``T`` tokens, ``E`` experts and capacity ``cap``:

1. the gate picks top-k experts per token and each (token, choice) gets a slot in its
   expert's capacity buffer ``[E, cap, d]`` (first choices first; overflow is dropped and
   passes on the residual);
2. the buffer is cut into ``r`` chunks along the capacity dimension; chunk ``c`` goes
   out in the dispatch all-to-all (rows grouped by destination rank), the local experts
   run on what arrives, and the combine all-to-all sends the results back;
3. each token sums its experts' outputs weighted by the gate.

``dispatch="padded"`` sends every capacity slot (DeepSpeed-MoE's layout, which the
simulator models: ``T * top_k * capacity_factor`` rows); ``"uneven"`` sends only filled
slots, with a small all-to-all of fill counts first. Either way the all-to-all is
``all_to_all_single`` with explicit split sizes. Steps 2's collectives go through an
:class:`Exchange` (the rank's scheduler, :class:`runtime.comm.RankExchange`), inside
:class:`ExpertExchange`, an autograd
Function whose backward runs the reverse all-to-alls through the same scheduler, in the
simulator's program order (all combine chunks, then per chunk FFN and dispatch).

Weights are initialised from ``seed`` per *global* expert id, so the model is the same
function whatever the packing ``k`` and pipelining ``r``: every policy computes the same
loss and gradients, only the timing differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lina_sim.errors import ConfigError
from lina_sim.workload.model import ModelSpec
from runtime.moe import CausalSelfAttention, ExpertFFN, MoEConfig, TopKGate
from runtime.moe_dispatch import combine, dispatch, route

DISPATCH_MODES = ("padded", "uneven")
AUX_LOSS_WEIGHT = 0.01
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Handle(Protocol):
    def wait(self) -> torch.Tensor: ...


class Exchange(Protocol):
    """What the model needs from the runtime: scheduled all-to-alls and op marks."""

    def a2a(self, op: str, send: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int]) -> Handle:
        """Submit the all-to-all of graph op ``op``; rows ``send`` split by destination."""

    def counts_a2a(self, counts: torch.Tensor) -> torch.Tensor:
        """A small all-to-all of fill counts (uneven dispatch), outside the schedule."""

    def mark(self, op: str) -> None:
        """Compute op ``op`` starts now on this rank (ends the previous one)."""

    def pause(self) -> None:
        """The current compute op ends now (the rank waits for communication)."""


@dataclass(frozen=True)
class Layout:
    """Where experts live: ``k`` per rank, ``ep_size`` ranks per expert-parallel group,
    ``r`` pipeline chunks. ``ep_rank`` is this rank's index in its group."""

    k: int
    ep_size: int
    ep_rank: int
    r: int
    dispatch: str = "padded"
    kernels: str = "sparse"  # how tokens enter the capacity buffer: runtime.moe_dispatch


def batch(spec: ModelSpec, seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and next-token targets of ``rank``'s micro-batch at ``step``
    (``[micro_batch, seq_len]`` each): the same under any policy, packing or pipelining."""
    g = torch.Generator().manual_seed(hash((seed, rank, step)) & 0x7FFF_FFFF)
    t = torch.randint(0, spec.vocab, (spec.micro_batch, spec.seq_len + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def check_spec(spec: ModelSpec, where: str = "model") -> None:
    """The runtime builds decoder-only, absolute-position models: say so by field."""
    if spec.encoder_layers:
        raise ConfigError(f"{where}.encoder_layers", "the runtime builds decoder-only models", "0")
    if spec.relative_position:
        raise ConfigError(f"{where}.relative_position", "the runtime has no Transformer-XL attention", "false")
    if not spec.learned_positions:
        raise ConfigError(f"{where}.learned_positions", "the runtime uses a learned position table", "true")
    if spec.dtype not in TORCH_DTYPES:
        raise ConfigError(f"{where}.dtype", f"no torch dtype for {spec.dtype!r}", sorted(TORCH_DTYPES))


# ---------------------------------------------------------------------------------------
# Autograd pieces
# ---------------------------------------------------------------------------------------
class Boundary(torch.autograd.Function):
    """Identity whose backward marks the start of compute op ``name`` on this rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ex: Exchange, name: str) -> torch.Tensor:
        ctx.ex, ctx.name = ex, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        ctx.ex.mark(ctx.name)
        return g, None, None


@dataclass
class ChunkPlan:
    """One MoE layer's all-to-all shapes for one step: per chunk, rows sent to each
    ep rank (``send``), rows received from each (``recv``), and which local expert each
    received row belongs to (``local_expert``, a long tensor, or None when k = 1)."""

    layer: int
    send: list[list[int]]
    recv: list[list[int]]
    local_expert: list[torch.Tensor | None]


class ExpertExchange(torch.autograd.Function):
    """Dispatch all-to-all -> local experts -> combine all-to-all, pipelined in chunks.

    forward(plan, block, ex, *send_chunks) -> combined chunks (same rows as the sends).
    The expert FFNs run on detached inputs under ``enable_grad``; backward sends the
    output gradients back (reverse combine), backpropagates each chunk through the
    experts (accumulating expert weight gradients chunk by chunk) and returns the input
    gradients with the reverse dispatch. Program order on the all-to-all communicator is
    the simulator's: forward all dispatch chunks then combine chunks; backward all
    combine chunks then dispatch chunks.
    """

    @staticmethod
    def forward(ctx, plan: ChunkPlan, block: EPBlock, ex: Exchange, *send: torch.Tensor):
        l, r = plan.layer, len(send)
        disp = [ex.a2a(f"L{l}.fwd.dispatch.c{c}", send[c], plan.send[c], plan.recv[c]) for c in range(r)]
        ex.pause()  # the gate op ends here; waiting for the dispatch is not compute
        xin, yout, comb = [], [], []
        for c in range(r):
            recv = disp[c].wait()
            ex.mark(f"L{l}.fwd.ffn.c{c}")
            with torch.enable_grad():
                x = recv.detach().requires_grad_()
                y = block.run_experts(x, plan.local_expert[c])
            ex.pause()
            xin.append(x)
            yout.append(y)
            comb.append(ex.a2a(f"L{l}.fwd.combine.c{c}", y.detach(), plan.recv[c], plan.send[c]))
        out = tuple(h.wait() for h in comb)
        ctx.plan, ctx.ex, ctx.xin, ctx.yout = plan, ex, xin, yout
        return out

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        plan, ex = ctx.plan, ctx.ex
        l, r = plan.layer, len(grads)
        comb = [ex.a2a(f"L{l}.bwd.combine.c{c}", grads[c].contiguous(), plan.send[c], plan.recv[c]) for c in range(r)]
        ex.pause()
        disp = []
        for c in range(r):
            g = comb[c].wait()
            ex.mark(f"L{l}.bwd.ffn.c{c}")
            torch.autograd.backward(ctx.yout[c], g)  # expert weight grads accumulate here
            ex.pause()
            gx = ctx.xin[c].grad if ctx.xin[c].grad is not None else torch.zeros_like(ctx.xin[c])
            disp.append(ex.a2a(f"L{l}.bwd.dispatch.c{c}", gx, plan.recv[c], plan.send[c]))
        out = tuple(h.wait() for h in disp)
        ex.mark(f"L{l}.bwd.gate")
        ctx.xin = ctx.yout = None  # free the chunk graphs
        return (None, None, None, *out)


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------
def _generator(seed: int, *key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash((seed, *key)) & 0x7FFF_FFFF_FFFF)
    return g


def _init(module: nn.Module, gen: torch.Generator) -> None:
    """GPT-style init from ``gen``: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                m.weight.normal_(0.0, 0.02, generator=gen)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


class EPBlock(nn.Module):
    """Pre-LN attention + (expert-parallel MoE or dense) FFN; layer ``layer``."""

    def __init__(self, spec: ModelSpec, layer: int, lay: Layout, seed: int):
        super().__init__()
        d, E = spec.d_model, spec.experts
        self.spec, self.layer, self.lay = spec, layer, lay
        self.moe = spec.is_moe(layer)
        cfg = MoEConfig(
            layers=1,
            d_model=d,
            d_ff=spec.d_ff,
            heads=spec.heads,
            experts=E,
            top_k=spec.top_k,
            capacity_factor=spec.capacity_factor,
            vocab=spec.vocab,
            seq_len=spec.seq_len,
        )
        self.ln_attn, self.attn, self.ln_ffn = nn.LayerNorm(d), CausalSelfAttention(cfg), nn.LayerNorm(d)
        if self.moe:
            self.gate = TopKGate(d, E, spec.top_k)
            self.experts = nn.ModuleList(ExpertFFN(d, spec.d_ff) for _ in range(lay.k))
        else:
            self.ffn = ExpertFFN(d, spec.d_ff)
        _init(self, _generator(seed, layer, -1))
        if self.moe:  # each expert from its global id: the same weights under any packing
            for j, e in enumerate(self.global_experts):
                _init(self.experts[j], _generator(seed, layer, e))

    @property
    def global_experts(self) -> range:
        return range(self.lay.ep_rank * self.lay.k, (self.lay.ep_rank + 1) * self.lay.k)

    def capacity(self) -> int:
        s = self.spec
        return max(1, math.ceil(s.capacity_factor * s.tokens * s.top_k / s.experts))

    def run_experts(self, x: torch.Tensor, local_expert: torch.Tensor | None) -> torch.Tensor:
        """Each received row through its local expert (rows of one chunk)."""
        if local_expert is None:
            return self.experts[0](x)
        y = torch.zeros_like(x)
        for j, expert in enumerate(self.experts):
            idx = (local_expert == j).nonzero().squeeze(1)
            y = y.index_copy(0, idx, expert(x.index_select(0, idx)))
        return y

    def forward(self, x: torch.Tensor, ex: Exchange) -> tuple[torch.Tensor, torch.Tensor]:
        l = self.layer
        ex.mark(f"L{l}.fwd.attn")
        x = x + self.attn(self.ln_attn(x))
        x = Boundary.apply(x, ex, f"L{l}.bwd.attn")
        if not self.moe:
            ex.mark(f"L{l}.fwd.ffn")
            x = x + self.ffn(self.ln_ffn(x))
            return Boundary.apply(x, ex, f"L{l}.bwd.ffn"), x.new_zeros(())
        ex.mark(f"L{l}.fwd.gate")
        y, aux = self.moe_ffn(self.ln_ffn(x), ex)
        # The combine's gather runs at the start of the next op, as in the simulator.
        return Boundary.apply(x + y, ex, f"L{l}.bwd.gate"), aux

    def moe_ffn(self, h: torch.Tensor, ex: Exchange) -> tuple[torch.Tensor, torch.Tensor]:
        s, lay = self.spec, self.lay
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        d, E, cap = h.shape[1], s.experts, self.capacity()
        top_i, top_p, aux = self.gate(h)
        routing = route(top_i, top_p, cap, E)
        buf = dispatch(h, routing, lay.kernels)
        fill = torch.clamp(routing.counts, max=cap)
        bounds = [c * cap // lay.r for c in range(lay.r + 1)]
        plan, rows = self._plan(fill, bounds, ex)
        outs = ExpertExchange.apply(plan, self, ex, *[buf.index_select(0, rw) for rw in rows])
        out_buf = h.new_zeros(E * cap, d).index_copy(0, torch.cat(rows), torch.cat(outs))
        return combine(out_buf, routing, lay.kernels).reshape(shape), aux

    def _plan(self, fill: torch.Tensor, bounds: list[int], ex: Exchange) -> tuple[ChunkPlan, list[torch.Tensor]]:
        """Rows of the capacity buffer each chunk sends (grouped by destination rank,
        then expert, then slot) and the split sizes both ways. Sizes are worked out on
        the host; the index tensors go to the model's device."""
        lay, E, dev = self.lay, self.spec.experts, fill.device
        cap = bounds[-1]
        if lay.dispatch == "padded":
            mine, theirs = torch.full((E,), cap), torch.full((lay.ep_size, lay.k), cap)
        else:
            mine = fill.cpu()
            theirs = ex.counts_a2a(fill.view(lay.ep_size, lay.k).contiguous()).cpu()  # [src, local expert]
        send, recv, local, rows = [], [], [], []
        for lo, hi in zip(bounds, bounds[1:]):
            n_mine = torch.clamp(mine - lo, 0, hi - lo)  # rows of each expert in [lo, hi)
            n_theirs = torch.clamp(theirs - lo, 0, hi - lo)
            rows.append(
                torch.cat([torch.arange(e * cap + lo, e * cap + lo + int(n_mine[e])) for e in range(E)]).to(dev)
            )
            send.append(n_mine.view(lay.ep_size, lay.k).sum(1).tolist())
            recv.append(n_theirs.sum(1).tolist())
            local.append(
                None
                if lay.k == 1
                else torch.repeat_interleave(torch.arange(lay.k).repeat(lay.ep_size), n_theirs.reshape(-1)).to(dev)
            )
        return ChunkPlan(self.layer, send, recv, local), rows


class EPTransformer(nn.Module):
    """Decoder-only LM of ``spec`` with this rank's share of experts (see module doc)."""

    def __init__(self, spec: ModelSpec, lay: Layout, seed: int):
        super().__init__()
        check_spec(spec)
        d = spec.d_model
        self.spec, self.lay = spec, lay
        self.embed = nn.Embedding(spec.vocab, d)
        self.pos = nn.Parameter(torch.zeros(spec.seq_len, d))
        self.blocks = nn.ModuleList(EPBlock(spec, l, lay, seed) for l in range(spec.layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = None if spec.tie_embeddings else nn.Linear(d, spec.vocab, bias=False)
        gen = _generator(seed, -1, -1)
        _init(self.embed, gen)
        _init(self.ln_f, gen)
        if self.head is not None:
            _init(self.head, gen)
        with torch.no_grad():
            self.pos.normal_(0.0, 0.02, generator=gen)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, ex: Exchange) -> torch.Tensor:
        """Cross-entropy + weighted mean load-balancing loss for one micro-batch."""
        ex.mark("embed.fwd")
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = Boundary.apply(x, ex, "embed.bwd")
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x, ex)
            aux = aux + a
        ex.mark("head.fwd")
        h = self.ln_f(x)
        logits = h @ self.embed.weight.T if self.head is None else self.head(h)
        ce = F.cross_entropy(logits.reshape(-1, self.spec.vocab).float(), targets.reshape(-1))
        return ce + AUX_LOSS_WEIGHT * aux / max(1, len(self.spec.moe_layer_ids))

    def grad_tensors(self) -> dict[str, list[nn.Parameter]]:
        """The simulator's gradient tensors (``ModelSpec.tensors(k)`` names) -> parameters.
        A weight and its bias are one gradient tensor."""
        out: dict[str, list[nn.Parameter]] = {"embed.tokens": [self.embed.weight], "embed.positions": [self.pos]}
        lin = lambda m: [m.weight, m.bias]  # noqa: E731
        for b in self.blocks:
            p = f"L{b.layer}."
            out[p + "ln_attn"], out[p + "attn_qkv"], out[p + "attn_out"] = (
                lin(b.ln_attn),
                lin(b.attn.qkv),
                lin(b.attn.out),
            )
            out[p + "ln_ffn"] = lin(b.ln_ffn)
            if b.moe:
                out[p + "gate"] = [b.gate.proj.weight]
                for j, e in enumerate(b.experts):
                    out[p + f"expert{j}.w1"], out[p + f"expert{j}.w2"] = lin(e.w1), lin(e.w2)
            else:
                out[p + "ffn.w1"], out[p + "ffn.w2"] = lin(b.ffn.w1), lin(b.ffn.w2)
        out["final_ln"] = lin(self.ln_f)
        if self.head is not None:
            out["lm_head"] = [self.head.weight]
        self._check_against_spec(out)
        return out

    def _check_against_spec(self, tensors: dict[str, list[nn.Parameter]]) -> None:
        want = {name: n for name, n, _, _ in self.spec.tensors(self.lay.k)}
        have = {name: sum(p.numel() for p in ps) for name, ps in tensors.items()}
        if want != have:
            bad = sorted(set(want.items()) ^ set(have.items()))[:3]
            raise RuntimeError(f"runtime model does not match the simulator's ModelSpec.tensors: {bad}")

    def expert_params(self) -> set[nn.Parameter]:
        return {p for b in self.blocks if b.moe for p in b.experts.parameters()}
