"""The house rules of docs/ARCHITECTURE.md, checked on the source: imports run one way,
down the layers; nothing imports the CLI; the simulator never imports the runtime; and
no module imports another one that (directly or not) imports it back.

Every import counts, at module level or inside a function: an import inside a function
still makes the dependency, it only hides it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lina_sim", "runtime", "plots")

# Lowest first. A module may import its own layer (without a cycle) and the ones below.
LAYERS: list[tuple[str, ...]] = [
    ("lina_sim", "lina_sim.errors"),
    ("lina_sim.config", "lina_sim.results"),
    ("lina_sim.hardware",),
    ("lina_sim.network",),
    ("lina_sim.workload",),
    ("lina_sim.policies",),
    ("lina_sim.routing",),
    ("lina_sim.training", "lina_sim.serving"),
    ("plots",),
    ("lina_sim.experiments",),
    ("runtime",),
    ("lina_sim.cli",),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (the longest known prefix of each import)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            parts = t.split(".")
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand in known and cand != name:
                    out.add(cand)
                    break
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    # A package's __init__ is not a dependency of its submodules' imports of siblings.
    return graph


def _layer(name: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{name} is in no layer of LAYERS; add its package"
    return rank


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_imports_run_down_the_layers():
    bad = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in _graph().items()
        for b in sorted(deps)
        if _layer(b) > _layer(a)
    ]
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_nothing_outside_the_cli_imports_it():
    bad = [
        f"{a} imports {b}"
        for a, deps in _graph().items()
        for b in sorted(deps)
        if b.startswith("lina_sim.cli") and not a.startswith("lina_sim.cli")
    ]
    assert not bad, "\n".join(bad)


def test_the_simulator_never_imports_the_runtime():
    bad = [
        f"{a} imports {b}"
        for a, deps in _graph().items()
        for b in sorted(deps)
        if a.startswith("lina_sim") and b.startswith("runtime")
    ]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("ref", ["DESIGN.md"])
def test_nothing_refers_outside_the_repository(ref):
    hits = []
    for p in ROOT.rglob("*"):
        if (
            p.is_file()
            and p.suffix in (".py", ".md", ".yaml", ".toml")
            and ".venv" not in p.parts
            and ".git" not in p.parts
            and p.name != Path(__file__).name
        ):
            text = p.read_text(errors="replace")
            if ref in text or "../shared/DESIGN" in text:
                hits.append(str(p.relative_to(ROOT)))
    assert not hits, f"{ref} is not in this repository; refer to docs/ARCHITECTURE.md instead: {hits}"


# Inside runtime/, lowest first (docs/ARCHITECTURE.md, "Inside the runtime"): the comm
# primitives import no other runtime module, the modes sit below the scenario registry,
# and validation only orchestrates what is below it.
RUNTIME_ORDER = (
    "comm",
    "dist",
    "context",
    "moe",
    "moe_dispatch",
    "op_census",
    "ep_moe",
    "mode",
    "compute_profile",
    "train",
    "infer",
    "scenario",
    "selftest",
    "calibrate",
    "testbed",
    "launch",
    "testbed_profile",
    "compare",
    "validate",
    "record",
    "entry",
    "cli",
    "validate_command",
)


def test_runtime_modules_import_down_their_order():
    graph = _graph()
    mods = sorted(m for m in graph if m.startswith("runtime."))
    missing = [m for m in mods if m.split(".")[1] not in RUNTIME_ORDER]
    assert not missing, f"add these runtime modules to RUNTIME_ORDER: {missing}"
    bad = [
        f"{a} imports {b}"
        for a in mods
        for b in sorted(graph[a])
        if b.startswith("runtime.") and RUNTIME_ORDER.index(b.split(".")[1]) >= RUNTIME_ORDER.index(a.split(".")[1])
    ]
    assert not bad, "runtime imports that run up its order:\n" + "\n".join(bad)
    assert not any(b.startswith("runtime.") for b in graph["runtime.comm"]), "runtime.comm imports the runtime"


def test_runtime_registries_cover_every_scenario_kind():
    from lina_sim.config.scenario import KIND_NAMES
    from lina_sim.experiments.kinds import KINDS
    from runtime.scenario import MODES
    from runtime.validate import VALIDATIONS

    assert set(KINDS) == set(MODES) == set(VALIDATIONS) == set(KIND_NAMES)
