"""What a *sender-timed* one-way send measures, as NCCL runs it.

Vidur's send/recv profiles time one send from rank 0 to rank 1, and only rank 0's NCCL
kernel (``vidur/profiling/collectives/collectives_impl.py:
GraphedCollective._run_send_recv``, the median of rank 0's kernel times from a kineto
trace). nccl-tests' ``sendrecv_perf`` instead times the whole call on every rank, which
ends when the data have arrived: the simulator's send/recv time. The two differ because
NCCL's sender does not wait for its data to arrive.

What NCCL's sender does (NVIDIA/nccl, read in source):

- It copies its message, chunk by chunk, into the connection's Simple FIFO, ``NCCL_STEPS``
  (8) slots of ``p2pChunkSize`` on each of the message's channels (``init.cc:
  computeBuffSizes``, ``enqueue.cc: addP2pToPlan``;
  :meth:`lina_sim.network.nccl_p2p.P2pComm.fifo_bytes`), and waits for a free slot only
  when all are full (``prims_simple.h``: the sender waits on the receiver's ``head``). Its
  kernel ends when the last chunk is posted.
- Where that FIFO lives decides what the copy costs. On an Ampere NVLink pair NCCL runs
  P2P *read* (``transport/p2p.cc: p2pUseRead``: "For P2P Read the SIMPLE buffer is local"):
  the sender copies into its own memory and the receiver pulls the data over NVLink. On a
  network connection the sender's kernel fills a FIFO that the proxy thread drains into
  the network. In both, the sender's copy runs at its own rate, not the link's. In P2P
  *write* mode (Hopper NVLink) the FIFO is the receiver's and the sender's writes are the
  delivery; LL sends (small intra-node messages) write into the receiver's LL buffer in
  every mode.

The model (ours, from the above): a message of ``S`` bytes whose FIFO holds ``W`` bytes,

    fill(S) = latency(S) + S / fill_bandwidth
    T(S)    = fill(S)                                          S <= W
    T(S)    = max(fill(S), receiver_lag + delivered(S - W))    S > W

``latency`` is the p2p model's call latency (:meth:`P2pComm.latency`), ``delivered`` the
simulator's send/recv time (the receiver has consumed the first ``S - W`` bytes when they
have arrived), ``fill_bandwidth`` ``NcclSpec.p2p_read_fill_bandwidth`` or
``net_fill_bandwidth`` and ``receiver_lag`` ``NcclSpec.receiver_lag`` (how much later the
harness's receiver starts; a property of the harness). None of them is in NCCL's source:
they are measured (``lina-sim collective --calibrate`` fits them on sender-timed tables).
With the fill rate unset, or in P2P-write mode, or for LL sizes, ``T = delivered(S)``.

What the measured tables show (``../shared/data/nccl-measured/vidur``): the DGX A100
pair runs at 271 GB/s up to exactly 32 MiB (8 channels x 8 slots x 512 KiB) and jumps by
30 µs to 220 GB/s above it; the Azure A100 pair, P2P-read over its bridge too, sends at
~340 GB/s (above the bridge's 300 GB/s a direction: a local copy) and slows towards 175
GB/s above ~48 MiB, the bus bandwidth its own one-node allreduce measures; the Azure
pair across nodes (sockets, one channel: a 1 MiB FIFO) runs at ~7.6 GB/s up to 2-3 MiB
and ~2.2 GB/s beyond.

Units: bytes, seconds, bytes/s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lina_sim.hardware.spec import ClusterSpec
from lina_sim.hardware.topology import Topology
from lina_sim.network.nccl_p2p import NIC, P2pComm, kind_codes


def fill_bandwidth(cluster: ClusterSpec, comm: P2pComm, kind: int) -> float | None:
    """The measured rate (bytes/s) at which a sender fills a FIFO on its own side over a
    connection of link class ``kind``, or ``None`` where the FIFO is the receiver's or the
    rate is unset."""
    if kind == NIC:
        return cluster.nccl.net_fill_bandwidth
    return cluster.nccl.p2p_read_fill_bandwidth if comm.reads(kind) else None


def _pair(cluster: ClusterSpec, ranks: np.ndarray) -> tuple[P2pComm, int]:
    """The p2p communicator of the two ranks ``ranks`` and the link class between them."""
    topo = Topology(cluster)
    node = ranks // cluster.gpus_per_node
    comm = P2pComm.of(topo, [ranks[node == n] for n in np.unique(node)])
    return comm, int(kind_codes(topo, ranks[:1], ranks[1:])[0])


def pair_reads(cluster: ClusterSpec) -> bool:
    """Whether NCCL runs a pair of one of ``cluster``'s nodes (its first two GPUs) in
    P2P-read mode (:meth:`P2pComm.reads`)."""
    if cluster.gpus_per_node < 2:
        return False
    comm, kind = _pair(cluster, np.arange(2))
    return comm.reads(kind)


def sender_times(
    cluster: ClusterSpec,
    ranks: np.ndarray,
    sizes: np.ndarray,
    delivered: np.ndarray,
    deliver: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Seconds the sender's kernel takes to send each of ``sizes`` bytes from ``ranks[0]``
    to ``ranks[1]`` (a pair) on ``cluster`` (the module docstring's ``T``);
    ``delivered`` holds the simulator's send/recv times (s) of ``sizes``, ``deliver(b)``
    gives them for other sizes."""
    sizes = np.asarray(sizes, dtype=np.float64)
    out = np.array(delivered, dtype=np.float64)
    comm, kind = _pair(cluster, np.asarray(ranks, dtype=np.int64))
    fill = fill_bandwidth(cluster, comm, kind)
    nch = comm.channels_for(sizes)
    staged = ~comm.is_ll(sizes, nch, kind)
    if fill is None or not staged.any():
        return out
    s = sizes[staged]
    # A staged (Simple) send's latency depends on its size only through its channel count.
    _, first, inverse = np.unique(nch[staged], return_index=True, return_inverse=True)
    src, kinds = np.zeros(1, dtype=np.int64), np.full(1, kind)
    latency = np.array([comm.latency(src, s[i : i + 1], kinds) for i in first])[inverse]
    t = latency + s / fill
    fifo = comm.fifo_bytes(s)
    over = s > fifo
    if over.any():
        rest = np.asarray(deliver(s[over] - fifo[over]), dtype=np.float64)
        t[over] = np.maximum(t[over], cluster.nccl.receiver_lag + rest)
    out[staged] = t
    return out


__all__ = ["fill_bandwidth", "pair_reads", "sender_times"]
