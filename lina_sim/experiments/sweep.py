"""Run many scenario points: validate all, skip cached ones, run the rest in parallel.

A sweep goes in three passes:

1. **Plan** (:func:`plan_points`): expand the ``sweep:`` block and resolve *every* point
   (training or inference) before anything runs, so a misspelt field, an empty grid or a
   bad value is reported at once, naming the field. A swept field that changes nothing
   in the resolved scenario (a field the resolver ignores) is an error too.
2. **Run** (:func:`run_sweep`): each point's key is a SHA-256 of its fully resolved
   scenario (``setup.describe()``) plus ``lina_sim.__version__``. Points whose key is in
   the cache are not run again; the rest go to a backend: :class:`LocalBackend` (a
   process pool) or :class:`RayBackend` (an existing Ray cluster, or a local one). Every
   finished point is written to the cache at once, atomically, so a sweep killed midway
   loses nothing it finished. A point that raises is recorded with its error and the
   others go on; failures are not cached, so the next run retries them.
3. **Assemble**: one row per (point, policy), with the point index, its key, every swept
   field as a column (named as the sweep spelt it), ``status`` (``ok`` | ``error``) and
   ``error``. The cached frame holds only what the resolved scenario determines; names
   and swept columns come from the current plan, so the same resolved scenario reached
   from two sweeps shares one cache entry.

The simulator is deterministic, so every backend gives the same rows (apart from the
wall-time column ``sim_wall_s``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import socket
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TextIO

import numpy as np
import pandas as pd

import lina_sim
from lina_sim.results.files import atomic_write_bytes
from lina_sim.errors import ConfigError, LinaSimError
from lina_sim.config.scenario import Scenario, canonical_path, expand, load_yaml, set_path

DEFAULT_CACHE = Path("results/.cache/points")
# Columns that depend on the machine, not on the scenario: left out of equality checks.
WALL_COLUMNS = ("sim_wall_s",)
# Top-level fields that label a scenario without changing what it simulates.
LABEL_FIELDS = ("name", "description", "output")


class SweepError(LinaSimError):
    """A sweep that cannot start (bad points, unreachable backend); one line."""


# ---- resolving a point ------------------------------------------------------------------
def resolve(scenario: Scenario) -> Any:
    """The resolved setup of a training or inference point (raises ConfigError)."""
    if scenario.kind == "inference":
        try:
            from lina_sim.serving.setup import resolve_inference
        except ImportError as e:
            raise ConfigError("kind", f"inference scenarios are not available in this build ({e})",
                              ["training"]) from None
        return resolve_inference(scenario)
    from lina_sim.training.run import resolve_training

    return resolve_training(scenario)


def package_version() -> str:
    """lina-sim's version (from the package, else from the installed metadata)."""
    v = getattr(lina_sim, "__version__", None)
    if v:
        return str(v)
    from importlib.metadata import version

    return version("lina-sim")


