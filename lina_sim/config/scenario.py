"""YAML scenarios: loading, field paths, validation with clear errors, sweep expansion.

A scenario is a mapping:

```yaml
name: my-experiment
kind: training                 # training | inference
seed: 0
cluster: {preset: paper-testbed, nodes: 4, nic: {bandwidth: 12.5e9}}
model: {preset: transformer-xl-24, micro_batch: 8}
policies: [deepspeed, {name: lina, micro_op_mb: 30}]
steps: 2
sweep:                         # optional
  grid: {cluster.nodes: [1, 2, 4], model.preset: [gpt2-moe, transformer-xl-24]}
  zip:  {policies[lina].micro_op_mb: [10, 30], cluster.nic.bandwidth: [12.5e9, 25e9]}
```

Field paths are dotted; ``policies[NAME]`` selects the policy entry with that name.
Two shorthands are accepted in sweeps: ``cluster.nic_bandwidth`` (likewise ``nvlink_`` /
``pcie_`` and ``_latency`` / ``_efficiency``) for ``cluster.nic.bandwidth``, and
``policies[NAME].micro_op_bytes`` / ``bucket_bytes`` (bytes) for ``micro_op_mb`` /
``bucket_mb`` (MB = 10^6 bytes); result columns keep the name the sweep used.
A sweep's ``grid`` is a product over its lists, ``zip`` walks its lists in lockstep, and
with both, every zip row is combined with every grid point. Every error names the YAML
path of the offending field and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lina_sim.config import fields
from lina_sim.errors import ConfigError

# The known scenario kinds. What each kind does is registered in lina_sim.experiments.kinds
# (a higher layer, which checks that its registry has exactly these names); the loader
# only needs the names, to reject an unknown kind before anything is resolved.
KIND_NAMES = ("training", "inference")
KIND = fields.Field(str, KIND_NAMES[0], choices=KIND_NAMES, help="what the scenario simulates")
TOP_LEVEL = {
    "name": "a label for the results",
    "description": "free text",
    "kind": "training | inference",
    "seed": "integer random seed",
    "cluster": "preset, nodes and overrides of preset fields",
    "model": "model preset and overrides",
    "policies": "list of policy names or {name: ..., params...}",
    "steps": "training steps to simulate",
    "collectives": "algorithms, NCCL's names: {algo: auto|ring|tree|nvls|hierarchical|flat-ring, "
    "proto: auto|LL|LL128|Simple, all_to_all: direct|hierarchical|flat} (inference: all_to_all only)",
    "compute": "compute model: {model: roofline} or {model: profile, profile: PATH}",
    "serving": "inference: trace, arrivals, batching",
    "sweep": "grid / zip over field paths",
    "output": "where to write results",
}
_SEG = re.compile(r"([A-Za-z_][\w\-]*)(?:\[([^\]]+)\])?$")


@dataclass
class Scenario:
    """One fully resolved scenario point: the raw mapping (after sweep substitution),
    the values of the swept fields, and where it came from."""

    data: dict[str, Any]
    swept: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def name(self) -> str:
        return str(self.data.get("name", Path(self.source).stem))

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", KIND.default))

    @property
    def seed(self) -> int:
        return int(self.data.get("seed", 0))

    def find(self, written: str) -> Path:
        """A file a scenario names (a trace, a profile) as :func:`beside`."""
        return beside(written, self.source)


def beside(written: str, source: str) -> Path:
    """A relative path as a scenario file writes it: from the working directory if it
    exists there; else beside the scenario file ``source``, or one level up
    (``scenarios/`` sits beside ``traces/`` in the repository), so that a scenario runs
    from any directory. The path as written when none exists (its reader then names it)."""
    path = Path(written)
    if path.is_absolute() or path.exists() or source in ("<memory>", ""):
        return path
    here = Path(source).resolve().parent
    return next((c for c in (here / written, here.parent / written) if c.exists()), path)


# -- field paths ----------------------------------------------------------------------
def _split(path: str) -> list[tuple[str, str | None]]:
    out = []
    for seg in path.split("."):
        m = _SEG.match(seg)
        if not m:
            raise ConfigError(
                f"sweep.{path}",
                f"cannot parse field path segment {seg!r}",
                "dotted names, with policies[NAME] to pick a policy",
            )
        out.append((m.group(1), m.group(2)))
    return out


def _policy_entry(policies: Any, name: str, path: str) -> dict:
    if not isinstance(policies, list):
        raise ConfigError(path, "policies must be a list")
    for i, p in enumerate(policies):
        pname = p if isinstance(p, str) else (p or {}).get("name")
        if pname == name:
            if isinstance(p, str):
                policies[i] = {"name": p}
            return policies[i]
    names = [p if isinstance(p, str) else (p or {}).get("name") for p in policies]
    raise ConfigError(path, f"no policy named {name!r} in this scenario", names)


# Shorthand sweep paths -> canonical ones (the spelling of nested fields).
_LINK_SHORTHAND = re.compile(r"^cluster\.(nic|nvlink|pcie)_(bandwidth|efficiency|latency)$")
_BYTES_SHORTHAND = re.compile(r"^(policies\[[^\]]+\])\.(micro_op|bucket)_bytes$")


def canonical_path(path: str, value: Any) -> tuple[str, Any]:
    """Rewrite a shorthand field path (and its value's unit) to the canonical one."""
    if m := _LINK_SHORTHAND.match(path):
        return f"cluster.{m.group(1)}.{m.group(2)}", value
    if m := _BYTES_SHORTHAND.match(path):
        mb = value / 1e6 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        return f"{m.group(1)}.{m.group(2)}_mb", mb
    return path, value


def get_path(data: Mapping, path: str) -> Any:
    node: Any = data
    for key, sel in _split(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(path)
        node = node[key]
        if sel is not None:
            node = _policy_entry(node, sel, path)
    return node


def set_path(data: dict, path: str, value: Any, known_top: Mapping[str, Any] = TOP_LEVEL) -> None:
    """Set a dotted field; intermediate mappings are created, but the top-level field
    must be a known one so that a typo is caught before anything runs."""
    segs = _split(path)
    if segs[0][0] not in known_top:
        raise ConfigError(f"sweep.{path}", f"unknown top-level field {segs[0][0]!r}", sorted(known_top))
    node: Any = data
    for i, (key, sel) in enumerate(segs):
        last = i == len(segs) - 1
        if sel is not None:
            node = _policy_entry(node.setdefault(key, []), sel, f"sweep.{path}")
            if last:
                raise ConfigError(f"sweep.{path}", "cannot replace a whole policy entry; sweep one of its parameters")
            continue
        if last:
            node[key] = value
        else:
            nxt = node.get(key)
            if nxt is None:
                nxt = node[key] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"sweep.{path}", f"{key!r} is not a mapping here, so it has no sub-fields")
            node = nxt


# -- loading and expansion -------------------------------------------------------------
def load_yaml(path: str | Path) -> dict:
    """A scenario file's mapping (one error naming the file if it is not one)."""
    return fields.load_yaml(path, "scenario", sorted(TOP_LEVEL))


def check_kind(kind: Any, where: str = "") -> None:
    """A ConfigError naming ``<where>kind`` unless ``kind`` is one of :data:`KIND_NAMES`."""
    KIND.check(kind, f"{where}kind")


def check_top_level(data: Mapping, where: str = "") -> None:
    fields.check_known(data, TOP_LEVEL, where.removesuffix("."))
    check_kind(data.get("kind", KIND.default), where)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where}seed", f"must be an integer, got {seed!r}")


