"""``lina-sim collective`` in NCCL's vocabulary (``--algo auto|ring|tree|nvls|hierarchical|
flat-ring``, ``--proto auto|LL|LL128|Simple``), the per-size ``algo`` / ``proto`` columns,
and the one-line errors for bad input; the scenario ``collectives:`` block's names."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lina_sim.cli.main import main
from lina_sim.config.scenario import expand
from lina_sim.errors import ConfigError
from lina_sim.experiments.microbench import collective_sweep
from lina_sim.hardware.spec import load_preset
from lina_sim.network import nccl
from lina_sim.routing.generator import RoutingTraceGenerator
from lina_sim.serving.setup import resolve_inference
from lina_sim.training.run import resolve_training

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nccl-measured"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lina_sim.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit 2 and one line ``lina-sim collective: error: ...`` holding
    every needle, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("lina-sim collective: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def table_rows(out: str) -> list[list[str]]:
    return [l.split() for l in out.splitlines() if l.strip() and not l.startswith("#")]


def test_default_is_auto_and_the_table_says_what_ran(capsys):
    args = ["collective", "--preset", "dgx-a100", "--nodes", "4", "--op", "allreduce", "--sizes", "4K:1G:256"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "allreduce (auto) on dgx-a100" in out.splitlines()[0]
    assert out.splitlines()[1].split()[-2:] == ["algo", "proto"]
    rows = table_rows(out)
    assert rows[0][-2:] == ["tree", "LL"]  # small on 4 nodes: NCCL's tree
    c = load_preset("dgx-a100", nodes=4)
    assert [tuple(r[-2:]) for r in rows] == [nccl.predict(c, int(r[0]))[:2] for r in rows]  # NCCL's choice


def test_nvls_on_one_hopper_node(capsys):
    assert main(["collective", "--preset", "dgx-h100", "--nodes", "1", "--op", "allreduce", "--sizes", "1G"]) == 0
    assert table_rows(capsys.readouterr().out)[0][-2:] == ["nvls", "Simple"]
    args = ["collective", "--preset", "dgx-h100", "--nodes", "1", "--op", "allreduce", "--algo", "tree"]
    assert main([*args, "--proto", "LL128", "--sizes", "1M"]) == 0
    assert table_rows(capsys.readouterr().out)[0][-2:] == ["tree", "LL128"]


@pytest.mark.parametrize("algo", ["flat-ring", "hierarchical"])
def test_lina_sims_own_algorithms_show_a_dash(capsys, algo):
    assert main(["collective", "--op", "allreduce", "--algo", algo, "--sizes", "1M"]) == 0
    assert table_rows(capsys.readouterr().out)[0][-2:] == [algo, "-"]


def test_flat_ring_is_the_old_ring_and_auto_differs():
    c = load_preset("dgx-a100", nodes=4)
    flat = collective_sweep(c, "allreduce", "flat-ring", [4 << 10])["time_us"].iloc[0]
    auto = collective_sweep(c, "allreduce", "auto", [4 << 10])["time_us"].iloc[0]
    assert auto * 3 < flat  # NCCL's tree vs 2(n-1) latency-bound ring steps


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--op", "allreduce", "--algo", "nccl"], ["--algo", "allowed: auto, ring, tree, nvls, hierarchical, flat"]),
        (["--op", "allreduce", "--algo", "nccl-ring"], ["--algo", "unknown allreduce algorithm"]),
        (["--op", "all_to_all", "--algo", "ring"], ["--algo", "allowed: direct, hierarchical, flat"]),
        (["--op", "allreduce", "--proto", "ll"], ["--proto", "allowed: auto, LL, LL128, Simple"]),
        (["--op", "allreduce", "--algo", "flat-ring", "--proto", "LL"], ["--proto", "auto|ring|tree|nvls"]),
        (["--op", "allreduce", "--algo", "hierarchical", "--proto", "Simple"], ["--proto", "hierarchical"]),
        (["--op", "all_to_all", "--proto", "LL"], ["--proto", "only the allreduce"]),
        (["--op", "sendrecv", "--proto", "LL"], ["--proto", "only the allreduce"]),
        # NVLS needs NVSwitch and Hopper (dgx-a100 has NVSwitch but A100s; paper-testbed has
        # neither), and one node.
        (["--op", "allreduce", "--algo", "nvls", "--preset", "dgx-a100"], ["--algo", "Hopper", "allowed: auto"]),
        (["--op", "allreduce", "--algo", "nvls"], ["--algo", "nvls", "allowed: auto, ring, tree, hierarchical"]),
        (["--op", "allreduce", "--algo", "nvls", "--preset", "dgx-h100", "--nodes", "2"], ["--algo", "2 node(s)"]),
        (["--op", "allreduce", "--algo", "nvls", "--preset", "dgx-h100", "--proto", "LL"], ["--proto", "Simple"]),
        (["--op", "allreduce", "--algo", "ring", "--proto", "LL128"], ["--proto", "allowed: auto, LL, Simple"]),
    ],
)
def test_bad_algo_or_proto_is_one_line(args, needles):
    one_line_error(run_cli("collective", "--sizes", "1M", *args), *needles)


def test_contention_takes_the_new_names(capsys):
    assert main(["contention", "--preset", "paper-testbed", "--size", "4M"]) == 0
    assert "allreduce (auto)" in capsys.readouterr().out
    assert main(["contention", "--preset", "paper-testbed", "--size", "4M", "--ar-algo", "flat-ring"]) == 0
    r = run_cli("contention", "--ar-algo", "nccl")
    assert r.returncode == 2 and "--ar-algo" in r.stderr and "flat-ring" in r.stderr and "Traceback" not in r.stderr


# -- measured files --------------------------------------------------------------------
HEAD = "collective,size_bytes,ranks,ranks_per_node,nodes,time_s\n"


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_garbage_measured_file_names_file_and_line(tmp_path):
    f = _write(tmp_path, "junk.txt", "hello world\nthis is not a table\n")
    one_line_error(run_cli("collective", "--compare", f), f"{f}:1", "not a measured collective table")
    f = _write(tmp_path, "allreduce.txt", "# nThread 1 nGpus 1\n  1024 256 float sum -1 x y z 0\n")
    one_line_error(run_cli("collective", "--compare", f), f"{f}:2")
    f = _write(tmp_path, "junk.csv", "collective,size_bytes,ranks,ranks_per_node,nodes,time_s\nallreduce,1K,8,8,1,x\n")
    one_line_error(run_cli("collective", "--compare", f), f"{f}:2")


@pytest.mark.parametrize(
    "row,extra,needles",
    [
        ("allreduce,1048576,16,8,2,0.001", [], ["16 ranks (2 node(s) x 8)", "paper-testbed with 4 GPUs per node"]),
        ("allreduce,1048576,6,4,2,0.001", [], [":2", "6 ranks"]),
        ("allreduce,1048576,40,4,10,0.001", ["--nodes", "4"], ["on at most 4 node(s)"]),
        ("allreduce,1048576,8,4,2,0.001", ["--gpus-per-node", "2"], ["2 GPUs per node"]),
    ],
)
def test_measured_table_that_does_not_fit_the_preset(tmp_path, row, extra, needles):
    f = _write(tmp_path, "t.csv", "collective,size_bytes,ranks,ranks_per_node,nodes,time_s\n" + row + "\n")
    one_line_error(run_cli("collective", "--compare", f, *extra), f, *needles)


def test_nvls_on_a_multi_node_measured_table_is_one_line(tmp_path):
    f = _write(tmp_path, "t.csv", HEAD + "allreduce,1048576,16,8,2,1e-4\n")
    one_line_error(run_cli("collective", "--compare", f, "--preset", "dgx-h100", "--algo", "nvls"), "--algo", "t.csv")
    f2 = _write(tmp_path, "a2a.csv", HEAD + "all_to_all,1048576,8,8,1,1e-4\n")
    one_line_error(run_cli("collective", "--compare", f2, "--preset", "dgx-h100", "--proto", "LL"), "--proto")


def test_compare_records_the_protocol(tmp_path, capsys):
    truth = collective_sweep(load_preset("dgx-h100"), "allreduce", "ring", [1 << 20, 64 << 20], proto="LL128")
    rows = [f"allreduce,{s},8,8,1,{t * 1e-6}" for s, t in zip(truth["size"], truth["time_us"])]
    f = _write(tmp_path, "t.csv", "collective,size_bytes,ranks,ranks_per_node,nodes,time_s\n" + "\n".join(rows) + "\n")
    out = tmp_path / "cmp"
    args = ["collective", "--compare", f, "--preset", "dgx-h100", "--algo", "ring", "--proto", "LL128"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ring/LL128" in text  # the summary's algo column
    cmp = pd.read_csv(out / "comparison.csv")
    assert set(cmp["proto"]) == {"LL128"} and set(cmp["ran"]) == {"ring LL128"}
    assert cmp["error_pct"].abs().max() < 0.01  # the same algorithm and protocol predict themselves


def test_calibrate_records_the_protocol(tmp_path, capsys):
    c = load_preset("dgx-h100")
    sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20]
    truth = collective_sweep(c, "allreduce", "auto", sizes, proto="Simple")
    rows = [f"allreduce,{s},8,8,1,{t * 1e-6}" for s, t in zip(truth["size"], truth["time_us"])]
    f = _write(tmp_path, "t.csv", "collective,size_bytes,ranks,ranks_per_node,nodes,time_s\n" + "\n".join(rows) + "\n")
    prof = tmp_path / "p.yaml"
    assert main(["collective", "--calibrate", f, "--preset", "dgx-h100", "--proto", "Simple", "--out", str(prof)]) == 0
    assert yaml.safe_load(prof.read_text())["calibration"]["proto"] == "Simple"
    r = run_cli("collective", "--calibrate", f, "--preset", "dgx-h100", "--proto", "ll", "--out", str(prof))
    one_line_error(r, "--proto", "allowed: auto, LL, LL128, Simple")


# -- scenarios ---------------------------------------------------------------------------
TRAINING = {
    "kind": "training",
    "cluster": {"preset": "paper-testbed", "nodes": 2},
    "model": {"preset": "transformer-xl-12", "layers": 2},
    "policies": ["deepspeed"],
}


@pytest.mark.parametrize(
    "block,field,needle",
    [
        ({"allreduce": "ring"}, "collectives.allreduce", "renamed to collectives.algo"),
        ({"algo": "nccl-tree"}, "collectives.algo", "allowed: auto, ring, tree, nvls, hierarchical, flat-ring"),
        ({"algo": "nvls"}, "collectives.algo", "Hopper"),
        ({"algo": "hierarchical", "proto": "LL"}, "collectives.proto", "needs one of NCCL's algorithms"),
        ({"proto": "simple"}, "collectives.proto", "allowed: auto, LL, LL128, Simple"),
        ({"all_to_all": "ring"}, "collectives.all_to_all", "allowed: direct, hierarchical, flat"),
    ],
)
def test_training_collectives_block(block, field, needle):
    with pytest.raises(ConfigError) as e:
        resolve_training(expand({**TRAINING, "collectives": block})[0])
    assert e.value.field == field and needle in str(e.value), str(e.value)


def test_training_collectives_block_defaults_and_values():
    assert resolve_training(expand(TRAINING)[0]).algos.algo == "auto"
    setup = resolve_training(expand({**TRAINING, "collectives": {"algo": "tree", "proto": "LL"}})[0])
    assert (setup.algos.algo, setup.algos.proto, setup.algos.all_to_all) == ("tree", "LL", "direct")
    assert setup.describe()["collectives"] == {"algo": "tree", "proto": "LL", "all_to_all": "direct"}


@pytest.mark.parametrize("key", ["algo", "proto", "allreduce"])
def test_inference_has_no_allreduce_fields(tmp_path, key):
    trace = tmp_path / "t.npz"
    RoutingTraceGenerator.synthetic(16, 12, top_k=1, seq_len=64, seed=3).generate(640, seed=3).save(trace)
    data = {
        "kind": "inference",
        "cluster": {"preset": "paper-testbed", "nodes": 1},
        "model": {"preset": "transformer-xl-12", "experts": 4, "top_k": 1},
        "serving": {
            "trace": str(trace),
            "requests": 4,
            "fold_experts": True,
            "arrival": {"process": "poisson", "rate": 1000.0},
        },
        "policies": ["static"],
        "collectives": {key: "auto"},
    }
    with pytest.raises(ConfigError) as e:
        resolve_inference(expand(data)[0])
    assert e.value.field == f"collectives.{key}" and "only collectives.all_to_all" in str(e.value)
    assert "all_to_all: direct|hierarchical|flat" in str(e.value)
    data["collectives"] = {"all_to_all": "flat"}
    assert resolve_inference(expand(data)[0]).a2a_algo == "flat"
