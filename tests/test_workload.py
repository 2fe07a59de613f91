import dataclasses

import pytest

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import load_preset
from lina_sim.workload.comm import ALL_TO_ALL
from lina_sim.workload.graph import build_training_graph, micro_op_estimates, packing_candidates
from lina_sim.workload.model import available_models, model_from_dict, model_preset


# -- parameter counts ----------------------------------------------------------------------
def expert_params(d, f):
    return 2 * d * f + d + f


def test_gpt2_moe_param_counts_match_hand_formula():
    d, f, V, s, L, E = 768, 3072, 50257, 1024, 12, 16
    m = model_preset("gpt2-moe").resolve(E)
    per_layer_dense = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + d * E
    non_expert = V * d + s * d + L * per_layer_dense + 2 * d
    expert = L * E * expert_params(d, f)
    pc = m.param_counts()
    assert (pc.non_expert, pc.expert, pc.total) == (non_expert, expert, non_expert + expert)
    assert m.param_counts(experts_per_device=1).expert == L * expert_params(d, f)


def test_bert2gpt2_counts_encoder_decoder_and_cross_attention():
    d, f, E = 768, 3072, 8
    m = model_preset("bert2gpt2-moe").resolve(E)
    attn = 2 * d + 4 * d * d + 4 * d
    cross = 2 * d + 4 * d * d + 4 * d
    moe_dense = 2 * d + d * E
    emb = 30522 * d + 512 * d + 50257 * d + 512 * d
    non_expert = emb + 12 * (attn + moe_dense) + 12 * (attn + cross + moe_dense) + 2 * d
    assert m.param_counts().non_expert == non_expert
    assert m.param_counts().expert == 24 * E * expert_params(d, f)


@pytest.mark.parametrize("layers,experts,millions", [(12, 4, 117), (24, 4, 233), (36, 4, 349), (12, 16, 419)])
def test_transformer_xl_sizes_fit_the_stated_model_sizes(layers, experts, millions):
    # docs/reference-numbers.md: the Transformer-XL sizes 117M/233M/349M/419M fit d_model 512, d_ff 2048.
    m = model_preset(f"transformer-xl-{layers}").resolve(experts)
    assert m.param_counts().total / 1e6 == pytest.approx(millions, rel=0.005)


# -- the graph: FLOPs and bytes against hand formulas ---------------------------------------
def gpt2(world=16, **kw):
    return build_training_graph(model_preset("gpt2-moe"), world, **kw)


@pytest.mark.parametrize("kernels", ["sparse", "einsum"])
def test_forward_flops_and_a2a_bytes_match_hand_formulas(kernels):
    g = gpt2(dispatch_kernels=kernels)
    m = g.model
    T, s, d, f, E, k, cf, b = m.tokens, m.seq_len, m.d_model, m.d_ff, m.experts, m.top_k, m.capacity_factor, 2
    # DeepSpeed's einsums over tokens x (experts x capacity = T k cf slots) x d_model: the
    # dispatch in the gate op, the combine at the start of the next op.
    einsum = 2 * T * (T * k * cf) * d if kernels == "einsum" else 0
    assert g.op("L0.fwd.attn").flops == 8 * T * d * d + 4 * T * s * d
    assert g.op("L1.fwd.attn").flops == 8 * T * d * d + 4 * T * s * d + einsum
    assert g.op("L0.fwd.gate").flops == 2 * T * d * E + einsum
    assert g.op("L0.fwd.ffn.c0").flops == 4 * T * k * cf * d * f
    assert g.op("head.fwd").flops == 2 * T * d * m.vocab + einsum
    for name in ("L3.fwd.dispatch.c0", "L3.fwd.combine.c0", "L3.bwd.combine.c0", "L3.bwd.dispatch.c0"):
        op = g.op(name)
        assert op.kind == ALL_TO_ALL and op.communicator == "ep" and op.stream == "a2a"
        assert op.bytes == T * k * cf * d * b
    fwd = g.totals("fwd")
    assert fwd["flops"] == pytest.approx(
        12 * (8 * T * d * d + 4 * T * s * d + 2 * T * d * E + 4 * T * k * cf * d * f + 2 * einsum)
        + 2 * T * d * m.vocab,
        rel=1e-12,
    )
    assert fwd["a2a_bytes"] == 12 * 2 * T * k * cf * d * b


