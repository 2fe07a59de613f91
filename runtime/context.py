"""What a run mode's rank function gets: :class:`RankContext`, and the one definition of
a scenario run's arguments (:func:`add_scenario_options`).

:mod:`runtime.entry` builds one :class:`RankContext` per rank after the process group is
up and passes it to the mode's ``rank_fn``: who the rank is, the mode's arguments, the
run's common clock, and the expert- and data-parallel communicators, built on first use.

The scenario options live here, below every mode, because two sides parse them with the
same parser: ``lina-run`` before it spawns anything (and for its ``--help``), and every
rank of the ``scenario`` mode (:func:`scenario_args`). This module must not load torch
at import: ``lina-run``'s argument errors and ``--help`` import it and stay fast.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lina_sim.errors import ConfigError

if TYPE_CHECKING:  # annotations only: runtime.dist imports torch (see the module docstring)
    from runtime.dist import DistInfo, Groups

DISPATCH_CHOICES = ("padded", "uneven")


def add_scenario_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> list[argparse.Action]:
    """Add a scenario run's options (everything after ``SCENARIO.yaml``) to ``p``; returns
    their actions, which :func:`scenario_argv` turns back into a command line."""
    return [
        p.add_argument("--out", default=None, help="results directory (default results/<name>-measured)"),
        p.add_argument("--steps", type=int, default=None, help="measured steps per policy (default: the scenario's)"),
        p.add_argument("--warmup", type=int, default=1, help="steps run first and not measured (default 1)"),
        p.add_argument(
            "--dispatch",
            default="padded",
            choices=DISPATCH_CHOICES,
            help="training all-to-all: padded to capacity or uneven splits (default padded)",
        ),
        p.add_argument("--policies", default=None, help="comma-separated policy labels to run (default: all)"),
        p.add_argument("--keep-grads", action="store_true", help="return step-0 reduced gradients (tests)"),
        p.add_argument(
            "--profile-compute",
            default=None,
            metavar="OUT.yaml",
            help="instead of the policies: time every compute op without the network (calibration)",
        ),
    ]


def check_scenario_options(a: argparse.Namespace) -> argparse.Namespace:
    """Range checks argparse cannot express; one ConfigError naming the option."""
    if a.steps is not None and a.steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {a.steps}")
    if a.warmup < 0:
        raise ConfigError("--warmup", f"must be >= 0, got {a.warmup}")
    return a


def scenario_argv(a: argparse.Namespace, actions: Sequence[argparse.Action]) -> list[str]:
    """The options in ``a`` that differ from their defaults, as a command line the ranks'
    :func:`scenario_args` parses back to the same values."""
    out: list[str] = []
    for act in actions:
        value = getattr(a, act.dest)
        if value == act.default:
            continue
        flag = act.option_strings[-1]
        out += [flag] if isinstance(act, argparse._StoreTrueAction) else [flag, str(value)]
    return out


def scenario_args(argv: Sequence[str]) -> argparse.Namespace:
    """The scenario mode's arguments, ``SCENARIO.yaml [OPTIONS]``, parsed on the rank side
    (the launcher parses the same options with :func:`add_scenario_options`)."""
    p = argparse.ArgumentParser(prog="lina-run SCENARIO.yaml", exit_on_error=False, allow_abbrev=False)
    p.add_argument("scenario")
    add_scenario_options(p)
    try:
        a = p.parse_args(list(argv))
    except (argparse.ArgumentError, SystemExit) as e:
        raise ConfigError("lina-run", str(e) or "bad arguments") from None
    return check_scenario_options(a)


@dataclass
class RankContext:
    """Who this rank is (``info``), its mode's arguments, a shared clock (origin ``t0``,
    ``time.monotonic()`` s shared by all ranks on this machine), and lazily built process
    groups (``ctx.groups()`` is collective: call it on every rank)."""

    info: DistInfo
    args: list[str]
    t0: float
    _groups: dict[int | None, Groups] = field(default_factory=dict)

    def groups(self, ep_size: int | None = None) -> Groups:
        """Expert-parallel and data-parallel communicators (built once per ep_size)."""
        # Here, not at the top: runtime.dist imports torch (see the module docstring).
        from runtime.dist import make_groups

        if ep_size not in self._groups:
            self._groups[ep_size] = make_groups(self.info, ep_size)
        return self._groups[ep_size]

    def now(self) -> float:
        """Seconds since the run's common origin (the timeline's ``start``/``end`` clock).
        On GPU, synchronise the stream (or use CUDA events) before reading it."""
        return time.monotonic() - self.t0
