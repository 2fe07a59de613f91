"""Measured collective times, read into one tidy table whatever tool printed them.

Every reader turns one file into a frame with the columns of :data:`MEASURED_COLUMNS`,
one row per measured size of one configuration:

- ``table``: the measured table the row belongs to: the file's stem, with
  ``[NODESxRANKS_PER_NODE]`` (and the collective, when a file mixes them) appended when
  one file holds several configurations;
- ``collective``: ``allreduce``, ``all_to_all`` or ``sendrecv`` (the simulator's names;
  another nccl-tests op keeps its own, e.g. ``all_gather``);
- ``size_bytes``: nccl-tests' size, bytes per rank: the allreduce buffer, all a rank sends
  in an all-to-all, what a rank sends to the next in a sendrecv;
- ``ranks``, ``ranks_per_node``, ``nodes``: the communicator's shape
  (``ranks = nodes x ranks_per_node``);
- ``time_s``: the measured time, s: the faster of nccl-tests' out-of-place and in-place
  times (both time the same collective, and interference only ever adds time:
  ``h100-8x8-allreduce-1`` reads 1272 µs out of place at 8 MiB, 321 µs in place), Vidur's
  median;
- ``time_inplace_s``: nccl-tests' in-place time, s (NaN where there is none);
- ``algbw_GBps``, ``busbw_GBps``: bandwidths as the tool printed them, GB/s (NaN where none);
- ``dtype``, ``nccl_version``: what the file says ("" where it says nothing);
- ``timed``: what the time covers: ``sender`` for the sender's kernel of a one-way send
  (Vidur's send/recv profiles: rank 0 sends, rank 1 receives, and rank 0's NCCL kernel is
  timed, ``vidur/profiling/collectives/collectives_impl.py: GraphedCollective._run_send_recv``),
  "" for the whole call as every rank sees it (nccl-tests, ``lina-run calibrate``);
- ``format``, ``source``, ``line``: the reader, the file and the 1-based line of the row.

Formats (:data:`READERS`, tried in order on the file's content, not its extension):

- ``lina-sim-csv``: a CSV with the columns above, as ``lina-sim collective --compare --out``
  writes it (extra columns such as ``predicted_s`` are ignored), so that a previous
  comparison can be fed back as a measurement;
- ``vidur``: Vidur's network profiles (``size`` in bytes, ``time_stats.<op>.median`` in ms,
  ``num_workers``, ``devices_per_node``);
- ``calibrate-raw``: the raw YAML ``lina-run calibrate`` writes beside a profile
  (``world_size``, ``ranks_per_node``, ``collectives: [{kind, bytes, seconds}]``; the mean
  time is taken, as nccl-tests reports);
- ``nccl-tests``: ``*_perf`` output as pasted from a terminal (and the nccl-tests-style
  table ``lina-sim collective`` prints). The ``#  Rank ... on HOST device ...`` lines give
  the ranks and, by distinct host names, the ranks per node; the column header line says
  which columns a data row has. Other lines are skipped, but a line that starts with two
  integers is a data row and must parse.

A bad file is one :class:`~lina_sim.errors.ConfigError` naming ``file:line`` and the
column or field, never a traceback. Only finite times > 0 pass. Rows of size 0 (which
time only a launch) are left out: there is nothing to compare them with.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lina_sim.config.fields import Field, read_text
from lina_sim.errors import ConfigError

MEASURED_COLUMNS = (
    "table",
    "collective",
    "size_bytes",
    "ranks",
    "ranks_per_node",
    "nodes",
    "time_s",
    "time_inplace_s",
    "algbw_GBps",
    "busbw_GBps",
    "dtype",
    "nccl_version",
    "nccl_algo",
    "nccl_proto",
    "nccl_channels",
    "timed",
    "format",
    "source",
    "line",
)
# What a row's time covers (the module docstring's ``timed``).
SENDER = "sender"
TIMED = ("", SENDER)
# The columns that identify one measured table's configuration.
CONFIG_COLUMNS = ("collective", "ranks", "ranks_per_node", "nodes")

# Tool names of a collective -> the simulator's (nccl-tests *_perf stems, Vidur's
# time_stats.<name>, lina-run calibrate's kinds, lina-sim's own).
OP_NAMES = {
    "all_reduce": "allreduce",
    "allreduce": "allreduce",
    "alltoall": "all_to_all",
    "all_to_all": "all_to_all",
    "sendrecv": "sendrecv",
    "send_recv": "sendrecv",
}

SIZE = Field(int, minimum=0, allowed="a whole number of bytes >= 0")
COUNT = Field(int, minimum=1, allowed="an integer >= 1")
TIME = Field(float, minimum=0, exclusive_minimum=True)  # `allowed` says the unit, per reader
BANDWIDTH = Field(float, minimum=0, allowed="a finite number >= 0 (GB/s)")


def op_name(name: str) -> str:
    """The simulator's name of a collective a tool calls ``name`` (unknown names stay)."""
    key = name.strip().lower()
    return OP_NAMES.get(key, key)


