"""The MoE op census (runtime/op_census.py): the shipped table the simulator prices is
what the real code launches today, and both dispatch styles compute the same thing."""

from __future__ import annotations

import torch
import yaml

from lina_sim.workload import moe_ops
from runtime import op_census
from runtime.moe_dispatch import combine, dispatch, route


def test_shipped_census_is_current():
    """Regenerating the census on this code gives the shipped moe_ops.yaml (else run
    `python -m runtime.op_census --write`)."""
    shipped = yaml.safe_load(moe_ops.CENSUS.read_text())
    assert op_census.census()["kernels"] == shipped["kernels"]


def test_einsum_launches_dense_products_sparse_does_not():
    dims = {"S": 4096, "E": 16, "C": 512, "M": 1024, "k": 2}

    def gate_fwd_flops(kernels: str) -> float:
        return sum(count * flops for _, count, flops, _ in moe_ops.census_ops(kernels, "gate", "fwd", dims))

    router = 2 * 4096 * 16 * 1024
    assert gate_fwd_flops("sparse") == router  # the router's GEMM alone
    assert gate_fwd_flops("einsum") == router + 2 * 4096 * 16 * 512 * 1024  # + einsum("sec,sm->ecm")


def test_both_dispatch_styles_fill_the_same_buffer_and_combine_alike():
    torch.manual_seed(0)
    S, E, k, d, cap = 50, 7, 2, 11, 12
    h = torch.randn(S, d, dtype=torch.float64)
    top_p, top_i = torch.randn(S, E, dtype=torch.float64).softmax(-1).topk(k)
    r = route(top_i, top_p, cap, E)
    assert torch.equal(dispatch(h, r, "sparse"), dispatch(h, r, "einsum"))
    out = torch.randn(E * cap, d, dtype=torch.float64)
    torch.testing.assert_close(combine(out, r, "sparse"), combine(out, r, "einsum"), rtol=1e-14, atol=1e-14)