def test_ffn_hbm_bytes_match_gemm_shapes():
    g = gpt2()
    m = g.model
    c, d, f, b = m.tokens * m.top_k * m.capacity_factor, m.d_model, m.d_ff, 2
    w1 = c * d + d * f + c * f
    w2 = c * f + f * d + c * d
    gelu = 2 * c * f
    assert g.op("L0.fwd.ffn.c0").hbm_bytes == (w1 + w2 + gelu) * b


def test_backward_has_twice_the_matmul_flops_of_forward():
    # Sparse dispatch: every GEMM has a weight and an input gradient. (DeepSpeed's
    # dispatch einsum has only the input's: its one-hot mask takes no gradient.)
    g = gpt2(dispatch_kernels="sparse")
    key = lambda o: (o.role, o.layer, o.chunk)  # noqa: E731
    fwd = {key(o): o for o in g.ops if o.phase == "fwd"}
    bwd = [o for o in g.ops if o.phase == "bwd" and o.kind == "compute"]
    assert len(bwd) == sum(1 for o in fwd.values() if o.kind == "compute")
    for o in bwd:
        assert o.flops == 2 * fwd[key(o)].flops
    assert g.totals("bwd")["a2a_bytes"] == g.totals("fwd")["a2a_bytes"]


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_pipelining_preserves_total_bytes_and_flops(r):
    base = gpt2(pipeline_degree=1).totals()
    g = gpt2(pipeline_degree=r)
    t = g.totals()
    assert t["flops"] == pytest.approx(base["flops"], rel=1e-12)
    assert t["a2a_bytes"] == pytest.approx(base["a2a_bytes"], rel=1e-12)
    assert t["grad_bytes"] == base["grad_bytes"]
    assert sum(1 for o in g.ops if o.kind == ALL_TO_ALL) == 12 * 4 * r
    # Per stream, chunk c+1's dispatch precedes chunk c's combine (that is the overlap).
    a2a = [o.name for o in g.ops if o.layer == 0 and o.phase == "fwd" and o.kind == ALL_TO_ALL]
    assert a2a == [f"L0.fwd.dispatch.c{c}" for c in range(r)] + [f"L0.fwd.combine.c{c}" for c in range(r)]


def test_deps_point_backwards_and_gradients_become_ready_in_backward_compute():
    g = build_training_graph(model_preset("bert2gpt2-moe"), 8, experts_per_device=2, pipeline_degree=2)
    for o in g.ops:
        assert all(0 <= d < o.id for d in o.deps)
        assert o.stream == ("a2a" if o.kind == ALL_TO_ALL else "compute")
    for r in g.grad_requests:
        op = g.ops[r.ready_after]
        assert op.kind == "compute" and op.phase == "bwd"
    assert [r.order for r in g.grad_requests] == list(range(len(g.grad_requests)))
    assert [r.ready_after for r in g.grad_requests] == sorted(r.ready_after for r in g.grad_requests)
    # Expert weights become ready after the layer's last backward FFN chunk.
    w = next(r for r in g.grad_requests if r.name == "L5.expert0.w1")
    assert g.ops[w.ready_after].name == "L5.bwd.ffn.c1"
    assert g.ops[-1].role == "optimizer" and g.ops[-1].waits_for_gradients