def _number(text: Any) -> Any:
    """Text that spells a number as that number (``nan`` as NaN, so that the error says
    "finite"); anything else unchanged, for the field check to reject."""
    if isinstance(text, str):
        try:
            return float(text)
        except ValueError:
            return text.strip()
    return text


def _check(f: Field, value: Any, where: str, column: str, allowed: str | None = None) -> Any:
    """``value`` checked by ``f``; a bad one is an error on ``where: column``."""
    if allowed is not None:
        f = dataclasses.replace(f, allowed=allowed)
    return f.check(_number(value), f"{where}: {column}")


@dataclass
class _Rows:
    """The tidy rows of one file, checked as they are added."""

    path: str
    fmt: str
    rows: list[dict] = field(default_factory=list)

    def add(
        self,
        line: int,
        collective: str,
        size: int,
        ranks: int,
        ranks_per_node: int,
        time_s: float,
        *,
        table: str | None = None,
        time_inplace_s: float = math.nan,
        algbw: float = math.nan,
        busbw: float = math.nan,
        dtype: str = "",
        nccl_version: str = "",
        nccl_algo: str = "",
        nccl_proto: str = "",
        nccl_channels: str = "",
        timed: str = "",
    ) -> None:
        where = f"{self.path}:{line}"
        if ranks % ranks_per_node:
            raise ConfigError(
                where,
                f"{ranks} ranks do not divide into nodes of {ranks_per_node}",
                "ranks a multiple of ranks per node",
            )
        self.rows.append(
            {
                "table": table,
                "collective": op_name(collective),
                "size_bytes": int(size),
                "ranks": int(ranks),
                "ranks_per_node": int(ranks_per_node),
                "nodes": int(ranks) // int(ranks_per_node),
                "time_s": float(time_s),
                "time_inplace_s": float(time_inplace_s),
                "algbw_GBps": float(algbw),
                "busbw_GBps": float(busbw),
                "dtype": dtype,
                "nccl_version": nccl_version,
                "nccl_algo": nccl_algo,
                "nccl_proto": nccl_proto,
                "nccl_channels": nccl_channels,
                "timed": timed,
                "format": self.fmt,
                "source": self.path,
                "line": int(line),
            }
        )

    def frame(self, end_line: int, expected: str) -> pd.DataFrame:
        """The rows as a frame, each labelled with its table; no rows at all is an error
        at ``end_line`` saying what a data row looks like."""
        if not self.rows:
            raise ConfigError(f"{self.path}:{end_line}", "no data rows", expected)
        df = pd.DataFrame(self.rows, columns=list(MEASURED_COLUMNS))
        stem = Path(self.path).stem
        unlabelled = df["table"].isna()
        configs = df.loc[unlabelled, list(CONFIG_COLUMNS)].drop_duplicates()
        mixed_ops = configs["collective"].nunique() > 1
        for cfg in configs.itertuples(index=False):
            mask = unlabelled & (df[list(CONFIG_COLUMNS)] == pd.Series(cfg._asdict())).all(axis=1)
            label = stem
            if len(configs) > 1:
                label += f"[{cfg.collective} " if mixed_ops else "["
                label += f"{cfg.nodes}x{cfg.ranks_per_node}]"
            df.loc[mask, "table"] = label
        return df


