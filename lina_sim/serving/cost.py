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
- expert FFN, per (device, expert) with ``r`` tokens: ``r x f x d`` and ``r x d x f``
  GEMMs and a GELU; the expert's weights are read once per kernel;
- head: the embedding lookup before layer 0; final norm and LM-head GEMM after the last.

Each kernel takes :meth:`RooflineComputeModel.kernel_time`, launch overhead included.
Weight swaps: ``expert_bytes`` per expert over the device's PCIe link (host to device) at
its effective bandwidth, plus the link latency per swapped expert.

Units: seconds, bytes, FLOP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import ClusterSpec
from lina_sim.workload.model import ModelSpec


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
    """Per-device compute times (s) of one inference batch for ``model`` on ``cluster``."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, top_k: int):
        self.model = model
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
        # Expert FFN per (device, expert): affine in its rows r.
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
        total = np.zeros_like(T)
        for kern in kernels:
            flops = kern.ft * T + kern.fs * S
            nbytes = kern.bt * T + kern.bs * S + kern.b0
            total += np.maximum(flops / rl.flops_per_s, nbytes / rl.bytes_per_s) + rl.launch_s
        return np.where(T > 0, total, 0.0)

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
        ``[..., devices]`` s of expert FFN, a device's experts run one after another."""
        return self._time(self._ffn, rows).sum(axis=-2)

    def swap_time(self, experts: np.ndarray) -> np.ndarray:
        """``[devices]`` s to load ``experts`` expert weight sets each over PCIe."""
        n = np.asarray(experts, dtype=np.float64)
        return np.where(n > 0, n * (self.expert_bytes / self.pcie_bandwidth + self.pcie_latency), 0.0)
