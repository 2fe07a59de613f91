"""The op graph of one training step.

:func:`build_training_graph` turns a :class:`~lina_sim.workload.model.ModelSpec`
into the SPMD program every rank runs for one training step: a tuple of :class:`Op`
(compute and all-to-all, in program order), the gradient allreduce requests
(:class:`~lina_sim.workload.comm.GradRequest`, one per parameter tensor) that a policy
partitions into micro-ops, and the communicators (rank groups) the collectives run on.

Units: FLOP, bytes, tokens. Nothing here imports simpy or torch.

Modelling choices (each one a comment where it is made):

- Pre-LN transformer layers; a weight and its bias are one gradient tensor.
- Expert FFNs compute over the whole capacity buffer (padding included), as
  DeepSpeed-MoE's einsum-free dispatch does: ``T * top_k * capacity_factor`` token rows
  per rank, whatever the routing.
- Expert parallelism as DeepSpeed-MoE lays it out: with ``k`` experts per device the
  expert-parallel group (``ep``) is ``experts / k`` consecutive ranks, and the ranks
  holding the same experts form an ``expert_dp`` group (stride ``experts / k``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lina_sim.config.fields import Field
from lina_sim.errors import ConfigError
from lina_sim.workload.comm import ALL_TO_ALL, GradRequest, MicroOp, PackingEstimate
from lina_sim.workload.model import ModelSpec
from lina_sim.workload.moe_ops import DISPATCH_KERNELS, census_ops

COMPUTE, ALLREDUCE = "compute", "allreduce"
FWD, BWD, OPT = "fwd", "bwd", "opt"
# Adam in mixed precision touches, per parameter: fp16 weight read+write (4 B), fp16 grad
# read (2 B), fp32 master weight, momentum and variance read+write (24 B).
ADAM_BYTES_PER_PARAM = 30.0


# ---------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Kernel:
    """One GPU kernel of an op: tensor-core FLOP and HBM bytes read + written; for a GEMM
    also its shape ``(m, n, k, batch)`` (C[m, n] += A[m, k] B[k, n], ``batch`` times), which
    a compute model may use for tile and wave quantization."""

    name: str
    flops: float
    hbm_bytes: float
    gemm: tuple[float, float, float, float] | None = None


@dataclass(frozen=True, slots=True)
class Op:
    """One op of the SPMD program, identical on every rank.

    - ``id``: index in ``TrainingGraph.ops`` = program order. Each rank runs the ops of
      one stream in this order; ``deps`` lists only the data dependencies on *other*
      ops (the previous op of the same stream is implied).
    - ``kind``: ``compute`` or ``all_to_all``; ``stream``: ``compute`` or ``a2a``.
    - ``role``: ``embed``, ``attn``, ``gate``, ``dispatch``, ``ffn``, ``combine``,
      ``head`` or ``optimizer``; ``phase``: ``fwd``, ``bwd`` or ``opt``.
    - ``layer``: -1 for the embedding, ``total_layers`` for the head.
    - ``chunk`` of ``chunks``: the pipelining split of dispatch / ffn / combine.
    - ``flops`` (FLOP), ``hbm_bytes`` (bytes), ``kernels``: compute cost on one rank.
    - ``bytes``: for an all-to-all, the send buffer per rank (including the share that
      stays local); ``communicator``: the group it runs on (``ep``).
    - ``tokens``: token rows this op processes on one rank (for profile look-ups);
      ``shape``: the dimensions that, with ``tokens``, fix its cost.
    - ``waits_for_gradients``: the optimizer step also waits for every gradient
      allreduce micro-op to complete.
    """

    id: int
    name: str
    kind: str
    stream: str
    role: str
    phase: str
    layer: int
    deps: tuple[int, ...] = ()
    chunk: int = 0
    chunks: int = 1
    flops: float = 0.0
    hbm_bytes: float = 0.0
    kernels: tuple[Kernel, ...] = ()
    bytes: float = 0.0
    communicator: str | None = None
    tokens: float = 0.0
    shape: str = ""
    waits_for_gradients: bool = False

    @property
    def profile_key(self) -> str:
        """``role.phase``, the key of a measured profile table."""
        return f"{self.role}.{self.phase}"


@dataclass(frozen=True)
class Communicator:
    """A named communicator: the disjoint rank groups a collective on it runs within."""

    name: str
    groups: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return len(self.groups[0])

    def group_of(self, rank: int) -> tuple[int, ...]:
        return self._group_by_rank[rank]

    @functools.cached_property
    def _group_by_rank(self) -> dict[int, tuple[int, ...]]:
        # Built once: the engine asks per rank and micro-op, and a group can hold 1024 ranks.
        return {r: g for g in self.groups for r in g}


# -- kernel cost helpers: a forward kernel and the kernels of its backward ---------------
@dataclass(frozen=True)
class _Gemm:
    """C[m, n] = A[m, k] @ B[k, n], ``batch`` times."""

    name: str
    m: float
    n: float
    k: float
    batch: float = 1.0

    def fwd(self, db: int) -> list[Kernel]:
        return [_gemm_kernel(self.name, self.m, self.n, self.k, self.batch, db)]

    def bwd(self, db: int) -> list[Kernel]:
        # dA = dC @ B^T and dB = A^T @ dC: two GEMMs of the forward's FLOPs each.
        return [
            _gemm_kernel(self.name + ".dgrad", self.m, self.k, self.n, self.batch, db),
            _gemm_kernel(self.name + ".wgrad", self.k, self.n, self.m, self.batch, db),
        ]


@dataclass(frozen=True)
class _Elementwise:
    """A memory-bound kernel reading ``reads`` and writing ``writes`` elements."""

    name: str
    reads: float
    writes: float

    def fwd(self, db: int) -> list[Kernel]:
        return [Kernel(self.name, 0.0, (self.reads + self.writes) * db)]

    def bwd(self, db: int) -> list[Kernel]:
        # The gradient reads the output gradient and the saved inputs, writes input grads.
        return [Kernel(self.name + ".bwd", 0.0, (self.writes + 2 * self.reads) * db)]


@dataclass(frozen=True)
class _Streaming:
    """A memory-bound kernel of a fixed byte count (the optimizer step); no backward."""

    name: str
    nbytes: float

    def fwd(self, db: int) -> list[Kernel]:
        return [Kernel(self.name, 0.0, self.nbytes)]


@dataclass(frozen=True)
class _Census:
    """The ops of an MoE layer's ``region`` (``gate`` or ``combine``) as the real code of
    the ``kernels`` dispatch style launches them (:mod:`lina_sim.workload.moe_ops`), one
    kernel per launch, forward or backward, at the layer's dimensions ``dims``."""

    region: str
    kernels: str
    dims: tuple[tuple[str, float], ...]

    def _ops(self, phase: str, db: int) -> list[Kernel]:
        out = []
        for op, count, flops, elements in census_ops(self.kernels, self.region, phase, dict(self.dims)):
            name = f"{self.region}.{op.removeprefix('aten::')}" + (".bwd" if phase == BWD else "")
            out += [Kernel(name, flops, elements * db)] * count
        return out

    def fwd(self, db: int) -> list[Kernel]:
        return self._ops(FWD, db)

    def bwd(self, db: int) -> list[Kernel]:
        return self._ops(BWD, db)