# -- nccl-tests text --------------------------------------------------------------------------
# "#  Rank  3 Group  0 Pid 4180129 on cnode3-002 device  3 [0000:61:00] NVIDIA H100 80GB HBM3"
# (nccl-tests before 2.10 printed no "Group").
_RANK = re.compile(r"^#\s*Rank\s+(\d+)\s+(?:Group\s+\d+\s+)?Pid\s+\d+\s+on\s+(\S+)\s+device\s+\d+")
# A note a collector left in place of the rank lines:
# '# [collector note: 64 "# Rank N ..." lines omitted; 8 ranks per node on hosts h1 h2 ...]'
_NOTE_RANKS = re.compile(r'(\d+)\s+"#\s*Rank[^"]*"\s+lines\s+omitted')
_NOTE_HOSTS = re.compile(r"(\d+)\s+ranks\s+per\s+node\s+on\s+hosts\s+([^\]]+)")
_TEST = re.compile(r"\b([a-z_]+?)_perf\b")  # "all_reduce_perf" on a command line or a header
_STARTING = re.compile(r"^#\s*Collective test starting:\s*([a-z_]+?)_perf\b")
_NTHREAD = re.compile(r"^#\s*nThread\s+\d+")
_NCCL_CODE = re.compile(r"nccl-library=(\d+)")
_NCCL_VERSION = re.compile(r"NCCL version\s+(\d+\.\d+\.\d+)")
# NCCL_ALGO / NCCL_PROTO set for the run, as a command line or an env dump shows them
# ("mpirun -x NCCL_ALGO=Ring ...", "NCCL INFO NCCL_PROTO set by environment to LL128").
_NCCL_ENV = re.compile(
    r"\bNCCL_(ALGO|PROTO|MIN_CTAS|MAX_CTAS|MIN_NCHANNELS|MAX_NCHANNELS|MIN_NRINGS|MAX_NRINGS)"
    r"(?:=|\s+set by environment to\s+)([\w^,]+)"
)
# The channel-count variables, as NCCL combines them (connect.cc ncclTopoPostset: the
# channel count is at least max(NCCL_MIN_NCHANNELS, NCCL_MIN_CTAS) and at most
# min(NCCL_MAX_NCHANNELS, NCCL_MAX_CTAS); NCCL_MIN/MAX_NRINGS are the oldest names).
_CHANNEL_ENV = {"MIN_CTAS": "min", "MIN_NCHANNELS": "min", "MIN_NRINGS": "min"}
_CHANNEL_ENV |= {"MAX_CTAS": "max", "MAX_NCHANNELS": "max", "MAX_NRINGS": "max"}
# The table `lina-sim collective` prints: "# allreduce (auto) on dgx-a100: 2 node(s) x 8 GPUs = 16 ranks"
# (in the parentheses the algorithm asked for, e.g. flat-ring, and a forced protocol: "tree, proto LL")
_LINA_TITLE = re.compile(
    r"^#\s*(\w+)\s+\(([^)]*)\)\s+on\s+\S+:\s+(\d+)\s+node\(s\)\s+x\s+(\d+)\s+GPUs\s+=\s+(\d+)\s+ranks"
)
_INT = re.compile(r"^\d+$")
# Without a column header line, the number of fields says which optional columns a row
# has: size count type, then 0-2 of (redop, root), then 1-2 groups of time algbw busbw #wrong.
_BY_FIELD_COUNT = {3 + extra + 4 * groups: (extra, groups) for extra in (0, 1, 2) for groups in (1, 2)}
_OPS_ALLOWED = (
    "nccl-tests *_perf output (e.g. all_reduce_perf), or a file name that names allreduce, alltoall or sendrecv"
)


def _nccl_version(code: int) -> str:
    """NCCL_VERSION_CODE as x.y.z: major*10000 + minor*100 + patch since NCCL 2.9, major*1000 before."""
    if code >= 10000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


def _op_from_name(path: str) -> str | None:
    stem = Path(path).stem.lower()
    for name in sorted(OP_NAMES, key=len, reverse=True):  # all_reduce before allreduce's substrings
        if name in stem:
            return OP_NAMES[name]
    return None


