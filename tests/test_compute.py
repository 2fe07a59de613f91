import dataclasses

import pytest

from lina_sim.errors import ConfigError
from lina_sim.hardware.compute import ProfileComputeModel, ProfileRow, RooflineComputeModel
from lina_sim.hardware.spec import ComputeSpec, GPUSpec, load_preset
from lina_sim.workload.graph import Kernel, Op, build_training_graph
from lina_sim.workload.model import model_preset

GPU = GPUSpec("g", {"fp16": 100e12}, hbm_bandwidth=1e12, memory_bytes=1e9)
SPEC = ComputeSpec(matmul_efficiency=0.5, memory_efficiency=0.8, kernel_launch_s=5e-6)


def op(kernels=(), flops=0.0, hbm=0.0, tokens=0.0, role="ffn", phase="fwd", shape="", kind="compute"):
    return Op(
        id=0,
        name="x",
        kind=kind,
        stream="compute",
        role=role,
        phase=phase,
        layer=0,
        kernels=tuple(kernels),
        flops=flops,
        hbm_bytes=hbm,
        tokens=tokens,
        shape=shape,
    )


def test_roofline_takes_the_binding_resource_per_kernel_plus_launches():
    cm = RooflineComputeModel(GPU, SPEC, "fp16")
    gemm = Kernel("gemm", flops=1e12, hbm_bytes=1e6)  # compute bound: 1e12 / 50e12 = 20 ms
    soft = Kernel("softmax", flops=0.0, hbm_bytes=8e9)  # memory bound: 8e9 / 0.8e12 = 10 ms
    assert cm.op_time(op([gemm])) == pytest.approx(0.02 + 5e-6)
    assert cm.op_time(op([soft])) == pytest.approx(0.01 + 5e-6)
    # Per-kernel sum, not one max over the op's totals.
    assert cm.op_time(op([gemm, soft])) == pytest.approx(0.03 + 10e-6)
    assert cm.op_time(op(flops=1e12, hbm=8e9)) == pytest.approx(0.02 + 5e-6)


def test_roofline_rejects_communication_and_bad_dtype():
    cm = RooflineComputeModel(GPU, SPEC, "fp16")
    with pytest.raises(ValueError):
        cm.op_time(op(kind="all_to_all"))
    with pytest.raises(ConfigError) as e:
        RooflineComputeModel(GPU, SPEC, "fp8")
    assert e.value.field == "dtype" and "fp16" in e.value.allowed


def test_roofline_on_a_real_graph_is_positive_and_scales_with_tokens():
    cluster = load_preset("paper-testbed")
    cm = RooflineComputeModel.from_cluster(cluster)
    # Sparse dispatch: DeepSpeed's einsums grow with the square of the tokens.
    small = build_training_graph(model_preset("gpt2-moe"), cluster, dispatch_kernels="sparse")
    m = model_preset("gpt2-moe")
    big = build_training_graph(dataclasses.replace(m, micro_batch=8), cluster, dispatch_kernels="sparse")
    t_small = sum(cm.op_time(o) for o in small.ops if o.kind == "compute")
    t_big = sum(cm.op_time(o) for o in big.ops if o.kind == "compute")
    assert 0 < t_small < t_big < 2.2 * t_small


ROWS = [
    ProfileRow("ffn.fwd", "", 1000, 1e-3),
    ProfileRow("ffn.fwd", "", 3000, 2e-3),
    ProfileRow("ffn.fwd", "d_model=8", 1000, 5e-3),
]


def test_profile_interpolates_over_tokens_and_prefers_the_exact_shape():
    pm = ProfileComputeModel(ROWS)
    assert pm.op_time(op(tokens=2000)) == pytest.approx(1.5e-3)
    assert pm.op_time(op(tokens=1000)) == pytest.approx(1e-3)
    assert pm.op_time(op(tokens=5000)) == pytest.approx(3e-3)  # linear extrapolation
    assert pm.op_time(op(tokens=0)) == pytest.approx(0.5e-3)
    assert pm.op_time(op(tokens=500, shape="d_model=8")) == pytest.approx(2.5e-3)  # one point: proportional


def test_profile_missing_key_falls_back_or_names_what_exists():
    roof = RooflineComputeModel(GPU, SPEC)
    pm = ProfileComputeModel(ROWS, fallback=roof)
    attn = op([Kernel("k", 1e12, 0)], role="attn")
    assert pm.op_time(attn) == roof.op_time(attn)
    with pytest.raises(ConfigError) as e:
        ProfileComputeModel(ROWS).op_time(attn)
    assert "attn.fwd" in str(e.value) and "ffn.fwd" in e.value.allowed


def test_profile_loads_yaml_and_csv(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(
        "rows:\n  - {op: ffn.fwd, tokens: 1000, seconds: 0.001}\n  - {op: ffn.fwd, tokens: 3000, seconds: 0.002}\n"
    )
    c = tmp_path / "p.csv"
    c.write_text("op,shape,tokens,seconds\nffn.fwd,,1000,0.001\nffn.fwd,,3000,0.002\n")
    for path in (y, c):
        assert ProfileComputeModel.load(path).op_time(op(tokens=2000)) == pytest.approx(1.5e-3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows:\n  - {op: ffn.fwd, seconds: 0.001}\n")
    with pytest.raises(ConfigError) as e:
        ProfileComputeModel.load(bad)
    assert e.value.field.endswith("rows[0].tokens")
