"""Compute and weight-swap times of one inference batch, per device (roofline).

Inference runs the forward pass only, on a data-parallel batch: each device holds a
contiguous slice of the batch's tokens (:func:`~lina_sim.policies.placement.token_sources`)
and runs the dense part of every layer on it; the MoE FFN of a layer runs on whatever
tokens the placement routes to the device's experts.

Kernels per device and layer (FLOP and HBM bytes; ``T`` tokens on the device, ``S`` the
sum over those tokens of their sequence's length, i.e. the attention keys they score,
``d`` d_model, ``f`` d_ff, ``h`` heads, ``E`` experts, ``k`` top-k, ``b`` dtype bytes):

- attention: layer norm, QKV projection (``2*T*d*3d``), scores and values
  (``2*S*d`` each; full attention over each sequence, no flash kernel, as the
  training workload models DeepSpeed), softmax over ``h*S`` scores, output projection
  (``2*T*d*d``), residual; Transformer-XL adds its relative-position score term
  (``2*S*d``) and projection (``2*T*d*d``, an upper bound: one position row per token);
- gate: layer norm, ``T x E`` gate GEMM, top-k softmax, scatter of ``k*T`` rows;
- combine-out: gather each token's ``k`` expert outputs and add the residual;
- expert FFN of a device, as the serving implementation runs it (``ffn``, see
  :data:`FFN_KERNELS`):

  - ``grouped`` (default; vLLM's fused MoE, MegaBlocks, SGLang): one launch per kernel
    for all of the device's experts. Following vLLM's
    ``vllm/model_executor/layers/fused_moe/fused_moe.py``: ``fused_experts_impl`` runs
    ``moe_align_block_size`` (sorts the rows by expert and pads each expert's row count
    up to a multiple of ``BLOCK_SIZE_M``), then ``invoke_fused_moe_kernel`` for ``w1``
    (``fused_moe_kernel``: one program per ``BLOCK_SIZE_M`` rows of one expert, so a
    padded tile costs the FLOP of a full one), the activation, and
    ``invoke_fused_moe_kernel`` for ``w2``. ``BLOCK_SIZE_M`` is what
    ``get_default_config`` picks for an unquantized dtype: 16 when the device's tokens
    ``M <= E`` (its experts), else 64 (:func:`block_size_m`). Each expert with tokens
    has its weights read from HBM once per GEMM (its ``N x K`` tiles, reused across its
    row blocks through L2); an expert without tokens launches no program and reads
    nothing. The top-k sum (``moe_sum``) is part of combine-out below;
  - ``per-expert`` (DeepSpeed-MoE era): a loop over the device's experts, each with
    ``r > 0`` tokens running its own ``r x f x d`` GEMM, GELU and ``r x d x f`` GEMM
    (three launches, weights read once per GEMM, no padding);
- head: the embedding lookup before layer 0; final norm and LM-head GEMM after the last.

Each kernel takes :meth:`RooflineComputeModel.kernel_time`, launch overhead included.
Weight swaps: ``expert_bytes`` per expert over the device's PCIe link (host to device) at
its effective bandwidth, plus the link latency per swapped expert.

Units: seconds, bytes, FLOP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numba
import numpy as np

from lina_sim.errors import ConfigError
from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.network.serving_a2a import AllToAllTimer
from lina_sim.policies.placement import Placement
from lina_sim.policies.placement.layout import assign_many, assign_shares, send_matrices
from lina_sim.workload.model import ModelSpec

# How a device runs its experts' FFN (module docstring).
FFN_KERNELS: tuple[str, ...] = ("grouped", "per-expert")
# vLLM fused_moe.py, get_default_config (unquantized): BLOCK_SIZE_M 16 when M <= E, else 64.
_BLOCK_M_FEW_TOKENS, _BLOCK_M = 16, 64
# moe_align_block_size reads each row's expert id and writes its sorted row index (int32).
_ALIGN_BYTES_PER_ROW = 8


def block_size_m(tokens: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """vLLM's default ``BLOCK_SIZE_M`` for a device with ``tokens`` rows over ``experts``
    local experts (fused_moe.py, ``get_default_config``, unquantized): 16 if
    ``tokens <= experts`` else 64."""
    return np.where(np.asarray(tokens) <= np.asarray(experts), _BLOCK_M_FEW_TOKENS, _BLOCK_M)


def padded_rows(rows: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``rows [..., experts]`` → ``[...]``: rows after ``moe_align_block_size`` pads each
    expert's count up to a multiple of ``block`` (``[...]``, one block size per device)."""
    r = np.asarray(rows, dtype=np.float64)
    b = np.asarray(block, dtype=np.float64)[..., None]
    return (np.ceil(r / b) * b).sum(axis=-1)


