"""How long a compute op takes on one GPU: a roofline model, or a measured profile table.

Both models answer ``op_time(op) -> seconds`` for a compute :class:`~lina_sim.workload.graph.Op`
(any object with the same fields works), so the engine does not care which it has:

- :class:`RooflineComputeModel`: each kernel takes the longer of its tensor-core time
  (FLOP / (peak FLOP/s of the dtype x matmul_efficiency)) and its memory time (HBM bytes
  / (HBM bytes/s x memory_efficiency)), plus ``kernel_launch_s`` per kernel. The factors
  come from the preset's ``compute:`` section (lina_sim/hardware/spec.py). A GEMM on a
  GPU whose SM count is known pays for whole tiles in whole waves (:func:`gemm_flops`).
- :class:`ProfileComputeModel`: measured seconds per op key and shape at several token
  counts (a YAML or CSV profile, e.g. written by a calibration run), interpolated
  linearly in tokens.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lina_sim.config.fields import Field, check_declared, check_fields, check_mapping, load_yaml, read_text
from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import ClusterSpec, ComputeSpec, GPUSpec

# Thread-block tiles (rows x columns of C) of cuBLAS's tensor-core GEMM kernels, as NVIDIA's
# "Matrix Multiplication Background User's Guide" (DU-09799-001, section 2.3, "Typical
# tile dimensions in cuBLAS") lists them.
GEMM_TILES: tuple[tuple[int, int], ...] = (
    (256, 128),
    (128, 256),
    (128, 128),
    (256, 64),
    (64, 256),
    (128, 64),
    (64, 128),
    (64, 64),
)


def gemm_flops(m: float, n: float, k: float, batch: float, sms: int | None) -> float:
    """The FLOP a GEMM's kernel really spends: C is cut into thread-block tiles, a tile
    is computed whole even where C ends inside it (tile quantization), and the tiles run
    in waves of one per SM, the last wave costing as much as a full one (wave
    quantization; the same guide, section 3). The kernel is taken to use the tile of
    :data:`GEMM_TILES` that wastes least, as cuBLAS's heuristics aim to. ``sms`` None:
    the plain ``2 m n k batch``."""
    if not sms:
        return 2.0 * m * n * k * batch
    spent = min(math.ceil(math.ceil(m / a) * math.ceil(n / b) * batch / sms) * sms * a * b for a, b in GEMM_TILES)
    return 2.0 * k * spent


class ComputeModel(Protocol):
    """Anything that times compute ops (seconds)."""

    def op_time(self, op: Any) -> float: ...


def _require_compute(op: Any) -> None:
    if op.kind != "compute":
        raise ValueError(f"{op.name} is a {op.kind} op: its time comes from the network, not the compute model")


class RooflineComputeModel:
    """Roofline timing of compute ops on one GPU.

    Per kernel: ``max(flops / (peak[dtype] * matmul_efficiency), hbm_bytes /
    (hbm_bandwidth * memory_efficiency)) + kernel_launch_s``. Summing per kernel rather
    than taking one max over the op keeps a memory-bound softmax from hiding behind a
    compute-bound GEMM of the same op; an op without a kernel list is one kernel.
    """

    def __init__(self, gpu: GPUSpec, compute: ComputeSpec, dtype: str = "fp16") -> None:
        check_declared(compute, "compute")
        self.flops_per_s = gpu.flops(dtype) * compute.matmul_efficiency
        self.bytes_per_s = gpu.hbm_bandwidth * compute.memory_efficiency
        self.launch_s = compute.kernel_launch_s
        self.sms = gpu.sms

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, dtype: str = "fp16") -> RooflineComputeModel:
        return cls(cluster.gpu, cluster.compute, dtype)

    def kernel_time(self, flops: float, hbm_bytes: float) -> float:
        """Seconds for one kernel, launch overhead included."""
        return max(flops / self.flops_per_s, hbm_bytes / self.bytes_per_s) + self.launch_s

    def device_time(
        self, flops: float, hbm_bytes: float, gemm: tuple[float, float, float, float] | None = None
    ) -> float:
        """Seconds a kernel keeps the GPU busy (no launch overhead): what CUDA events around
        it measure. ``gemm`` ``(m, n, k, batch)``: a GEMM, priced by :func:`gemm_flops`."""
        if gemm is not None:
            flops = gemm_flops(*gemm, self.sms)
        return max(flops / self.flops_per_s, hbm_bytes / self.bytes_per_s)

    def op_time(self, op: Any) -> float:
        _require_compute(op)
        if op.kernels:
            return sum(self.device_time(k.flops, k.hbm_bytes, k.gemm) + self.launch_s for k in op.kernels)
        return self.kernel_time(op.flops, op.hbm_bytes)


@dataclass(frozen=True)
class ProfileRow:
    """One measurement: op key (``role.phase``, e.g. ``ffn.fwd``), shape (``""`` matches
    any shape), tokens processed, seconds."""

    op: str
    shape: str
    tokens: float
    seconds: float


class ProfileComputeModel:
    """Measured op times, looked up by (``op.profile_key``, ``op.shape``) and interpolated
    linearly over ``op.tokens``.

    Rows whose shape equals the op's are used if any exist, else rows with an empty
    shape. Outside the measured token range the nearest two points extrapolate
    linearly (one point scales proportionally), never below zero. An op the table does
    not cover goes to ``fallback`` (e.g. the roofline) if given, else is an error naming
    the key and the keys the profile has.
    """

    def __init__(
        self, rows: Iterable[ProfileRow], fallback: ComputeModel | None = None, source: str = "profile"
    ) -> None:
        self.fallback = fallback
        self.source = source
        table: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in rows:
            table.setdefault((r.op, r.shape), []).append((float(r.tokens), float(r.seconds)))
        self._curves: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for key, pts in table.items():
            pts.sort()
            self._curves[key] = ([p[0] for p in pts], [p[1] for p in pts])

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, fallback: ComputeModel | None = None) -> ProfileComputeModel:
        """Load a ``.yaml``/``.yml`` (``{rows: [{op, shape, tokens, seconds}, ...]}`` or a
        bare list) or a ``.csv`` with columns op, shape, tokens, seconds."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(str(path), "profile file not found")
        if path.suffix == ".csv":
            records = list(csv.DictReader(io.StringIO(read_text(path, "profile"), newline="")))
        elif path.suffix in (".yaml", ".yml"):
            data = load_yaml(
                path, "profile", "{rows: [{op, shape, tokens, seconds}, ...]} or a list of rows", lists=True
            )
            records = data.get("rows") if isinstance(data, Mapping) else data
            if not isinstance(records, list):
                raise ConfigError(f"{path}.rows", "must be a list of {op, shape, tokens, seconds}")
        else:
            raise ConfigError(str(path), f"unknown profile format {path.suffix!r}", [".yaml", ".yml", ".csv"])
        return cls(rows_from_records(records, str(path)), fallback, source=str(path))

    # -- lookup -------------------------------------------------------------------------
    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._curves)

    def op_time(self, op: Any) -> float:
        _require_compute(op)
        curve = self._curves.get((op.profile_key, op.shape)) or self._curves.get((op.profile_key, ""))
        if curve is None:
            if self.fallback is not None:
                return self.fallback.op_time(op)
            raise ConfigError(
                self.source,
                f"no measurement for op {op.profile_key!r} with shape {op.shape!r}",
                [f"{k}[{s}]" if s else k for k, s in self.keys()],
            )
        return _interp(float(op.tokens), *curve)