def describe_key(described: Any, version: str | None = None) -> str:
    """Content hash (hex SHA-256) of a resolved scenario's plain-data description and the
    package version: equal keys mean the simulator would compute the same rows."""
    blob = json.dumps({"version": version or package_version(), "scenario": described}, sort_keys=True, default=repr,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


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


def _policy_labels(setup: Any) -> tuple[str, ...]:
    return tuple(getattr(p, "label", getattr(p, "name", str(p))) for p in getattr(setup, "policies", ()))


def plan_points(points: Sequence[Scenario]) -> list[SweepPoint]:
    """Resolve every point before any runs; one SweepError lists every bad point."""
    if not points:
        raise SweepError("sweep: no points to run")
    planned, errors = [], []
    for i, sc in enumerate(points):
        try:
            setup = resolve(sc)
        except LinaSimError as e:
            errors.append((i, sc, str(e)))
            continue
        planned.append(SweepPoint(i, sc, describe_key(setup.describe()), _policy_labels(setup)))
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
            raise SweepError(f"sweep.{path}: has no effect: every value resolves to the same scenario "
                             f"(a misspelt field, or one this kind of scenario ignores?{hint})")


def _suggest(path: str, described: Any) -> str:
    """' did you mean X?' from the resolved fields beside the last segment of ``path``."""
    import difflib

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


# ---- running one point (in a worker) --------------------------------------------------------
def execute_point(scenario: Scenario) -> pd.DataFrame:
    """Simulate one point; the frame holds only what its resolved scenario determines
    (no scenario name, no swept columns), one row per policy."""
    setup = resolve(scenario)
    if scenario.kind == "inference":
        from lina_sim.serving.run import run_inference

        df, _ = run_inference(setup)
    else:
        from lina_sim.training.run import run_training

        df, runs = run_training(setup)
        # Per-collective slowdowns, for distributions (the row keeps only quantiles).
        df["bwd_a2a_slowdowns"] = [[float(x) for x in r.a2a_slowdown] for r in runs]
    drop = [c for c in ("scenario", "point", *scenario.swept) if c in df.columns]
    return df.drop(columns=drop).reset_index(drop=True)


@dataclass
class Outcome:
    """What a worker sends back for one point."""

    frame: pd.DataFrame | None
    error: str | None
    wall_s: float
    cpu_s: float = 0.0  # CPU seconds the worker spent on the point


def execute_safely(scenario: Scenario) -> Outcome:
    """:func:`execute_point`, with any exception turned into a recorded error."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        frame, error = execute_point(scenario), None
    except Exception as e:  # noqa: BLE001 - a failing point must not stop the sweep
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        loc = f" [{Path(where.filename).name}:{where.lineno}]" if where else ""
        frame, error = None, f"{type(e).__name__}: {e}{loc}"
    return Outcome(frame, error, time.perf_counter() - t0, time.process_time() - c0)


# ---- cache ------------------------------------------------------------------------------
class Cache:
    """Finished points as ``DIR/<key>.parquet``, written atomically (temp file + rename)."""

    def __init__(self, root: str | Path = DEFAULT_CACHE):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.parquet"

    def get(self, key: str) -> pd.DataFrame | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            df = pd.read_parquet(p)
        except Exception:  # noqa: BLE001 - an unreadable entry is recomputed, not fatal
            return None
        # Parquet gives list cells back as numpy arrays; a fresh point has lists.
        for c in df.columns:
            if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], np.ndarray):
                df[c] = df[c].map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
        return df

    def put(self, key: str, frame: pd.DataFrame) -> Path:
        return write_parquet(frame, self.path(key))


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing types (a sweep over [1, "a"]) become strings for Parquet."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            kinds = {type(v) for v in out[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1 and not kinds <= {list, tuple, np.ndarray} and not kinds <= {int, float}:
                out[c] = out[c].map(lambda v: v if v is None else str(v))
            elif kinds <= {int, float} and len(kinds) == 2:
                out[c] = out[c].astype(float)
    return out


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a Parquet file so that readers never see half of it."""
    return atomic_write_bytes(path, _parquet_safe(df).to_parquet(index=False))


# ---- backends ---------------------------------------------------------------------------
class Backend(Protocol):
    """Runs points and yields ``(index, outcome)`` as they finish, in any order."""

    workers: int

    def run(self, points: Sequence[SweepPoint]) -> Iterator[tuple[int, Outcome]]: ...

    def close(self) -> None: ...


class LocalBackend:
    """A pool of ``workers`` local processes (in-process when ``workers == 1``)."""

    def __init__(self, workers: int | None = None):
        if workers is None:
            workers = os.cpu_count() or 1
        if workers < 1:
            raise ConfigError("--workers", f"must be >= 1, got {workers}")
        self.workers = workers

    def run(self, points: Sequence[SweepPoint]) -> Iterator[tuple[int, Outcome]]:
        if not points:
            return
        if self.workers == 1 or len(points) == 1:
            for p in points:
                yield p.index, execute_safely(p.scenario)
            return
        import multiprocessing as mp

        # forkserver: workers fork from a clean server with the simulator preloaded, so
        # they start fast and never inherit a parent's threads (Ray, progress output).
        # A preload module that fails to import is skipped by multiprocessing.
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["lina_sim.experiments.sweep", "lina_sim.training.run", "lina_sim.serving.run"])
        with ProcessPoolExecutor(min(self.workers, len(points)), mp_context=ctx) as pool:
            futures = {pool.submit(execute_safely, p.scenario): p.index for p in points}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        try:
                            yield futures[f], f.result()
                        except Exception as e:  # noqa: BLE001 - a worker died (OOM kill, segfault)
                            yield futures[f], Outcome(None, f"worker process failed: {type(e).__name__}: {e}", 0.0)
            finally:
                for f in pending:
                    f.cancel()

    def close(self) -> None:
        pass


