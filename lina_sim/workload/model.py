"""MoE model specs and the model presets (architecture numbers from the papers that define
each model; see docs/reference-numbers.md).

A :class:`ModelSpec` describes an MoE transformer: layers, widths, experts, gating and
the batch one rank processes. :func:`model_from_dict` reads a scenario's ``model`` block
(a preset plus overrides) and checks every field. Units: tokens, bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from lina_sim.errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


# ---------------------------------------------------------------------------------------
# Model spec
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """An MoE transformer.

    - ``layers``: layers of the main (decoder) stack; ``encoder_layers`` > 0 adds an
      encoder stack in front and cross-attention to every decoder layer (bert2gpt2).
      Layers are numbered encoder first: 0 .. encoder_layers + layers - 1.
    - ``experts``: experts per MoE layer; 0 means one per GPU (set by :meth:`resolve`).
    - ``capacity_factor``: each expert's buffer holds ``capacity_factor * tokens * top_k /
      experts`` token rows (DeepSpeed's top-2 capacity).
    - ``seq_len`` tokens per sequence, ``micro_batch`` sequences per GPU per step (the
      encoder gets sequences of the same length).
    - ``dtype``: activations, weights and gradients on the wire; ``dtype_bytes`` derives.
    - ``moe_layers``: which layers have an MoE FFN (None: all); the rest have a dense FFN.
    - ``vocab`` (decoder) and ``encoder_vocab`` (0: same) token-embedding rows;
      ``tie_embeddings`` ties the LM head to the decoder embedding.
    - ``learned_positions``: a learned position table of ``seq_len`` rows per stack.
    - ``relative_position``: Transformer-XL attention (relative-position projection of
      d_model x d_model and two d_model biases per layer; no q/k/v/o biases).
    """

    name: str
    layers: int
    d_model: int
    d_ff: int
    heads: int
    seq_len: int
    micro_batch: int
    vocab: int
    experts: int = 0
    top_k: int = 2
    capacity_factor: float = 1.0
    dtype: str = "fp16"
    moe_layers: tuple[int, ...] | None = None
    encoder_layers: int = 0
    encoder_vocab: int = 0
    tie_embeddings: bool = True
    learned_positions: bool = True
    relative_position: bool = False

    # -- derived -----------------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def total_layers(self) -> int:
        return self.encoder_layers + self.layers

    @property
    def tokens(self) -> int:
        """Tokens per GPU per step in one stack: micro_batch x seq_len."""
        return self.micro_batch * self.seq_len

    def is_moe(self, layer: int) -> bool:
        return self.moe_layers is None or layer in self.moe_layers

    def is_decoder(self, layer: int) -> bool:
        return layer >= self.encoder_layers

    def has_cross_attention(self, layer: int) -> bool:
        return self.encoder_layers > 0 and self.is_decoder(layer)

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.total_layers) if self.is_moe(l))

    def resolve(self, world_size: int, where: str = "model") -> "ModelSpec":
        """Set ``experts`` to one per GPU if unset, and check it divides over the GPUs."""
        spec = self if self.experts else dataclasses.replace(self, experts=world_size)
        spec.check(where)
        e = spec.experts
        if world_size % e and e % world_size:
            raise ConfigError(f"{where}.experts", f"{e} experts do not divide over {world_size} GPUs",
                              f"a divisor or a multiple of {world_size}, e.g. {', '.join(map(str, _divisors(world_size)))}")
        return spec

    def check(self, where: str = "model") -> "ModelSpec":
        for f in ("layers", "d_model", "d_ff", "heads", "seq_len", "micro_batch", "vocab", "top_k"):
            _positive_int(f"{where}.{f}", getattr(self, f))
        for f in ("experts", "encoder_layers", "encoder_vocab"):
            _nonneg_int(f"{where}.{f}", getattr(self, f))
        if self.d_model % self.heads:
            raise ConfigError(f"{where}.heads", f"{self.heads} heads do not divide d_model {self.d_model}",
                              f"a divisor of {self.d_model}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"{where}.dtype", f"unknown dtype {self.dtype!r}", sorted(DTYPE_BYTES))
        if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) \
                or not self.capacity_factor > 0:
            raise ConfigError(f"{where}.capacity_factor", f"must be a number > 0, got {self.capacity_factor!r}", "> 0")
        if self.experts and self.top_k > self.experts:
            raise ConfigError(f"{where}.top_k", f"top_k {self.top_k} exceeds the {self.experts} experts",
                              f"1..{self.experts}")
        if self.moe_layers is not None:
            bad = [l for l in self.moe_layers if isinstance(l, bool) or not isinstance(l, int)
                   or not 0 <= l < self.total_layers]
            if bad:
                raise ConfigError(f"{where}.moe_layers", f"layer {bad[0]!r} out of range",
                                  f"layer indices 0..{self.total_layers - 1}")
        return self

    # -- parameters --------------------------------------------------------------------
    def tensors(self, experts_per_device: int | None = None) -> list[tuple[str, int, bool, int]]:
        """Every parameter tensor as (name, elements, is_expert, layer), in forward order.

        Expert tensors are listed for all experts, or, with ``experts_per_device``, for
        the experts one device holds.
        """
        d, f, e = self.d_model, self.d_ff, self.experts
        bias = 0 if self.relative_position else 1
        local = e if experts_per_device is None else experts_per_device
        out: list[tuple[str, int, bool, int]] = []
        if self.encoder_layers:
            out.append(("embed.encoder_tokens", (self.encoder_vocab or self.vocab) * d, False, -1))
            if self.learned_positions:
                out.append(("embed.encoder_positions", self.seq_len * d, False, -1))
        out.append(("embed.tokens", self.vocab * d, False, -1))
        if self.learned_positions:
            out.append(("embed.positions", self.seq_len * d, False, -1))
        for l in range(self.total_layers):
            p = f"L{l}."
            out += [(p + "ln_attn", 2 * d, False, l), (p + "attn_qkv", 3 * d * d + 3 * d * bias, False, l),
                    (p + "attn_out", d * d + d * bias, False, l)]
            if self.relative_position:
                out.append((p + "attn_rel", d * d + 2 * d, False, l))
            if self.has_cross_attention(l):
                out += [(p + "ln_cross", 2 * d, False, l), (p + "cross_q", d * d + d, False, l),
                        (p + "cross_kv", 2 * d * d + 2 * d, False, l), (p + "cross_out", d * d + d, False, l)]
            out.append((p + "ln_ffn", 2 * d, False, l))
            if self.is_moe(l):
                out.append((p + "gate", d * e, False, l))  # DeepSpeed's TopKGate: Linear(d, E, bias=False)
                for j in range(local):
                    out += [(p + f"expert{j}.w1", d * f + f, True, l), (p + f"expert{j}.w2", f * d + d, True, l)]
            else:
                out += [(p + "ffn.w1", d * f + f, False, l), (p + "ffn.w2", f * d + d, False, l)]
        out.append(("final_ln", 2 * d, False, self.total_layers))
        if not self.tie_embeddings:
            out.append(("lm_head", self.vocab * d, False, self.total_layers))
        return out

    def param_counts(self, experts_per_device: int | None = None) -> "ParamCounts":
        """Parameter counts of the whole model (or of one device's share of experts)."""
        ts = self.tensors(experts_per_device)
        expert = sum(n for _, n, is_e, _ in ts if is_e)
        non_expert = sum(n for _, n, is_e, _ in ts if not is_e)
        return ParamCounts(total=expert + non_expert, expert=expert, non_expert=non_expert)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements): total = expert + non_expert."""

    total: int
    expert: int
    non_expert: int


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _positive_int(path: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(path, f"must be a positive integer, got {v!r}", "an integer >= 1")


def _nonneg_int(path: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(path, f"must be a non-negative integer, got {v!r}", "an integer >= 0")


# Presets. Architecture numbers are the paper's (docs/reference-numbers.md); the batch shapes are ours,
# chosen to be typical of each model's public training setup, and are NOT from the paper:
# - Transformer-XL: the enwik8 character-level setup of the Transformer-XL code (vocab of
#   204 symbols, segment length 512; relative-position attention, sinusoidal positions).
#   With 4 experts the 12/24/36-layer sizes land near the 117M/233M/349M that docs/reference-numbers.md
#   quotes, which is how we know the vocabulary is small (a word-level vocabulary would
#   add 137M embedding parameters).
# - GPT-2: 1024-token context, 50257-token BPE vocabulary, tied LM head (GPT-2 small).
# - BERT2GPT2: a BERT-base encoder (30522-token WordPiece vocabulary, 512 positions)
#   with a GPT-2 decoder; encoder and decoder sequences of 512 tokens.
# - micro_batch: 8 sequences of 512 tokens (4 of 1024 for GPT-2) per GPU: 4096 tokens,
#   which fits an A100-40GB with 16 experts' worth of buffers and activations in fp16.
# - capacity_factor 1.0: DeepSpeed-MoE's default for training.
PRESETS: dict[str, dict[str, Any]] = {
    **{f"transformer-xl-{n}": dict(layers=n, d_model=512, d_ff=2048, heads=8, seq_len=512, micro_batch=8,
                                   vocab=204, learned_positions=False, relative_position=True)
       for n in (12, 24, 36)},
    "gpt2-moe": dict(layers=12, d_model=768, d_ff=3072, heads=12, seq_len=1024, micro_batch=4, vocab=50257),
    "bert2gpt2-moe": dict(layers=12, encoder_layers=12, d_model=768, d_ff=3072, heads=12, seq_len=512,
                          micro_batch=8, vocab=50257, encoder_vocab=30522),
}
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec))


def available_models() -> list[str]:
    return sorted(PRESETS)


def model_preset(name: str, where: str = "model.preset") -> ModelSpec:
    if name not in PRESETS:
        raise ConfigError(where, f"unknown model preset {name!r}", available_models())
    return ModelSpec(name=name, **PRESETS[name])


def model_from_dict(d: Mapping[str, Any] | str, where: str = "model", world_size: int | None = None) -> ModelSpec:
    """Build a ModelSpec from a scenario's ``model:`` entry.

    ``d`` is a preset name, or a mapping with an optional ``preset`` and any
    :class:`ModelSpec` field as an override (without a preset every required field must
    be given). With ``world_size`` the experts are resolved against the GPUs. Errors name
    the YAML path (``model.micro_batch``) and what is allowed.
    """
    if isinstance(d, str):
        d = {"preset": d}
    if not isinstance(d, Mapping):
        raise ConfigError(where, "must be a preset name or a mapping", ["preset: NAME", *MODEL_FIELDS])
    known = ("preset",) + MODEL_FIELDS
    for k in d:
        if k not in known or k == "name":
            raise ConfigError(f"{where}.{k}", "unknown field", [k for k in known if k != "name"])
    base: dict[str, Any] = {}
    if "preset" in d:
        base = {"name": d["preset"], **dataclasses.asdict(model_preset(str(d["preset"]), f"{where}.preset"))}
    values = {**base, **{k: v for k, v in d.items() if k != "preset"}}
    values.setdefault("name", "custom")
    missing = [f.name for f in dataclasses.fields(ModelSpec)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}", "missing (give it, or a preset to start from)",
                          ["preset: " + "|".join(available_models())])
    if values.get("moe_layers") is not None:
        ml = values["moe_layers"]
        if not isinstance(ml, (list, tuple)):
            raise ConfigError(f"{where}.moe_layers", f"must be a list of layer indices, got {ml!r}")
        values["moe_layers"] = tuple(ml)
    if isinstance(values.get("capacity_factor"), int) and not isinstance(values["capacity_factor"], bool):
        values["capacity_factor"] = float(values["capacity_factor"])
    spec = ModelSpec(**values)
    return spec.resolve(world_size, where) if world_size is not None else spec.check(where)
