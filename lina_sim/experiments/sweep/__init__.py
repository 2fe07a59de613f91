"""Run many scenario points: validate all, skip cached ones, run the rest in parallel.

A sweep goes in three passes:

1. **Plan** (:mod:`.plan`, :func:`plan_points`): expand the ``sweep:`` block and resolve
   *every* point (of any kind) before anything runs, so a misspelt field, an empty grid
   or a bad value is reported at once, naming the field. A swept field that changes
   nothing in the resolved scenario (a field the resolver ignores) is an error too.
2. **Run** (:mod:`.run`, :func:`run_sweep`): each point's key (:mod:`.cache`) is a
   SHA-256 of its fully resolved scenario (``setup.describe()``), ``lina_sim.__version__``
   and a hash of the package's source (every ``.py`` and preset YAML under lina_sim/,
   :func:`source_hash`), so an edited simulator re-runs its points. Points whose key is
   in the cache are not run again; the rest go to a backend (:mod:`.backends`):
   :class:`LocalBackend` (a process pool) or :class:`RayBackend` (an existing Ray
   cluster, or a local one), whose workers run :func:`~.worker.execute_safely`. Local
   workers die with the sweep process, however it dies (:mod:`.lifeline`). Every
   finished point is written to the cache at once, atomically, so a sweep killed midway
   loses nothing it finished; Ctrl-C abandons the running points at once and raises
   :class:`SweepInterrupted` (how many finished). A point that raises is recorded with
   its error and the others go on; failures are not cached, so the next run retries
   them. :mod:`.progress` draws the progress bar (on a terminal).
3. **Assemble**: one row per (point, policy), with the point index, its key, every swept
   field as a column (named as the sweep spelt it), ``status`` (``ok`` | ``error``) and
   ``error``. The cached frame holds only what the resolved scenario determines; names
   and swept columns come from the current plan, so the same resolved scenario reached
   from two sweeps shares one cache entry.

The simulator is deterministic, so every backend gives the same rows (apart from the
wall-time column ``sim_wall_s``). What differs between kinds of scenario (how a point
is resolved and run) comes from :mod:`lina_sim.experiments.kinds`.
"""

from lina_sim.experiments.sweep.backends import Backend, LocalBackend, RayBackend, make_backend
from lina_sim.experiments.sweep.cache import (
    DEFAULT_CACHE,
    Cache,
    describe_key,
    package_version,
    source_hash,
    write_parquet,
)
from lina_sim.experiments.sweep.plan import LABEL_FIELDS, SweepError, SweepPoint, load_plan, plan_points, resolve
from lina_sim.experiments.sweep.progress import Progress
from lina_sim.experiments.sweep.run import (
    WALL_COLUMNS,
    SweepInterrupted,
    SweepResult,
    assemble,
    comparable,
    run_sweep,
)
from lina_sim.experiments.sweep.worker import Outcome, execute_point, execute_safely

__all__ = [
    "DEFAULT_CACHE",
    "LABEL_FIELDS",
    "WALL_COLUMNS",
    "Backend",
    "Cache",
    "LocalBackend",
    "Outcome",
    "Progress",
    "RayBackend",
    "SweepError",
    "SweepInterrupted",
    "SweepPoint",
    "SweepResult",
    "assemble",
    "comparable",
    "describe_key",
    "execute_point",
    "execute_safely",
    "load_plan",
    "make_backend",
    "package_version",
    "plan_points",
    "resolve",
    "run_sweep",
    "source_hash",
    "write_parquet",
]
