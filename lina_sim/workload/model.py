"""MoE model specs and the model presets (architecture numbers from the papers that define
each model; see docs/reference-numbers.md).

A :class:`ModelSpec` describes an MoE transformer: layers, widths, experts, gating and
the batch one rank processes. :func:`model_from_dict` reads a scenario's ``model`` block
(a preset plus overrides) and checks every field. Units: tokens, bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lina_sim.config.fields import REQUIRED, Field, check_declared, check_fields, check_known, declare, declared
from lina_sim.errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


# ---------------------------------------------------------------------------------------
# Model spec
# ---------------------------------------------------------------------------------------
def _count(what: str) -> Any:
    """A required ModelSpec field: an integer >= 1 (``what`` is its help, with its unit)."""
    return declare(Field(int, REQUIRED, minimum=1, help=what))


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

    name: str  # the preset's name, or "custom"; not a field a scenario sets
    layers: int = _count("layers of the main (decoder) stack")
    d_model: int = _count("model width, elements per token")
    d_ff: int = _count("FFN (and expert) hidden width, elements per token")
    heads: int = _count("attention heads")
    seq_len: int = _count("tokens per sequence")
    micro_batch: int = _count("sequences per GPU per step")
    vocab: int = _count("decoder token-embedding rows (tokens)")
    experts: int = declare(Field(int, 0, minimum=0, help="experts per MoE layer (0: one per GPU)"))
    top_k: int = declare(Field(int, 2, minimum=1, help="experts each token is routed to"))
    capacity_factor: float = declare(
        Field(
            float,
            1.0,
            minimum=0,
            exclusive_minimum=True,
            help="expert buffer size over an even share of the tokens (a ratio)",
        )
    )
    dtype: str = declare(
        Field(
            str,
            "fp16",
            choices=tuple(sorted(DTYPE_BYTES)),
            help="dtype of activations, weights and gradients on the wire",
        )
    )
    moe_layers: tuple[int, ...] | None = declare(
        Field(
            tuple,
            None,
            allow_none=True,
            allowed="a list of layer indices or null",
            help="layers with an MoE FFN (null: all)",
        )
    )
    encoder_layers: int = declare(Field(int, 0, minimum=0, help="layers of the encoder stack (0: none)"))
    encoder_vocab: int = declare(Field(int, 0, minimum=0, help="encoder token-embedding rows (0: vocab)"))
    tie_embeddings: bool = declare(Field(bool, True, help="the LM head shares the decoder embedding"))
    learned_positions: bool = declare(Field(bool, True, help="a learned table of seq_len positions per stack"))
    relative_position: bool = declare(Field(bool, False, help="Transformer-XL relative-position attention"))
    check_memory: bool = declare(
        Field(
            bool,
            True,
            help="refuse a training scenario whose per-GPU training state and activations "
            "(ModelSpec.training_memory) exceed the GPU's memory_bytes; false simulates it anyway",
        )
    )

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

    def resolve(self, world_size: int, where: str = "model") -> ModelSpec:
        """Set ``experts`` to one per GPU if unset, and check it divides over the GPUs."""
        spec = self if self.experts else dataclasses.replace(self, experts=world_size)
        spec.check(where)
        e = spec.experts
        if world_size % e and e % world_size:
            raise ConfigError(
                f"{where}.experts",
                f"{e} experts do not divide over {world_size} GPUs",
                f"a divisor or a multiple of {world_size}, e.g. {', '.join(map(str, _divisors(world_size)))}",
            )
        return spec

    def check(self, where: str = "model") -> ModelSpec:
        """Every field (:data:`MODEL_FIELDS`), then the rules that tie fields together."""
        check_declared(self, where)
        if self.d_model % self.heads:
            raise ConfigError(
                f"{where}.heads",
                f"{self.heads} heads do not divide d_model {self.d_model}",
                f"a divisor of {self.d_model}",
            )
        if self.experts and self.top_k > self.experts:
            raise ConfigError(
                f"{where}.top_k", f"top_k {self.top_k} exceeds the {self.experts} experts", f"1..{self.experts}"
            )
        if self.moe_layers is not None:
            bad = [
                l
                for l in self.moe_layers
                if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < self.total_layers
            ]
            if bad:
                raise ConfigError(
                    f"{where}.moe_layers", f"layer {bad[0]!r} out of range", f"layer indices 0..{self.total_layers - 1}"
                )
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
            out += [
                (p + "ln_attn", 2 * d, False, l),
                (p + "attn_qkv", 3 * d * d + 3 * d * bias, False, l),
                (p + "attn_out", d * d + d * bias, False, l),
            ]
            if self.relative_position:
                out.append((p + "attn_rel", d * d + 2 * d, False, l))
            if self.has_cross_attention(l):
                out += [
                    (p + "ln_cross", 2 * d, False, l),
                    (p + "cross_q", d * d + d, False, l),
                    (p + "cross_kv", 2 * d * d + 2 * d, False, l),
                    (p + "cross_out", d * d + d, False, l),
                ]
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

    def param_counts(self, experts_per_device: int | None = None) -> ParamCounts:
        """Parameter counts of the whole model (or of one device's share of experts)."""
        ts = self.tensors(experts_per_device)
        expert = sum(n for _, n, is_e, _ in ts if is_e)
        non_expert = sum(n for _, n, is_e, _ in ts if not is_e)
        return ParamCounts(total=expert + non_expert, expert=expert, non_expert=non_expert)

    # -- memory ----------------------------------------------------------------------
    def training_memory(self, experts_per_device: int) -> TrainingMemory:
        """Bytes one GPU holds to train this model with ``experts_per_device`` local experts
        (no activation recomputation, no ZeRO partitioning, as DeepSpeed-MoE's defaults):

        - ``states``: 16 bytes per local parameter: mixed-precision Adam keeps an fp16
          weight and gradient (2 + 2 bytes) and fp32 master weight, momentum and variance
          (4 + 4 + 4), ZeRO (Rajbhandari et al., SC'20, section 3.1) "16Ψ"; fp32 training
          (4 + 4 + 4 + 4) is the same 16 bytes.
        - ``activations``: per layer, Korthikanti et al. (MLSys'23, "Reducing Activation
          Recomputation", eq. 1) for 16-bit activations: ``s b h (34 + 5 a s / h)`` bytes,
          of which the FFN's ``19 s b h`` is written ``s b (3 h + 4 d_ff)`` so that any FFN
          width counts; an MoE FFN holds its expert buffer of ``capacity_factor x top_k``
          times the tokens; a decoder layer with cross-attention adds another attention
          block; then the logits (``dtype`` and fp32 for the loss) of ``s b vocab``.
          Scaled by ``dtype_bytes / 2``. Units: bytes; s = seq_len, b = micro_batch,
          h = d_model, a = heads.
        """
        s, b, h, a, f = self.seq_len, self.micro_batch, self.d_model, self.heads, self.d_ff
        attention = s * b * h * 15 + 5 * a * s * s * b  # 11 sbh + 5 a s^2 b, and 4 sbh of layer norms
        ffn = s * b * (3 * h + 4 * f)
        rows = self.capacity_factor * self.top_k
        per_layer = [
            attention * (2 if self.has_cross_attention(l) else 1) + ffn * (rows if self.is_moe(l) else 1.0)
            for l in range(self.total_layers)
        ]
        logits = s * b * self.vocab * (self.dtype_bytes + 4)
        activations = sum(per_layer) * self.dtype_bytes / 2 + logits
        params = self.param_counts(experts_per_device).total
        return TrainingMemory(params=params, states=16.0 * params, activations=float(activations))


@dataclass(frozen=True)
class TrainingMemory:
    """One GPU's training memory (:meth:`ModelSpec.training_memory`): local parameters
    (elements), their weights, gradients and optimizer state, and the activations one
    micro-batch keeps for the backward pass (bytes)."""

    params: int
    states: float
    activations: float

    @property
    def total(self) -> float:
        """Bytes: states + activations."""
        return self.states + self.activations


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (elements): total = expert + non_expert."""

    total: int
    expert: int
    non_expert: int


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


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
    **{
        f"transformer-xl-{n}": dict(
            layers=n,
            d_model=512,
            d_ff=2048,
            heads=8,
            seq_len=512,
            micro_batch=8,
            vocab=204,
            learned_positions=False,
            relative_position=True,
        )
        for n in (12, 24, 36)
    },
    "gpt2-moe": dict(layers=12, d_model=768, d_ff=3072, heads=12, seq_len=1024, micro_batch=4, vocab=50257),
    # DeepSeekMoE 16B (Dai et al., "DeepSeekMoE", arXiv:2401.06066, and the released
    # deepseek-ai/deepseek-moe-16b-base config.json): 28 layers, hidden 2048, 16 heads,
    # 64 routed experts of intermediate size 1408 with 6 routed per token, the first
    # layer dense (first_k_dense_replace 1), vocabulary 102400, 4096-token context,
    # rotary positions (no learned table), untied LM head. What lina-sim's ModelSpec
    # cannot hold: the 2 shared experts (an always-on dense FFN of 2 x 1408, left out)
    # and the dense layer's own width (10944; here it takes the experts' 1408). As in
    # every preset, the expert count is the scenario's (``experts: 64`` is the model's own,
    # expert parallelism 64: benchmarks/bench_frontier.py); one 4096-token sequence per
    # GPU per step is our batch shape.
    "deepseek-moe-16b": dict(
        layers=28,
        d_model=2048,
        d_ff=1408,
        heads=16,
        seq_len=4096,
        micro_batch=1,
        vocab=102400,
        top_k=6,
        dtype="bf16",
        moe_layers=tuple(range(1, 28)),
        tie_embeddings=False,
        learned_positions=False,
    ),
    "bert2gpt2-moe": dict(
        layers=12,
        encoder_layers=12,
        d_model=768,
        d_ff=3072,
        heads=12,
        seq_len=512,
        micro_batch=8,
        vocab=50257,
        encoder_vocab=30522,
    ),
}
MODEL_FIELDS: dict[str, Field] = declared(ModelSpec)  # what a scenario's model block may set


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
    check_known(d, ["preset", *MODEL_FIELDS], where)
    name, values = "custom", {}
    if "preset" in d:
        name = str(d["preset"])
        model_preset(name, f"{where}.preset")
        values = dict(PRESETS[name])
    values.update((k, v) for k, v in d.items() if k != "preset")
    missing = [k for k, f in MODEL_FIELDS.items() if f.required and k not in values]
    if missing:
        raise ConfigError(
            f"{where}.{missing[0]}",
            "missing (give it, or a preset to start from)",
            ["preset: " + "|".join(available_models())],
        )
    spec = ModelSpec(name=name, **check_fields(values, MODEL_FIELDS, where))
    return spec.resolve(world_size, where) if world_size is not None else spec.check(where)