def _gemm_kernel(name: str, m: float, n: float, k: float, batch: float, db: int) -> Kernel:
    return Kernel(name, 2.0 * m * n * k * batch, (m * k + k * n + m * n) * batch * db, (m, n, k, batch))


class _GraphBuilder:
    """Builds the op list of one training step for a resolved model."""

    def __init__(
        self, model: ModelSpec, world_size: int, experts_per_device: int, r: int, kernels: str = "einsum"
    ) -> None:
        self.m, self.n, self.k, self.r, self.kernels = model, world_size, experts_per_device, r, kernels
        self.db = model.dtype_bytes
        self.ops: list[Op] = []
        self.grads: list[GradRequest] = []
        self.ep_size = model.experts // experts_per_device
        self.expert_dp_size = world_size // self.ep_size

    # -- op creation --------------------------------------------------------------------
    def expert_ffn_chunks(self, phase: str, l: int, inputs: list[int], rows: float, shape: str) -> list[int]:
        """Layer ``l``'s expert FFN in ``r`` chunks, chunk c after ``inputs[c]`` (its
        dispatch all-to-all forward, its combine backward)."""
        r = len(inputs)
        return [
            self.compute(
                f"L{l}.{phase}.ffn.c{c}",
                "ffn",
                phase,
                l,
                self.ffn_kernels(rows, self.k),
                [inputs[c]],
                rows,
                shape,
                chunk=c,
                chunks=r,
            )
            for c in range(r)
        ]

    def compute(
        self,
        name: str,
        role: str,
        phase: str,
        layer: int,
        kernels: Sequence[Any],
        deps: Iterable[int],
        tokens: float,
        shape: str,
        chunk: int = 0,
        chunks: int = 1,
        **extra: Any,
    ) -> int:
        ks: list[Kernel] = []
        for spec in kernels:
            ks += spec.bwd(self.db) if phase == BWD else spec.fwd(self.db)
        return self._add(
            name=name,
            kind=COMPUTE,
            stream=COMPUTE,
            role=role,
            phase=phase,
            layer=layer,
            deps=tuple(deps),
            chunk=chunk,
            chunks=chunks,
            kernels=tuple(ks),
            flops=sum(x.flops for x in ks),
            hbm_bytes=sum(x.hbm_bytes for x in ks),
            tokens=tokens,
            shape=shape,
            **extra,
        )

    def a2a(self, name: str, role: str, phase: str, layer: int, deps: Iterable[int], chunk: int) -> int:
        m = self.m
        rows = m.tokens * m.top_k * m.capacity_factor / self.r
        return self._add(
            name=name,
            kind=ALL_TO_ALL,
            stream="a2a",
            role=role,
            phase=phase,
            layer=layer,
            deps=tuple(deps),
            chunk=chunk,
            chunks=self.r,
            bytes=rows * m.d_model * self.db,
            communicator="ep",
            tokens=rows,
            shape=f"d_model={m.d_model}",
        )

    def _add(self, **kw: Any) -> int:
        i = len(self.ops)
        self.ops.append(Op(id=i, **kw))
        return i

    def grad(self, names: Sequence[tuple[str, int, bool, int]], ready_after: int) -> None:
        # Backward produces a module's gradients in reverse forward order.
        for name, elems, is_expert, layer in reversed(names):
            comm = "expert_dp" if is_expert else "dp"
            if (self.expert_dp_size if is_expert else self.n) < 2:
                continue  # a group of one rank has nothing to reduce
            self.grads.append(
                GradRequest(
                    name=name,
                    communicator=comm,
                    nbytes=float(elems * self.db),
                    ready_after=ready_after,
                    layer=layer,
                    order=len(self.grads),
                )
            )

    # -- per-op kernel lists (forward shapes; backward derives) --------------------------
    def attn_kernels(self, layer: int) -> list[Any]:
        m = self.m
        T, s, d, b, h = m.tokens, m.seq_len, m.d_model, m.micro_batch, m.heads
        ks: list[Any] = []
        prev = layer - 1
        if layer > 0 and m.is_moe(prev):
            ks += self.combine_out_kernels(prev)
        ks += [_Elementwise("ln_attn", T * d, T * d), _Gemm("qkv", T, 3 * d, d)]
        if m.relative_position:
            # Transformer-XL: project the relative position embeddings, then the
            # position term of the scores (one more score-sized batched GEMM).
            ks += [_Gemm("rel_proj", s, d, d), _Gemm("rel_scores", s, s, d / h, b * h)]
        ks += self._core("attn", s, s)
        if m.has_cross_attention(layer):
            ks += [
                _Elementwise("ln_cross", T * d, T * d),
                _Gemm("cross_q", T, d, d),
                _Gemm("cross_kv", T, 2 * d, d),
            ] + self._core("cross", s, s)
        return ks

    def _core(self, p: str, sq: float, sk: float) -> list[Any]:
        m = self.m
        T, d, b, h = m.tokens, m.d_model, m.micro_batch, m.heads
        # Scores over the full square (no flash attention, as in the paper's DeepSpeed).
        return [
            _Gemm(f"{p}_scores", sq, sk, d / h, b * h),
            _Elementwise(f"{p}_softmax", b * h * sq * sk, b * h * sq * sk),
            _Gemm(f"{p}_values", sq, d / h, sk, b * h),
            _Gemm(f"{p}_out", T, d, d),
            _Elementwise(f"{p}_residual", 2 * T * d, T * d),
        ]

    def _moe_dims(self) -> tuple[tuple[str, float], ...]:
        m = self.m
        T = m.tokens
        return (
            ("S", T),
            ("E", m.experts),
            ("C", T * m.top_k * m.capacity_factor / m.experts),
            ("M", m.d_model),
            ("k", m.top_k),
        )

    def gate_kernels(self) -> list[Any]:
        # The router, the routing and the dispatch into the capacity buffer, as the real
        # code launches them (the op census), after the FFN's layer norm.
        m = self.m
        T, d = m.tokens, m.d_model
        return [_Elementwise("ln_ffn", T * d, T * d), _Census("gate", self.kernels, self._moe_dims())]

    def ffn_kernels(self, rows: float, experts: int) -> list[Any]:
        m = self.m
        d, f = m.d_model, m.d_ff
        per = rows / experts
        ks: list[Any] = []
        for j in range(experts):  # one GEMM pair per local expert
            ks += [
                _Gemm(f"e{j}.w1", per, f, d),
                _Elementwise(f"e{j}.gelu", per * f, per * f),
                _Gemm(f"e{j}.w2", per, d, f),
            ]
        return ks

    def combine_out_kernels(self, layer: int) -> list[Any]:
        # After the combine all-to-all: gather each token's top-k expert outputs from the
        # capacity buffer, weight them by the gate, add the residual. Runs at the start of
        # the next op, so its backward lands right before this layer's backward combine.
        m = self.m
        T, d = m.tokens, m.d_model
        return [
            _Census("combine", self.kernels, self._moe_dims()),
            _Elementwise(f"L{layer}.moe_residual", 2 * T * d, T * d),
        ]

    def dense_ffn_kernels(self) -> list[Any]:
        m = self.m
        T, d = m.tokens, m.d_model
        return (
            [_Elementwise("ln_ffn", T * d, T * d)]
            + self.ffn_kernels(T, 1)
            + [_Elementwise("ffn_residual", 2 * T * d, T * d)]
        )

    def embed_kernels(self) -> list[Any]:
        m = self.m
        T, d = m.tokens, m.d_model
        stacks = 2 if m.encoder_layers else 1
        return [_Elementwise("embed_lookup", stacks * 2 * T * d, stacks * T * d)]

    def head_kernels(self) -> list[Any]:
        m = self.m
        T, d, V = m.tokens, m.d_model, m.vocab
        ks: list[Any] = []
        last = m.total_layers - 1
        if m.is_moe(last):
            ks += self.combine_out_kernels(last)
        return ks + [
            _Elementwise("final_ln", T * d, T * d),
            _Gemm("lm_head", T, V, d),
            _Elementwise("softmax_xent", T * V, T * V),
        ]

    # -- the step -----------------------------------------------------------------------
    def build(self) -> None:
        m, r = self.m, self.r
        T, d = m.tokens, m.d_model
        tensors = m.tensors(self.k)
        by_module: dict[tuple[int, str], list[tuple[str, int, bool, int]]] = {}
        for t in tensors:
            by_module.setdefault((t[3], _module_of(t[0])), []).append(t)
        # Ops holding an MoE layer's gate or combine kernels differ by dispatch style: a
        # measured profile keeps them apart by shape.
        style = f",dispatch={self.kernels}"
        attn_shape = f"d_model={d},heads={m.heads},seq_len={m.seq_len},cross={int(m.encoder_layers > 0)}{style}"
        ffn_shape = f"d_model={d},d_ff={m.d_ff},experts_per_device={self.k}"
        L = m.total_layers

        # Forward.
        prev_out = [self.compute("embed.fwd", "embed", FWD, -1, self.embed_kernels(), (), T, f"d_model={d}")]
        fwd: dict[int, list[int]] = {}  # layer -> the ops producing its output
        for l in range(L):
            deps = list(prev_out)  # every combine chunk of the previous layer
            if m.has_cross_attention(l):
                deps += [x for x in fwd[m.encoder_layers - 1] if x not in deps]
            a = self.compute(f"L{l}.fwd.attn", "attn", FWD, l, self.attn_kernels(l), deps, T, attn_shape)
            if m.is_moe(l):
                g = self.compute(
                    f"L{l}.fwd.gate",
                    "gate",
                    FWD,
                    l,
                    self.gate_kernels(),
                    [a],
                    T,
                    f"d_model={d},experts={m.experts}{style}",
                )
                rows = T * m.top_k * m.capacity_factor / r
                # Program order is all dispatch chunks, then the FFN chunks, then the
                # combine chunks: the a2a stream runs in program order, so chunk c+1's
                # dispatch must precede chunk c's combine for FFN c to overlap it.
                xs = [self.a2a(f"L{l}.fwd.dispatch.c{c}", "dispatch", FWD, l, [g], c) for c in range(r)]
                fs = self.expert_ffn_chunks(FWD, l, xs, rows, ffn_shape)
                outs = [self.a2a(f"L{l}.fwd.combine.c{c}", "combine", FWD, l, [fs[c]], c) for c in range(r)]
                prev_out = outs
            else:
                prev_out = [
                    self.compute(
                        f"L{l}.fwd.ffn",
                        "ffn",
                        FWD,
                        l,
                        self.dense_ffn_kernels(),
                        [a],
                        T,
                        f"d_model={d},d_ff={m.d_ff},dense=1",
                    )
                ]
            fwd[l] = list(prev_out)
        head = self.compute(
            "head.fwd", "head", FWD, L, self.head_kernels(), prev_out, T, f"d_model={d},vocab={m.vocab}{style}"
        )

        # Backward, layers in reverse; gradients become ready where their module's
        # backward ends.
        head_shape = f"d_model={d},vocab={m.vocab}{style}"
        last = self.compute("head.bwd", "head", BWD, L, self.head_kernels(), [head], T, head_shape)
        self.grad(by_module.get((L, "head"), []), last)
        for l in reversed(range(L)):
            if m.is_moe(l):
                rows = T * m.top_k * m.capacity_factor / r
                xs = [self.a2a(f"L{l}.bwd.combine.c{c}", "combine", BWD, l, [last], c) for c in range(r)]
                fs = self.expert_ffn_chunks(BWD, l, xs, rows, ffn_shape)
                dispatch = [self.a2a(f"L{l}.bwd.dispatch.c{c}", "dispatch", BWD, l, [fs[c]], c) for c in range(r)]
                # Expert weight gradients accumulate over chunks: ready after the last one.
                self.grad(by_module.get((l, "expert"), []), fs[-1])
                g = self.compute(
                    f"L{l}.bwd.gate",
                    "gate",
                    BWD,
                    l,
                    self.gate_kernels(),
                    dispatch,
                    T,
                    f"d_model={d},experts={m.experts}{style}",
                )
                self.grad(by_module.get((l, "gate"), []), g)
                last = g
            else:
                last = self.compute(
                    f"L{l}.bwd.ffn",
                    "ffn",
                    BWD,
                    l,
                    self.dense_ffn_kernels(),
                    [last],
                    T,
                    f"d_model={d},d_ff={m.d_ff},dense=1",
                )
                self.grad(by_module.get((l, "gate"), []), last)
            last = self.compute(f"L{l}.bwd.attn", "attn", BWD, l, self.attn_kernels(l), [last], T, attn_shape)
            self.grad(by_module.get((l, "attn"), []), last)
        last = self.compute("embed.bwd", "embed", BWD, -1, self.embed_kernels(), [last], T, f"d_model={d}")
        self.grad(by_module.get((-1, "embed"), []), last)

        # Optimizer step (Adam, memory-bound) over this rank's parameters, after every
        # gradient is reduced: DDP and DeepSpeed synchronise before the step.
        params = m.param_counts(self.k)
        local = params.non_expert + params.expert
        self.compute(
            "optimizer",
            "optimizer",
            OPT,
            -1,
            [_Streaming("adam", ADAM_BYTES_PER_PARAM * local)],
            [last],
            0.0,
            f"params={local}",
            waits_for_gradients=True,
        )


