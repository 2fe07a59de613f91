"""Inference for real: placement policies drive uneven all-to-alls and expert swaps.

The batches and decisions are the serving simulator's own: every rank builds the same
:class:`lina_sim.serving.server.PolicyServer` per placement policy (fit on the trace's training
slice) and takes its batches from ``prepare()``, which runs the placement protocol
(``plan`` before the gate, ``refine`` after it) on the trace's real expert choices. The
simulator's decisions depend on gate counts only, so every rank sees the same plan. Per
batch and MoE layer, each rank then runs for real:

- attention and gate over its data-parallel share of the batch's tokens;
- the expert weight swaps its placement needs (phase 1 and phase 2), copied from a
  host-memory store of every expert into the device's expert slots;
- the dispatch ``all_to_all_single`` with the placement's uneven splits
  (``Placement.send_matrix``: row = what this rank sends, column = what it receives);
- the expert FFN over the tokens it received, and the combine all-to-all (the transpose).

Measured (:class:`InferenceMode`, the ``kind: inference`` mode of a scenario run): the
time of each batch (max end - min start over ranks, after a barrier) and its timeline.
Predicted: ``run_inference`` on the same scenario (the same batches; see
:mod:`runtime.validate`).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lina_sim.config.scenario import Scenario
from lina_sim.errors import ConfigError
from lina_sim.results.files import atomic_write_text
from lina_sim.results.tables import format_measured_inference_table
from lina_sim.results.timeline import Event, write_chrome_trace
from lina_sim.serving.server import PolicyServer, ServingInputs, serving_inputs
from lina_sim.serving.setup import InferenceSetup, PlacementEntry, resolve_inference
from lina_sim.workload.model import ModelSpec
from runtime.context import RankContext
from runtime.mode import Mode, Timelines, median_span, span_timeline
from runtime.moe import CausalSelfAttention, ExpertFFN, MoEConfig


@dataclass
class BatchRecord:
    """One served batch on one rank (a :class:`runtime.mode.Span`): [start, end) on the
    common clock (s), its events, the batch's tokens (all ranks), MoE layers re-planned
    (phase 2) and expert swaps."""

    start: float
    end: float
    events: list[Event]
    tokens: int
    replanned: int
    swaps: int


class _Dense(nn.Module):
    """One layer's attention and gate (the gate's routing comes from the trace)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        cfg = MoEConfig(
            d_model=spec.d_model,
            d_ff=spec.d_ff,
            heads=spec.heads,
            experts=spec.experts,
            top_k=1,
            vocab=spec.vocab,
            seq_len=spec.seq_len,
        )
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(spec.d_model), CausalSelfAttention(cfg), nn.LayerNorm(spec.d_model)
        self.gate = nn.Linear(spec.d_model, spec.experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        F.softmax(self.gate(h), dim=-1)  # the gate's compute; its choices are the trace's
        return x, h


def serve_policy(ctx: RankContext, setup: InferenceSetup, entry: PlacementEntry, shared: ServingInputs) -> dict:
    """Serve the scenario's batches with one placement policy on this rank."""
    torch.manual_seed(setup.scenario.seed)
    spec, info, now = setup.model, ctx.info, ctx.now
    r, d = info.rank, spec.d_model
    dev = info.device
    layers = [_Dense(spec).to(dev) for _ in range(shared.layers)]
    host = [[ExpertFFN(d, spec.d_ff) for _ in range(spec.experts)] for _ in range(shared.layers)]  # host memory
    if dev.type == "cuda":  # pinned, so that swaps are real async host-to-device copies
        for layer in host:
            for e in layer:
                for p in e.parameters():
                    p.data = p.data.pin_memory()
    slot = ExpertFFN(d, spec.d_ff).to(dev)  # the device's expert weights in use
    ln_f, embed = nn.LayerNorm(d).to(dev), nn.Embedding(spec.vocab, d).to(dev)
    server = PolicyServer(setup, entry, shared)
    batches: list[BatchRecord] = []
    zeros = np.zeros(shared.layers)
    with torch.no_grad():
        while not server.done:
            plan = server.prepare()
            server.complete(plan, zeros, zeros)  # closed-loop batches do not depend on timing
            events: list[Event] = []

            def ev(stream, op, kind, t0, layer=-1, nbytes=0.0):
                if dev.type == "cuda":  # host clock: wait for the device before reading it
                    torch.cuda.synchronize(dev)
                events.append(Event(r, stream, op, kind, t0, now(), layer, -1, float(nbytes)))

            n_tok = int(plan.tokens[r])
            ids = torch.randint(0, spec.vocab, (1, max(n_tok, 1)), device=dev)
            dist.barrier()
            start = t = now()
            x = embed(ids)
            ev("compute", "embed", "compute", t)
            for l, dense in enumerate(layers):
                t = now()
                x, h = dense(x)
                ev("compute", f"L{l}.attn+gate", "compute", t, l)
                n_swap = int(plan.swap1[l][r] + plan.swap2[l][r])
                if n_swap:  # from host memory into the device's slots
                    t = now()
                    for i in range(n_swap):
                        for dst, src in zip(slot.parameters(), host[l][i % spec.experts].parameters()):
                            dst.copy_(src, non_blocking=True)
                    ev(
                        "pcie",
                        f"L{l}.swap",
                        "swap",
                        t,
                        l,
                        n_swap * sum(p.numel() * p.element_size() for p in slot.parameters()),
                    )
                send_rows, recv_rows = plan.send[l][r].tolist(), plan.send[l][:, r].tolist()
                rows = h.reshape(-1, d)
                send = (
                    rows[torch.arange(sum(send_rows), device=dev) % max(rows.shape[0], 1)]
                    if rows.shape[0]
                    else rows.new_zeros(sum(send_rows), d)
                )
                recv = send.new_empty(sum(recv_rows), d)
                t = now()
                dist.all_to_all_single(recv, send, recv_rows, send_rows)
                ev("a2a", f"L{l}.dispatch", "all_to_all", t, l, send.numel() * send.element_size())
                t = now()
                y = slot(recv)
                ev("compute", f"L{l}.ffn", "compute", t, l)
                back = send.new_empty(send.shape)
                t = now()
                dist.all_to_all_single(back, y, send_rows, recv_rows)
                ev("a2a", f"L{l}.combine", "all_to_all", t, l, y.numel() * y.element_size())
                if n_tok and back.shape[0]:
                    idx = torch.arange(back.shape[0], device=dev) % n_tok
                    x = x + back.new_zeros(n_tok, d).index_add(0, idx, back).unsqueeze(0)
            t = now()
            ln_f(x) @ embed.weight.T
            ev("compute", "head", "compute", t, shared.layers)
            batches.append(
                BatchRecord(
                    start,
                    now(),
                    events,
                    int(plan.tokens.sum()),
                    int(plan.replanned.sum()),
                    int((plan.swap1 + plan.swap2).sum()),
                )
            )
    return {"label": entry.label, "name": entry.name, "batches": batches}


class InferenceMode(Mode):
    """``kind: inference`` scenarios: every placement policy of every point serves the
    scenario's closed-loop batches on every rank."""

    kind = "inference"

    def resolve(self, point: Scenario) -> InferenceSetup:
        return resolve_inference(point)

    def rank_main(self, ctx: RankContext, setups: list[InferenceSetup], args: argparse.Namespace) -> dict:
        out = []
        for setup in setups:
            if setup.serving.arrival.process != "closed":
                raise ConfigError(
                    "serving.arrival.process",
                    "the runtime replays batches whose make-up must not depend on timing",
                    ["closed"],
                )
            shared = serving_inputs(setup)
            out.append([serve_policy(ctx, setup, e, shared) for e in setup.policies])
        return {"kind": self.kind, "points": out}

    def measured_frame(self, results: list[dict], setups: list[InferenceSetup]) -> tuple[pd.DataFrame, Timelines]:
        """Per (point, policy): batch time mean/median over batches (max end - min start
        over ranks, s), all-to-all time per batch, swaps; and the median batch's timeline."""
        rows, tls = [], {}
        for pi, setup in enumerate(setups):
            for j, run in enumerate(results[0]["points"][pi]):
                per_rank = [res["points"][pi][j]["batches"] for res in results]
                times, pick = median_span(per_rank)
                df = tls[(pi, run["label"])] = span_timeline(per_rank, pick)
                rows.append(
                    {
                        "point": pi,
                        "scenario": setup.scenario.name,
                        "policy": run["label"],
                        "policy_name": run["name"],
                        "batches": len(times),
                        "batch_time_mean_s": float(np.mean(times)),
                        "batch_time_p50_s": statistics.median(times),
                        "batch_time_min_s": min(times),
                        "batch_time_max_s": max(times),
                        "batch_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
                        "a2a_s": float(
                            df[df["kind"] == "all_to_all"]
                            .groupby("rank")
                            .apply(lambda d: (d["end"] - d["start"]).sum())
                            .mean()
                        ),
                        "swaps": sum(b.swaps for b in per_rank[0]),
                        "replanned_layers": sum(b.replanned for b in per_rank[0]),
                    }
                )
        return pd.DataFrame(rows), tls

    def finish(self, results: list[dict], setups: list[InferenceSetup], args: argparse.Namespace, out: Path) -> int:
        df, tls = self.measured_frame(results, setups)
        print(format_measured_inference_table(df, setups[0].scenario.name))
        for (pi, label), tl in tls.items():
            atomic_write_text(out / f"timeline-p{pi}-{label}.csv", tl.to_csv(index=False))
            write_chrome_trace(tl, out / f"trace-p{pi}-{label}.json", name="lina-run")
        path = atomic_write_text(out / "results.csv", df.to_csv(index=False))
        print(f"# measured results: {path}")
        return 0