def _sweep_lists(block: Any, where: str) -> dict[str, list]:
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        raise ConfigError(where, "must be a mapping of field path -> list of values")
    out = {}
    for path, values in block.items():
        if not isinstance(values, list):
            raise ConfigError(f"{where}.{path}", f"must be a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"{where}.{path}", "empty list: the sweep would have no points")
        out[str(path)] = values
    return out


def expand(data: Mapping, source: str = "<memory>") -> list[Scenario]:
    """Expand a scenario's ``sweep`` block into its points (one point without a sweep)."""
    data = copy.deepcopy(dict(data))
    check_top_level(data)
    sweep = data.pop("sweep", None)
    if sweep is None:
        return [Scenario(data, {}, source)]
    if not isinstance(sweep, Mapping):
        raise ConfigError("sweep", "must be a mapping with grid and/or zip", ["grid", "zip"])
    for key in sweep:
        if key not in ("grid", "zip"):
            raise ConfigError(f"sweep.{key}", "unknown field", ["grid", "zip"])
    grid = _sweep_lists(sweep.get("grid"), "sweep.grid")
    zipped = _sweep_lists(sweep.get("zip"), "sweep.zip")
    if not grid and not zipped:
        raise ConfigError("sweep", "empty sweep: give grid and/or zip lists")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ConfigError("sweep.zip", f"lists must have equal lengths, got {sorted(lengths)}")
    zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
    grid_rows = [dict(zip(grid, row)) for row in itertools.product(*grid.values())] if grid else [{}]
    points = []
    for g in grid_rows:
        for z in zip_rows:
            values = {**g, **z}
            d = copy.deepcopy(data)
            for path, v in values.items():
                set_path(d, *canonical_path(path, v))
            points.append(Scenario(d, values, source))
    return points


def load_scenarios(path: str | Path) -> list[Scenario]:
    """Load a scenario file and expand its sweep."""
    return expand(load_yaml(path), str(path))
