"""Planning a sweep: every point resolved (and so validated) before anything runs, with
one error that names the bad fields, and swept fields that change nothing refused."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lina_sim.config.scenario import Scenario, canonical_path, expand, load_yaml, set_path
from lina_sim.errors import LinaSimError
from lina_sim.experiments.kinds import kind_of
from lina_sim.experiments.sweep.cache import describe_key

# Top-level fields that label a scenario without changing what it simulates.
LABEL_FIELDS = ("name", "description", "output")


class SweepError(LinaSimError):
    """A sweep that cannot start (bad points, unreachable backend); one line."""


def resolve(scenario: Scenario) -> Any:
    """The resolved setup of a point, whatever its kind (raises ConfigError)."""
    return kind_of(scenario.kind).resolve(scenario)


@dataclass(frozen=True)
class SweepPoint:
    """One validated point: its index in the sweep, scenario, cache key and policy labels."""

    index: int
    scenario: Scenario
    key: str
    policies: tuple[str, ...]

    @property
    def swept(self) -> dict[str, Any]:
        return self.scenario.swept


def plan_points(points: Sequence[Scenario]) -> list[SweepPoint]:
    """Resolve every point before any runs; one SweepError lists every bad point."""
    if not points:
        raise SweepError("sweep: no points to run")
    planned, errors = [], []
    for i, sc in enumerate(points):
        try:
            kind = kind_of(sc.kind)
            setup = kind.resolve(sc)
        except LinaSimError as e:
            errors.append((i, sc, str(e)))
            continue
        planned.append(SweepPoint(i, sc, describe_key(setup.describe()), kind.policy_labels(setup)))
    if errors:
        # The same bad field usually breaks many points: report each message once.
        msgs = list(dict.fromkeys(msg for _, _, msg in errors))
        first = errors[0]
        where = f" (first: point {first[0]}" + (f" [{_fmt_swept(first[1].swept)}])" if first[1].swept else ")")
        raise SweepError(f"{len(errors)} of {len(points)} points are invalid{where}: " + "; ".join(msgs))
    _check_swept_fields_matter(planned)
    return planned


def _fmt_swept(swept: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in swept.items())


def _check_swept_fields_matter(planned: Sequence[SweepPoint]) -> None:
    """A swept field that the resolver ignores (changing it alone leaves the resolved
    scenario unchanged) is almost always misspelt or misplaced, so refuse it. Each field
    is changed alone on the first point, which also catches one zipped with a real field."""
    first = planned[0]
    for path, value in first.swept.items():
        if path.split(".")[0].split("[")[0] in LABEL_FIELDS:
            continue
        other = next((p.swept[path] for p in planned if repr(p.swept[path]) != repr(value)), None)
        if other is None:
            continue
        data = copy.deepcopy(first.scenario.data)
        set_path(data, *canonical_path(path, other))
        try:
            key = describe_key(resolve(Scenario(data, first.swept, first.scenario.source)).describe())
        except LinaSimError:
            continue  # invalid alone (e.g. zipped with a field it must match): it matters
        if key == first.key:
            hint = _suggest(path, resolve(first.scenario).describe())
            raise SweepError(
                f"sweep.{path}: has no effect: every value resolves to the same scenario "
                f"(a misspelt field, or one this kind of scenario ignores?{hint})"
            )


def _suggest(path: str, described: Any) -> str:
    """' did you mean X?' from the resolved fields beside the last segment of ``path``."""
    *parents, last = [seg.split("[")[0] for seg in path.split(".")]
    node = described
    for seg in parents:
        node = node.get(seg) if isinstance(node, dict) else None
        if isinstance(node, list):  # policies[NAME]: the parameters of any entry
            node = {k: None for entry in node if isinstance(entry, dict) for k in entry}
    if not isinstance(node, dict):
        return ""
    close = difflib.get_close_matches(last, [str(k) for k in node], n=1)
    return f" did you mean {'.'.join([*path.split('.')[:-1], close[0]])}?" if close else ""


def load_plan(path: str | Path) -> tuple[str, list[SweepPoint]]:
    """(scenario name, planned points) of a scenario file."""
    # An absolute source: workers (Ray's included) may run in another directory, and
    # relative trace paths fall back to the scenario file's location.
    points = expand(load_yaml(path), str(Path(path).resolve()))
    return points[0].name, plan_points(points)
