"""NCCL's grouped point-to-point (send/recv, all-to-all) as a cost model on lina-sim's
hardware specs: per call a latency, per peer message a protocol and a channel count,
per peer connection a bandwidth cap.

nccl-tests' ``alltoall_perf`` and torch's ``all_to_all_single`` run ``ncclGroupStart();
for each peer: ncclSend + ncclRecv; ncclGroupEnd()`` (nccl-tests ``src/alltoall.cu:
AlltoAllRunColl``; NCCL 2.28's own ``ncclAlltoAll`` enqueues the same p2p tasks), and
``sendrecv_perf`` one send to the next rank and one receive from the previous
(``src/sendrecv.cu``). NCCL's tuning model (``src/graph/tuning.cc``) has no entry for
p2p; what follows is what NCCL 2.30.7 (NVIDIA/nccl @ 5067397c) *executes*, read in
source, plus the assumptions we need where the source gives no number (marked
**assumption**). See ``docs/nccl-tuning-model.md`` §4 and §7.

Channels (``src/graph/paths.cc``):

- ``ncclTopoGetNchannels``: channels per peer: NVLink peer ``2 x max(1, pathBw /
  ncclTopoNVLinkBw)``; PCI peer 2; network peer ``max(local NICs, ceil(netBw /
  NCCL_P2P_PER_CHANNEL_NET_BW))`` with ``NCCL_P2P_PER_CHANNEL_NET_BW`` = 14 GB/s.
  ``ncclTopoComputeP2pChannelsPerPeer``: ``p2pnChannelsPerPeer`` = the minimum over peers.
- ``ncclTopoComputeP2pChannels``: ``p2pnChannels = pow2Up(comm->nChannels)`` (at most
  ``MAXCHANNELS`` = 64, ``device.h``); ``p2pnChannelsPerPeer = pow2Up(..)``, then across
  nodes halved while ``perPeer x ceil(nRanks / 8) > p2pnChannels`` (8 =
  ``NCCL_MAX_DEV_WORK_P2P_PER_BATCH``), on one node capped at ``p2pnChannels``.
  **Assumption**: ``comm->nChannels`` comes from NCCL's ring graph search, which lina-sim
  does not run; we take :func:`lina_sim.network.nccl.comm_channels`: the equivalent
  ring channel count of :func:`lina_sim.network.nccl.equivalent_channels` with NCCL's own
  doublings (``search.cc: ncclTopoDupChannels``, ``connect.cc: ncclTopoPostset``),
  rounded *down* to a power of two (:func:`p2p_channels`; ``NCCL_MIN_CTAS`` /
  ``NCCL_MAX_CTAS``, exact counts, round up as in NCCL). For DGX H100 that is 32 (rounding
  up would give 64); one H100 per node across nodes gets 4 (one search channel at 45
  GB/s, duplicated, then doubled by the postset: 4 x 14 GB/s per network peer, so the
  NIC, not the channels, bounds Vidur's 2 x 1 send/recv). The choice between the two
  roundings was made with the nccl-tests 1x8 sendrecv table
  (``../shared/data/nccl-measured``): it shows 4 channels per peer at 8 ranks (79 GB/s
  at 32 MB, 162 GB/s at 128 MB, 299 GB/s at 256 MB: the doubling of the part-size rule
  below, at about 20 GB/s per channel), i.e. 32 p2p channels.

Per call (``src/enqueue.cc``):

- ``scheduleP2pTasksToPlan``: ``nChannelsMax = p2pnChannelsPerPeer``; ``nChannelsMin``
  starts there and is halved while ``nChannelsMin x nRanks > p2pnChannels`` ("use all
  channels, but one channel per operation").
- ``addP2pToPlan``: for a message of ``b`` bytes, ``nCh = min(nChannelsMin, ceil(b /
  minPart))``, doubled while the part ``ceil(b / nCh)`` exceeds ``maxPart`` and ``nCh <=
  nChannelsMax / 2``; ``minPart, maxPart`` = ``chunk/8, 32 chunk`` on one node and
  ``chunk/2, chunk`` across nodes, ``chunk`` = ``p2pChunkSize`` (``init.cc:
  computeBuffSizes``: ``NCCL_P2P_NET_CHUNKSIZE`` 128 KiB across nodes, ``
  NCCL_P2P_NVL_CHUNKSIZE`` 512 KiB when all the communicator's GPUs reach each other over
  NVLink, ``NCCL_P2P_PCI_CHUNKSIZE`` 128 KiB otherwise).
- Protocol: LL when the connection has LL buffers and ``b <= nCh x
  NCCL_P2P_LL_THRESHOLD`` (16384), else Simple; LL128 is never used for p2p. Network
  connections get LL buffers only with ``NCCL_ALLOC_P2P_NET_LL_BUFFERS=1`` (default 0,
  NCCL env docs), so across nodes p2p is always Simple.
- Rounds: ``ncclP2pSchedule`` (init.cc) orders the peers in nRanks rounds; each round's
  op starts at ``ncclP2pChannelBaseForRound`` and a channel runs up to 8 ops per work
  batch *concurrently*, its warps split among them (``device/sendrecv.h``:
  ``nWarpPerWork = nWarps / nWorks``). Batches on one channel run one after another.

The model (ours, from the above):

- **Channel bandwidth** (GB/s per channel, per direction): network
  ``NCCL_P2P_PER_CHANNEL_NET_BW`` = 14 (NCCL's own sizing figure, paths.cc); PCI
  ``PCI_BW`` = 12 (``topo.h``); NVLink: **assumption** one ``ncclTopoNVLinkBw`` (20.6
  GB/s on sm90, ``topo.h``) per channel. NCCL gives no per-channel p2p figure for
  NVLink; the alternatives were half of it (NCCL allots 2 channels per NVLink link)
  and the graph search's top intra speed (60 on sm90, ``search.cc``); the nccl-tests 1x8
  sendrecv table (about 20 GB/s per channel, above) chose this one. A measured cluster
  corrects it by ``NcclSpec.p2p_channel_scale`` (Vidur's DGX A100 pair pulls ~240 GB/s
  over its 8 channels in P2P-read mode: ~30 GB/s per channel).
- **Connection cap**: ``nCh(b) x channel bw / share``, ``share = min(8, max(1, sum over
  the rank's peers of nCh / p2pnChannels))``: when a rank's ops need more channel slots
  than it has channels, up to a batch of 8 run at once on a channel and split its warps
  (above); we take the largest share of any rank for the whole call. Batches that run
  one after another are not a bandwidth limit here (all of the call's flows share the
  links at once on the fluid network, which bounds the aggregate rate the same way);
  they add latency (below). LL: the cap is further limited by ``llMaxBw`` (tuning.cc,
  NCCL's LL bandwidth ceiling, 141 GB/s for one Hopper node) and halved on the wire: LL
  sends an 8-byte flag with every 8 bytes of data (``LL_EFFICIENCY`` 0.5).
- **Latency** of a call: ``baseLat[Ring][p] + batches x hwLat[hw][Ring][p] + remote peers
  x netOverhead``, maximised over the (link class, protocol) pairs the call uses.
  ``baseLat`` / ``hwLat``: NCCL's tuning constants (:data:`lina_sim.network.nccl.BASE_LAT_US`,
  :data:`~lina_sim.network.nccl.HW_LAT_US`). A p2p transfer is one hop of one step, which
  is what tuning.cc prices for a Ring broadcast on the same channels (``baseLat +
  hwLat[hw][RING][p]``): **assumption**, NCCL has no p2p latency. ``batches = ceil(ops per
  channel / 8)``, ops per channel = ``ceil(sum of nCh / p2pnChannels)``: the work batches
  a channel runs one after another. ``netOverhead`` (``getNetOverhead``, 1 µs Intel, 2
  µs AMD; tuning.cc) per remote peer: **assumption**, the proxy thread posts each
  network peer's transfers in turn.

On the fluid network (``Collectives``) a call is one step whose latency is the model's
and whose flows carry their bytes times ``inflation = max(1 / eta, r0 / cap)``: ``r0`` is
the rate the flow gets with all the call's flows running (weighted max-min, as the
network will give it), ``eta`` the protocol's wire efficiency, ``cap`` the connection
cap. Alone, each flow then takes ``bytes / min(eta r0, cap)`` as the model says; under
contention it shares links max-min fairly in proportion to what it loads, as
:mod:`lina_sim.network.nccl` does for allreduce protocols.

Units: seconds, bytes, bytes/s in the API; NCCL's constants in µs and GB/s.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from lina_sim.hardware.topology import Topology
from lina_sim.network import nccl

US = nccl.US
GBPS = nccl.GBPS
# src/enqueue.cc NCCL_PARAM(P2pLLThreshold, "P2P_LL_THRESHOLD", 16384): LL up to this many
# bytes per channel.
P2P_LL_THRESHOLD = 16384
# src/init.cc computeBuffSizes: NCCL_P2P_NET_CHUNKSIZE, NCCL_P2P_NVL_CHUNKSIZE,
# NCCL_P2P_PCI_CHUNKSIZE (bytes).
P2P_NET_CHUNK = 1 << 17
P2P_NVL_CHUNK = 1 << 19
P2P_PCI_CHUNK = 1 << 17
# src/graph/paths.cc NCCL_PARAM(P2pPerChannelNetBw, "P2P_PER_CHANNEL_NET_BW", 14), GB/s.
P2P_PER_CHANNEL_NET_BW = 14.0
# src/graph/topo.h PCI_BW, GB/s.
PCI_BW = 12.0
# src/include/device.h MAXCHANNELS and NCCL_MAX_DEV_WORK_P2P_PER_BATCH.
MAXCHANNELS = 64
P2P_PER_BATCH = 8
# src/include/device.h NCCL_STEPS: the slots of a connection's FIFO a sender may fill
# before the receiver frees one (prims_simple.h waits on the peer's head); a p2p
# connection's slot holds p2pChunkSize (init.cc computeBuffSizes keeps p2pChunkSize x
# NCCL_STEPS within the Simple buffer).
NCCL_STEPS = 8
# LL moves 8 bytes of data with an 8-byte flag per 16-byte line (src/device/prims_ll.h).
LL_EFFICIENCY = 0.5
# Link classes of a pair, as integer codes (Topology.intra_link_kind's names), and
# NCCL's hardware row of each (nccl_tuner.h NCCL_HW_NVLINK, NCCL_HW_PCI, NCCL_HW_NET).
SELF, NVLINK, PCIE, NIC = 0, 1, 2, 3
KIND_NAMES = ("", "nvlink", "pcie", "nic")
HW_OF_KIND = {NVLINK: "nvlink", PCIE: "pci", NIC: "net"}


def kind_codes(topo: Topology, src, dst) -> np.ndarray:
    """Link class code (:data:`KIND_NAMES`) of each pair ``src[i] -> dst[i]``."""
    s, d = np.broadcast_arrays(np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))
    g = topo.gpus_per_node
    same_node = (s // g) == (d // g)
    over_pcie = ((s ^ 1) != d) if not topo.intra_all_nvlink else np.zeros(s.shape, dtype=bool)
    code = np.where(same_node, np.where(over_pcie, PCIE, NVLINK), NIC)
    return np.where(s == d, SELF, code).astype(np.int8)


def pow2_up(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, x))))


def pow2_down(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(1.0, x))))


@dataclass(frozen=True)
class P2pComm:
    """What NCCL's p2p scheduling reads of one communicator (see the module docstring):
    ``ranks`` over ``nodes``; ``channels`` = ``p2pnChannels``; ``per_peer`` =
    ``p2pnChannelsPerPeer``; ``chunk`` = ``p2pChunkSize`` (bytes); ``arch`` NCCL's
    compute-capability index; ``amd_host`` picks ``getNetOverhead``'s row; ``nvlink_bw``
    ``ncclTopoNVLinkBw`` (GB/s) of the architecture; ``channel_scale`` the cluster's
    measured factor on it (``NcclSpec.p2p_channel_scale``)."""

    ranks: int
    nodes: int
    channels: int
    per_peer: int
    chunk: int
    arch: int
    amd_host: bool
    intra_scale: float = 1.0
    net_scale: float = 1.0
    simple_scale: float = 1.0
    channel_scale: float = 1.0

    @classmethod
    def of(cls, topo: Topology, by_node: list[np.ndarray]) -> P2pComm:
        """The p2p parameters of the communicator whose ranks, grouped by node, are ``by_node``."""
        c = topo.cluster
        model, _ = nccl.model_for(topo, by_node)
        shape = model.shape
        ranks, nodes = shape.ranks, shape.nodes
        channels = p2p_channels(model)
        # paths.cc ncclTopoGetNchannels, per peer class; the minimum over the classes present.
        per_peer = []
        local = np.concatenate(by_node)
        # The link classes among the communicator's pairs, counted per node (not per pair).
        kinds = {KIND_NAMES.index(k.kind) for k in topo.block_pairs(local, np.zeros(local.size))}
        if NVLINK in kinds:
            path_bw = c.nvlink.bandwidth / GBPS  # the GPU's NVLink bandwidth, as NCCL's topology reads it
            per_peer.append(2 * max(1, int(path_bw / nccl.NVLINK_LINK_BW[shape.arch])))
        if PCIE in kinds:
            per_peer.append(2)
        if NIC in kinds:
            gpus_per_nic = max(1, c.gpus_per_node // max(1, c.nics_per_node))
            net_bw = c.nic.bandwidth / GBPS / gpus_per_nic
            per_peer.append(max(1, math.ceil(net_bw / P2P_PER_CHANNEL_NET_BW)))
        pp = pow2_up(min(per_peer)) if per_peer else 1
        if nodes > 1:
            while pp * math.ceil(ranks / P2P_PER_BATCH) > channels and pp > 1:
                pp //= 2
        else:
            pp = min(channels, pp)
        if nodes > 1:
            chunk = P2P_NET_CHUNK
        else:
            # init.cc computeBuffSizes reads ncclTopoPathAllNVLink over the communicator's
            # own GPUs (its topology holds only those): a bridged pair of an nvlink-pairs
            # node is all NVLink.
            chunk = P2P_NVL_CHUNK if kinds == {NVLINK} else P2P_PCI_CHUNK
        return cls(
            ranks,
            nodes,
            channels,
            pp,
            chunk,
            shape.arch,
            shape.amd_host,
            shape.intra_scale,
            shape.net_scale,
            shape.simple_scale,
            c.nccl.p2p_channel_scale,
        )

    # -- per message --------------------------------------------------------------------
    @property
    def channels_min(self) -> int:
        """enqueue.cc scheduleP2pTasksToPlan: nChannelsMin."""
        n = self.per_peer
        while n * self.ranks > self.channels and n > 1:
            n //= 2
        return n

    def channels_for(self, nbytes) -> np.ndarray:
        """Channels one message of ``nbytes`` is striped over (enqueue.cc addP2pToPlan)."""
        b = np.asarray(nbytes, dtype=np.float64)
        if self.nodes > 1:
            min_part, max_part = self.chunk // 2, self.chunk
        else:
            min_part, max_part = self.chunk // 8, self.chunk * 32
        nch = np.minimum(self.channels_min, np.maximum(1, np.ceil(b / min_part)))
        part = np.maximum(min_part, np.ceil(b / nch))
        while True:
            grow = (part > max_part) & (nch <= self.per_peer // 2)
            if not grow.any():
                return nch
            nch = np.where(grow, nch * 2, nch)
            part = np.where(grow, np.ceil(b / nch), part)

    def fifo_bytes(self, nbytes) -> np.ndarray:
        """Bytes a sender can post before its receiver consumes any: ``NCCL_STEPS`` chunks
        on each of the message's channels."""
        return self.channels_for(nbytes) * NCCL_STEPS * self.chunk

    def reads(self, kind: int) -> bool:
        """Whether NCCL runs a connection of link class ``kind`` in P2P-read mode: Ampere
        GPUs over NVLink (``transport/p2p.cc: p2pUseRead`` -> ``paths.cc:
        ncclTopoCheckP2p``, ``NCCL_P2P_READ_ENABLE`` unset). The Simple FIFO then lives
        in the sender's memory and the receiver pulls it over NVLink."""
        return kind == NVLINK and nccl.ARCHS[self.arch] == "ampere"

    @staticmethod
    def is_ll(nbytes, nch, kind) -> np.ndarray:
        """LL for messages up to ``nch x NCCL_P2P_LL_THRESHOLD`` on connections with LL
        buffers: intra-node ones (network p2p has none by default)."""
        return (np.asarray(kind) != NIC) & (np.asarray(nbytes) <= nch * P2P_LL_THRESHOLD)

    def channel_bw(self, kind) -> np.ndarray:
        """Bytes/s one channel moves per direction on a connection of link class ``kind``."""
        k = np.asarray(kind)
        nvl = nccl.NVLINK_LINK_BW[self.arch] * self.channel_scale
        return np.where(k == NIC, P2P_PER_CHANNEL_NET_BW, np.where(k == PCIE, PCI_BW, nvl)) * GBPS

    def ll_max_bw(self) -> float:
        """tuning.cc llMaxBws (bytes/s): arch row on one node, CPU row across nodes."""
        row = self.arch if self.nodes == 1 else int(self.amd_host)
        return nccl.LL_MAX_BW[row][min(self.nodes - 1, 2)] * GBPS

    def share(self, src: np.ndarray, nbytes: np.ndarray, count=None) -> float:
        """How many ops run concurrently on one channel at worst, for messages from rank
        ``src[i]`` of ``nbytes[i]`` (``count[i]`` alike messages each; default one):
        max over ranks of (channel slots its messages need / p2pnChannels), at least 1
        and at most a work batch (8): ops beyond a batch wait for the next batch on that
        channel rather than split its warps."""
        if np.size(src) == 0:
            return 1.0
        slots = np.bincount(np.asarray(src), weights=self.channels_for(nbytes) * _count(count, src))
        return min(float(P2P_PER_BATCH), max(1.0, float(slots.max()) / self.channels))

    def cap(self, nbytes, kind, share: float) -> tuple[np.ndarray, np.ndarray]:
        """(goodput cap in bytes/s, wire efficiency) of connections carrying ``nbytes``
        messages over link class ``kind``."""
        nch = self.channels_for(nbytes)
        ll = self.is_ll(nbytes, nch, kind)
        cap = nch * self.channel_bw(kind) / share
        cap = np.where(ll, np.minimum(cap, self.ll_max_bw()) * LL_EFFICIENCY, cap)
        return cap, np.where(ll, LL_EFFICIENCY, 1.0)

    def inflation(self, nbytes, kind, share: float, rate0) -> np.ndarray:
        """Bytes on the wire per payload byte so that a flow running at ``rate0`` takes
        the model's time: ``max(1 / eta, rate0 / cap)``."""
        cap, eta = self.cap(nbytes, kind, share)
        return np.maximum(1.0 / eta, np.asarray(rate0, dtype=np.float64) / cap)

    # -- per call -----------------------------------------------------------------------
    def latency(self, src: np.ndarray, nbytes: np.ndarray, kinds: np.ndarray, count=None) -> float:
        """The model's latency (s) of one grouped call whose messages go from rank
        ``src[i]`` (communicator index) with ``nbytes[i]`` bytes over link class
        ``kinds[i]`` (:data:`KIND_NAMES` codes), ``count[i]`` alike messages each (default
        one); messages of 0 bytes are not sent."""
        src, b, kinds = np.asarray(src), np.asarray(nbytes, dtype=np.float64), np.asarray(kinds)
        b, kinds = np.broadcast_to(b, src.shape), np.broadcast_to(kinds, src.shape)
        count = _count(count, src)
        on = (b > 0) & (kinds != SELF) & (count > 0)
        if not on.any():
            return 0.0
        src, b, kinds, count = src[on], b[on], kinds[on], count[on]
        nch = self.channels_for(b)
        ops = math.ceil(float(np.bincount(src, weights=nch * count).max()) / self.channels - 1e-9)
        batches = max(1, math.ceil(ops / P2P_PER_BATCH))
        ll = self.is_ll(b, nch, kinds)
        lat = 0.0
        for kind in np.unique(kinds):
            hw = nccl.HW_LAT_US[HW_OF_KIND[int(kind)]]["ring"]
            for p in np.unique(np.where(ll[kinds == kind], 0, 2)):
                # The cluster's measured corrections: intra-node terms by intra (and, for
                # Simple, simple) scale, network hops by the network scale.
                local = self.intra_scale * (self.simple_scale if p == 2 else 1.0)
                hw_scale = self.net_scale if kind == NIC else local
                lat = max(lat, nccl.BASE_LAT_US["ring"][p] * local + batches * hw[p] * hw_scale)
        net = kinds == NIC
        remote = int(np.bincount(src[net], weights=count[net]).max()) if net.any() else 0
        overhead = nccl.NET_OVERHEAD_US["amd" if self.amd_host else "intel"] * self.net_scale
        return (lat + remote * overhead) * US


def p2p_channels(model: nccl.NcclModel) -> int:
    """``p2pnChannels`` (``paths.cc: ncclTopoComputeP2pChannels``: ``pow2Up(comm->nChannels)``,
    at most ``MAXCHANNELS``). Our ``comm->nChannels`` is an equivalent count
    (:func:`lina_sim.network.nccl.comm_channels`), rounded *down* (module docstring);
    a bound the run set (``NCCL_MIN_CTAS`` / ``NCCL_MAX_CTAS``) is an exact count, which
    NCCL rounds up."""
    s = model.shape
    free = dataclasses.replace(s, min_ctas=None, max_ctas=None)
    channels = pow2_down(nccl.comm_channels(free, model.channels, model.graph_speed))
    if s.max_ctas is not None:
        channels = min(channels, pow2_up(min(s.max_ctas, MAXCHANNELS)))
    if s.min_ctas is not None:
        channels = max(channels, pow2_up(min(s.min_ctas, MAXCHANNELS)))
    return min(MAXCHANNELS, channels)


def _count(count, src) -> np.ndarray:
    """Messages each entry stands for: ``count`` as floats, or one each."""
    return np.ones(np.shape(src)) if count is None else np.asarray(count, dtype=np.float64)


__all__ = ["P2pComm"]
