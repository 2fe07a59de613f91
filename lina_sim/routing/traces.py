"""Expert-selection traces: the format, load/save, slicing, and importers.

A trace records which experts a real MoE router chose for every token at every MoE
layer. It is stored as one ``.npz`` (see ``traces/README.md``):

- ``experts``  int16   [tokens, layers, k]  expert ids, best choice first;
- ``probs``    float16 [tokens, layers, k]  gate probabilities (optional);
- ``seq_ids``  int32   [tokens]             which sequence each token belongs to;
  tokens of a sequence are contiguous and in order;
- ``metadata`` a 0-d unicode array holding JSON (no pickles, so loading is safe).

Every constructor validates, so a ``RoutingTrace`` that exists is well formed; anything wrong
raises :class:`lina_sim.errors.RoutingTraceError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lina_sim.errors import RoutingTraceError
from lina_sim.results.files import atomic_write_bytes

#: Metadata every trace must carry. ``made_by`` says how it was made (a command line,
#: an importer, or a generator with its seed).
REQUIRED_METADATA = ("model", "dataset", "num_experts", "top_k", "source", "license", "made_by")

#: Field names accepted as the sequence id in JSON-lines records, in order of preference.
SEQ_ID_FIELDS = ("problem_id", "seq_id", "sequence_id", "request_id", "sample_id", "doc_id")

MEMORY = "<memory>"

#: Gate probabilities are softmax outputs in [0, 1]; float16 storage and float32 dumps
#: may round a little past 1, so allow that much.
PROB_TOLERANCE = 1e-3


@dataclass(eq=False)
class RoutingTrace:
    """Expert choices of ``tokens`` tokens at ``layers`` MoE layers, ``k`` experts each.

    ``experts[t, l, j]`` is the j-th choice (by gate probability) of token t at MoE layer l,
    an id in ``[0, num_experts)``. ``probs`` holds the matching gate probabilities (unitless,
    0..1) or is None. ``seq_ids[t]`` is the sequence (request) of token t. ``origin`` is the
    file the trace came from, used only in error messages.
    """

    experts: np.ndarray
    seq_ids: np.ndarray
    metadata: dict[str, Any]
    probs: np.ndarray | None = None
    origin: str = field(default=MEMORY, compare=False)

    def __post_init__(self) -> None:
        self.metadata = dict(self.metadata)
        check_trace(self, self.origin)

    # ---- shape -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    @property
    def top1(self) -> np.ndarray:
        """[tokens, layers] first choices."""
        return self.experts[:, :, 0]

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"RoutingTrace({self.num_tokens} tokens x {self.num_layers} layers x top-{self.top_k} "
            f"of {self.num_experts} experts, model={m.get('model')!r}, "
            f"dataset={m.get('dataset')!r}, origin={self.origin!r})"
        )

    # ---- operations --------------------------------------------------------------------
    def slice_tokens(self, start: int | None = None, stop: int | None = None) -> RoutingTrace:
        """Tokens ``[start, stop)``; sequence ids are kept."""
        sl = slice(start, stop)
        return self._derive(sl, slice(None), f"tokens[{start}:{stop}]")

    def slice_layers(self, start: int | None = None, stop: int | None = None) -> RoutingTrace:
        """MoE layers ``[start, stop)`` of every token."""
        sl = slice(start, stop)
        return self._derive(slice(None), sl, f"layers[{start}:{stop}]")

    def _derive(self, tokens: slice, layers: slice, what: str) -> RoutingTrace:
        meta = dict(self.metadata)
        meta["made_by"] = f"{meta['made_by']} | {what}"
        return RoutingTrace(
            experts=self.experts[tokens, layers],
            seq_ids=self.seq_ids[tokens],
            metadata=meta,
            probs=None if self.probs is None else self.probs[tokens, layers],
            origin=self.origin,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace as ``.npz`` atomically (a crash leaves no half-written file)."""
        arrays: dict[str, np.ndarray] = {
            "experts": self.experts,
            "seq_ids": self.seq_ids,
            "metadata": np.array(json.dumps(self.metadata, sort_keys=True)),
        }
        if self.probs is not None:
            arrays["probs"] = self.probs
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue())