def _module_of(tensor: str) -> str:
    """Which op's backward produces a tensor's gradient."""
    if tensor.startswith("embed."):
        return "embed"
    if tensor in ("final_ln", "lm_head"):
        return "head"
    leaf = tensor.split(".", 1)[1]
    if leaf.startswith("expert"):
        return "expert"
    if leaf.startswith(("ln_ffn", "gate", "ffn.")):
        return "gate"  # pre-FFN LayerNorm and gate (or dense FFN) finish with the gate/FFN op
    return "attn"


# ---------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingGraph:
    """One training step of ``model`` on ``world_size`` ranks, as plain data.

    - ``ops``: compute and all-to-all ops in program order (same on every rank).
    - ``grad_requests``: one per parameter tensor whose gradient must be reduced, in the
      order the backward produces them; a policy partitions them into allreduce
      micro-ops (:meth:`micro_ops`).
    - ``communicators``: ``dp`` (all ranks), ``ep`` (ranks exchanging tokens), and
      ``expert_dp`` (ranks holding the same experts).
    """

    model: ModelSpec
    world_size: int
    experts_per_device: int
    pipeline_degree: int
    ops: tuple[Op, ...]
    grad_requests: tuple[GradRequest, ...]
    communicators: Mapping[str, Communicator]

    def a2a_micro_ops(self) -> tuple[MicroOp, ...]:
        """One micro-op per all-to-all op, numbered in program order per communicator."""
        out, seq = [], {}
        for op in self.ops:
            if op.kind != ALL_TO_ALL:
                continue
            s = seq.get(op.communicator, 0)
            seq[op.communicator] = s + 1
            out.append(
                MicroOp(
                    id=op.name,
                    kind=ALL_TO_ALL,
                    communicator=op.communicator,
                    seq=s,
                    nbytes=op.bytes,
                    layer=op.layer,
                    phase=op.phase,
                    role=op.role,
                    chunk=op.chunk,
                    chunks=op.chunks,
                    op_id=op.id,
                )
            )
        return tuple(out)

    def micro_ops(self, policy: Any) -> tuple[MicroOp, ...]:
        """Every collective of the step under ``policy``: the all-to-all micro-ops, then
        the allreduce micro-ops from ``policy.partition_gradients``."""
        return self.a2a_micro_ops() + tuple(policy.partition_gradients(self.grad_requests))

    def totals(self, phase: str | None = None) -> dict[str, float]:
        """Summed flops, hbm_bytes and all-to-all bytes per rank (optionally one phase)."""
        ops = [o for o in self.ops if phase is None or o.phase == phase]
        return {
            "flops": sum(o.flops for o in ops),
            "hbm_bytes": sum(o.hbm_bytes for o in ops),
            "a2a_bytes": sum(o.bytes for o in ops if o.kind == ALL_TO_ALL),
            "grad_bytes": sum(g.nbytes for g in self.grad_requests),
        }

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)


