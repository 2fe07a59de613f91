"""Helpers for the tests that build real testbeds and launch real rank processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"lina-probe-{uuid.uuid4().hex[:6]}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create a network namespace: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_WHY = netns_unavailable()
needs_netns = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def lina_namespaces(prefix: str = "lina-") -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(prefix)]


def rank_pids(launcher_pid: int) -> list[int]:
    """Live processes started by the launcher ``launcher_pid`` (it tags its ranks' env)."""
    tag = f"LINA_LAUNCHER_PID={launcher_pid}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if tag in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def lina_run(*args: str) -> subprocess.Popen:
    """Start ``lina-run ARGS`` as a child process (output captured)."""
    return subprocess.Popen(
        [PY, "-m", "runtime.cli", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.fixture
def no_leftovers():
    """Fail if the test leaves namespaces of this process behind; remove them regardless."""
    mine = f"lina-{os.getpid()}-"
    yield
    left = lina_namespaces(mine)
    for ns in left:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert not left, f"namespaces left behind: {left}"