def make_trace(
    experts: np.ndarray,
    metadata: dict[str, Any],
    seq_ids: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    origin: str = MEMORY,
) -> RoutingTrace:
    """Build a trace from any integer/float arrays, casting to the stored dtypes.

    ``experts`` may be [tokens, layers] (top-1) or [tokens, layers, k]. Missing ``top_k``
    or ``num_experts`` metadata is filled from the arrays; missing ``seq_ids`` puts every
    token in sequence 0. Values that do not survive the cast (ids beyond int16) are errors.
    """
    experts = np.asarray(experts)
    if experts.ndim == 2:
        experts = experts[:, :, None]
    if experts.ndim != 3:
        raise RoutingTraceError(
            origin, f"experts must be [tokens, layers] or [tokens, layers, k], got shape {experts.shape}"
        )
    if not np.issubdtype(experts.dtype, np.integer):
        raise RoutingTraceError(origin, f"experts must be integer expert ids, got dtype {experts.dtype}")
    if experts.size and (experts.min() < 0 or experts.max() > np.iinfo(np.int16).max):
        raise RoutingTraceError(
            origin, f"expert ids must lie in [0, {np.iinfo(np.int16).max}], got {experts.min()}..{experts.max()}"
        )
    meta = dict(metadata)
    meta.setdefault("top_k", int(experts.shape[2]))
    if "num_experts" not in meta:
        meta["num_experts"] = int(experts.max()) + 1 if experts.size else 1
    if seq_ids is None:
        seq_ids = np.zeros(experts.shape[0], dtype=np.int32)
    if probs is not None:
        probs = np.asarray(probs)
        if probs.ndim == 2:
            probs = probs[:, :, None]
        if not np.issubdtype(probs.dtype, np.floating):
            raise RoutingTraceError(origin, f"gate probabilities must be floats, got dtype {probs.dtype}")
        probs = probs.astype(np.float16)
    return RoutingTrace(
        experts=experts.astype(np.int16),
        seq_ids=np.asarray(seq_ids).astype(np.int32),
        metadata=meta,
        probs=probs,
        origin=origin,
    )