def grouped_gemm_time(
    roofline: RooflineComputeModel, rows: np.ndarray, k_in: int, n_out: int, dtype_bytes: int, bias: bool = True
) -> np.ndarray:
    """Seconds of one grouped GEMM (vLLM's ``fused_moe_kernel``, one launch) over
    ``rows [..., experts]`` tokens per expert, each expert an ``[n_out, k_in]`` weight
    (plus a bias row if ``bias``): FLOP on the padded rows, HBM bytes of the real rows'
    activations in and out plus the weights of every expert with rows. ``[...]`` s;
    zero where no expert has rows."""
    r = np.asarray(rows, dtype=np.float64)
    total = r.sum(axis=-1)
    active = (r > 0).sum(axis=-1)
    padded = padded_rows(r, block_size_m(total, active))
    flops = 2.0 * k_in * n_out * padded
    nbytes = (total * (k_in + n_out) + active * (k_in * n_out + (n_out if bias else 0))) * dtype_bytes
    t = np.maximum(flops / roofline.flops_per_s, nbytes / roofline.bytes_per_s) + roofline.launch_s
    return np.where(total > 0, t, 0.0)


_COEFS = ("ft", "fs", "bt", "bs", "b0")


@dataclass(frozen=True)
class _LinearKernel:
    """A kernel whose FLOP and bytes are affine in two per-device variables:
    ``flops = ft*T + fs*S``, ``bytes = bt*T + bs*S + b0`` (b0: weights read)."""

    ft: float = 0.0
    fs: float = 0.0
    bt: float = 0.0
    bs: float = 0.0
    b0: float = 0.0


