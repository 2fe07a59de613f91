"""The ops an MoE layer's gate, dispatch and combine launch, from the census of the real
PyTorch code (``runtime/op_census.py`` writes ``moe_ops.yaml`` beside this file; a test
checks it is current): per dispatch kernel (``einsum``: DeepSpeed-MoE's dense
``dispatch_mask`` einsums; ``sparse``: Tutel-style scatter and gather), region (``gate``:
router, routing and dispatch into the capacity buffer; ``combine``: the buffer back to
token rows) and phase, each aten op with its count, the sizes of its tensors as products
of the layer's dimensions (``S`` rows, ``E`` experts, ``C`` slots per expert, ``M``
d_model, ``k`` choices) and, for a GEMM, its multiply-add product.

The op graph turns each into a kernel: FLOP ``2 x`` the GEMM product, HBM bytes the sum of
its tensors' elements times the model's dtype bytes (index tensors are priced at that
width too: an approximation), so every launch pays the compute model's per-kernel
overhead as it does on an eager GPU. Pure: no torch. Units: elements, FLOP, bytes.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import yaml

DISPATCH_KERNELS = ("einsum", "sparse")
REGIONS = ("gate", "combine")
CENSUS = Path(__file__).with_name("moe_ops.yaml")


@functools.cache
def census() -> dict[str, Any]:
    """The shipped census (``moe_ops.yaml``)."""
    return yaml.safe_load(CENSUS.read_text())


def _product(term: str, dims: dict[str, float]) -> float:
    return 1.0 if term == "1" else math.prod(dims[x] for x in term.split("*"))


def census_ops(kernels: str, region: str, phase: str, dims: dict[str, float]) -> list[tuple[str, int, float, float]]:
    """``(op, count, FLOP, elements)`` of each op the ``kernels`` style launches in
    ``region`` / ``phase`` (``fwd`` or ``bwd``), at the layer's ``dims`` (``S``, ``E``,
    ``C``, ``M``, ``k``)."""
    out = []
    for o in census()["kernels"][kernels][region][phase]:
        flops = 2.0 * _product(o["gemm"], dims) if "gemm" in o else 0.0
        out.append((o["op"], int(o["count"]), flops, sum(_product(t, dims) for t in o["elements"])))
    return out