# One measurement of a profile (a CSV's columns, or a YAML row's keys; other keys are
# left alone, so that a table may carry notes).
ROW_FIELDS: dict[str, Field] = {
    "op": Field(str, allowed="an op key such as ffn.fwd", help="op key: role.phase"),
    "shape": Field(str, "", allow_none=True, help="the op's shape key (empty: any shape)"),
    "tokens": Field(float, minimum=0, help="tokens the op processed"),
    "seconds": Field(float, minimum=0, help="measured time of the op, s"),
}


def rows_from_records(records: Sequence[Mapping[str, Any]], where: str = "profile") -> list[ProfileRow]:
    """Validate raw records (dicts) into ProfileRows, naming the bad field."""
    rows = []
    for i, rec in enumerate(records):
        at = f"{where}.rows[{i}]"
        # A CSV leaves empty cells as "": that is a missing value.
        rec = {k: v for k, v in check_mapping(rec, at, list(ROW_FIELDS)).items() if v != ""}
        v = check_fields(rec, ROW_FIELDS, at, strict=False)
        rows.append(ProfileRow(v["op"], v["shape"] or "", v["tokens"], v["seconds"]))
    return rows


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if len(xs) == 1:
        return ys[0] * x / xs[0] if xs[0] else ys[0]
    i = bisect.bisect_left(xs, x)
    i = min(max(i, 1), len(xs) - 1)  # the segment [i-1, i], extended at either end
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(0.0, y)
