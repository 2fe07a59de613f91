"""The runtime's model op by op against the compute model (benchmarks/bench_gpu_ops.py):
the same code path on the CPU here, on CUDA where there is a GPU (skipped otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lina_sim.workload.model import model_from_dict
from runtime.compute_profile import compare_ops

TINY = {
    "layers": 2,
    "d_model": 32,
    "d_ff": 64,
    "heads": 2,
    "seq_len": 16,
    "micro_batch": 2,
    "vocab": 64,
    "experts": 4,
    "top_k": 2,
    "capacity_factor": 1.0,
}


def _check(df, dtype: str) -> None:
    assert set(df["dispatch"]) == {"einsum", "sparse"} and set(df["dtype"]) == {dtype}
    for d in ("einsum", "sparse"):
        ops = set(df.loc[df["dispatch"] == d, "op"])
        assert {"attn.fwd", "gate.fwd", "gate.bwd", "ffn.fwd", "ffn.bwd", "head.fwd", "optimizer.opt"} <= ops
    assert (df["measured_ms"] > 0).all() and np.isfinite(df["predicted_ms"]).all()
    # The MoE ops are kept apart by dispatch style, as a compute profile keeps them.
    assert df.loc[df["op"] == "gate.fwd", "shape"].str.contains("dispatch=").all()


def test_op_by_op_on_the_cpu():
    spec = model_from_dict({**TINY, "dtype": "fp32"}, world_size=4)
    _check(compare_ops(spec, 4, "dgx-a100", torch.device("cpu"), steps=2), "fp32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_op_by_op_on_cuda(dtype):
    spec = model_from_dict({**TINY, "dtype": dtype}, world_size=4)
    _check(compare_ops(spec, 4, "dgx-a100", torch.device("cuda"), steps=3), dtype)