# ---- validation ---------------------------------------------------------------------------
def check_trace(trace: RoutingTrace, source: str) -> None:
    """Raise RoutingTraceError (naming ``source``) unless ``trace`` is well formed."""
    ex, seq, probs, meta = trace.experts, trace.seq_ids, trace.probs, trace.metadata
    if not isinstance(ex, np.ndarray) or ex.dtype != np.int16:
        raise RoutingTraceError(source, f"'experts' must be an int16 array, got {_dtype(ex)}")
    if ex.ndim != 3 or ex.shape[2] < 1:
        raise RoutingTraceError(source, f"'experts' must have shape [tokens, layers, k], got {ex.shape}")
    if not isinstance(seq, np.ndarray) or seq.dtype != np.int32:
        raise RoutingTraceError(source, f"'seq_ids' must be an int32 array, got {_dtype(seq)}")
    if seq.shape != (ex.shape[0],):
        raise RoutingTraceError(source, f"'seq_ids' must have shape [tokens] = ({ex.shape[0]},), got {seq.shape}")
    if probs is not None:
        if not isinstance(probs, np.ndarray) or probs.dtype != np.float16:
            raise RoutingTraceError(source, f"'probs' must be a float16 array, got {_dtype(probs)}")
        if probs.shape != ex.shape:
            raise RoutingTraceError(source, f"'probs' must have the shape of 'experts' {ex.shape}, got {probs.shape}")
    if not isinstance(meta, dict):
        raise RoutingTraceError(source, f"metadata must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise RoutingTraceError(
            source, f"missing metadata {', '.join(missing)} (required: {', '.join(REQUIRED_METADATA)})"
        )
    for key in ("num_experts", "top_k"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 1:
            raise RoutingTraceError(source, f"metadata {key} must be a positive integer, got {meta[key]!r}")
    if meta["top_k"] != ex.shape[2]:
        raise RoutingTraceError(
            source, f"metadata top_k={meta['top_k']} but 'experts' holds k={ex.shape[2]} choices per token"
        )
    if meta["top_k"] > meta["num_experts"]:
        raise RoutingTraceError(source, f"top_k={meta['top_k']} exceeds num_experts={meta['num_experts']}")
    if ex.size:
        lo, hi = int(ex.min()), int(ex.max())
        if lo < 0 or hi >= meta["num_experts"]:
            bad = np.argwhere((ex < 0) | (ex >= meta["num_experts"]))[0]
            raise RoutingTraceError(
                source,
                f"expert id {int(ex[tuple(bad)])} out of range [0, {meta['num_experts']}) "
                f"at token {bad[0]}, layer {bad[1]}",
            )
    if ex.shape[2] > 1 and ex.size:
        ordered = np.sort(ex, axis=2)
        twice = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
        if twice.any():
            t, layer = np.argwhere(twice)[0]
            raise RoutingTraceError(
                source, f"token {t}, layer {layer}: the same expert chosen twice ({ex[t, layer].tolist()})"
            )
    if probs is not None and probs.size:
        p = probs.astype(np.float32)
        wrong = ~np.isfinite(p) | (p < 0) | (p > 1 + PROB_TOLERANCE)
        if wrong.any():
            t, layer, j = np.argwhere(wrong)[0]
            raise RoutingTraceError(
                source, f"token {t}, layer {layer}: gate probability {float(p[t, layer, j])} not in [0, 1]"
            )


def _dtype(a: Any) -> str:
    return f"dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__


def check_num_experts(trace: RoutingTrace, expected: int, what: str = "the scenario") -> None:
    """Raise RoutingTraceError unless ``trace`` routes over exactly ``expected`` experts."""
    if trace.num_experts != expected:
        raise RoutingTraceError(
            trace.origin,
            f"trace has {trace.num_experts} experts but {what} expects {expected}",
        )


# ---- load / save ---------------------------------------------------------------------------
#: What ``load`` reads, by the name's last suffix(es) once a ``.gz`` is taken off.
FORMATS = ".npz, .jsonl, .json (JSON lines or a JSON array of records), .npy; any of them gzipped (.gz)"
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_GZIP_MAGIC = b"\x1f\x8b"


def load(
    path: str | os.PathLike,
    num_experts: int | None = None,
    seq_field: str | None = None,
    metadata: dict[str, Any] | None = None,
    drop_incomplete: bool = False,
) -> RoutingTrace:
    """Load a ``.npz`` trace, or import JSON lines / a JSON array / ``.npy``, gzipped or not.

    ``num_experts`` is the known expert count: an imported id at or above it is an error,
    and a ``.npz`` whose metadata says otherwise is refused. ``seq_field`` names the
    sequence id of JSON records; ``metadata`` overrides metadata keys (e.g. ``model``);
    ``drop_incomplete`` drops JSON tokens that lack a record at some layer (see
    :func:`import_jsonl`).
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise RoutingTraceError(name, "no such file")
    kind = _format_of(path)
    if seq_field is not None and kind != "json":
        raise RoutingTraceError(name, f"a sequence-id field ({seq_field!r}) applies only to JSON records, not {kind}")
    if kind == "json":
        return import_jsonl(path, num_experts, seq_field, metadata, drop_incomplete)
    if kind == "npy":
        return import_npy(path, num_experts, metadata=metadata)
    trace = _load_npz(path)
    if num_experts is not None and num_experts != trace.num_experts:
        raise RoutingTraceError(
            name, f"given {num_experts} experts but the trace's metadata says num_experts={trace.num_experts}"
        )
    if metadata:
        meta = dict(trace.metadata)
        meta.update(metadata)
        trace = RoutingTrace(trace.experts, trace.seq_ids, meta, trace.probs, origin=name)
    return trace


def _format_of(path: Path) -> str:
    """ "npz", "json" or "npy", from the suffix under any ``.gz``, else from the first bytes."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in _JSON_SUFFIXES:
        return "json"
    if last in (".npy", ".npz"):
        return last[1:]
    head = _read_bytes(path)[:8]
    if head.startswith(b"PK"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    raise RoutingTraceError(str(path), f"unknown trace format (allowed: {FORMATS})")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip (by content, whatever its name)."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RoutingTraceError(name, f"cannot read ({e.strerror})") from None
    if not data.startswith(_GZIP_MAGIC):
        if path.suffix.lower() == ".gz":
            raise RoutingTraceError(name, "named .gz but not gzip-compressed")
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise RoutingTraceError(name, f"truncated or corrupt gzip ({type(e).__name__}: {e})") from None


def _load_npz(path: Path) -> RoutingTrace:
    name = str(path)
    data = _read_bytes(path)
    if not data.startswith(b"PK"):  # else numpy guesses a pickle and blames that
        raise RoutingTraceError(name, "truncated or corrupt .npz (not a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            names = set(z.files)
            for need in ("experts", "seq_ids", "metadata"):
                if need not in names:
                    raise RoutingTraceError(
                        name, f"missing array {need!r} (found: {', '.join(sorted(names)) or 'none'})"
                    )
            experts = z["experts"]
            seq_ids = z["seq_ids"]
            meta_raw = z["metadata"]
            probs = z["probs"] if "probs" in names else None
    except RoutingTraceError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error) as e:
        raise RoutingTraceError(name, f"truncated or corrupt .npz ({type(e).__name__}: {e})") from None
    try:
        metadata = json.loads(str(meta_raw[()]))
    except (json.JSONDecodeError, TypeError, IndexError) as e:
        raise RoutingTraceError(name, f"metadata is not valid JSON ({e})") from None
    return RoutingTrace(experts=experts, seq_ids=seq_ids, metadata=metadata, probs=probs, origin=name)


def concatenate(traces: Sequence[RoutingTrace], dataset: str | None = None) -> RoutingTrace:
    """Join traces token-wise. Sequence ids are renumbered so sequences stay distinct."""
    if not traces:
        raise RoutingTraceError(MEMORY, "nothing to concatenate")
    first = traces[0]
    for t in traces[1:]:
        for what, a, b in (
            ("num_experts", t.num_experts, first.num_experts),
            ("layers", t.num_layers, first.num_layers),
            ("top_k", t.top_k, first.top_k),
        ):
            if a != b:
                raise RoutingTraceError(t.origin, f"cannot concatenate: {what}={a} but {first.origin} has {b}")
        if (t.probs is None) != (first.probs is None):
            raise RoutingTraceError(t.origin, "cannot concatenate traces with and without gate probabilities")
    seqs, offset = [], 0
    for t in traces:
        _, renum = np.unique(t.seq_ids, return_inverse=True)
        seqs.append(renum.astype(np.int32) + offset)
        offset += int(renum.max()) + 1 if renum.size else 0
    meta = dict(first.metadata)
    datasets = list(dict.fromkeys(str(t.metadata["dataset"]) for t in traces))
    meta["dataset"] = dataset or "+".join(datasets)
    meta["made_by"] = "concatenate(" + ", ".join(t.origin for t in traces) + ")"
    return RoutingTrace(
        experts=np.concatenate([t.experts for t in traces]),
        seq_ids=np.concatenate(seqs),
        metadata=meta,
        probs=None if first.probs is None else np.concatenate([t.probs for t in traces]),
        origin=MEMORY,
    )


# ---- importers -----------------------------------------------------------------------------
def _import_metadata(path: Path, importer: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    stem = path.name.removesuffix(".gz").removesuffix(".GZ")
    meta: dict[str, Any] = {
        "model": "unknown",
        "dataset": Path(stem).stem,
        "source": str(path),
        "license": "unknown",
        "made_by": f"lina_sim.routing.traces.{importer}({path.name})",
    }
    meta.update(overrides or {})
    return meta


def import_jsonl(
    path: str | os.PathLike,
    num_experts: int | None = None,
    seq_field: str | None = None,
    metadata: dict[str, Any] | None = None,
    drop_incomplete: bool = False,
) -> RoutingTrace:
    """Import JSON routing records, one per token per layer: JSON lines, or one JSON array
    of record objects; either may be gzipped.

    Each record has ``layer``, ``token_idx`` (or ``token_pos``), ``experts`` (a list of k
    distinct ids, best first) and optionally ``gating_probs`` (k numbers in [0, 1]); a
    sequence id comes from ``seq_field`` or the first of :data:`SEQ_ID_FIELDS` present
    (none: one sequence). Layers must run 0, 1, ... with none missing. A token that lacks
    a record at some layer (a ragged dump) is an error unless ``drop_incomplete``: then
    such tokens are dropped and their count is kept in metadata ``dropped_incomplete``.
    ``num_experts`` (or ``metadata["num_experts"]``) bounds the ids; without it the
    count is inferred as the largest id + 1 and metadata ``num_experts_inferred`` says so.
    """
    path = Path(path)
    name = str(path)
    known = num_experts if num_experts is not None else (metadata or {}).get("num_experts")
    if known is not None and (not _is_int(known) or known < 1):
        raise RoutingTraceError(name, f"the expert count must be a positive integer, got {known!r}")
    records: dict[tuple[int, int, int], tuple[list[int], list[float] | None]] = {}
    seq_index: dict[Any, int] = {}
    seq_label: dict[int, Any] = {}
    layers: set[int] = set()
    k: int | None = None
    has_probs: bool | None = None
    for where, rec in _json_records(path):
        if not isinstance(rec, dict):
            raise RoutingTraceError(name, f"{where}: a record must be a JSON object")
        tok_key = "token_idx" if "token_idx" in rec else "token_pos" if "token_pos" in rec else None
        for need, present in (
            ("layer", "layer" in rec),
            ("token_idx or token_pos", tok_key),
            ("experts", "experts" in rec),
        ):
            if not present:
                raise RoutingTraceError(name, f"{where}: missing field {need}")
        layer, tok, experts = rec["layer"], rec[tok_key], rec["experts"]
        if not _is_int(layer) or not _is_int(tok) or layer < 0 or tok < 0:
            raise RoutingTraceError(name, f"{where}: layer and {tok_key} must be non-negative integers")
        if _is_int(experts):
            experts = [experts]
        if not isinstance(experts, list) or not experts or not all(_is_int(e) for e in experts):
            raise RoutingTraceError(name, f"{where}: experts must be a non-empty list of integer ids")
        _check_ids(name, where, experts, known)
        if k is None:
            k = len(experts)
        elif len(experts) != k:
            raise RoutingTraceError(name, f"{where}: {len(experts)} experts but earlier records have {k}")
        probs = rec.get("gating_probs")
        if has_probs is None:
            has_probs = probs is not None
        if (probs is not None) != has_probs:
            raise RoutingTraceError(name, f"{where}: gating_probs present in some records but not others")
        if probs is not None:
            probs = _check_probs(name, where, probs, k)
        if seq_field and seq_field not in rec:
            raise RoutingTraceError(name, f"{where}: missing sequence id field {seq_field!r}")
        field_name = seq_field or next((f for f in SEQ_ID_FIELDS if f in rec), None)
        seq_raw = rec[field_name] if field_name else 0
        seq = seq_index.setdefault(_hashable(seq_raw), len(seq_index))
        seq_label.setdefault(seq, seq_raw)
        key = (seq, tok, layer)
        if key in records:
            raise RoutingTraceError(
                name, f"{where}: duplicate record for sequence {seq_raw!r}, token {tok}, layer {layer}"
            )
        records[key] = (experts, probs)
        layers.add(layer)
    if not records or k is None:
        raise RoutingTraceError(name, "no records (empty or truncated file)")
    L = max(layers) + 1
    missing_layers = sorted(set(range(L)) - layers)
    if missing_layers:
        # Renumbering the layers that are there would shift every later one (4->5 read as 4->6).
        raise RoutingTraceError(
            name,
            f"layer {missing_layers[0]} has no records ({len(missing_layers)} of layers 0..{L - 1} missing); "
            "a trace needs every MoE layer from 0, numbered consecutively",
        )
    per_token: dict[tuple[int, int], int] = {}
    for s, t, _ in records:
        per_token[(s, t)] = per_token.get((s, t), 0) + 1
    incomplete = sorted(st for st, n in per_token.items() if n < L)
    if incomplete and not drop_incomplete:
        s, t = incomplete[0]
        lacking = next(layer for layer in range(L) if (s, t, layer) not in records)
        raise RoutingTraceError(
            name,
            f"ragged trace: {len(incomplete)} of {len(per_token)} tokens lack a record at some layer "
            f"(first: token {t} of sequence {seq_label[s]!r} at layer {lacking}); "
            "drop them with --drop-incomplete (trace-stats) or serving.drop_incomplete: true",
        )
    dropped = set(incomplete)
    tokens = sorted(st for st in per_token if st not in dropped)
    if not tokens:
        raise RoutingTraceError(name, f"every one of the {len(per_token)} tokens lacks a record at some layer")
    tok_pos = {st: i for i, st in enumerate(tokens)}
    n = len(tokens)
    experts_arr = np.empty((n, L, k), dtype=np.int64)
    probs_arr = np.empty((n, L, k), dtype=np.float32) if has_probs else None
    for (s, t, layer), (e, p) in records.items():
        i = tok_pos.get((s, t))
        if i is None:
            continue
        experts_arr[i, layer] = e
        if probs_arr is not None:
            probs_arr[i, layer] = p
    seq_ids = np.array([s for s, _ in tokens], dtype=np.int32)
    meta = _import_metadata(path, "import_jsonl", metadata)
    if known is not None:
        meta["num_experts"] = known
    else:
        meta["num_experts_inferred"] = True
    if drop_incomplete:
        meta["dropped_incomplete"] = len(dropped)
    return make_trace(experts_arr, meta, seq_ids=seq_ids, probs=probs_arr, origin=name)


def _json_records(path: Path) -> list[tuple[str, Any]]:
    """(where, record) of every record: ``line N`` of JSON lines, ``record N`` of an array."""
    name = str(path)
    try:
        text = _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RoutingTraceError(name, f"not UTF-8 text ({e.reason})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RoutingTraceError(
                name, f"line {e.lineno}: invalid JSON array, truncated or corrupt ({e.msg})"
            ) from None
        if not isinstance(items, list):  # "[1] [2]" and the like fail to parse above
            raise RoutingTraceError(name, "expected a JSON array of records")
        return [(f"record {i}", rec) for i, rec in enumerate(items, 1)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise RoutingTraceError(name, f"line {lineno}: invalid JSON, truncated or corrupt ({e.msg})") from None
    return out


def _check_ids(name: str, where: str, experts: list[int], known: int | None) -> None:
    """One record's expert ids: non-negative, below the known count, no expert twice."""
    for e in experts:
        if e < 0 or (known is not None and e >= known):
            allowed = f"[0, {known})" if known is not None else "non-negative"
            raise RoutingTraceError(name, f"{where}: expert id {e} out of range (allowed: {allowed})")
    if len(set(experts)) != len(experts):
        twice = next(e for e in experts if experts.count(e) > 1)
        raise RoutingTraceError(name, f"{where}: expert {twice} chosen twice for one token ({experts})")


def _check_probs(name: str, where: str, probs: Any, k: int) -> list[float]:
    """One record's gate probabilities: k finite numbers in [0, 1]."""
    if _is_number(probs):
        probs = [probs]
    if not isinstance(probs, list) or len(probs) != k or not all(_is_number(p) for p in probs):
        raise RoutingTraceError(name, f"{where}: gating_probs must be a list of {k} numbers")
    bad = next((p for p in probs if not (math.isfinite(p) and 0 <= p <= 1 + PROB_TOLERANCE)), None)
    if bad is not None:
        raise RoutingTraceError(name, f"{where}: gate probability {bad} not in [0, 1]")
    return probs


def import_npy(
    path: str | os.PathLike,
    num_experts: int | None = None,
    tokens_per_seq: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> RoutingTrace:
    """Import a plain ``.npy`` of expert ids, [tokens, layers] or [tokens, layers, k].

    This is the layout ExFlow uses. The file holds no sequence boundaries: give
    ``tokens_per_seq`` to cut it into sequences of that many tokens, else it is one.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise RoutingTraceError(name, "no such file")
    try:
        arr = np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RoutingTraceError(name, f"truncated or corrupt .npy ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise RoutingTraceError(name, "expected a single .npy array")
    if arr.ndim not in (2, 3):
        raise RoutingTraceError(name, f"expected shape [tokens, layers] or [tokens, layers, k], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise RoutingTraceError(name, f"expected integer expert ids, got dtype {arr.dtype}")
    seq_ids = None
    if tokens_per_seq:
        seq_ids = (np.arange(arr.shape[0]) // tokens_per_seq).astype(np.int32)
    meta = _import_metadata(path, "import_npy", metadata)
    if num_experts is not None:
        meta["num_experts"] = num_experts
    elif "num_experts" not in meta:
        meta["num_experts_inferred"] = True
    return make_trace(arr, meta, seq_ids=seq_ids, origin=name)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _hashable(x: Any) -> Any:
    return json.dumps(x, sort_keys=True) if isinstance(x, (list, dict)) else x