def _probe_ray_address(address: str, timeout_s: float) -> None:
    """Fail fast (bounded time) if nothing listens at a ``host:port`` Ray address."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise SweepError(f"--address: cannot parse Ray address {address!r} (allowed: HOST:PORT, ray://HOST:PORT, auto)")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise SweepError(f"--address: cannot reach a Ray cluster at {address} ({reason}); start one with "
                         f"`ray start --head`, or leave out --address to start a local one") from None


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 (what C/C++ code writes to) to /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RayBackend:
    """Points as Ray tasks on an existing cluster (``address``) or, without an address,
    on a local one that ``ray.init()`` starts (and :meth:`close` stops).

    The cluster's nodes need lina-sim (same version) and its dependencies installed.
    """

    def __init__(self, address: str | None = None, connect_timeout_s: float = 5.0):
        try:
            import ray
        except ImportError as e:
            raise SweepError(f"--backend ray: ray is not installed ({e}); pip install 'lina-sim[ray]'") from None
        self._ray = ray
        if address:
            _probe_ray_address(address, connect_timeout_s)
        self._owns = not ray.is_initialized()
        if self._owns:
            t0 = time.monotonic()
            try:
                with _stderr_silenced():  # Ray's C++ core logs each connection retry there
                    ray.init(address=address, include_dashboard=False, logging_level="ERROR",
                             log_to_driver=False, configure_logging=True)
            except Exception as e:  # noqa: BLE001 - ray raises many types; report one line
                raise SweepError(f"--address: cannot connect to Ray at {address or 'a new local cluster'} "
                                 f"(gave up after {time.monotonic() - t0:.0f} s): {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1)(execute_safely)

    def run(self, points: Sequence[SweepPoint]) -> Iterator[tuple[int, Outcome]]:
        ray = self._ray
        refs = {self._task.remote(p.scenario): p.index for p in points}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    yield refs[ref], ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost worker or node
                    yield refs[ref], Outcome(None, f"ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}", 0.0)

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def make_backend(name: str = "local", workers: int | None = None, address: str | None = None) -> Backend:
    if name == "local":
        if address:
            raise ConfigError("--address", "only with --backend ray")
        return LocalBackend(workers)
    if name == "ray":
        return RayBackend(address)
    raise ConfigError("--backend", f"unknown backend {name!r}", ["local", "ray"])


# ---- progress ---------------------------------------------------------------------------
def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line progress bar on ``stream`` (stderr): points done, cached, failed, ETA.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every
    ``every_s`` seconds, and at the end.
    """

    def __init__(self, total: int, cached: int = 0, stream: TextIO | None = None, every_s: float = 5.0,
                 label: str = "sweep", enabled: bool = True):
        self.total, self.cached, self.failed, self.done = total, cached, 0, cached
        self.stream = stream or sys.stderr
        self.every_s, self.label, self.enabled = every_s, label, enabled
        self.t0 = time.monotonic()
        self._last, self._last_done = -math.inf, -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def eta_s(self) -> float:
        ran = self.done - self.cached
        if ran <= 0:
            return math.inf
        return (time.monotonic() - self.t0) / ran * (self.total - self.done)

    def line(self) -> str:
        width = 24
        fill = int(width * self.done / self.total) if self.total else width
        extra = ", ".join(x for x in (f"{self.cached} cached" if self.cached else "",
                                      f"{self.failed} failed" if self.failed else "") if x)
        return (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} points"
                + (f" ({extra})" if extra else "")
                + f"  elapsed {_fmt_s(time.monotonic() - self.t0)}  ETA {_fmt_s(self.eta_s()) if self.done < self.total else '0:00'}")

    def update(self, ok: bool = True) -> None:
        self.done += 1
        self.failed += not ok
        self.show()

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        elif (final and self._last_done != self.done) or now - self._last >= self.every_s:
            self.stream.write(self.line() + "\n")
            self._last, self._last_done = now, self.done
        self.stream.flush()