@dataclass
class _Columns:
    """Which field of a data row holds what: positions of size, count, type, the
    out-of-place time / algbw / busbw and the in-place time (-1: absent)."""

    n: int
    names: str
    size: int = 0
    count: int = 1
    type: int = 2
    time: int = -1
    algbw: int = -1
    busbw: int = -1
    time_inplace: int = -1

    @classmethod
    def from_header(cls, tokens: list[str]) -> _Columns | None:
        """From a header line: ``size count type redop root time algbw busbw #wrong time ...``
        (units in parentheses, as ``lina-sim collective`` prints them, are dropped); None
        when the line names no size or no time column."""
        names = [re.sub(r"\(.*\)$", "", t).lower() for t in tokens]
        times = [i for i, t in enumerate(names) if t == "time"]
        if not times or names[0] != "size":
            return None
        c = cls(len(names), " ".join(tokens))
        c.size, c.count, c.type = (names.index(k) if k in names else -1 for k in ("size", "count", "type"))
        c.time = times[0]
        c.time_inplace = times[1] if len(times) > 1 else -1
        c.algbw = names.index("algbw") if "algbw" in names else -1
        c.busbw = names.index("busbw") if "busbw" in names else -1
        return c

    @classmethod
    def from_count(cls, n: int) -> _Columns | None:
        """From the number of fields alone (a row pasted without its header), or None."""
        if n not in _BY_FIELD_COUNT:
            return None
        extra, groups = _BY_FIELD_COUNT[n]
        names = ["size", "count", "type", *["redop", "root"][:extra]]
        names += ["time", "algbw", "busbw", "#wrong"] * groups
        return cls.from_header(names)


@dataclass
class _RunState:
    """What the lines before a data row said about the run it belongs to."""

    op: str | None = None
    hosts: dict[int, str] = field(default_factory=dict)  # rank -> host
    note: tuple[int, int] | None = None  # (ranks, ranks per node) from a collector note
    lina: tuple[int, int] | None = None  # (ranks, ranks per node) from a lina-sim title
    version: str = ""
    env: dict[str, str] = field(default_factory=dict)  # "ALGO" / "PROTO" -> the value set
    columns: _Columns | None = None
    header_line: int = 0

    def shape(self, where: str) -> tuple[int, int]:
        """(ranks, ranks per node) of the run, or an error saying which lines are missing."""
        if self.hosts:
            per_host = Counter(self.hosts.values())
            counts = set(per_host.values())
            if len(counts) > 1:
                spread = ", ".join(f"{h}: {k}" for h, k in per_host.items())
                raise ConfigError(
                    where,
                    f"ranks are spread unevenly over the hosts ({spread})",
                    "the same number of ranks on every host",
                )
            return len(self.hosts), counts.pop()
        if self.note is not None:
            return self.note
        if self.lina is not None:
            return self.lina
        raise ConfigError(
            where,
            "cannot tell how many ranks ran: no '#  Rank N Group G Pid P on HOST device D' lines before this row",
            "nccl-tests output with its '# Using devices' block",
        )


def _read_text(path: str, text: str) -> pd.DataFrame:
    """nccl-tests output (or ``lina-sim collective``'s table) -> tidy rows."""
    rows = _Rows(path, "nccl-tests")
    st = _RunState()
    file_op = _op_from_name(path)
    lines = text.splitlines()
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        tokens = line.split()
        if not tokens:
            continue
        for key, value in _NCCL_ENV.findall(line):
            st.env[key] = value
        if line.startswith("#"):
            _header(st, line, lineno, f"{path}:{lineno}")
            continue
        if not (len(tokens) >= 2 and _INT.match(tokens[0]) and _INT.match(tokens[1])):
            if m := _NCCL_VERSION.search(line):  # NCCL_DEBUG=INFO: "NCCL INFO NCCL version 2.18.3+cuda12.2"
                st.version = m.group(1)
            elif m := _TEST.search(line):  # a command line: "./build/all_reduce_perf -b 8 -e 128M"
                st.op = m.group(1)
            continue
        _data_row(rows, st, tokens, lineno, file_op)
    after = st.header_line + 1 if st.header_line else max(len(lines), 1)
    return rows.frame(
        after,
        "nccl-tests data rows: size count type [redop root] time algbw busbw #wrong [time algbw busbw #wrong]",
    )


