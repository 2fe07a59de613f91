"""The emulated testbed: real namespaces, veths, tc shaping, real gloo across them."""

from __future__ import annotations

import subprocess
import time

import pytest

from lina_sim.errors import ConfigError
from runtime.testbed import (
    Testbed,
    TestbedSpec,
    TestbedTimeout,
    cleanup_stale,
    list_namespaces,
    parse_delay,
    parse_rate,
    parse_topology,
)
from tests._netns import PY, ROOT, needs_netns, no_leftovers  # noqa: F401 (a fixture)

pytestmark = pytest.mark.netns


def test_parse_topology_rate_delay():
    assert parse_topology("2x4") == (2, 4)
    assert parse_topology(" 3X1 ") == (3, 1)
    assert parse_rate("400mbit") == 400e6
    assert parse_rate("25Gb/s") == 25e9
    assert parse_rate("1.5gbit") == 1.5e9
    assert parse_delay("1ms") == pytest.approx(1e-3)
    for bad in ("2", "2x", "0x2", "2x0", "axb", "2x2x2"):
        with pytest.raises(ConfigError, match="NODESxRANKS"):
            parse_topology(bad)
    for bad in ("400", "400mbps", "fast", "-1gbit", "0mbit"):
        with pytest.raises(ConfigError, match="--nic"):
            parse_rate(bad)
    with pytest.raises(ConfigError, match="--delay"):
        parse_delay("soon")


@needs_netns
def test_up_and_down_leaves_nothing(no_leftovers):  # noqa: F811 (the fixture)
    with Testbed(TestbedSpec(2, 1, 100e6)) as tb:
        names = set(list_namespaces())
        assert set(tb.namespaces) <= names
        # Node 0 reaches node 1 across the bridge, over addresses that exist only in our namespaces.
        probe = f"import socket; socket.create_connection(('{tb.node_addr(1)}', 9), timeout=5)"
        p = subprocess.run(tb.wrap([PY, "-c", probe], rank=0), capture_output=True, text=True)
        assert "ConnectionRefused" in p.stderr, p.stderr  # node 1's stack answered (nothing listens)
        qdisc = subprocess.run(
            ["ip", "netns", "exec", tb.node_ns(0), "tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True
        ).stdout
        assert "htb" in qdisc
    assert not set(tb.namespaces) & set(list_namespaces())


@needs_netns
def test_teardown_on_exception_kills_processes_inside(no_leftovers):  # noqa: F811 (the fixture)
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed(TestbedSpec(2, 1, 100e6)) as tb:
            sleeper = subprocess.Popen(tb.wrap(["sleep", "300"], rank=1))
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) != 0  # killed by the teardown, not finished
    assert not set(tb.namespaces) & set(list_namespaces())


@needs_netns
def test_cleanup_stale_removes_namespaces_of_dead_runs():
    dead = Testbed(TestbedSpec(1, 1, 100e6), prefix="lina-999999999-0")  # no such pid
    dead.up()
    dead._created.clear()  # "crash": forget them, as a SIGKILLed launcher would
    try:
        assert dead.switch_ns in list_namespaces()
        removed = cleanup_stale()
        assert set(dead.namespaces) <= set(removed)
        assert not set(dead.namespaces) & set(list_namespaces())
    finally:
        for ns in dead.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@needs_netns
def test_gloo_collectives_and_shaped_rate(no_leftovers):  # noqa: F811 (the fixture)
    """2 nodes x 2 ranks: allreduce and all_to_all are correct; a cross-node transfer runs
    near the shaped 200 Mbit/s (TCP/IP overhead and a busy CPU only slow it down)."""
    from runtime.launch import run_entry

    rate = 200e6
    nbytes = 4e6  # 0.16 s at 200 Mbit/s
    res = run_entry("selftest", ["1e6", str(nbytes), "1"], testbed=TestbedSpec(2, 2, rate), timeout_s=90, echo=False)
    assert all(r["allreduce_ok"] == 1.0 and r["a2a_ok"] == 1.0 for r in res)
    achieved = nbytes * 8 / res[0]["p2p"]
    assert 0.4 * rate < achieved < 1.1 * rate, f"cross-node p2p at {achieved / 1e6:.0f} Mbit/s, shaped to 200"


@needs_netns
def test_not_root_is_one_line_exit_2():
    p = subprocess.run(
        [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            PY,
            "-m",
            "runtime.cli",
            "selftest",
            "--testbed",
            "2x2",
            "--nic",
            "1gbit",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "Permission denied" in p.stderr and "python" in p.stderr.lower():
        pytest.skip("the unprivileged user cannot run this venv's python")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "needs root" in p.stderr


def test_bad_testbed_input_is_one_line_exit_2():
    for args, needle in (
        (["--testbed", "2y2", "--nic", "1gbit"], "NODESxRANKS"),
        (["--testbed", "2x2", "--nic", "400mbps"], "bad rate"),
        (["--testbed", "2x2"], "--nic: required"),
    ):
        p = subprocess.run(
            [PY, "-m", "runtime.cli", "selftest", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 2 and needle in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr


@needs_netns
def test_building_past_the_deadline_stops_and_removes_what_was_built(no_leftovers):  # noqa: F811 (the fixture)
    tb = Testbed(TestbedSpec(3, 1, 100e6), deadline=time.monotonic() - 1.0)
    with pytest.raises(TestbedTimeout, match=r"timed out while building the testbed \(0 of 3 nodes up\)"):
        with tb:
            pass
    assert not set(tb.namespaces) & set(list_namespaces())