# ---- the sweep --------------------------------------------------------------------------
@dataclass
class SweepResult:
    """The assembled table and what happened."""

    table: pd.DataFrame
    points: int
    cached: int
    ran: int
    failed: list[tuple[int, str]] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU seconds of the points run (all workers)


def _point_rows(pt: SweepPoint, frame: pd.DataFrame | None, error: str | None, swept_cols: Sequence[str]) -> pd.DataFrame:
    if frame is None:
        frame = pd.DataFrame({"policy": list(pt.policies) or [None]})
    frame = frame.copy()
    meta = {"point": pt.index, "scenario": pt.scenario.name,
            **{c: pt.swept.get(c) for c in swept_cols}}
    for i, (k, v) in enumerate(meta.items()):
        if k in frame.columns:
            frame = frame.drop(columns=k)
        frame.insert(i, k, [v] * len(frame))
    frame["point_key"] = pt.key
    frame["status"] = "ok" if error is None else "error"
    frame["error"] = error
    return frame


def assemble(points: Sequence[SweepPoint], frames: dict[int, pd.DataFrame], errors: dict[int, str]) -> pd.DataFrame:
    """One row per (point, policy), in point order; failed points keep one row per policy."""
    swept_cols = list(dict.fromkeys(k for p in points for k in p.swept))
    parts = [_point_rows(p, frames.get(p.index), errors.get(p.index), swept_cols) for p in points]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def run_sweep(points: Sequence[SweepPoint], backend: Backend | None = None, cache: Cache | None = None,
              progress: Progress | bool = True, on_point: Callable[[int, Outcome], None] | None = None) -> SweepResult:
    """Run every point not in ``cache`` on ``backend`` (default: local processes) and
    return the assembled table. Points are validated already (see :func:`plan_points`)."""
    t0 = time.perf_counter()
    backend = backend or LocalBackend()
    frames: dict[int, pd.DataFrame] = {}
    errors: dict[int, str] = {}
    todo = []
    for p in points:
        hit = cache.get(p.key) if cache is not None else None
        if hit is None:
            todo.append(p)
        else:
            frames[p.index] = hit
    if not isinstance(progress, Progress):
        progress = Progress(len(points), len(points) - len(todo), enabled=bool(progress))
    if todo:
        progress.show()
    # Identical resolved scenarios in one sweep (e.g. a swept label) run once.
    by_key: dict[str, list[SweepPoint]] = {}
    for p in todo:
        by_key.setdefault(p.key, []).append(p)
    unique = [group[0] for group in by_key.values()]
    key_of = {p.index: p.key for p in unique}
    cpu_s = 0.0
    for index, outcome in backend.run(unique):
        key = key_of[index]
        cpu_s += outcome.cpu_s
        for p in by_key[key]:
            if outcome.error is None:
                frames[p.index] = outcome.frame
            else:
                errors[p.index] = outcome.error
            progress.update(outcome.error is None)
        if outcome.error is None and cache is not None:
            cache.put(key, outcome.frame)  # at once: a killed sweep keeps every finished point
        if on_point:
            on_point(index, outcome)
    progress.show(final=True)
    table = assemble(points, frames, errors)
    return SweepResult(table, len(points), len(points) - len(todo), len(todo),
                       sorted(errors.items()), time.perf_counter() - t0, cpu_s)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """A result table without machine-dependent columns, for equality checks."""
    return df.drop(columns=[c for c in WALL_COLUMNS if c in df.columns])


def summarize_failures(failed: Iterable[tuple[int, str]], limit: int = 5) -> str:
    failed = list(failed)
    lines = [f"  point {i}: {msg}" for i, msg in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"  ... and {len(failed) - limit} more (see the error column)")
    return "\n".join(lines)