def _header(st: _RunState, line: str, lineno: int, where: str) -> None:
    """Update the run state from one ``#`` line."""
    tokens = line[1:].split()
    if _NTHREAD.match(line):  # a new run starts: its devices follow
        st.hosts, st.note = {}, None
    elif m := _RANK.match(line):
        st.hosts[int(m.group(1))] = m.group(2)
    elif m := _STARTING.match(line):
        st.op = m.group(1)
    elif m := _LINA_TITLE.match(line):
        st.op = m.group(1)
        st.lina = (int(m.group(5)), int(m.group(4)))  # the whole cluster is the communicator
    elif tokens and tokens[0].lower() == "size" and (cols := _Columns.from_header(tokens)) is not None:
        st.columns, st.header_line = cols, lineno
    elif "collector note" in line and (m := _NOTE_RANKS.search(line)):
        ranks = int(m.group(1))
        h = _NOTE_HOSTS.search(line)
        if h is None:
            raise ConfigError(where, "a collector note omits the rank lines but does not say on which hosts")
        per_node, hosts = int(h.group(1)), h.group(2).split()
        if per_node * len(hosts) != ranks:
            raise ConfigError(
                where,
                f"the note says {ranks} ranks but {per_node} per node on {len(hosts)} hosts",
                "ranks = ranks per node x hosts",
            )
        st.note = (ranks, per_node)
    elif m := _NCCL_CODE.search(line):
        st.version = _nccl_version(int(m.group(1)))
    elif m := _NCCL_VERSION.search(line):
        st.version = m.group(1)
    elif (m := _TEST.search(line)) and st.op is None:
        st.op = m.group(1)


def _data_row(rows: _Rows, st: _RunState, tokens: list[str], lineno: int, file_op: str | None) -> None:
    where = f"{rows.path}:{lineno}"
    cols = st.columns if st.columns is not None and st.columns.n == len(tokens) else None
    if cols is None:
        if st.columns is not None:
            raise ConfigError(
                where,
                f"a data row with {len(tokens)} fields: {' '.join(tokens)!r}",
                f"{st.columns.n} fields, as the column header on line {st.header_line} says: {st.columns.names}",
            )
        cols = _Columns.from_count(len(tokens))
        if cols is None:
            raise ConfigError(
                where,
                f"a data row with {len(tokens)} fields: {' '.join(tokens)!r}",
                "size count type [redop root] time algbw busbw #wrong [time algbw busbw #wrong]",
            )
    if st.op is None and file_op is None:
        raise ConfigError(where, "cannot tell which collective this row measures", _OPS_ALLOWED)
    size = _check(SIZE, tokens[cols.size], where, "size (B)")
    if size == 0:
        return
    _check(COUNT, tokens[cols.count], where, "count (elements)")
    us = "a finite number > 0 (us)"
    time = _check(TIME, tokens[cols.time], where, "out-of-place time (us)" if cols.time_inplace >= 0 else "time", us)
    inplace = math.nan
    if cols.time_inplace >= 0:
        inplace = _check(TIME, tokens[cols.time_inplace], where, "in-place time (us)", us) / 1e6
    bw = [
        _check(BANDWIDTH, tokens[i], where, k) if i >= 0 else math.nan
        for i, k in ((cols.algbw, "algbw"), (cols.busbw, "busbw"))
    ]
    ranks, per_node = st.shape(where)
    rows.add(
        lineno,
        st.op or file_op or "",
        size,
        ranks,
        per_node,
        time / 1e6 if not inplace < time / 1e6 else inplace,  # NaN in-place: the out-of-place time
        time_inplace_s=inplace,
        algbw=bw[0],
        busbw=bw[1],
        dtype=tokens[cols.type] if cols.type >= 0 else "",
        nccl_version=st.version,
        nccl_algo=st.env.get("ALGO", ""),
        nccl_proto=st.env.get("PROTO", ""),
        nccl_channels=channel_env(st.env),
    )


# -- CSV: Vidur's profiles and our own -------------------------------------------------------
_VIDUR_TIME = re.compile(r"^time_stats\.(\w+)\.median$")
VIDUR_COLUMNS = ("size", "num_workers", "devices_per_node")


