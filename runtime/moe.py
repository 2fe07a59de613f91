"""A real, small mixture-of-experts transformer in PyTorch.

Decoder-only: token embedding + learned positions, then ``layers`` blocks of
pre-norm causal self-attention and a MoE feed-forward layer, then a tied output head.
Each MoE layer has a linear top-k gate with a capacity limit (tokens over an expert's
capacity are dropped and pass through on the residual path, as in Switch/GShard) and
the Switch/GShard load-balancing auxiliary loss.

The module is deliberately plain (no fused kernels, no distributed code) so that a
later runtime can build it from the simulator's model spec and shard its experts.
``forward(..., return_gates=True)`` also returns every layer's top-k expert ids and
gate probabilities, which is what ``runtime.record`` writes as a trace.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEConfig:
    """Shape of the MoE transformer. Sizes are counts (tokens, features, experts)."""

    layers: int = 12  # transformer blocks, each with one MoE FFN
    d_model: int = 128  # hidden size
    d_ff: int = 256  # hidden size inside each expert FFN
    heads: int = 4  # attention heads; d_model must divide by it
    experts: int = 16  # experts per MoE layer
    top_k: int = 1  # experts per token
    capacity_factor: float = 1.25  # expert capacity = factor * tokens * top_k / experts
    vocab: int = 256  # byte-level by default
    seq_len: int = 128  # context length (tokens)
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss in the total loss

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, experts={self.experts}]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateOutput:
    """One MoE layer's routing for the N tokens it saw.

    ``experts`` [N, k] long ids best-first; ``probs`` [N, k] softmax probabilities of
    those experts; ``aux_loss`` the scalar load-balancing loss; ``dropped`` how many
    (token, choice) pairs exceeded capacity.
    """

    experts: torch.Tensor
    probs: torch.Tensor
    aux_loss: torch.Tensor
    dropped: int


class TopKGate(nn.Module):
    """Linear router: softmax over experts, keep the top k, balance with an aux loss."""

    def __init__(self, d_model: int, experts: int, top_k: int):
        super().__init__()
        self.experts = experts
        self.top_k = top_k
        self.proj = nn.Linear(d_model, experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.proj(x).float(), dim=-1)  # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k], best first
        # Switch/GShard auxiliary loss: E * sum_e f_e * P_e, where f_e is the fraction of
        # tokens whose first choice is e and P_e the mean router probability of e. It is 1
        # under a perfectly uniform router and grows with imbalance.
        f = torch.bincount(top_i[:, 0], minlength=self.experts).float() / max(1, x.shape[0])
        aux = self.experts * torch.sum(f * probs.mean(dim=0))
        return top_i, top_p, aux


class ExpertFFN(nn.Module):
    """One expert: d_model -> d_ff -> d_model with GELU."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class MoELayer(nn.Module):
    """Gate + experts with a capacity limit; outputs the gate-weighted sum of experts."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = TopKGate(cfg.d_model, cfg.experts, cfg.top_k)
        self.experts = nn.ModuleList(ExpertFFN(cfg.d_model, cfg.d_ff) for _ in range(cfg.experts))

    def capacity(self, tokens: int) -> int:
        return max(1, math.ceil(self.cfg.capacity_factor * tokens * self.cfg.top_k / self.cfg.experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, GateOutput]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n, k = x.shape[0], self.cfg.top_k
        top_i, top_p, aux = self.gate(x)
        if k > 1:  # renormalise the kept probabilities, as GShard's top-2 does
            weights = top_p / top_p.sum(dim=-1, keepdim=True)
        else:
            weights = top_p
        cap = self.capacity(n)
        flat_e = top_i.reshape(-1)  # choice order: token-major, best choice first
        flat_tok = torch.arange(n, device=x.device).repeat_interleave(k)
        flat_w = weights.reshape(-1)
        # Position of each (token, choice) in its expert's queue; first choices of all
        # tokens are queued before second choices, so capacity drops hit second choices.
        rank = torch.arange(k, device=x.device).repeat(n)
        order = torch.argsort(flat_e * k + rank, stable=True)  # by expert, then choice rank
        sorted_e = flat_e[order]
        counts = torch.bincount(sorted_e, minlength=self.cfg.experts)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(sorted_e.numel(), device=x.device) - starts[sorted_e]
        keep = pos < cap
        dropped = int((~keep).sum())
        out = torch.zeros_like(x)
        kept_order = order[keep]
        kept_e = sorted_e[keep]
        kept_counts = torch.bincount(kept_e, minlength=self.cfg.experts).tolist()
        offset = 0
        for e, c in enumerate(kept_counts):
            if c == 0:
                continue
            idx = kept_order[offset : offset + c]
            offset += c
            tok = flat_tok[idx]
            y = self.experts[e](x[tok]) * flat_w[idx].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, tok, y)
        return out.reshape(shape), GateOutput(top_i, top_p, aux, dropped)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoELayer(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, GateOutput]:
        x = x + self.attn(self.ln1(x))
        y, gate = self.moe(self.ln2(x))
        return x + y, gate


@dataclass
class MoEOutput:
    """Logits [B, T, vocab]; the summed aux loss; per-layer gates if requested."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    gates: list[GateOutput] | None


class MoETransformer(nn.Module):
    """A decoder-only language model whose every FFN is a MoE layer."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, return_gates: bool = False) -> MoEOutput:
        b, t = tokens.shape
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds seq_len={self.cfg.seq_len}")
        x = self.embed(tokens) + self.pos[:t]
        aux = x.new_zeros(())
        gates: list[GateOutput] = []
        for block in self.blocks:
            x, g = block(x)
            aux = aux + g.aux_loss
            if return_gates:
                gates.append(g)
        logits = self.ln_f(x) @ self.embed.weight.T  # tied head
        return MoEOutput(logits, aux / len(self.blocks), gates if return_gates else None)

    def loss(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total loss, LM cross-entropy in nats/token, aux loss) for next-token prediction."""
        out = self(tokens[:, :-1])
        ce = F.cross_entropy(out.logits.reshape(-1, self.cfg.vocab), tokens[:, 1:].reshape(-1))
        return ce + self.cfg.aux_loss_weight * out.aux_loss, ce, out.aux_loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
