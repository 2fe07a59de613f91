"""The simulator refuses, at validation, what cannot run: a scenario whose simulation would
not fit this machine's memory (within a second, with the estimate and what would fit),
and a model whose training state and activations do not fit its GPU (unless the scenario
sets ``model.check_memory: false``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import yaml

from lina_sim.cli.main import main
from lina_sim.config.scenario import expand, load_scenarios
from lina_sim.errors import ConfigError
from lina_sim.hardware.machine import NETWORK_BYTES_PER_RANK
from lina_sim.hardware.spec import load_preset
from lina_sim.policies.registry import policy_entries
from lina_sim.training import run as training_run
from lina_sim.training.run import HOST_BYTES_PER_RANK_OP, host_memory, resolve_training
from lina_sim.workload.model import model_preset

ROOT = Path(__file__).resolve().parents[1]
# 1,000,000 GPUs, one expert each: one expert-parallel group, so every rank is simulated
# (about 200 GB). 100,000 such GPUs need about 20 GB: that may fit.
HUGE = {
    "name": "huge",
    "cluster": {"preset": "dgx-a100", "nodes": 125000},
    # A million experts' gate alone outgrows the GPU: this test is about the host.
    "model": {"preset": "transformer-xl-12", "check_memory": False},
    "policies": ["deepspeed", "lina"],
}


def test_a_1000000_gpu_scenario_is_refused_in_a_second(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(HUGE))
    start = time.perf_counter()
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    took = time.perf_counter() - start
    line = capsys.readouterr().err.strip()
    assert took < 5.0, took  # about 0.1 s; generous for a loaded machine
    assert line.startswith("lina-sim run: error: cluster.nodes: simulating 1000000 GPUs"), line
    assert "GB of memory" in line and "available" in line  # how big it would be, and what there is
    assert "allowed: cluster.nodes <= " in line  # what fits
    assert not (tmp_path / "out").exists()


def test_what_fits_is_accepted(monkeypatch):
    """The node count the refusal offers passes the same check."""
    monkeypatch.setattr(training_run, "available_memory", lambda: 8e9)  # an 8 GB machine
    with pytest.raises(ConfigError) as e:
        resolve_training(expand(HUGE)[0])
    fits = int(e.value.allowed.split("<= ")[1].split()[0])
    assert fits >= 1
    setup = resolve_training(expand({**HUGE, "cluster": {"preset": "dgx-a100", "nodes": fits}})[0])
    assert setup.cluster.nodes == fits
    with pytest.raises(ConfigError, match="cluster.nodes"):
        resolve_training(expand({**HUGE, "cluster": {"preset": "dgx-a100", "nodes": fits + 1}})[0])


def test_the_estimate_grows_with_what_the_simulator_builds():
    one, six = (
        policy_entries(["deepspeed"], "training"),
        policy_entries([{"name": "deepspeed", "label": f"d{i}"} for i in range(6)], "training"),
    )
    c1024, c2048 = load_preset("dgx-a100", nodes=128), load_preset("dgx-a100", nodes=256)
    m = model_preset("transformer-xl-12").resolve(1024)  # one expert per GPU: one group, every rank simulated
    small = host_memory(c1024, m, one, 223)
    big = host_memory(c2048, model_preset("transformer-xl-12").resolve(2048), one, 223)
    assert (small.simulated, big.simulated) == (1024, 2048)
    assert big.rank_ops == 2 * small.rank_ops
    assert big.total > 2 * small.total - 1e8
    assert host_memory(c1024, m, six, 223).total > small.total  # finished policies keep their timelines
    assert small.total >= small.rank_ops * HOST_BYTES_PER_RANK_OP + 1024 * NETWORK_BYTES_PER_RANK
    # 64 experts: one replica of 64 GPUs (8 nodes) runs the step for all 16 (or 32).
    m64 = model_preset("transformer-xl-12").resolve(1024)
    m64 = dataclasses.replace(m64, experts=64)
    rep, rep2 = host_memory(c1024, m64, one, 223), host_memory(c2048, m64, one, 223)
    assert (rep.simulated, rep2.simulated) == (64, 64) and rep.rank_ops == 64 * 223
    assert rep2.total - rep.total == pytest.approx(1024 * NETWORK_BYTES_PER_RANK)  # the network of every GPU
    # lina may pack up to 16 experts per GPU: 4-GPU replicas, simulated as 8-GPU nodes.
    lina = policy_entries([{"name": "lina", "max_experts_per_device": 16}], "training")
    assert host_memory(c1024, m64, lina, 223).simulated == 64


def test_shipped_scenarios_pass_both_checks():
    for path in sorted((ROOT / "scenarios").glob("paper-training.yaml")) + [ROOT / "scenarios/default.yaml"]:
        for point in load_scenarios(path):
            resolve_training(point)


TOO_BIG = {
    "name": "too-big",
    "cluster": {"preset": "paper-testbed", "nodes": 1},
    "model": {"preset": "gpt2-moe", "layers": 2, "micro_batch": 200},  # ~100 GB of activations
    "policies": ["deepspeed"],
}


def test_a_model_too_large_for_the_gpu_is_refused_and_the_override_accepts_it():
    with pytest.raises(ConfigError) as e:
        resolve_training(expand(TOO_BIG)[0])
    assert e.value.field == "model.micro_batch"
    assert "GB per GPU" in e.value.problem and "cluster.gpu.memory_bytes" in e.value.problem
    largest = int(e.value.allowed.split("micro_batch <= ")[1].split(",")[0])
    assert 1 <= largest < 200
    fits = {**TOO_BIG, "model": {**TOO_BIG["model"], "micro_batch": largest}}
    assert resolve_training(expand(fits)[0]).model.micro_batch == largest
    over = {**TOO_BIG, "model": {**TOO_BIG["model"], "check_memory": False}}
    assert resolve_training(expand(over)[0]).model.micro_batch == 200


def test_parameters_alone_too_large_name_the_model():
    big = {**TOO_BIG, "model": {"preset": "gpt2-moe", "d_model": 16384, "d_ff": 65536, "heads": 128, "micro_batch": 1}}
    with pytest.raises(ConfigError) as e:
        resolve_training(expand(big)[0])
    assert e.value.field == "model" and "check_memory: false" in e.value.allowed


def test_training_memory_follows_the_zero_formula():
    m = model_preset("gpt2-moe").resolve(16)
    mem = m.training_memory(1)
    assert mem.states == 16 * m.param_counts(1).total  # 2 + 2 + 4 + 4 + 4 bytes per parameter
    double = dataclasses.replace(m, micro_batch=2 * m.micro_batch).training_memory(1)
    assert double.activations == pytest.approx(2 * mem.activations)  # activations per micro_batch
    assert double.states == mem.states


@pytest.mark.parametrize("command", [["collective", "--op", "all_to_all", "--sizes", "1M"], ["contention"]])
def test_a_20000000_rank_all_to_all_is_refused_before_it_is_built(capsys, command):
    start = time.perf_counter()
    assert main([*command, "--preset", "dgx-a100", "--nodes", "2500000"]) == 2
    assert time.perf_counter() - start < 5.0
    line = capsys.readouterr().err.strip()
    assert "--nodes: all_to_all (direct) over 20000000 ranks needs about 240 GB of memory" in line, line
    assert "available (allowed: --nodes <= " in line


def test_a_long_point_is_announced_and_ctrl_c_leaves_nothing(tmp_path):
    """100,000 GPUs with one expert each (one expert-parallel group: every rank simulated)
    fit in memory but take minutes: `run` says how long before it starts, and Ctrl-C then
    stops it with exit 130 and no results directory. (With 16 experts the step runs as one
    16-GPU replica: 20 s.)"""
    import signal
    import subprocess
    import sys

    path = tmp_path / "big.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "big",
                "kind": "training",
                "cluster": {"preset": "dgx-a100", "nodes": 12500},
                "model": {"preset": "transformer-xl-12"},
                "policies": ["deepspeed"],
            }
        )
    )
    out = tmp_path / "out"
    p = subprocess.Popen(
        [sys.executable, "-m", "lina_sim.cli.main", "run", str(path), "--out", str(out), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = p.stderr.readline()
        assert "100000 GPUs" in line and "min of one core's time" in line, line
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 130
    finally:
        p.kill()
    assert not out.exists()


def test_a_100000_gpu_serving_scenario_is_refused_in_a_second(tmp_path, capsys):
    trace = Path(__file__).resolve().parents[1] / "traces" / "moe12-top1-arxiv.npz"
    path = tmp_path / "big-serving.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "big-serving",
                "kind": "inference",
                "cluster": {"preset": "paper-testbed", "nodes": 25000},
                "model": {"preset": "transformer-xl-12", "experts": 16, "top_k": 1},
                "serving": {
                    "trace": str(trace),
                    "fold_experts": True,
                    "requests": 100,
                    "arrival": {"process": "poisson", "rate": 6800},
                    "batching": {"tokens_per_gpu": 512},
                },
                "policies": ["static"],
            }
        )
    )
    t0 = time.perf_counter()
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 5  # generous: the check itself takes milliseconds
    line = capsys.readouterr().err.strip()
    assert (
        "\n" not in line
        and "cluster.nodes: serving 100000 GPUs needs about" in line
        and "allowed: cluster.nodes <=" in line
    )
    assert not (tmp_path / "out").exists()


def test_classes_of_replicas_that_would_not_fit_are_refused_before_they_are_built(monkeypatch):
    """The guard counts one block of replicas; where the engine splits replicas into
    classes (DeepSpeed's trees across 8 replicas of 2 nodes, beside its all-to-alls) it
    checks the classes' ranks against the same budget before building them: a machine
    with room for one block but not for the classes gets the one-line refusal."""
    scenario = {
        "cluster": {"preset": "dgx-h100-superpod", "nodes": 16},
        "model": {"preset": "deepseek-moe-16b", "experts": 16, "layers": 4, "moe_layers": [1, 2, 3]},
        "policies": ["deepspeed"],
    }
    setup = resolve_training(expand(scenario)[0])
    one_block = host_memory(setup.cluster, setup.model, setup.policies, 1)
    assert one_block.simulated == 16
    built: list[tuple[int, int]] = []  # (simulated ranks, ops and gradients per rank)
    real = training_run.check_simulated_ranks

    def spy(cluster, model, policies, graph, simulated):
        built.append((simulated, len(graph.ops) + len(graph.grad_requests)))
        return real(cluster, model, policies, graph, simulated)

    monkeypatch.setattr(training_run, "check_simulated_ranks", spy)
    alone = training_run.AloneTimes(setup.cluster, setup.algos)
    training_run.run_policy(setup, setup.policies[0], alone)
    (first, per_rank), (last, _) = built[0], built[-1]
    assert first == 16 and last > 16  # one class first, then the classes
    # Room for the one-class run and half a block more, not for the classes.
    one = training_run.HostMemory(setup.cluster.world_size, 16, 16 * per_rank, 1)
    budget = one.total + 0.5 * one.rank_ops * HOST_BYTES_PER_RANK_OP
    monkeypatch.setattr(training_run, "available_memory", lambda: budget)
    with pytest.raises(ConfigError) as e:
        training_run.run_policy(setup, setup.policies[0], alone)
    assert e.value.field == "cluster.nodes" and "classes" in str(e.value) and "\n" not in str(e.value)