def _csv_rows(path: str, text: str, required: Iterable[str]) -> Iterable[tuple[int, dict]]:
    """The (line, row) pairs of a CSV; a missing column is an error on line 1."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    missing = [c for c in required if c not in header]
    if missing:
        raise ConfigError(f"{path}:1", f"missing column {missing[0]!r}", ", ".join(required))

    def rows():
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise ConfigError(
                    f"{path}:{reader.line_num}", f"{len(values)} values", f"{len(header)}, one per column of line 1"
                )
            yield reader.line_num, dict(zip(header, values))

    return rows()


def _read_vidur(path: str, text: str) -> pd.DataFrame:
    """Vidur's ``<cluster>_<collective>.csv``: the median time (ms) of each row."""
    first = text.splitlines()[0] if text else ""
    medians = [m.group(1) for c in first.split(",") if (m := _VIDUR_TIME.match(c.strip()))]
    if len(medians) != 1:
        raise ConfigError(
            f"{path}:1", "need exactly one time_stats.<collective>.median column", "e.g. time_stats.all_reduce.median"
        )
    time_col = f"time_stats.{medians[0]}.median"
    # Vidur times a send/recv on the sender only (the module docstring's ``timed``).
    timed = SENDER if op_name(medians[0]) == "sendrecv" else ""
    data = _csv_rows(path, text, (*VIDUR_COLUMNS, time_col))
    rows = _Rows(path, "vidur")
    for line, r in data:
        where = f"{path}:{line}"
        size = _check(SIZE, r["size"], where, "size")
        if size == 0:
            continue
        ms = _check(TIME, r[time_col], where, time_col, "a finite number > 0 (ms)")
        ranks = _check(COUNT, r["num_workers"], where, "num_workers")
        per_node = _check(COUNT, r["devices_per_node"], where, "devices_per_node")
        rows.add(line, medians[0], size, ranks, per_node, ms / 1e3, timed=timed)
    return rows.frame(1, f"rows of {', '.join((*VIDUR_COLUMNS, time_col))}")


def _timed(value: str | None, where: str) -> str:
    """A ``timed`` cell of a lina-sim CSV: "" (or NaN, as pandas writes an empty cell) or
    ``sender``."""
    v = "" if value is None or value.strip() in ("", "nan", "NaN") else value.strip()
    if v not in TIMED:
        raise ConfigError(f"{where}: timed", f"got {v!r}", [t or '""' for t in TIMED])
    return v


OWN_COLUMNS = ("collective", "size_bytes", "ranks", "ranks_per_node", "nodes", "time_s")


def _read_own(path: str, text: str) -> pd.DataFrame:
    """A CSV with :data:`MEASURED_COLUMNS` (a comparison's extra columns are ignored);
    ``source`` and ``line`` become this file's, so that errors point at it."""
    data = _csv_rows(path, text, OWN_COLUMNS)
    rows = _Rows(path, "lina-sim-csv")
    for line, r in data:
        where = f"{path}:{line}"
        size = _check(SIZE, r["size_bytes"], where, "size_bytes")
        if size == 0:
            continue
        ranks = _check(COUNT, r["ranks"], where, "ranks")
        per_node = _check(COUNT, r["ranks_per_node"], where, "ranks_per_node")
        nodes = _check(COUNT, r["nodes"], where, "nodes")
        if nodes * per_node != ranks:
            raise ConfigError(
                f"{where}: nodes",
                f"{nodes} nodes x {per_node} ranks per node != {ranks} ranks",
                "ranks / ranks_per_node",
            )
        optional = {}
        for col, f in (("time_inplace_s", TIME), ("algbw_GBps", BANDWIDTH), ("busbw_GBps", BANDWIDTH)):
            if r.get(col, "").strip() not in ("", "nan", "NaN"):
                optional[col] = _check(f, r[col], where, col)
        rows.add(
            line,
            r["collective"],
            size,
            ranks,
            per_node,
            _check(TIME, r["time_s"], where, "time_s", "a finite number > 0 (s)"),
            table=r.get("table") or None,
            time_inplace_s=optional.get("time_inplace_s", math.nan),
            algbw=optional.get("algbw_GBps", math.nan),
            busbw=optional.get("busbw_GBps", math.nan),
            dtype=r.get("dtype", ""),
            nccl_version=r.get("nccl_version", ""),
            nccl_algo=r.get("nccl_algo", "") or "",
            nccl_proto=r.get("nccl_proto", "") or "",
            nccl_channels=r.get("nccl_channels", "") or "",
            timed=_timed(r.get("timed", ""), where),
        )
    return rows.frame(1, f"rows with the columns {', '.join(OWN_COLUMNS)}")