class InferenceCostModel:
    """Per-device compute times (s) of one inference batch for ``model`` on ``cluster``;
    ``ffn`` is how a device runs its experts (:data:`FFN_KERNELS`, module docstring)."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, top_k: int, ffn: str = "grouped"):
        if ffn not in FFN_KERNELS:
            raise ConfigError("serving.ffn", f"unknown expert FFN implementation {ffn!r}", FFN_KERNELS)
        self.ffn = ffn
        self.model = model
        self._coef: dict[tuple[tuple[_LinearKernel, ...], int], tuple[np.ndarray, ...]] = {}
        self.roofline = RooflineComputeModel.from_cluster(cluster, model.dtype)
        self.top_k = top_k
        m, b = model, model.dtype_bytes
        d, f, h, e, k = m.d_model, m.d_ff, m.heads, m.experts, top_k
        self.token_bytes = float(d * b)
        self.expert_params = 2 * d * f + f + d
        self.expert_bytes = float(self.expert_params * b)
        self.pcie_bandwidth = cluster.pcie.effective_bandwidth
        self.pcie_latency = cluster.pcie.latency
        attn = [
            _LinearKernel(bt=2 * d * b),  # layer norm
            _LinearKernel(ft=2 * 3 * d * d, bt=4 * d * b, b0=3 * d * d * b),  # QKV
            # Scores: each token's query and key read once, h scores per (token, key) written.
            _LinearKernel(fs=2 * d, bt=2 * d * b, bs=h * b),
            _LinearKernel(bs=2 * h * b),  # softmax
            _LinearKernel(fs=2 * d, bt=2 * d * b, bs=h * b),  # values: probs, values, out
            _LinearKernel(ft=2 * d * d, bt=2 * d * b, b0=d * d * b),  # output projection
            _LinearKernel(bt=3 * d * b),  # residual
        ]
        if m.relative_position:
            attn += [
                _LinearKernel(ft=2 * d * d, bt=2 * d * b, b0=d * d * b),  # position projection
                _LinearKernel(fs=2 * d, bt=2 * d * b, bs=h * b),
            ]  # position scores
        self._attn = attn
        self._gate = [
            _LinearKernel(bt=2 * d * b),  # layer norm
            _LinearKernel(ft=2 * d * e, bt=(d + e) * b, b0=d * e * b),  # gate GEMM
            _LinearKernel(bt=2 * e * b),  # top-k softmax
            _LinearKernel(bt=2 * k * d * b),  # scatter into the dispatch buffer
        ]
        self._combine_out = [_LinearKernel(bt=(k * d + 2 * d) * b)]
        self._embed = [_LinearKernel(bt=2 * d * b)]
        self._head = [
            _LinearKernel(bt=2 * d * b),  # final norm
            _LinearKernel(ft=2 * d * m.vocab, bt=(d + m.vocab) * b, b0=d * m.vocab * b),
        ]
        # Per-expert FFN, per (device, expert): affine in its rows r.
        self._ffn = [
            _LinearKernel(ft=2 * d * f, bt=(d + f) * b, b0=(d * f + f) * b),  # w1
            _LinearKernel(bt=2 * f * b),  # GELU
            _LinearKernel(ft=2 * f * d, bt=(f + d) * b, b0=(f * d + d) * b),  # w2
        ]

    # -- helpers -------------------------------------------------------------------------
    def _time(self, kernels: list[_LinearKernel], T: np.ndarray, S: np.ndarray | float = 0.0) -> np.ndarray:
        """Seconds per device for token counts ``T`` (and key counts ``S``); devices with
        no tokens launch nothing."""
        T = np.asarray(T, dtype=np.float64)
        S = np.broadcast_to(np.asarray(S, dtype=np.float64), T.shape)
        rl = self.roofline
        if len(kernels) == 1:
            kern = kernels[0]
            flops = kern.ft * T + kern.fs * S
            nbytes = kern.bt * T + kern.bs * S + kern.b0
            total = np.maximum(flops / rl.flops_per_s, nbytes / rl.bytes_per_s) + rl.launch_s
            return np.where(T > 0, total, 0.0)
        # Every kernel at once, ``[kernels, ...]``: the same elementwise terms, summed in
        # kernel order (a reduction over the leading axis adds its rows one by one).
        ft, fs, bt, bs, b0 = self._coefficients(kernels, T.ndim)
        flops = ft * T + fs * S
        nbytes = bt * T + bs * S + b0
        total = np.add.reduce(np.maximum(flops / rl.flops_per_s, nbytes / rl.bytes_per_s) + rl.launch_s, axis=0)
        return np.where(T > 0, total, 0.0)

    def _coefficients(self, kernels: list[_LinearKernel], ndim: int) -> tuple[np.ndarray, ...]:
        """``kernels``' five coefficients as ``[kernels, 1, ...]`` columns for ``ndim``-d counts."""
        key = (tuple(kernels), ndim)
        hit = self._coef.get(key)
        if hit is None:
            shape = (len(kernels),) + (1,) * ndim
            hit = tuple(np.array([getattr(k, f) for k in kernels], dtype=np.float64).reshape(shape) for f in _COEFS)
            self._coef[key] = hit
        return hit

    # -- per batch -----------------------------------------------------------------------
    def dense_layer(self, tokens: np.ndarray, keys: np.ndarray, first: bool) -> np.ndarray:
        """``[devices]`` s: (combine-out of the previous MoE layer unless ``first``),
        attention and gate of one layer, for ``tokens`` and ``keys`` per device."""
        t = self._time(self._attn, tokens, keys) + self._time(self._gate, tokens)
        return t if first else t + self._time(self._combine_out, tokens)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return self._time(self._embed, tokens)

    def head(self, tokens: np.ndarray) -> np.ndarray:
        """``[devices]`` s: the last layer's combine-out, final norm and LM head."""
        return self._time(self._combine_out + self._head, tokens)

    def expert_ffn(self, rows: np.ndarray) -> np.ndarray:
        """``rows [..., experts, devices]`` tokens each (expert, device) computes →
        ``[..., devices]`` s of expert FFN, run as :attr:`ffn` says (module docstring)."""
        if self.ffn == "per-expert":
            return self._time(self._ffn, rows).sum(axis=-2)
        r = np.swapaxes(np.asarray(rows, dtype=np.float64), -1, -2)  # [..., devices, experts]
        m, b = self.model, self.model.dtype_bytes
        total = r.sum(axis=-1)
        w1 = grouped_gemm_time(self.roofline, r, m.d_model, m.d_ff, b)
        w2 = grouped_gemm_time(self.roofline, r, m.d_ff, m.d_model, b)
        align = self._time([_LinearKernel(bt=_ALIGN_BYTES_PER_ROW)], total)
        act = self._time([_LinearKernel(bt=2 * m.d_ff * b)], total)
        return align + w1 + act + w2

    def swap_time(self, experts: np.ndarray) -> np.ndarray:
        """``[devices]`` s to load ``experts`` expert weight sets each over PCIe."""
        n = np.asarray(experts, dtype=np.float64)
        return np.where(n > 0, n * (self.expert_bytes / self.pcie_bandwidth + self.pcie_latency), 0.0)