def test_gradient_requests_cover_parameters_and_expert_groups():
    g = gpt2()  # 16 experts on 16 GPUs, one per GPU: no expert replicas, nothing to reduce
    m = g.model
    assert all(r.communicator == "dp" for r in g.grad_requests)
    assert g.totals()["grad_bytes"] == m.param_counts().non_expert * 2
    packed = gpt2(experts_per_device=2)  # ep groups of 8, each expert on 2 ranks
    exp = [r for r in packed.grad_requests if r.communicator == "expert_dp"]
    assert sum(r.nbytes for r in exp) == 12 * 2 * expert_params(768, 3072) * 2
    assert packed.communicators["ep"].groups == (tuple(range(8)), tuple(range(8, 16)))
    assert packed.communicators["expert_dp"].group_of(3) == (3, 11)
    assert packed.communicators["dp"].size == 16
    # Packing leaves per-rank a2a bytes and FFN FLOPs unchanged but splits the FFN per expert.
    assert packed.totals()["a2a_bytes"] == g.totals()["a2a_bytes"]
    assert packed.op("L0.fwd.ffn.c0").flops == g.op("L0.fwd.ffn.c0").flops
    assert len(packed.op("L0.fwd.ffn.c0").kernels) == 2 * len(g.op("L0.fwd.ffn.c0").kernels)


def test_fewer_experts_than_gpus_reduce_expert_gradients_across_replicas():
    m = dataclasses.replace(model_preset("transformer-xl-12"), experts=4)
    g = build_training_graph(m, 16)
    assert g.experts_per_device == 1
    assert g.communicators["ep"].size == 4 and g.communicators["expert_dp"].size == 4
    assert any(r.communicator == "expert_dp" for r in g.grad_requests)
    assert packing_candidates(m, 16) == [1, 2, 4]
    assert packing_candidates(dataclasses.replace(m, experts=32), 16) == [2, 4, 8, 16, 32]


def test_dense_layers_have_no_all_to_all():
    m = dataclasses.replace(model_preset("gpt2-moe"), moe_layers=(1, 3))
    g = build_training_graph(m, 4)
    assert {o.layer for o in g.ops if o.kind == ALL_TO_ALL} == {1, 3}
    assert any(r.name == "L0.ffn.w1" and r.communicator == "dp" for r in g.grad_requests)


def test_a2a_micro_ops_are_numbered_in_program_order():
    g = gpt2(pipeline_degree=2)
    mops = g.a2a_micro_ops()
    assert [m.seq for m in mops] == list(range(len(mops)))
    assert all(g.ops[m.op_id].name == m.id for m in mops)


def test_graph_is_deterministic():
    assert gpt2(pipeline_degree=2) == gpt2(pipeline_degree=2)


def test_micro_op_estimates_cover_every_packing():
    est = micro_op_estimates(
        model_preset("transformer-xl-12"),
        8,
        2,
        ffn_time=lambda op: op.flops,
        a2a_time=lambda op, comm: op.bytes * comm.size,
        allreduce_time=lambda nbytes, comm: nbytes * comm.size,
    )
    assert sorted(est) == [1, 2, 4, 8]
    assert est[1].a2a_micro_op_s == 8 * est[8].a2a_micro_op_s
    # One expert per device on 8 GPUs with 8 experts: no expert replicas, no expert allreduce.
    assert est[1].expert_allreduce_s == 0 and est[8].expert_allreduce_s > 0
    assert est[1].dense_allreduce_s == est[8].dense_allreduce_s > 0
    assert all(e.compute_s > e.backward_compute_s > 0 and e.a2a_s > 0 for e in est.values())


# -- specs and errors -------------------------------------------------------------------------
def test_presets_and_overrides():
    assert set(available_models()) >= {
        "transformer-xl-12",
        "transformer-xl-24",
        "transformer-xl-36",
        "gpt2-moe",
        "bert2gpt2-moe",
    }
    m = model_from_dict({"preset": "gpt2-moe", "micro_batch": 2, "capacity_factor": 2}, world_size=8)
    assert (m.micro_batch, m.capacity_factor, m.experts, m.top_k, m.dtype_bytes) == (2, 2.0, 8, 2, 2)
    assert model_from_dict("transformer-xl-24").layers == 24
    assert model_preset("bert2gpt2-moe").total_layers == 24


