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

Measured: the time of each batch (max end - min start over ranks, after a barrier) and
its timeline. Predicted: ``run_inference`` on the same scenario (the same batches).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lina_sim.results.timeline import Event
from runtime.moe import CausalSelfAttention, ExpertFFN, MoEConfig


class _Dense(nn.Module):
    """One layer's attention and gate (the gate's routing comes from the trace)."""

    def __init__(self, spec: Any):
        super().__init__()
        cfg = MoEConfig(d_model=spec.d_model, d_ff=spec.d_ff, heads=spec.heads, experts=spec.experts, top_k=1,
                        vocab=spec.vocab, seq_len=spec.seq_len)
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(spec.d_model), CausalSelfAttention(cfg), nn.LayerNorm(spec.d_model)
        self.gate = nn.Linear(spec.d_model, spec.experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        F.softmax(self.gate(h), dim=-1)  # the gate's compute; its choices are the trace's
        return x, h


def serve_policy(ctx: Any, setup: Any, entry: Any, shared: Any) -> dict:
    """Serve the scenario's batches with one placement policy on this rank."""
    from lina_sim.serving.server import PolicyServer

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
    batches, zeros = [], np.zeros(shared.layers)
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
                    ev("pcie", f"L{l}.swap", "swap", t, l, n_swap * sum(p.numel() * p.element_size()
                                                                         for p in slot.parameters()))
                send_rows, recv_rows = plan.send[l][r].tolist(), plan.send[l][:, r].tolist()
                rows = h.reshape(-1, d)
                send = rows[torch.arange(sum(send_rows), device=dev) % max(rows.shape[0], 1)] if rows.shape[0] else \
                    rows.new_zeros(sum(send_rows), d)
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
            batches.append({"start": start, "end": now(), "events": events, "tokens": int(plan.tokens.sum()),
                            "replanned": int(plan.replanned.sum()), "swaps": int((plan.swap1 + plan.swap2).sum())})
    return {"label": entry.label, "name": entry.name, "batches": batches}


def rank_main(ctx: Any, points: list, a: Any) -> dict:
    from lina_sim.serving.setup import resolve_inference
    from lina_sim.serving.server import serving_inputs
    from runtime.executor import check_launch

    setups = [resolve_inference(p) for p in points]
    out = []
    for setup in setups:
        check_launch(ctx.info, setup.cluster)
        if setup.serving.arrival.process != "closed":
            from lina_sim.errors import ConfigError

            raise ConfigError("serving.arrival.process", "the runtime replays batches whose make-up must not depend "
                              "on timing", ["closed"])
        shared = serving_inputs(setup)
        out.append([serve_policy(ctx, setup, e, shared) for e in setup.policies])
    return {"kind": "inference", "points": out}


def measured_frame(results: list, setups: list):
    """Per (point, policy): batch time mean/median over batches (max end - min start over
    ranks), and the timeline of the median batch."""
    import pandas as pd

    from lina_sim.results.timeline import events_to_frame

    rows, tls = [], {}
    for pi, setup in enumerate(setups):
        for j, run in enumerate(results[0]["points"][pi]):
            per_rank = [res["points"][pi][j]["batches"] for res in results]
            times = [max(b[i]["end"] for b in per_rank) - min(b[i]["start"] for b in per_rank)
                     for i in range(len(per_rank[0]))]
            med = statistics.median(times)
            pick = min(range(len(times)), key=lambda i: abs(times[i] - med))
            t0 = min(b[pick]["start"] for b in per_rank)
            df = events_to_frame([e for b in per_rank for e in b[pick]["events"]])
            df["start"] -= t0
            df["end"] -= t0
            tls[(pi, run["label"])] = df
            rows.append({"point": pi, "scenario": setup.scenario.name, "policy": run["label"],
                         "policy_name": run["name"], "batches": len(times), "batch_time_mean_s": float(np.mean(times)),
                         "batch_time_p50_s": med, "batch_time_min_s": min(times), "batch_time_max_s": max(times),
                         "batch_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
                         "a2a_s": float(df[df["kind"] == "all_to_all"].groupby("rank").apply(
                             lambda d: (d["end"] - d["start"]).sum()).mean()),
                         "swaps": sum(b["swaps"] for b in per_rank[0]),
                         "replanned_layers": sum(b["replanned"] for b in per_rank[0])})
    return pd.DataFrame(rows), tls


def finish(results: list, points: list, out: Path) -> int:
    from lina_sim.serving.setup import resolve_inference
    from lina_sim.results.timeline import write_chrome_trace
    from lina_sim.results.files import atomic_write_text

    setups = [resolve_inference(p) for p in points]
    df, tls = measured_frame(results, setups)
    print(f"# {points[0].name} [measured]: batch time per policy")
    for r in df.itertuples():
        print(f"  {r.point:>2} {r.policy:<18} mean {r.batch_time_mean_s * 1e3:8.2f} ms  median "
              f"{r.batch_time_p50_s * 1e3:8.2f} ms  a2a/batch {r.a2a_s * 1e3:7.2f} ms  swaps {r.swaps}  "
              f"re-planned layers {r.replanned_layers}  ({r.batches} batches)")
    for (pi, label), tl in tls.items():
        atomic_write_text(out / f"timeline-p{pi}-{label}.csv", tl.to_csv(index=False))
        write_chrome_trace(tl, out / f"trace-p{pi}-{label}.json", name="lina-run")
    path = atomic_write_text(out / "results.csv", df.to_csv(index=False))
    print(f"# measured results: {path}")
    return 0


def validate_inference(scenario: str, out: Path, testbed: str | None, nic: str | None, profile: str | None,
                       timeout_s: float, echo: bool):
    """Predicted (``run_inference``) against measured mean batch time per policy."""
    from lina_sim.config.scenario import load_scenarios
    from lina_sim.serving.setup import resolve_inference
    from lina_sim.serving.run import run_inference
    from lina_sim.results.files import atomic_write_text
    from runtime.launch import run_entry
    from runtime.validate import _testbed, calibrated_profile, mark_rankings, ranking_summary, resolved_scenario

    points = load_scenarios(scenario)
    first = resolve_inference(points[0])
    spec = _testbed(testbed, nic, first.cluster)
    # The largest dispatch per rank: a full batch's tokens, spread evenly, each sent top_k times.
    widest = max(s.serving.batching.token_budget * s.top_k * s.model.d_model * s.model.dtype_bytes
                 / s.cluster.world_size for s in map(resolve_inference, points))
    profile = calibrated_profile(spec, out, profile, first.model, timeout_s, widest)
    resolved = resolved_scenario(scenario, profile, None, out / "scenario-resolved.yaml")
    setups = [resolve_inference(p) for p in load_scenarios(resolved)]
    preds = []
    for pi, setup in enumerate(setups):
        df, _ = run_inference(setup)
        df.insert(0, "point", pi)
        preds.append(df[["point", "policy", "batch_time_mean_s", "batches"]])
    import pandas as pd

    pred = pd.concat(preds, ignore_index=True)
    results = run_entry("scenario", [str(resolved)], testbed=spec, timeout_s=timeout_s, echo=echo)
    meas, tls = measured_frame(results, setups)
    for (pi, label), tl in tls.items():
        atomic_write_text(out / f"timeline-measured-p{pi}-{label}.csv", tl.to_csv(index=False))
    j = pred.merge(meas, on=["point", "policy"], suffixes=("_pred", "_meas"))
    j["error_pct"] = (j["batch_time_mean_s_pred"] - j["batch_time_mean_s_meas"]) / j["batch_time_mean_s_meas"] * 100
    mark_rankings(j, "batch_time_mean_s_pred", "batch_time_mean_s_meas", "batch_time_std_s", "batches_meas")
    atomic_write_text(out / "validation.csv", j.to_csv(index=False))
    print(f"# {points[0].name}: testbed {spec.nodes}x{spec.ranks_per_node} at {spec.nic_bps / 1e6:.0f} Mbit/s "
          f"(mean batch time)")
    print(f"  {'pt':>2} {'policy':<18} {'predicted ms':>12} {'measured ms':>12} {'error':>8}  ranking")
    for r in j.itertuples():
        print(f"  {r.point:>2} {r.policy:<18} {r.batch_time_mean_s_pred * 1e3:>12.2f} "
              f"{r.batch_time_mean_s_meas * 1e3:>12.2f} {r.error_pct:>+7.1f}%  {'same' if r.ranking_match else 'DIFFERS'}")
    print(f"  median |error| {statistics.median(abs(e) for e in j['error_pct']):.1f}% (target <= 10%); "
          + ranking_summary(j))
    print(f"# validation: {out / 'validation.csv'}")
    return j
