"""The ops one MoE layer's gate, dispatch and combine launch, counted by torch's profiler
on the real model code (``runtime.moe.TopKGate``, ``runtime.moe_dispatch``), forward and
backward, for both dispatch kernels (``einsum``: DeepSpeed-MoE; ``sparse``: Tutel).

The simulator's op graph prices these ops from the table this writes
(``lina_sim/workload/moe_ops.yaml``), so its kernel list comes from code, not guesses.
Each recorded op is an aten op the Python code or an autograd node calls (what eager
PyTorch dispatches one by one; view-like ops that launch nothing are left out). Its
tensors' sizes are written as products of the layer's
dimensions: ``S`` rows (tokens on the rank), ``E`` experts, ``C`` capacity slots per
expert, ``M`` d_model, ``k`` choices per token. The census runs with dimensions chosen so
that every such product is a distinct number (:data:`DIMS`), which is how a recorded
numel is mapped back to its product.

    python -m runtime.op_census            # print the census
    python -m runtime.op_census --write    # regenerate lina_sim/workload/moe_ops.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.profiler import ProfilerActivity, profile, record_function

from runtime.moe import TopKGate
from runtime.moe_dispatch import DISPATCH_KERNELS, combine, dispatch, route

# Capacity C = ceil(S k / E) (capacity factor 1). Every product of a subset of these is a
# distinct number, so a tensor's numel names its shape.
DIMS = {"S": 223, "E": 7, "k": 2, "M": 11}
DIMS["C"] = math.ceil(DIMS["S"] * DIMS["k"] / DIMS["E"])
# Ops that only re-describe memory (no kernel on a GPU).
VIEWS = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::select",
    "aten::slice",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::permute",
    "aten::expand",
    "aten::as_strided",
    "aten::t",
    "aten::transpose",
    "aten::_unsafe_view",
    "aten::lift_fresh",
    "aten::alias",
    "aten::detach",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resize_",
    "aten::result_type",
    "aten::is_nonzero",
    "aten::item",
    "aten::_local_scalar_dense",
}
GEMMS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::linear", "aten::matmul", "aten::einsum"}
BLAS = {"aten::mm", "aten::bmm", "aten::addmm"}
OUT = Path(__file__).resolve().parents[1] / "lina_sim" / "workload" / "moe_ops.yaml"


def _monomials() -> dict[int, str]:
    names = list(DIMS)
    out: dict[int, str] = {1: "1"}
    for n in range(1, len(names) + 1):
        for combo in itertools.combinations(names, n):
            v = math.prod(DIMS[c] for c in combo)
            if v in out:
                raise ValueError(f"census dimensions are not distinct: {combo} = {out[v]} = {v}")
            out[v] = "*".join(combo)
    return out


def _with_kept(table: dict[int, str], kept: int) -> dict[int, str]:
    """Tensors over the kept (token, choice) pairs: ``kept`` <= S k (capacity drops the
    rest), written as ``S*k`` times whatever else they span."""
    out = dict(table)
    for v, name in table.items():
        if "S" not in name and "k" not in name:
            out.setdefault(kept * v, "S*k" if name == "1" else f"S*k*{name}")
    return out


def _symbol(numel: int, table: dict[int, str]) -> str:
    if numel not in table:
        raise ValueError(f"a tensor of {numel} elements is no product of the census dimensions {DIMS}")
    return table[numel]


def _run(kernels: str) -> dict[str, Any]:
    """The four places the simulator puts these ops: the gate op (gate, routing and
    dispatch into the buffer) and the combine (buffer back to rows), each forward and
    backward. The experts between them are cut out (the buffer is detached), and the
    backward starts from given gradients, so no op of the census's own making is
    counted."""
    S, E, k, M, C = (DIMS[x] for x in ("S", "E", "k", "M", "C"))
    torch.manual_seed(0)
    gate = TopKGate(M, E, k)
    h = torch.randn(S, M, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("census.gate.fwd"):
            top_i, top_p, aux = gate(h)
            r = route(top_i, top_p, C, E)
            buf = dispatch(h, r, kernels)
        # The combine starts from leaves: the experts' output and the gate weights.
        out_buf = buf.detach().requires_grad_()
        weight = r.weight.detach().requires_grad_()
        with record_function("census.combine.fwd"):
            y = combine(out_buf, dataclasses.replace(r, weight=weight), kernels)
        grad_y, one = torch.ones_like(y), torch.ones_like(aux)
        with record_function("census.combine.bwd"):
            torch.autograd.backward(y, grad_y)
        with record_function("census.gate.bwd"):
            torch.autograd.backward([buf, aux, r.weight], [out_buf.grad, one, weight.grad])
    table = _with_kept(_monomials(), int(r.slot.numel()))
    events = prof.events()
    return {
        region: {phase: _top_ops(events, f"census.{region}.{phase}", table) for phase in ("fwd", "bwd")}
        for region in ("gate", "combine")
    }


def _descendant(e, names: set[str]):
    """The first aten call named in ``names`` below ``e`` (depth first)."""
    for c in e.cpu_children:
        if c.name in names:
            return c
        found = _descendant(c, names)
        if found is not None:
            return found
    return None


def _tensor_shapes(inputs: list) -> list[list[int]]:
    """The shapes of an op's tensor arguments; a tensor list (``einsum``'s operands) is
    opened up."""
    out = []
    for x in inputs:
        if isinstance(x, list) and x and isinstance(x[0], list):
            out += [s for s in x if isinstance(s, list)]
        elif isinstance(x, list):
            out.append(x)
    return out


def _top_ops(events, region: str, table: dict[int, str]) -> list[dict[str, Any]]:
    """The aten ops called from outside aten inside ``region`` (by the model's Python code
    or by an autograd node), i.e. what eager PyTorch dispatches one by one; view-like ops
    are left out. A GEMM-like op (:data:`GEMMS`) also gets its FLOP product: 2 x the
    product of the distinct dimensions of its two matrix operands (distinct by size,
    which :data:`DIMS` guarantees)."""
    reg = next(e for e in events if e.name == region)
    ops: Counter = Counter()
    for e in events:
        if not (reg.time_range.start <= e.time_range.start and e.time_range.end <= reg.time_range.end):
            continue
        parent = e.cpu_parent
        nested = parent is not None and parent.name.startswith("aten::")
        if not e.name.startswith("aten::") or e.name in VIEWS or nested:
            continue
        gemm = ""
        if e.name in GEMMS:
            # einsum and matmul record no operand shapes: read them off the BLAS call inside.
            blas = e if e.name in BLAS else _descendant(e, BLAS)
            shapes = [x for x in _tensor_shapes(blas.input_shapes) if len(x) >= 2][-2:]
            a, b = shapes
            gemm = _symbol(math.prod(set(a) | set(b)), table)
        else:
            shapes = _tensor_shapes(e.input_shapes)
        numels = [math.prod(s) for s in shapes]  # a 0-dim tensor (shape []) is 1 element
        # Bytes moved: the inputs, and an output as large as the largest input.
        sizes = tuple(sorted(_symbol(n, table) for n in numels + ([max(numels)] if numels else [])))
        ops[(e.name, sizes, gemm)] += 1
    return [
        {"op": name, "count": count, "elements": list(sizes), **({"gemm": gemm} if gemm else {})}
        for (name, sizes, gemm), count in sorted(ops.items())
    ]


def census() -> dict[str, Any]:
    """Per dispatch kernel and phase, the leaf ops with their counts and sizes."""
    return {
        "source": "python -m runtime.op_census --write (torch " + torch.__version__.split("+")[0] + ")",
        "dims": {k: v for k, v in DIMS.items()},
        "kernels": {kernels: _run(kernels) for kernels in DISPATCH_KERNELS},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.op_census", description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(OUT.parents[2])}")
    args = ap.parse_args(argv)
    data = census()
    text = yaml.safe_dump(data, sort_keys=False, width=120, default_flow_style=None)
    if args.write:
        OUT.write_text("# Generated by runtime/op_census.py: do not edit by hand.\n" + text)
        print(f"wrote {OUT}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
