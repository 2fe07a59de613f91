"""What a run mode's rank function gets: :class:`RankContext`.

:mod:`runtime.entry` builds one per rank after the process group is up and passes it
to the mode's ``rank_fn``: who the rank is, the mode's arguments, the run's common
clock, and the expert- and data-parallel communicators, built on first use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from runtime.dist import DistInfo, Groups, make_groups


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
        if ep_size not in self._groups:
            self._groups[ep_size] = make_groups(self.info, ep_size)
        return self._groups[ep_size]

    def now(self) -> float:
        """Seconds since the run's common origin (the timeline's ``start``/``end`` clock).
        On GPU, synchronise the stream (or use CUDA events) before reading it."""
        return time.monotonic() - self.t0