def packing_candidates(model: ModelSpec, world_size: int) -> list[int]:
    """Valid experts-per-device values k (ascending): k divides the experts and the
    expert-parallel group of experts/k ranks divides the world."""
    e = model.experts or world_size
    return [k for k in range(1, e + 1) if e % k == 0 and world_size % (e // k) == 0]


# The builder's arguments that are plain numbers (callers are code, so the error paths
# are the argument names).
WORLD_SIZE = Field(int, minimum=1, help="ranks (GPUs) in the cluster")
PIPELINE_DEGREE = Field(int, minimum=1, help="chunks of each all-to-all and expert FFN, along tokens")


def _world(cluster: Any) -> int:
    n = cluster if isinstance(cluster, int) else cluster.world_size
    return WORLD_SIZE.check(n, "cluster.world_size")


def build_training_graph(
    model: ModelSpec,
    cluster: Any,
    experts_per_device: int | None = None,
    pipeline_degree: int = 1,
    dispatch_kernels: str = "einsum",
) -> TrainingGraph:
    """The op graph of one training step.

    ``cluster`` is a :class:`~lina_sim.hardware.spec.ClusterSpec` or a world size.
    ``experts_per_device`` (None: the smallest valid, normally 1) packs experts; the
    expert-parallel group then has ``experts / experts_per_device`` ranks.
    ``pipeline_degree`` r splits every dispatch all-to-all, expert FFN and combine
    all-to-all into r chunks along tokens (total bytes and FLOPs are preserved).
    ``dispatch_kernels``: how tokens enter and leave the experts' capacity buffer
    (``einsum``, DeepSpeed-MoE; ``sparse``, Tutel; :mod:`lina_sim.workload.moe_ops`).
    """
    if dispatch_kernels not in DISPATCH_KERNELS:
        raise ConfigError("dispatch_kernels", f"unknown dispatch kernels {dispatch_kernels!r}", DISPATCH_KERNELS)
    n = _world(cluster)
    model = model.resolve(n)
    cands = packing_candidates(model, n)
    k = cands[0] if experts_per_device is None else experts_per_device
    if k not in cands:
        raise ConfigError(
            "experts_per_device", f"{k} experts per device do not fit {model.experts} experts on {n} GPUs", cands
        )
    pipeline_degree = PIPELINE_DEGREE.check(pipeline_degree, "pipeline_degree")
    return _built_graph(model, n, k, pipeline_degree, dispatch_kernels)


@functools.lru_cache(maxsize=8)
def _built_graph(model: ModelSpec, n: int, k: int, pipeline_degree: int, kernels: str) -> TrainingGraph:
    """The graph of a checked shape, kept: the packing estimates build every candidate k
    and the engine then builds the chosen one again (seconds each at 1024 GPUs). The
    graph is immutable, so sharing it is safe."""
    b = _GraphBuilder(model, n, k, pipeline_degree, kernels)
    b.build()
    ep = b.ep_size
    comms = {
        "dp": Communicator("dp", (tuple(range(n)),)),
        "ep": Communicator("ep", tuple(tuple(range(g * ep, (g + 1) * ep)) for g in range(n // ep))),
        "expert_dp": Communicator("expert_dp", tuple(tuple(range(i, n, ep)) for i in range(ep))),
    }
    return TrainingGraph(
        model=model,
        world_size=n,
        experts_per_device=k,
        pipeline_degree=pipeline_degree,
        ops=tuple(b.ops),
        grad_requests=tuple(b.grads),
        communicators=comms,
    )


def micro_op_estimates(
    model: ModelSpec,
    cluster: Any,
    pipeline_degree: int,
    ffn_time: Callable[[Op], float],
    a2a_time: Callable[[Op, Communicator], float],
    allreduce_time: Callable[[float, Communicator], float] | None = None,
    dispatch_kernels: str = "einsum",
) -> Mapping[int, PackingEstimate]:
    """For every valid packing k, its :class:`PackingEstimate` from the caller's timing
    functions (a compute model for every compute op, and the network for an all-to-all
    op and, with ``allreduce_time(bytes, communicator)``, a gradient allreduce, each run
    alone). Feed it to ``policy.experts_per_device``. Each k is worked out when first
    looked up (:class:`LazyEstimates`)."""
    n = _world(cluster)
    model = model.resolve(n)
    if not model.moe_layer_ids:
        raise ConfigError("model.moe_layers", "no MoE layer: nothing to pack", "at least one layer index")
    return LazyEstimates(
        packing_candidates(model, n),
        lambda k: _packing_estimate(model, n, k, pipeline_degree, ffn_time, a2a_time, allreduce_time, dispatch_kernels),
    )


def _packing_estimate(
    model: ModelSpec,
    n: int,
    k: int,
    pipeline_degree: int,
    ffn_time: Callable[[Op], float],
    a2a_time: Callable[[Op, Communicator], float],
    allreduce_time: Callable[[float, Communicator], float] | None,
    dispatch_kernels: str,
) -> PackingEstimate:
    g = build_training_graph(model, n, k, pipeline_degree, dispatch_kernels)
    ffn = next(o for o in g.ops if o.role == "ffn" and o.phase == FWD and model.is_moe(o.layer))
    ep = g.communicators["ep"]
    a2a_by_bytes: dict[float, float] = {}
    a2a_s = 0.0
    compute_s = backward_s = 0.0
    for o in g.ops:
        if o.kind == ALL_TO_ALL:
            if o.bytes not in a2a_by_bytes:
                a2a_by_bytes[o.bytes] = a2a_time(o, ep)
            a2a_s += a2a_by_bytes[o.bytes]
        else:
            t = ffn_time(o)
            compute_s += t
            backward_s += t if o.phase == BWD else 0.0
    allreduce = {"dp": 0.0, "expert_dp": 0.0}
    if allreduce_time is not None:
        for name in allreduce:
            nbytes = sum(r.nbytes for r in g.grad_requests if r.communicator == name)
            comm = g.communicators[name]
            allreduce[name] = allreduce_time(nbytes, comm) if nbytes > 0 and comm.size > 1 else 0.0
    first_a2a = next(o for o in g.ops if o.kind == ALL_TO_ALL)
    return PackingEstimate(
        ffn_time(ffn),
        a2a_by_bytes[first_a2a.bytes],
        compute_s,
        backward_s,
        a2a_s,
        allreduce["dp"],
        allreduce["expert_dp"],
    )


class LazyEstimates(Mapping):
    """Packing estimates keyed by k, each computed on first look: a policy that never
    reads them (every one but a packing ``lina``) or reads only the k it may choose
    (``max_experts_per_device``) costs no graph builds and no alone-time simulations for
    the rest, which at 1024 GPUs are seconds per packing candidate."""

    def __init__(self, keys: Sequence[int], compute: Callable[[int], PackingEstimate]):
        self._keys = tuple(keys)
        self._compute = compute
        self._done: dict[int, PackingEstimate] = {}

    def __getitem__(self, k: int) -> PackingEstimate:
        if k not in self._keys:
            raise KeyError(k)
        if k not in self._done:
            self._done[k] = self._compute(k)
        return self._done[k]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def graph_for_policy(
    model: ModelSpec,
    cluster: Any,
    policy: Any,
    ffn_time: Callable[[Op], float] | None = None,
    a2a_time: Callable[[Op, Communicator], float] | None = None,
    allreduce_time: Callable[[float, Communicator], float] | None = None,
) -> TrainingGraph:
    """The step graph shaped by ``policy``: its pipelining degree and its packing.

    A policy that packs experts (``lina``) needs ``ffn_time`` (e.g. a compute model's
    ``op_time``, used for every compute op) and ``a2a_time`` (an all-to-all op run alone
    on its communicator, from the network), and ``allreduce_time`` (bytes on a
    communicator, alone) for its cost rule to see the gradient allreduces.
    """
    n = _world(cluster)
    model = model.resolve(n)
    estimates = None
    if ffn_time is not None and a2a_time is not None:
        estimates = micro_op_estimates(
            model, n, policy.pipeline_degree, ffn_time, a2a_time, allreduce_time, policy.dispatch_kernels
        )
    k = policy.experts_per_device(packing_candidates(model, n), estimates)
    return build_training_graph(model, n, k, policy.pipeline_degree, policy.dispatch_kernels)
