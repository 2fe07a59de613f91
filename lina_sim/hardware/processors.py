"""CPU cores shared by several simulated ranks: egalitarian processor sharing.

On an emulated testbed every "GPU" is a process on one host, so ranks that compute at
the same time divide the host's cores among them (the Linux scheduler is fair over the
tens of milliseconds an op lasts). :class:`ProcessorPool` models that as a fluid, the
way :mod:`lina_sim.network.fluid` models links: each running job progresses at
``min(1, cores / jobs running)`` seconds of one-core work per second, and rates are
recomputed whenever a job starts or ends. Nothing is preempted or reordered; a job
alone on a free core runs exactly as long as its one-core time.

CPU collectives (gloo) need cores too, not for long but at once: each step of a
collective waits for its thread to be scheduled, which costs little on an idle host and
milliseconds per step when compute threads outnumber the cores (measured on a 2-core
testbed with 4 ranks: about 5 ms per all-to-all peer, 11 ms per ring-allreduce step).
:meth:`ProcessorPool.excess_time` integrates the oversubscription ``(running - cores) / cores`` so that a
collective can be charged (:meth:`ProcessorPool.owed`, :meth:`ProcessorPool.pay`) for the
part of its life the host spent oversubscribed.
"""

from __future__ import annotations

import itertools

import numpy as np
import simpy

_DONE_S = 1e-12  # work left (one-core seconds) below which a job counts as finished


class ProcessorPool:
    """``cores`` identical processors shared by every job submitted with :meth:`run`.

    ``run(work_s)`` returns a simpy event that fires when ``work_s`` seconds of
    one-core work are done. Events of jobs that finish at the same instant fire in
    submission order, so runs are deterministic.
    """

    def __init__(self, env: simpy.Environment, cores: int):
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        self.env, self.cores = env, cores
        self._jobs: dict[int, list] = {}  # id -> [work left (s), event]
        self._ids = itertools.count()
        self._t_last = env.now
        self._version = 0  # only the newest wake-up timer acts
        self._excess_time = 0.0  # integral of excess() over time (s)
        self._changed = env.event()  # fires (and is renewed) whenever a job starts or ends

    def rate(self) -> float:
        """One-core seconds of work each running job gets per second now."""
        return min(1.0, self.cores / len(self._jobs)) if self._jobs else 1.0

    def excess(self) -> float:
        """Oversubscription now: ``max(0, running - cores) / cores``."""
        return max(0, len(self._jobs) - self.cores) / self.cores

    def excess_time(self) -> float:
        """Integral of :meth:`excess` from the start until now (s)."""
        self._advance()
        return self._excess_time

    def run(self, work_s: float) -> simpy.Event:
        ev = self.env.event()
        if work_s <= 0:
            ev.succeed()
            return ev
        self._advance()
        self._jobs[next(self._ids)] = [float(work_s), ev]
        self._notify()
        self._schedule()
        return ev

    def owed(self, delay_s: float, reference_excess: float, since: tuple[float, float]) -> float:
        """Seconds a collective that started at ``since`` = (time, :meth:`excess_time`
        then) and whose transfer ends now still waits for its threads: ``delay_s``, the
        whole collective's delay measured at oversubscription ``reference_excess``, in
        proportion to the mean oversubscription over its life."""
        t0, x0 = since
        span = self.env.now - t0
        if delay_s <= 0 or span <= 0:
            return 0.0
        return delay_s * (self.excess_time() - x0) / span / reference_excess

    def pay(self, owed_s: float, reference_excess: float):
        """A simpy process body that waits off :meth:`owed` seconds at the current
        oversubscription's pace (relative to ``reference_excess``), so the wait ends early
        once the host frees up."""
        while owed_s > 1e-12:
            pace = self.excess() / reference_excess
            if pace <= 0:
                return
            t = self.env.now
            yield self.env.timeout(owed_s / pace) | self._changed
            owed_s -= (self.env.now - t) * pace

    def _notify(self) -> None:
        ev, self._changed = self._changed, self.env.event()
        ev.succeed()

    def _advance(self) -> None:
        dt = self.env.now - self._t_last
        if dt > 0 and self._jobs:
            self._excess_time += dt * self.excess()
            done = dt * self.rate()
            for job in self._jobs.values():
                job[0] -= done
        self._t_last = self.env.now

    def _schedule(self) -> None:
        self._version += 1
        if not self._jobs:
            return
        wait = max(0.0, min(j[0] for j in self._jobs.values()) / self.rate())
        version = self._version
        self.env.timeout(wait).callbacks.append(lambda _ev: self._wake(version))

    def _wake(self, version: int) -> None:
        if version != self._version:
            return
        self._advance()
        finished = [k for k, job in self._jobs.items() if job[0] <= _DONE_S]
        if not finished:  # rounding left a sliver: finish the job closest to done
            finished = [min(self._jobs, key=lambda k: self._jobs[k][0])]
        for k in finished:
            self._jobs.pop(k)[1].succeed()
        self._notify()
        self._schedule()


def shared_finish_times(work_s: np.ndarray, cores: int | None) -> np.ndarray:
    """When each of the jobs ``work_s`` (one-core seconds), all started together, ends
    on ``cores`` shared cores under processor sharing (what :class:`ProcessorPool` does
    with simultaneous arrivals), as seconds after the start. ``cores=None`` or at least
    one core per job: each job ends after its own work."""
    work = np.asarray(work_s, dtype=float)
    if cores is None or work.size <= cores:
        return work.copy()
    order = np.argsort(work, kind="stable")
    out = np.empty_like(work)
    t = done = 0.0
    for i, j in enumerate(order):
        active = work.size - i
        t += (work[j] - done) / min(1.0, cores / active)
        done = work[j]
        out[j] = t
    return out