@pytest.mark.parametrize(
    "entry,field,allowed_has",
    [
        ({"preset": "gpt2-moe", "micro_batch": -1}, "model.micro_batch", ">= 1"),
        ({"preset": "gpt2-moe", "batch": 4}, "model.batch", "micro_batch"),
        ({"preset": "gpt-3"}, "model.preset", "gpt2-moe"),
        ({"preset": "gpt2-moe", "experts": 3}, "model.experts", "8"),
        ({"preset": "gpt2-moe", "dtype": "int4"}, "model.dtype", "bf16"),
        ({"preset": "gpt2-moe", "heads": 5}, "model.heads", "divisor"),
        ({"preset": "gpt2-moe", "moe_layers": [0, 12]}, "model.moe_layers", "0..11"),
        ({"layers": 2}, "model.d_model", "preset"),
    ],
)
def test_bad_model_fields_name_the_path_and_what_is_allowed(entry, field, allowed_has):
    with pytest.raises(ConfigError) as e:
        model_from_dict(entry, world_size=16)
    assert e.value.field == field
    assert allowed_has in (e.value.allowed or "")


@pytest.mark.parametrize(
    "field,value",
    [
        ("capacity_factor", float("nan")),
        ("capacity_factor", float("inf")),
        ("micro_batch", float("nan")),
    ],
)
def test_non_finite_model_fields_are_one_error_naming_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        model_from_dict({"preset": "gpt2-moe", field: value}, world_size=16)
    assert e.value.field == f"model.{field}" and "finite" in e.value.problem


def test_model_fields_are_declared_once():
    from lina_sim.workload.model import MODEL_FIELDS, ModelSpec

    # Every field a scenario may set has a Field whose default is the dataclass default.
    names = [f.name for f in dataclasses.fields(ModelSpec) if f.name != "name"]
    assert list(MODEL_FIELDS) == names
    for f in dataclasses.fields(ModelSpec):
        if f.name in MODEL_FIELDS and not MODEL_FIELDS[f.name].required:
            assert f.default == MODEL_FIELDS[f.name].default and MODEL_FIELDS[f.name].help


def test_bad_graph_arguments():
    with pytest.raises(ConfigError) as e:
        gpt2(experts_per_device=3)
    assert e.value.field == "experts_per_device" and "16" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        gpt2(pipeline_degree=0)
    assert e.value.field == "pipeline_degree"


def test_cluster_spec_is_accepted():
    g = build_training_graph(model_preset("transformer-xl-24"), load_preset("paper-testbed"))
    assert g.world_size == 16 and g.model.experts == 16


def test_graph_for_policy_applies_pipelining_and_packing():
    from lina_sim.policies.registry import make_training_policy
    from lina_sim.workload.graph import graph_for_policy

    m = model_preset("transformer-xl-12")
    g = graph_for_policy(m, 8, make_training_policy("tutel"))
    assert (g.pipeline_degree, g.experts_per_device) == (2, 1)
    # A2A time that falls as the ep group shrinks; FFN time flat: lina packs until FFN >= a2a.
    paper = make_training_policy("lina", packing="paper")
    g = graph_for_policy(m, 8, paper, ffn_time=lambda op: 1.0, a2a_time=lambda op, comm: comm.size / 3)
    assert (g.pipeline_degree, g.experts_per_device) == (2, 4)  # a2a: 8/3, 4/3, 2/3 -> stop at k=4
    # The cost rule, with no allreduce to pay for packing, takes the cheapest all-to-all.
    g = graph_for_policy(
        m, 8, make_training_policy("lina"), ffn_time=lambda op: 1.0, a2a_time=lambda op, comm: comm.size / 3
    )
    assert g.experts_per_device == 8
    with pytest.raises(ValueError):
        graph_for_policy(m, 8, make_training_policy("lina"))