# -- lina-run calibrate's raw YAML ----------------------------------------------------------
def _read_calibrate(path: str, text: str) -> pd.DataFrame:
    """``<profile>.raw.yaml``: ``collectives`` rows (kind, bytes, seconds: the mean) of
    ``world_size`` ranks, ``ranks_per_node`` per node."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, Mapping) or root is None:
        raise ConfigError(f"{path}:1", "not a mapping", "lina-run calibrate's raw YAML")
    ranks = _check(COUNT, data.get("world_size"), f"{path}:1", "world_size")
    per_node = _check(COUNT, data.get("ranks_per_node"), f"{path}:1", "ranks_per_node")
    items = data.get("collectives")
    nodes = {k.value: v for k, v in root.value}.get("collectives") if isinstance(root, yaml.MappingNode) else None
    if not isinstance(items, list) or not isinstance(nodes, yaml.SequenceNode):
        raise ConfigError(f"{path}:1", "no 'collectives' list", "collectives: [{kind, bytes, seconds}, ...]")
    rows = _Rows(path, "calibrate-raw")
    for i, (item, node) in enumerate(zip(items, nodes.value)):
        line = node.start_mark.line + 1
        where = f"{path}:{line}"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: collectives[{i}]", "not a mapping", "{kind, bytes, seconds}")
        kind = Field(str, choices=("allreduce", "all_to_all")).check(item.get("kind"), f"{where}: kind")
        size = _check(SIZE, item.get("bytes"), where, "bytes")
        if size == 0:
            continue
        rows.add(
            line,
            kind,
            size,
            ranks,
            per_node,
            _check(TIME, item.get("seconds"), where, "seconds", "a finite number > 0 (s)"),
        )
    return rows.frame(nodes.end_mark.line + 1, "collectives rows {kind, bytes, seconds}")


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Reader:
    """A measured-table format: ``sniff(head)`` says whether the file's first lines are
    this format; ``read(path, text)`` returns the tidy frame; ``describe`` is for errors."""

    sniff: Callable[[str], bool]
    read: Callable[[str, str], pd.DataFrame]
    describe: str


def _csv_header(head: str) -> list[str]:
    first = head.splitlines()[0] if head.strip() else ""
    return [c.strip() for c in first.split(",")] if "," in first else []


READERS: dict[str, Reader] = {
    "lina-sim-csv": Reader(
        lambda head: set(OWN_COLUMNS) <= set(_csv_header(head)),
        _read_own,
        "a CSV with columns " + ", ".join(OWN_COLUMNS) + " (what lina-sim collective --compare --out writes)",
    ),
    "vidur": Reader(
        lambda head: any(_VIDUR_TIME.match(c) for c in _csv_header(head)),
        _read_vidur,
        "a Vidur CSV with size, time_stats.<op>.median (ms), num_workers, devices_per_node",
    ),
    "calibrate-raw": Reader(
        lambda head: bool(re.search(r"^world_size:", head, re.M) and re.search(r"^ranks_per_node:", head, re.M)),
        _read_calibrate,
        "lina-run calibrate's raw YAML (world_size, ranks_per_node, collectives)",
    ),
    "nccl-tests": Reader(
        lambda head: any(
            _NTHREAD.match(l) or _RANK.match(l) or _LINA_TITLE.match(l) or _TEST.search(l) or _data_like(l)
            for l in (s.strip() for s in head.splitlines())
        ),
        _read_text,
        "nccl-tests *_perf output or the table lina-sim collective prints",
    ),
}
SNIFF_LINES = 200  # the head a reader decides on: past pasted prompts and NCCL INFO lines
_FORMATS = "; ".join(r.describe for r in READERS.values())  # what a measured file may be, for errors


def _data_like(line: str) -> bool:
    tokens = line.split()
    return len(tokens) >= 3 and bool(_INT.match(tokens[0]) and _INT.match(tokens[1]))


def read_measured(path: str | Path, fmt: str | None = None) -> pd.DataFrame:
    """The tidy frame (:data:`MEASURED_COLUMNS`) of one measured file; ``fmt`` forces a
    format of :data:`READERS`, else the first whose sniff accepts the file's head."""
    name = str(path)
    if not Path(path).exists():
        raise ConfigError(name, "file not found", "a measured table: " + _FORMATS)
    text = read_text(path, "measured table")
    if not text.strip():
        raise ConfigError(f"{name}:1", "empty file", _FORMATS)
    if fmt is not None:
        if fmt not in READERS:
            raise ConfigError("format", f"unknown format {fmt!r}", READERS)
        return READERS[fmt].read(name, text)
    head = "\n".join(text.splitlines()[:SNIFF_LINES])
    for reader in READERS.values():
        if reader.sniff(head):
            return reader.read(name, text)
    raise ConfigError(f"{name}:1", "not a measured collective table", _FORMATS)