class ServingCharge:
    """What the serving simulator charges one MoE layer of one batch under a candidate
    placement (the :class:`~lina_sim.policies.placement.charge.LayerCharge` it binds to
    its policies), in seconds:

    ``dispatch + max_d(wait_d + ffn_d) + combine``, as :class:`~lina_sim.serving.server.
    PolicyServer` times a layer: the dispatch and combine all-to-alls of the placement's
    send matrix timed alone on the simulated network (``exact``: the same
    :class:`~lina_sim.network.serving_a2a.AllToAllTimer` the server uses), each device's
    expert FFN from :meth:`InferenceCostModel.expert_ffn` (on a shared host, processor
    sharing of its cores, as the server applies), and ``wait_d``: the PCIe time of the
    experts ``missing(layer, placement)`` says device ``d`` must load, less what hides
    behind it before the layer's dispatch ends: :attr:`window` (s per layer, set per
    batch by the server: the compute and the earlier layers between the swap's issue and
    the layer's gate) and the dispatch. The swap term is a proxy (the server queues swaps
    on one PCIe link per device, and times earlier layers as they run); with every
    expert resident it is zero and the charge is exact.

    ``quick`` ranks candidates in a search: fractional token splits (each expert's
    tokens times its shares) for the FFN instead of whole ones, and instead of the timer
    a bound of the all-to-all: per step the busiest GPU's intra-node bytes over its
    NVLink bandwidth or the busiest node's inter-node bytes over its NICs, whichever is
    longer, plus the link latency.
    """

    def __init__(
        self,
        cost: InferenceCostModel,
        cluster: ClusterSpec,
        timer: AllToAllTimer,
        missing: Callable[[int, Placement], np.ndarray] | None = None,
        on_host: Callable[[np.ndarray], np.ndarray] | None = None,
        missing_many: Callable[[int, Sequence[Placement]], np.ndarray] | None = None,
    ) -> None:
        self.cost, self.cluster, self.timer = cost, cluster, timer
        self.missing = missing
        # ``missing`` of several placements at once, ``[candidates, devices]`` (optional:
        # the same numbers in one array call instead of one per candidate).
        self.missing_many = missing_many
        self.on_host = on_host
        # s per layer from a swap's issue to the layer's gate (scalar: the same for all).
        self.window: float | np.ndarray = 0.0
        n, g = cluster.world_size, cluster.gpus_per_node
        # Ranks are node-major: each node's devices are one contiguous range.
        self._node_start = np.arange(0, n, g)
        self._first = (np.arange(n) // g) * g  # [N] first device of each device's node
        self._last = np.minimum(self._first + g, n) - 1
        self._nic_bw = cluster.nic.effective_bandwidth * cluster.nics_per_node
        self._nvl_bw = cluster.nvlink.effective_bandwidth

    def _after_parts(
        self, items: Sequence[tuple[int, Sequence[Placement], np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """What a layer's charge adds after its dispatch, for every candidate of
        ``items`` (item after item): ``ffn [C, devices]`` s of expert FFN (processor
        sharing applied on a shared host) and ``late [C, devices]``, the PCIe time of the
        candidate's missing experts less the window (``None`` without ``missing``). A
        candidate's ``wait_d + ffn_d`` (class docstring) is then ``ffn + max(late -
        dispatch, 0)``: the all-to-alls enter only there (:func:`_charged`)."""
        sizes = [len(p) for _, p, _ in items]
        ps = [p for _, pl, _ in items for p in pl]
        counts = np.concatenate(
            [
                np.broadcast_to(np.asarray(cbs).sum(axis=0), (k, np.shape(cbs)[1]))
                for (_, _, cbs), k in zip(items, sizes)
            ]
        )
        ffn = self.cost.expert_ffn(assign_many(ps, counts))  # [C, N]
        if self.on_host is not None:
            ffn = np.stack([self.on_host(f) for f in ffn])
        if self.missing is None:
            return ffn, None
        if self.missing_many is None:
            late = [self._swap_times(layer, pl) - self._window(layer) for layer, pl, _ in items]
            return ffn, np.concatenate(late)
        which = np.repeat(np.arange(len(items)), sizes)
        layers = np.array([layer for layer, _, _ in items], dtype=np.int64)[which]
        w = np.array([self._window(layer) for layer, _, _ in items])[which]
        return ffn, self.cost.swap_time(self.missing_many(layers, ps)) - w[:, None]

    def _swap_times(self, layer: int, placements: Sequence[Placement]) -> np.ndarray:
        """``[candidates, devices]`` s of PCIe loads each candidate needs (``missing``)."""
        if self.missing_many is not None:
            return self.cost.swap_time(self.missing_many(layer, list(placements)))
        return np.stack([self.cost.swap_time(self.missing(layer, p)) for p in placements])

    def _window(self, layer: int) -> float:
        w = np.asarray(self.window, dtype=np.float64)
        return float(w) if w.ndim == 0 else float(w[layer])

    def _sends(self, placements: Sequence[Placement], cbs: np.ndarray) -> np.ndarray:
        return send_matrices(placements, cbs).astype(np.float64) * self.cost.token_bytes

    def _sends_many(self, items: Sequence[tuple[int, Sequence[Placement], np.ndarray]]) -> list[np.ndarray]:
        """:meth:`_sends` of each item, built in one :func:`send_matrices` call (whole
        tokens: the same matrices)."""
        sizes = [len(p) for _, p, _ in items]
        ps = [p for _, pl, _ in items for p in pl]
        if not ps:
            return [self._sends(p, c) for _, p, c in items]
        cbs = np.stack([np.asarray(c, dtype=np.int64) for _, _, c in items])
        which = np.repeat(np.arange(len(items)), sizes)  # each candidate's item
        sends = send_matrices(ps, cbs, which).astype(np.float64) * self.cost.token_bytes
        return np.split(sends, np.cumsum(sizes)[:-1])

    def _quick_a2a(
        self,
        placements: Sequence[Placement],
        counts_by_source: np.ndarray,
        item_of: np.ndarray | None = None,
        share: np.ndarray | None = None,
    ) -> np.ndarray:
        """``[C]`` s: the bound in the class docstring for each candidate's dispatch. Its
        combine, the transposed matrix, has the same bound (the larger of each GPU's and
        node's bytes out and in). ``counts_by_source`` is one ``[N, E]`` for all
        candidates, or with ``item_of`` (``[C]``) a stack ``[items, N, E]`` and the item
        of each candidate; ``share`` the candidates' share matrices if already stacked.

        Read off how :meth:`Placement.send_matrix` is built, without building it: per
        expert, each device's tokens beyond its own replica's quota (:meth:`Placement.
        assign`) and each replica's quota left are laid out as consecutive intervals in
        device order and matched by overlap. A device's tokens to its own node are then
        the overlap of its interval with that node's (contiguous) quota range, and
        likewise inbound. Whole tokens, so the sums, and the bound, are what the matrix
        gives to the bit."""
        cbs = np.asarray(counts_by_source, dtype=np.int64)
        if item_of is None:
            cbs, item_of = cbs[None], np.zeros(len(placements), dtype=np.int64)
        if share is None:
            share = np.stack([p.share_matrix for p in placements])  # [C, E, N]
        quota = assign_shares(share, cbs.sum(axis=1)[item_of])  # what assign gives each candidate
        nic, nvl = self.cluster.nic.latency, self.cluster.nvlink.latency
        return _quick_a2a_kernel(
            np.ascontiguousarray(cbs.transpose(0, 2, 1)),
            item_of,
            quota,
            self._first,
            self._last,
            self._node_start,
            self.cost.token_bytes,
            self._nvl_bw,
            self._nic_bw,
            nic,
            nvl,
        )

    def quick(self, layer: int, placements: Sequence[Placement], counts_by_source: np.ndarray) -> np.ndarray:
        cbs = np.asarray(counts_by_source, dtype=np.float64)
        share = np.stack([p.share_matrix for p in placements])  # [C, E, N]
        quota = cbs.sum(axis=0)[None, :, None] * share  # fractional tokens per replica
        d = self._quick_a2a(placements, counts_by_source, share=share)
        c = d  # the combine's bound is the dispatch's (see _quick_a2a)
        ffn = self.cost.expert_ffn(quota)
        if self.on_host is not None:
            ffn = np.stack([self.on_host(f) for f in ffn])
        if self.missing is not None:
            ffn = ffn + np.maximum(self._swap_times(layer, placements) - self._window(layer) - d[:, None], 0.0)
        return d + ffn.max(axis=1) + c

    def quick_many(self, items: Sequence[tuple[int, Sequence[Placement], np.ndarray]]) -> list[np.ndarray]:
        """:meth:`quick` of each ``(layer, placements, counts_by_source)`` item, to the
        bit, in one pass over all their candidates (a search steps every layer of a batch
        at once: one call instead of one per layer). Every term is elementwise or a
        reduction within one candidate, so a candidate's charge does not depend on the
        others computed with it."""
        items = [(layer, list(ps), np.asarray(c)) for layer, ps, c in items]
        if not items:
            return []
        if self.missing is not None and self.missing_many is None:
            return [self.quick(layer, ps, c) for layer, ps, c in items]
        sizes = [len(ps) for _, ps, _ in items]
        ps = [p for _, pl, _ in items for p in pl]
        if not ps:
            return [np.zeros(0) for _ in items]
        which = np.repeat(np.arange(len(items)), sizes)  # each candidate's item
        cbs = np.stack([c.astype(np.int64) for _, _, c in items])  # [items, N, E]
        # Per candidate its item's per-expert totals, as quick sums them (whole numbers: exact).
        counts = np.stack([c.astype(np.float64).sum(axis=0) for _, _, c in items])[which]
        share = np.stack([p.share_matrix for p in ps])  # [C, E, N]
        quota = counts[:, :, None] * share
        d = self._quick_a2a(ps, cbs, which, share)
        ffn = self.cost.expert_ffn(quota)
        if self.on_host is not None:
            ffn = np.stack([self.on_host(f) for f in ffn])
        if self.missing is not None:
            layers = np.array([layer for layer, _, _ in items], dtype=np.int64)[which]
            w = np.array([self._window(layer) for layer, _, _ in items])[which]
            swap = self.cost.swap_time(self.missing_many(layers, ps))
            ffn = ffn + np.maximum(swap - w[:, None] - d[:, None], 0.0)
        total = d + ffn.max(axis=1) + d
        return np.split(total, np.cumsum(sizes)[:-1])

    def exact(self, items: Sequence[tuple[int, Sequence[Placement], np.ndarray]]) -> list[np.ndarray]:
        sends = self._sends_many(items) if items else []
        if not sends or not any(len(p) for _, p, _ in items):
            return [np.zeros(0) for _ in items]
        return self._totals(items, sends, self.timer.times, *self._after_parts(items))

    @staticmethod
    def _totals(
        items: Sequence[tuple[int, Sequence[Placement], np.ndarray]],
        sends: Sequence[np.ndarray],
        timed: Callable[[np.ndarray], np.ndarray],
        ffn: np.ndarray,
        late: np.ndarray | None,
    ) -> list[np.ndarray]:
        """Per item ``[candidates]`` s with its all-to-alls ``sends`` (``[candidates, N,
        N]`` bytes each) timed by ``timed`` (stacked as :func:`_both_ways` does) and the
        rest from :meth:`_after_parts` (``ffn`` and ``late``, rows of these candidates)."""
        sizes = [len(p) for _, p, _ in items]
        ends = np.cumsum(sizes)
        a2a = timed(_both_ways(sends))
        first = 2 * (ends - sizes)  # where each item's dispatches start in a2a
        d = np.concatenate([a2a[f : f + k] for f, k in zip(first, sizes)])
        c = np.concatenate([a2a[f + k : f + 2 * k] for f, k in zip(first, sizes)])
        return np.split(_charged(d, c, ffn, late), ends[:-1])

    def cheapest(self, items: Sequence[tuple[int, Sequence[Placement], np.ndarray]]) -> list[int]:
        """What ``argmin`` of :meth:`exact` gives, timing far fewer all-to-alls.

        With each all-to-all at its lower bound (:meth:`AllToAllTimer.lower_bounds`) a
        candidate's charge is a lower bound of its exact one (a layer's charge never
        falls when its dispatch or combine takes longer). Per item, the candidate with
        the least bound is timed exactly; then every candidate whose bound is not above
        that exact charge; the rest are dearer and never timed. The pick, the first
        cheapest of those timed, is therefore exactly :meth:`exact`'s argmin. The bound
        is within about 2% of the time and usually equal to it, so near-ties aside one
        candidate per item is timed instead of all of them. The send matrices and the
        terms after the dispatch are computed once for the bounds and the exact times.
        """
        if not items:
            return []
        sends = self._sends_many(items)
        ffn, late = self._after_parts(items)
        at = np.concatenate(([0], np.cumsum([len(p) for _, p, _ in items])))  # each item's first row

        def subset(picks: list[list[int]]) -> list[np.ndarray]:
            """The exact charges of the candidates ``picks[i]`` of each item ``i`` that has any."""
            keep = [i for i, js in enumerate(picks) if js]
            rows = np.array([at[i] + j for i in keep for j in picks[i]], dtype=np.int64)
            sub = [(items[i][0], [items[i][1][j] for j in picks[i]], items[i][2]) for i in keep]
            sub_late = None if late is None else late[rows]
            return self._totals(sub, [sends[i][picks[i]] for i in keep], self.timer.times, ffn[rows], sub_late)

        bound = self._totals(items, sends, self.timer.lower_bounds, ffn, late)
        first = [int(np.argmin(b)) for b in bound]
        best = subset([[i] for i in first])
        # Slack for the rounding of a charge computed from different inputs.
        todo = [
            [j for j in range(len(b)) if j != i and b[j] <= t[0] * (1 + 1e-12)] for b, i, t in zip(bound, first, best)
        ]
        more = iter(subset(todo) if any(todo) else [])
        out = []
        for i, js, t in zip(first, todo, best):
            if not js:
                out.append(i)
                continue
            timed = {i: float(t[0]), **dict(zip(js, map(float, next(more))))}
            out.append(min(sorted(timed), key=lambda j: timed[j]))
        return out


def _charged(d: np.ndarray, c: np.ndarray, ffn: np.ndarray, late: np.ndarray | None) -> np.ndarray:
    """``[C]`` s: each candidate's charge from its dispatch ``d`` and combine ``c``
    (``[C]``) and :meth:`ServingCharge._after_parts` (``ffn``, ``late``, ``[C, N]``)."""
    if late is not None:
        ffn = ffn + np.maximum(late - d[:, None], 0.0)
    return d + ffn.max(axis=1) + c


@numba.njit(cache=True)
def _quick_a2a_kernel(
    src: np.ndarray,
    item_of: np.ndarray,
    quota: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
    node_start: np.ndarray,
    token_bytes: float,
    nvl_bw: float,
    nic_bw: float,
    nic_latency: float,
    nvl_latency: float,
) -> np.ndarray:  # pragma: no cover - compiled
    """:meth:`ServingCharge._quick_a2a` per candidate: ``src [items, E, N]`` each
    device's tokens per expert, ``item_of [C]`` which of them each candidate's batch is,
    ``quota [C, E, N]`` each replica's; ``first``/``last`` ``[N]`` the first and last device of each device's
    node, ``node_start`` where each node's devices start. Whole tokens until the bytes
    (the same integers, then the same float operations as the array form)."""
    C, E, n = quota.shape
    nodes = node_start.size
    out_t = np.empty(n, dtype=np.int64)
    in_t = np.empty(n, dtype=np.int64)
    end_out = np.empty(n, dtype=np.int64)
    end_in = np.empty(n, dtype=np.int64)
    intra_out = np.empty(n, dtype=np.int64)
    intra_in = np.empty(n, dtype=np.int64)
    sent = np.empty(n, dtype=np.int64)
    taken = np.empty(n, dtype=np.int64)
    result = np.empty(C)
    for c in range(C):
        s = src[item_of[c]]
        intra_out[:] = 0
        intra_in[:] = 0
        sent[:] = 0
        taken[:] = 0
        for e in range(E):
            run_out = run_in = 0
            for d in range(n):
                kept = min(s[e, d], quota[c, e, d])
                out_t[d] = s[e, d] - kept
                in_t[d] = quota[c, e, d] - kept
                run_out += out_t[d]
                run_in += in_t[d]
                end_out[d] = run_out
                end_in[d] = run_in
                sent[d] += out_t[d]
                taken[d] += in_t[d]
            for d in range(n):
                f, l = first[d], last[d]
                to_node = min(end_out[d], end_in[l]) - max(end_out[d] - out_t[d], end_in[f] - in_t[f])
                from_node = min(end_in[d], end_out[l]) - max(end_in[d] - in_t[d], end_out[f] - out_t[f])
                intra_out[d] += max(to_node, 0)
                intra_in[d] += max(from_node, 0)
        gpu_most = 0
        total_sent = 0
        for d in range(n):
            gpu_most = max(gpu_most, max(intra_out[d], intra_in[d]))
            total_sent += sent[d]
        node_most = 0
        node_total = 0
        for k in range(nodes):
            hi = node_start[k + 1] if k + 1 < nodes else n
            node_out = node_in = 0
            for d in range(node_start[k], hi):
                node_out += sent[d] - intra_out[d]
                node_in += taken[d] - intra_in[d]
            node_most = max(node_most, max(node_out, node_in))
            node_total += node_out
        gpu = gpu_most * token_bytes / nvl_bw
        nic = node_most * token_bytes / nic_bw
        lat = nic_latency if node_total > 0 else nvl_latency
        result[c] = max(gpu, nic) + lat if total_sent > 0 else 0.0
    return result


def _both_ways(sends: Sequence[np.ndarray]) -> np.ndarray:
    """One stack of every item's dispatch byte matrices ``[C, N, N]`` followed by their
    transposes (the combines), item after item."""
    return np.concatenate([np.concatenate([s, np.swapaxes(s, 1, 2)]) for s in sends])
