"""Measure the cluster we run on and write a hardware profile the simulator loads.

Run in every rank (``lina-run calibrate --out profile.yaml [--testbed 2x2 --nic 400mbit]``):

- **links:** ping-pong between rank 0 and a rank on the same node (intra-node) and on
  the last node (inter-node) over growing message sizes; a least-squares fit of
  ``t(n) = alpha + n / bandwidth`` gives each link's latency (s) and bandwidth (bytes/s);
- **collectives:** all-to-all and allreduce over all ranks at several sizes (raw data);
- **compute:** matmul throughput (FLOP/s) at the model's (M, K, N) shapes at one-device
  speed (CPU ranks that outnumber their host's cores take turns, one per core), memory
  bandwidth from a large copy, and the per-op launch overhead;
- **host:** when every rank is a CPU process on one machine (an emulated testbed) with
  fewer cores than ranks, the profile's ``host`` block gives the cores they share (the
  simulator divides them among ranks that compute at once) and the extra time per
  collective step while compute oversubscribes them (collectives timed again with every
  rank computing).

Rank 0 writes ``profile.yaml`` in the preset schema (``lina_sim.hardware.spec.load_preset``
loads it) and the raw measurements to the sibling ``profile.raw.yaml``, both atomically.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from lina_sim.errors import ConfigError
from lina_sim.hardware.spec import COLLECTIVE_KINDS, HostSpec, cluster_from_dict, load_preset
from lina_sim.results.files import atomic_write_text
from runtime.dist import host_cores, host_id, one_core_each
from runtime.ep_moe import TORCH_DTYPES

# The expert FFN and attention matmuls of the paper's Transformer-XL (d_model 512,
# d_ff 2048), 1024 tokens per device, 8 heads: (M, K, N) of C[M, N] = A[M, K] @ B[K, N].
DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = (
    (1024, 512, 2048),  # expert FFN up
    (1024, 2048, 512),  # expert FFN down
    (1024, 512, 1536),  # attention QKV projection
    (1024, 512, 512),  # attention output projection
    (512, 64, 512),  # attention scores, one head
)
TARGET_S = 0.05  # stop growing a ping-pong message once one round trip takes this long


# -- timing ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reps(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> list[float]:
    """Wall time of each of ``reps`` back-to-back calls of ``fn`` (s, device-synchronised
    around each call), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def time_op(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds (device-synchronised around each call)."""
    return statistics.median(time_reps(fn, device, reps, warmup))


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """Fit ``t = alpha + n / bandwidth``; returns (alpha s, bandwidth bytes/s).

    The slope is a least-squares fit over all sizes, so the large messages set the
    bandwidth; alpha is the residual of the smallest size (a median over many round trips),
    never below 0, not the intercept: on a shaped link, messages up to the token bucket's
    burst (64 KB) pass at wire speed, which bends the small-size end of the line.
    """
    n, t = np.asarray(sizes, float), np.asarray(times, float)
    order = np.argsort(n)
    n, t = n[order], t[order]
    if len(n) < 2:
        return 0.0, float(n[0] / t[0])
    slope = float(np.polyfit(n, t, 1)[0])
    if slope <= 0:
        slope = float(np.dot(n, t) / np.dot(n, n))
    alpha = max(0.0, float(t[0] - n[0] * slope))
    return alpha, 1.0 / slope


# -- compute ----------------------------------------------------------------------------------
def measure_matmul(
    shapes: Sequence[tuple[int, int, int]], dtype: str = "fp32", device: torch.device | str = "cpu", reps: int = 3
) -> list[dict]:
    """FLOP/s of ``A[M,K] @ B[K,N]`` for each (M, K, N); 2*M*K*N FLOPs per matmul."""
    device = torch.device(device)
    out = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=TORCH_DTYPES[dtype])
        b = torch.randn(k, n, device=device, dtype=TORCH_DTYPES[dtype])
        flops = 2.0 * m * k * n
        inner = max(1, int(2e8 // flops)) if device.type == "cpu" else max(1, int(1e11 // flops))
        t = time_op(lambda: [a @ b for _ in range(inner)], device, reps) / inner
        out.append({"shape": [m, k, n], "dtype": dtype, "seconds": t, "flops_per_s": flops / t})
    return out


def effective_flops(rows: Sequence[dict]) -> float:
    """Total FLOPs over total time: the throughput the model's mix of shapes gets."""
    flops = sum(2.0 * np.prod(r["shape"]) for r in rows)
    return float(flops / sum(r["seconds"] for r in rows))


def measure_copy(nbytes: int, device: torch.device | str = "cpu", reps: int = 3) -> float:
    """Memory bandwidth in bytes/s from ``dst.copy_(src)`` (each byte read once, written once)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2.0 * src.numel() * 4 / time_op(lambda: dst.copy_(src), device, reps)


def measure_host_link(nbytes: int, device: torch.device) -> float:
    """Host-to-device bytes/s over PCIe from pinned memory (GPU only)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dst = torch.empty(src.numel(), dtype=torch.float32, device=device)
    return src.numel() * 4 / time_op(lambda: dst.copy_(src, non_blocking=True), device)


def measure_launch(device: torch.device, n: int = 2000) -> float:
    """Seconds per tiny op: the fixed per-kernel (or per-op, on CPU) overhead."""
    x = torch.zeros(1, device=device)
    return time_op(lambda: [x.add_(1.0) for _ in range(n)], device) / n


# -- links and collectives (collective: every rank calls these in the same order) ------------
def _pingpong_reps(size: int) -> int:
    # Small messages are cheap and noisy: more repetitions. Both sides derive the same count.
    return 21 if size <= 32 << 10 else 7 if size <= 2 << 20 else 3


def pingpong(peer: int, device: torch.device, max_bytes: int) -> list[dict]:
    """Rank 0 and ``peer`` bounce messages of 4 KB, 32 KB, ... (x8) up to ``max_bytes``,
    stopping after a round trip takes ``TARGET_S``. Other ranks return at once.
    Returns rows of (bytes, one-way seconds) on rank 0, [] elsewhere."""
    rank = dist.get_rank()
    if rank not in (0, peer) or peer == 0:
        return []
    rows, size = [], 4096
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    while True:
        buf = torch.empty(size // 4, dtype=torch.float32, device=device)

        def bounce() -> None:
            if rank == 0:
                dist.send(buf, peer), dist.recv(buf, peer)
            else:
                dist.recv(buf, 0), dist.send(buf, 0)

        rtt = time_op(bounce, device, _pingpong_reps(size))
        rows.append({"bytes": size, "seconds": rtt / 2})
        # rank 0 decides whether to go on, so both sides agree on the sizes.
        if rank == 0:
            flag.fill_(int(rtt < TARGET_S and size * 8 <= max_bytes))
            dist.send(flag, peer)
        else:
            dist.recv(flag, 0)
        if not flag.item():
            return rows if rank == 0 else []
        size *= 8


def _collective_reps(nbytes: int) -> int:
    return 40 if nbytes <= 256 << 10 else 16 if nbytes <= 2 << 20 else 8


def time_collectives(sizes: Sequence[int], device: torch.device) -> list[dict]:
    """All-to-all (``n`` bytes sent per rank, split evenly) and allreduce (``n`` bytes):
    the *mean* time over back-to-back repetitions, as nccl-tests reports it. A training
    step is a sum of many collectives, so their mean, occasional stalls included (gloo
    over a shaped TCP link stalls a few % of back-to-back collectives by tens of ms),
    is what adds up; a median would hide them. ``seconds_median`` is kept beside it."""
    world, rows = dist.get_world_size(), []
    for n in sizes:
        count = max(world, n // 4 // world * world)
        x, y = torch.ones(count, device=device), torch.empty(count, device=device)
        for kind, fn in (
            ("all_to_all", lambda: dist.all_to_all_single(y, x)),
            ("allreduce", lambda: dist.all_reduce(x)),
        ):
            dist.barrier()
            times = time_reps(fn, device, _collective_reps(count * 4))
            rows.append(
                {
                    "kind": kind,
                    "bytes": count * 4,
                    "seconds": statistics.fmean(times),
                    "seconds_median": statistics.median(times),
                }
            )
    return rows


BUSY_MAX_BYTES = 1 << 20  # collectives up to this size are also timed on a busy host


def time_collectives_busy(sizes: Sequence[int], device: torch.device, reps: int = 8) -> list[dict]:
    """Each collective of :func:`time_collectives` up to ``BUSY_MAX_BYTES`` again, while
    every rank keeps its main thread computing (matmuls) until the collective completes,
    as a rank does when it overlaps communication with compute: the mean time from
    launch to completion (a future callback stamps it)."""
    world, rows = dist.get_world_size(), []
    a, b = torch.randn(256, 256, device=device), torch.randn(256, 1024, device=device)
    for n in (s for s in sizes if s <= BUSY_MAX_BYTES):
        count = max(world, n // 4 // world * world)
        x, y = torch.ones(count, device=device), torch.empty(count, device=device)
        for kind, fn in (
            ("all_to_all", lambda: dist.all_to_all_single(y, x, async_op=True)),
            ("allreduce", lambda: dist.all_reduce(x, async_op=True)),
        ):
            times = []
            for _ in range(reps + 1):
                dist.barrier()
                done: list[float] = []
                t = time.perf_counter()
                work = fn()
                work.get_future().add_done_callback(lambda _f: done.append(time.perf_counter()))
                while not done:
                    a @ b
                work.wait()
                times.append(done[0] - t)
            rows.append({"kind": kind, "bytes": count * 4, "seconds": statistics.fmean(times[1:])})
    return rows


def host_step_delays(alone: Sequence[dict], busy: Sequence[dict], world: int) -> dict[str, float]:
    """Per kind: mean over sizes of (busy - alone mean time) / steps, never below 0: one
    step per peer for an all-to-all, ``2(world - 1)`` for a ring allreduce
    (``HostSpec.steps``, which the simulator charges)."""
    base = {(r["kind"], r["bytes"]): r["seconds"] for r in alone}
    out = {}
    for kind in COLLECTIVE_KINDS:
        steps = HostSpec.steps(kind, world)
        extra = [
            r["seconds"] - base[(kind, r["bytes"])] for r in busy if r["kind"] == kind and (kind, r["bytes"]) in base
        ]
        if extra and steps > 0:
            out[kind] = max(0.0, statistics.fmean(extra) / steps)
    return out


# -- the rank-side mode -------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"1024x512x2048,512x64x512"`` -> [(1024, 512, 2048), (512, 64, 512)]."""
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ConfigError(
            "--shapes", f"bad matmul shapes {text!r}", "comma-separated MxKxN, e.g. 1024x512x2048,1024x2048x512"
        )
    return shapes  # type: ignore[return-value]


def rank_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="calibrate", exit_on_error=False)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default=None)
    p.add_argument("--dtypes", default=None)
    p.add_argument("--max-bytes", type=float, default=32e6)
    p.add_argument("--collective-bytes", default="65536,1048576,4194304")
    p.add_argument("--note", default="")
    return p.parse_args(list(argv))


def rank_main(ctx) -> dict:
    """``runtime.entry`` mode ``calibrate``: measure, then rank 0 writes the profile."""
    t_start = time.monotonic()
    info, args = ctx.info, rank_args(ctx.args)
    device = info.device
    shapes = parse_shapes(args.shapes) if args.shapes else list(DEFAULT_SHAPES)
    dtypes = (
        args.dtypes.split(",") if args.dtypes else (["bf16", "fp16", "fp32"] if device.type == "cuda" else ["fp32"])
    )
    for d in dtypes:
        if d not in TORCH_DTYPES:
            raise ConfigError("--dtypes", f"unknown dtype {d!r}", TORCH_DTYPES)
    lw, world = info.local_world_size, info.world_size

    raw: dict = {"world_size": world, "ranks_per_node": lw}
    intra_peer = 1 if lw > 1 else 0
    inter_peer = world - lw  # first rank of the last node
    raw["intra_node_pingpong"] = pingpong(intra_peer, device, int(args.max_bytes))
    dist.barrier()
    raw["inter_node_pingpong"] = pingpong(inter_peer, device, int(args.max_bytes))
    dist.barrier()
    sizes = [int(float(s)) for s in args.collective_bytes.split(",")]
    raw["collectives"] = time_collectives(sizes, device)
    hosts: list = [None] * world
    dist.all_gather_object(hosts, (host_id(), host_cores()))
    if device.type == "cpu" and len({h for h, _ in hosts}) == 1 and hosts[0][1] < world:
        raw["host_cores"] = hosts[0][1]
        raw["collectives_busy"] = time_collectives_busy(sizes, device)

    # Compute at one-core (one-device) speed, then the median rank: CPU ranks that share a
    # host take turns, and the profile's host block lets the simulator share the cores.
    dist.barrier()
    mine = one_core_each(
        info,
        lambda: {
            "matmul": {d: measure_matmul(shapes, d, device) for d in dtypes},
            "copy_bytes_per_s": measure_copy(256 << 20 if device.type == "cuda" else 32 << 20, device),
            "launch_s": measure_launch(device),
            "host_link_bytes_per_s": measure_host_link(64 << 20, device) if device.type == "cuda" else None,
        },
    )
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    raw["compute_per_rank"] = gathered
    raw["seconds"] = time.monotonic() - t_start
    if info.rank == 0:
        profile = build_profile(raw, info, args.note)
        write_profile(args.out, profile, raw)
    dist.barrier()
    return raw if info.rank == 0 else None


# -- the profile ------------------------------------------------------------------------------
def _link_fit(rows: list[dict]) -> dict:
    alpha, bw = fit_alpha_beta([r["bytes"] for r in rows], [r["seconds"] for r in rows])
    return {"bandwidth": bw, "latency": alpha, "efficiency": 1.0}


def device_name(device: torch.device) -> str:
    """The device as a profile names it: the CUDA device's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.processor() or platform.machine()}-1thread"


def _memory_bytes(device: torch.device, ranks_per_node: int) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(pages / ranks_per_node)  # host memory split among the node's ranks


def build_profile(raw: dict, info, note: str = "") -> dict:
    """A preset-schema mapping from raw measurements (see ``lina_sim/config/presets/*.yaml``)."""
    world, lw = raw["world_size"], raw["ranks_per_node"]
    nodes = world // lw
    per_rank = raw["compute_per_rank"]
    med = lambda key: statistics.median(r[key] for r in per_rank)  # noqa: E731
    peak = {d: statistics.median(effective_flops(r["matmul"][d]) for r in per_rank) for d in per_rank[0]["matmul"]}
    copy_bw = med("copy_bytes_per_s")
    caveats = []
    intra = _link_fit(raw["intra_node_pingpong"]) if raw["intra_node_pingpong"] else None
    inter = _link_fit(raw["inter_node_pingpong"]) if raw["inter_node_pingpong"] else None
    if intra is None:
        caveats.append("one rank per node: nvlink copied from the inter-node link")
    if inter is None:
        caveats.append("one node: nic copied from the intra-node link")
    intra, inter = intra or inter, inter or intra
    if intra is None:  # a single rank: no link to measure at all
        intra = inter = {"bandwidth": copy_bw / 2, "latency": 0.0, "efficiency": 1.0}
        caveats.append("one rank: links set to the memory copy bandwidth")
    host = [r["host_link_bytes_per_s"] for r in per_rank if r["host_link_bytes_per_s"]]
    pcie = {"bandwidth": statistics.median(host) if host else copy_bw / 2, "latency": 0.0, "efficiency": 1.0}
    if not host:
        caveats.append("no GPU: pcie set to the memory copy bandwidth")
    # CPU ranks on one machine share its cores: the simulator must know how many, and how
    # long collectives wait for them.
    host_block = None
    if raw.get("host_cores"):
        cores = int(raw["host_cores"])
        delays = host_step_delays(raw["collectives"], raw["collectives_busy"], world)
        host_block = {"cores": cores, "step_delay_s": delays, "reference_excess": (world - cores) / cores}
        caveats.append(
            f"{world} CPU ranks share {cores} cores of one host (host: per-step delays of collectives "
            f"timed with every rank computing)"
        )
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    host_name = socket.gethostname()
    source = (
        f"measured by `lina-run calibrate` at {now} on {host_name}: {nodes} node(s) x {lw} rank(s), "
        f"backend {info.backend}, torch {torch.__version__}; links = alpha-beta fit of ping-pong "
        f"one-way times; peak_flops = total FLOPs / total time over the model's matmul shapes "
        f"(one rank per core at a time, median rank); hbm_bandwidth = large copy"
        + (f"; {'; '.join(caveats)}" if caveats else "")
        + (f"; {note}" if note else "")
    )
    profile = {
        "name": f"calibrated-{host_name}-{nodes}x{lw}",
        "description": f"measured: {nodes} x {lw} ranks on {device_name(info.device)}" + (f" ({note})" if note else ""),
        "source": source,
        "nodes": nodes,
        "gpus_per_node": lw,
        "gpu": {
            "name": device_name(info.device),
            "peak_flops": peak,
            "hbm_bandwidth": copy_bw,
            "memory_bytes": _memory_bytes(info.device, lw),
        },
        "compute": {"matmul_efficiency": 1.0, "memory_efficiency": 1.0, "kernel_launch_s": med("launch_s")},
        "intra_node": "full-mesh",
        "nvlink": intra,
        "pcie": pcie,
        "nics_per_node": 1,
        "nic_of_gpu": [0] * lw,
        "nic": inter,
        "oversubscription": 1.0,
        "switch_latency": 0.0,
    }
    if host_block is not None:
        profile["host"] = host_block
    return profile


def raw_path(out: str | os.PathLike) -> Path:
    """``profile.yaml`` -> ``profile.raw.yaml`` (raw data is not part of the preset schema)."""
    out = Path(out)
    return out.with_name(out.stem + ".raw" + (out.suffix or ".yaml"))


def _plain(x):
    """numpy scalars -> floats, tuples -> lists, so that yaml.safe_dump accepts them."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def write_profile(out: str | os.PathLike, profile: dict, raw: dict) -> Path:
    """Write the raw sibling, then the profile, each atomically; check the simulator loads it."""
    cluster_from_dict(_plain(profile), where=str(out))  # never write a profile lina-sim rejects
    atomic_write_text(raw_path(out), yaml.safe_dump(_plain(raw), sort_keys=False))
    header = f"# Hardware profile written by `lina-run calibrate`; raw data in {raw_path(out).name}.\n"
    return atomic_write_text(out, header + yaml.safe_dump(_plain(profile), sort_keys=False))


def finish(results: list, args: list[str]) -> int:
    """Launcher side: load the written profile the way the simulator will, and summarise."""
    out = rank_args(args).out
    spec = load_preset(out)
    peak = ", ".join(f"{d} {f / 1e9:.1f} GFLOP/s" for d, f in spec.gpu.peak_flops.items())
    print(f"calibrate: wrote {out} (+ {raw_path(out).name}) in {results[0]['seconds']:.1f} s of measuring")
    print(
        f"  intra-node {spec.nvlink.bandwidth / 1e6:.1f} MB/s, {spec.nvlink.latency * 1e6:.0f} us; "
        f"inter-node {spec.nic.bandwidth / 1e6:.1f} MB/s, {spec.nic.latency * 1e6:.0f} us"
    )
    print(
        f"  matmul {peak}; copy {spec.gpu.hbm_bandwidth / 1e9:.2f} GB/s; "
        f"per-op overhead {spec.compute.kernel_launch_s * 1e6:.1f} us"
    )
    if spec.host is not None:
        delays = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in spec.host.step_delay_s.items())
        print(
            f"  host: {spec.world_size} ranks share {spec.host.cores} cores; per collective step while "
            f"compute oversubscribes them: {delays}"
        )
    return 0
