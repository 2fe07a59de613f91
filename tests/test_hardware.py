"""Presets load, carry datasheet numbers, and reject bad fields by name."""

import pytest
import yaml

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import PRESET_DIR, available_presets, load_preset
from lina_sim.hardware.topology import Topology


def test_shipped_presets():
    assert {"dgx-a100", "paper-testbed", "dgx-h100"} <= set(available_presets())
    a100 = load_preset("dgx-a100")
    assert a100.gpus_per_node == 8 and a100.nics_per_node == 8 and a100.intra_node == "nvswitch"
    assert a100.gpu.flops("bf16") == 312e12 and a100.nvlink.bandwidth == 300e9
    tb = load_preset("paper-testbed")
    assert tb.nodes == 4 and tb.gpus_per_node == 4 and tb.nics_per_node == 1
    assert tb.nic.bandwidth == 12.5e9 and tb.gpu.memory_bytes == 40e9
    h100 = load_preset("dgx-h100", nodes=3)
    assert h100.world_size == 24 and h100.gpu.flops("bf16") == 989e12


def test_every_number_in_a_preset_says_where_it_comes_from():
    for path in PRESET_DIR.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if any(k in line for k in ("bandwidth:", "efficiency:", "peak_flops", "memory_bytes:")):
                assert "#" in line, f"{path.name}: no source for {line.strip()!r}"


def test_topology_paths():
    topo = Topology(load_preset("dgx-a100", nodes=2))
    assert [topo.link_name(l) for l in topo.path(0, 1)] == ["nvl_tx[0]", "nvl_rx[1]"]
    assert [topo.link_name(l) for l in topo.path(3, 12)] == [
        "pcie_up[3]",
        "nic_tx[node0.3]",
        "nic_rx[node1.4]",
        "pcie_down[12]",
    ]
    assert topo.path(5, 5) == []
    mesh = Topology(load_preset("paper-testbed"))
    assert [mesh.link_name(l) for l in mesh.path(6, 5)] == ["nvl[6->5]"]
    assert mesh.link_name(mesh.path(1, 9)[1]) == "nic_tx[node0.0]"  # four GPUs share one NIC


def test_oversubscribed_fabric_adds_uplinks(tmp_path):
    data = yaml.safe_load((PRESET_DIR / "dgx-a100.yaml").read_text())
    data["oversubscription"] = 4.0
    p = tmp_path / "over.yaml"
    p.write_text(yaml.safe_dump(data))
    topo = Topology(load_preset(str(p), nodes=2))
    names = [topo.link_name(l) for l in topo.path(0, 8)]
    assert "uplink[node0]" in names and "downlink[node1]" in names


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.update(nodes=0), "nodes"),
        (lambda d: d.update(intra_node="torus"), "intra_node"),
        (lambda d: d.update(nic_of_gpu=[0, 1]), "nic_of_gpu"),
        (lambda d: d["nic"].update(efficiency=1.5), "nic.efficiency"),
        (lambda d: d["gpu"].pop("hbm_bandwidth"), "gpu.hbm_bandwidth"),
        (lambda d: d.update(colour="blue"), "colour"),
    ],
)
def test_bad_preset_fields_are_named(tmp_path, mutate, field):
    data = yaml.safe_load((PRESET_DIR / "dgx-a100.yaml").read_text())
    mutate(data)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"bad.{field}"):
        load_preset(str(p))


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="dgx-a100, dgx-h100, dgx-h100-superpod, paper-testbed"):
        load_preset("dgx-z9")


@pytest.mark.parametrize(
    "text,field",
    [
        ("nic: {bandwidth: 25.0e+9, latency: .nan}", "nic.latency"),
        ("nic: {bandwidth: .inf}", "nic.bandwidth"),
        ("nvlink: {bandwidth: 300.0e+9, efficiency: .nan}", "nvlink.efficiency"),
        ("switch_latency: -.inf", "switch_latency"),
    ],
)
def test_non_finite_preset_numbers_are_one_error_naming_the_field(tmp_path, text, field):
    data = yaml.safe_load((PRESET_DIR / "dgx-a100.yaml").read_text())
    data.update(yaml.safe_load(text))
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_preset(str(p))
    assert e.value.field == f"bad.{field}" and "finite" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override,field",
    [
        ({"nic": {"latency": float("nan")}}, "cluster.nic.latency"),
        ({"nic": {"bandwidth": float("inf")}}, "cluster.nic.bandwidth"),
        ({"gpu": {"peak_flops": {"bf16": float("nan")}}}, "cluster.gpu.peak_flops.bf16"),
        ({"oversubscription": float("nan")}, "cluster.oversubscription"),
    ],
)
def test_non_finite_overrides_are_one_error_naming_the_field(override, field):
    from lina_sim.hardware.spec import resolve_cluster

    with pytest.raises(ConfigError) as e:
        resolve_cluster({"preset": "dgx-a100", **override})
    assert e.value.field == field and "finite" in e.value.problem


def test_misspelt_link_fields_are_named_with_a_suggestion():
    from lina_sim.hardware.spec import resolve_cluster

    with pytest.raises(ConfigError) as e:
        resolve_cluster({"preset": "paper-testbed", "nic": {"bandwdth": 1e9}})
    assert e.value.field == "cluster.nic.bandwdth" and "did you mean cluster.nic.bandwidth" in str(e.value)


def test_numbers_written_as_yaml_text_are_read():
    # PyYAML reads 12.5e9 (no exponent sign) as a string: presets have always allowed it.
    from lina_sim.hardware.spec import resolve_cluster

    assert resolve_cluster({"preset": "paper-testbed", "nic": {"bandwidth": "12.5e9"}}).nic.bandwidth == 12.5e9