def measured_tables(frames: Iterable[pd.DataFrame]) -> list[tuple[str, pd.DataFrame]]:
    """Every measured table of the frames, in order: (label, its rows). A label that two
    files share gets ``#2``, ``#3`` ... appended, so that each table is one."""
    out: list[tuple[str, pd.DataFrame]] = []
    seen: dict[str, int] = {}
    for df in frames:
        for (label, *_), rows in df.groupby(["table", "source", *CONFIG_COLUMNS], sort=False):
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}#{seen[label]}"
            out.append((label, rows.assign(table=label).reset_index(drop=True)))
    return out


@dataclass(frozen=True)
class TableConfig:
    """One measured table's configuration: collective, ranks, ranks per node, nodes, the
    file it came from, and what its run forced: ``NCCL_ALGO`` / ``NCCL_PROTO`` ("" if
    unset) and the channel bounds ``NCCL_MIN_CTAS`` / ``NCCL_MAX_CTAS`` (or their legacy
    ``NCCL_MIN/MAX_NCHANNELS`` names; ``None`` if unset); ``timed``: ``sender`` when the
    time is the sender's kernel of a one-way send (:data:`SENDER`), else ""."""

    label: str
    collective: str
    ranks: int
    ranks_per_node: int
    nodes: int
    source: str
    nccl_algo: str = ""
    nccl_proto: str = ""
    min_ctas: int | None = None
    max_ctas: int | None = None
    timed: str = ""

    @property
    def one_way(self) -> bool:
        """A sender-timed send between two ranks (Vidur's send/recv), which
        :mod:`lina_sim.experiments.sender_timed` predicts as its sender sees it."""
        return self.timed == SENDER and self.collective == "sendrecv" and self.ranks == 2


def channel_env(env: dict[str, str]) -> str:
    """The channel bounds a run's NCCL environment sets, as ``min=24 max=32`` (either
    part absent when unset; "" for neither): ``max`` of the ``NCCL_MIN_*`` variables,
    ``min`` of the ``NCCL_MAX_*`` ones, as NCCL combines them. A value that is not an
    integer is kept as written, for :func:`channel_bounds` to refuse with its line."""
    bounds: dict[str, list[str]] = {}
    for key, side in _CHANNEL_ENV.items():
        if key in env:
            bounds.setdefault(side, []).append(env[key])
    out = []
    for side, pick in (("min", max), ("max", min)):
        if side in bounds:
            values = bounds[side]
            ints = [int(v) for v in values if _INT.match(v)]
            out.append(f"{side}={pick(ints) if len(ints) == len(values) else ','.join(values)}")
    return " ".join(out)


def channel_bounds(text: str, where: str) -> tuple[int | None, int | None]:
    """(min, max) channel counts of a :func:`channel_env` string (``None`` where unset);
    a value that is not an integer >= 1 is a ConfigError at ``where``."""
    bounds: dict[str, int | None] = {"min": None, "max": None}
    for part in text.split():
        side, _, value = part.partition("=")
        if side not in bounds or not _INT.match(value) or int(value) < 1:
            raise ConfigError(
                where, f"NCCL channel setting {part!r}", "NCCL_MIN_CTAS / NCCL_MAX_CTAS = an integer >= 1"
            )
        bounds[side] = int(value)
    return bounds["min"], bounds["max"]


def table_config(label: str, rows: pd.DataFrame) -> TableConfig:
    """The configuration of one table of :func:`measured_tables` (all its rows share it),
    with the NCCL_ALGO / NCCL_PROTO its run was forced to ("" if none was)."""
    first = rows.iloc[0]

    def env(col: str) -> str:
        v = first.get(col, "")
        return "" if not isinstance(v, str) else v

    return TableConfig(
        label,
        str(first["collective"]),
        int(first["ranks"]),
        int(first["ranks_per_node"]),
        int(first["nodes"]),
        str(first["source"]),
        env("nccl_algo"),
        env("nccl_proto"),
        *channel_bounds(env("nccl_channels"), f"{first['source']}:{first['line']}"),
        env("timed"),
    )
