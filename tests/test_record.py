"""The small MoE transformer and trace recording (tiny: a few steps on a few KB)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lina_sim.routing import traces as tr  # noqa: E402
from runtime import record  # noqa: E402
from runtime.moe import MoEConfig, MoELayer, MoETransformer  # noqa: E402

torch.set_num_threads(1)

TEXT = {
    "alpha": "The quick brown fox jumps over the lazy dog. " * 60,
    "beta": "def f(x):\n    return x * 2 + 1  # code\n" * 60,
}
TINY = [
    "--layers",
    "2",
    "--experts",
    "4",
    "--d-model",
    "16",
    "--d-ff",
    "16",
    "--heads",
    "2",
    "--seq-len",
    "32",
    "--batch",
    "4",
    "--steps",
    "3",
    "--record-tokens",
    "640",
    "--threads",
    "1",
    "--log-every",
    "100",
]


@pytest.fixture()
def text_dir(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    for name, body in TEXT.items():
        (d / f"{name}.txt").write_text(body)
    return d


def test_record_writes_valid_traces(tmp_path, text_dir):
    out = tmp_path / "traces"
    written = record.main(["--out", str(out), "--data", str(text_dir), "--top-k", "1", "2", *TINY])
    assert len(written) == 4
    for path in written:
        t = tr.load(path)
        k = t.top_k
        assert (t.num_layers, t.num_experts) == (2, 4)
        assert t.num_tokens == 640 and np.unique(t.seq_ids).size == 640 // 32
        assert t.probs is not None and (np.diff(t.probs.astype(np.float32), axis=2) <= 0).all()
        assert (t.probs.astype(np.float32).sum(axis=2) <= 1.001).all()
        if k == 2:
            assert (t.experts[:, :, 0] != t.experts[:, :, 1]).all()
        meta = t.metadata
        assert meta["made_by"].startswith("python -m runtime.record --out")
        assert f"--data {text_dir}" in meta["made_by"] and "--steps 3" in meta["made_by"]
        assert meta["dataset"] in TEXT and meta["model_config"]["top_k"] == k
        assert meta["train_steps"] == 3 and meta["heldout_bits_per_byte"] > 0


def test_record_is_deterministic(tmp_path, text_dir):
    args = ["--data", str(text_dir), "--top-k", "2", "--domains", "beta", *TINY]
    (a,) = record.main(["--out", str(tmp_path / "a"), *args])
    (b,) = record.main(["--out", str(tmp_path / "b"), *args])
    np.testing.assert_array_equal(tr.load(a).experts, tr.load(b).experts)


def test_capacity_drops_and_combines_kept_tokens():
    torch.manual_seed(0)
    cfg = MoEConfig(layers=1, d_model=8, d_ff=8, heads=2, experts=4, top_k=2, capacity_factor=0.5, seq_len=16)
    layer = MoELayer(cfg)
    x = torch.randn(2, 16, 8)
    y, gate = layer(x)
    n = 32
    assert gate.experts.shape == (n, 2) and gate.probs.shape == (n, 2)
    assert layer.capacity(n) == 8  # 0.5 * 32 tokens * 2 choices / 4 experts
    counts = torch.bincount(gate.experts.reshape(-1), minlength=4)
    assert gate.dropped == int((counts - 8).clamp(min=0).sum())
    # recompute by hand: queue first choices before second ones, per expert, token order
    flat = x.reshape(n, 8)
    w = gate.probs / gate.probs.sum(-1, keepdim=True)
    want = torch.zeros_like(flat)
    used = [0] * 4
    for rank in range(2):
        for t in range(n):
            e = int(gate.experts[t, rank])
            if used[e] < 8:
                used[e] += 1
                want[t] += w[t, rank] * layer.experts[e](flat[t : t + 1])[0]
    torch.testing.assert_close(y.reshape(n, 8), want, atol=1e-5, rtol=1e-4)


def test_aux_loss_is_one_for_a_balanced_router():
    cfg = MoEConfig(layers=1, d_model=8, d_ff=8, heads=2, experts=4, top_k=1, seq_len=8)
    layer = MoELayer(cfg)
    torch.nn.init.zeros_(layer.gate.proj.weight)  # uniform probabilities
    _, gate = layer(torch.randn(1, 8, 8))
    # equal probabilities P_e = 1/4: E * sum_e f_e P_e = 4 * (1/4) = 1 whatever f is
    assert float(gate.aux_loss.detach()) == pytest.approx(1.0)


def test_model_forward_returns_gates_and_trains():
    torch.manual_seed(0)
    cfg = MoEConfig(layers=2, d_model=16, d_ff=16, heads=2, experts=4, top_k=2, seq_len=16)
    model = MoETransformer(cfg)
    tokens = torch.randint(0, 256, (3, 17))
    out = model(tokens[:, :-1], return_gates=True)
    assert out.logits.shape == (3, 16, 256) and len(out.gates) == 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        loss, ce, aux = model.loss(tokens)
        first = first if first is not None else float(ce.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(ce.detach()) < first
    with pytest.raises(ValueError, match="divisible"):
        MoEConfig(d_model=10, heads=3)
