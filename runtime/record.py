"""Train a small MoE on real text and record its gating as expert-routing traces.

The text is the real input of OLMoE's routing analysis (``<repo>/../shared/data/
olmoe-routing/text/*.txt``). The tail of each domain is held out; the model trains on
the rest (domains sampled evenly, byte-level tokens, Switch/GShard load-balancing
loss), then reads the held-out tail of each domain in windows of ``seq_len`` bytes and
its per-layer top-k choices are written as one trace per (top-k variant, domain).

    python -m runtime.record --out traces/

The exact command that regenerates a trace (every option spelled out) is stored in its
metadata as ``made_by``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lina_sim.routing.traces import make_trace
from runtime.moe import MoEConfig, MoETransformer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "olmoe-routing" / "text"
LICENSE_NOTE = (
    "Apache-2.0; recorded from text shipped with allenai/OLMoE's routing analysis "
    "(see ../shared/data/olmoe-routing/LICENSE)"
)


@dataclass
class Corpus:
    """Byte-level train/held-out split of each domain's text (uint8 token arrays)."""

    train: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]


def load_corpus(data: Path, domains: list[str] | None, heldout_tokens: int, max_bytes: int | None) -> Corpus:
    files = sorted(data.glob("*.txt"))
    if domains:
        files = [data / f"{d}.txt" for d in domains]
    if not files:
        raise SystemExit(f"runtime.record: no *.txt files in {data}")
    train, held = {}, {}
    for f in files:
        if not f.exists():
            raise SystemExit(f"runtime.record: {f}: no such file")
        raw = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        if max_bytes:
            raw = raw[:max_bytes]
        if raw.size < 2 * heldout_tokens:
            raise SystemExit(f"runtime.record: {f}: {raw.size} bytes, need at least {2 * heldout_tokens}")
        # Hold out the tail: the model never trains on the text it is recorded on.
        train[f.stem], held[f.stem] = raw[:-heldout_tokens], raw[-heldout_tokens:]
    return Corpus(train, held)


def train_model(cfg: MoEConfig, corpus: Corpus, args: argparse.Namespace, log) -> tuple[MoETransformer, dict]:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    domains = sorted(corpus.train)
    t0, cpu0 = time.monotonic(), time.process_time()
    hist = []
    model.train()
    for step in range(args.steps):
        batch = np.empty((args.batch, cfg.seq_len + 1), dtype=np.int64)
        for b in range(args.batch):
            text = corpus.train[domains[rng.integers(len(domains))]]
            start = rng.integers(0, text.size - cfg.seq_len - 1)
            batch[b] = text[start : start + cfg.seq_len + 1]
        loss, ce, aux = model.loss(torch.from_numpy(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        hist.append((float(ce.detach()), float(aux.detach())))
        if step % args.log_every == 0 or step == args.steps - 1:
            recent = np.mean(hist[-args.log_every :], axis=0)
            log(
                f"top{cfg.top_k} step {step + 1}/{args.steps}  ce {recent[0]:.3f} nats  "
                f"({recent[0] / math.log(2):.3f} bits/byte)  aux {recent[1]:.3f}  {time.monotonic() - t0:.0f}s"
            )
    info = {
        "train_seconds": round(time.monotonic() - t0, 1),
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),  # all threads together
        "train_threads": torch.get_num_threads(),
        "train_steps": args.steps,
        "final_train_ce_nats": round(float(np.mean([h[0] for h in hist[-20:]])), 4),
        "final_aux_loss": round(float(np.mean([h[1] for h in hist[-20:]])), 4),
    }
    return model, info


@torch.no_grad()
def record_domain(
    model: MoETransformer, text: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Gate choices on ``text`` read in non-overlapping windows of seq_len.

    Returns experts [tokens, layers, k], probs [tokens, layers, k], seq ids [tokens] and
    the held-out LM loss in bits per byte (evidence that the model learned the text).
    """
    model.eval()
    T = model.cfg.seq_len
    n_seq = text.size // T
    windows = torch.from_numpy(text[: n_seq * T].astype(np.int64)).view(n_seq, T)
    experts, probs, ce_sum, ce_n = [], [], 0.0, 0
    for i in range(0, n_seq, batch):
        x = windows[i : i + batch]
        out = model(x, return_gates=True)
        # [layers, B*T, k] -> [B*T, layers, k]; tokens come out window-major, in order.
        experts.append(torch.stack([g.experts for g in out.gates], dim=1))
        probs.append(torch.stack([g.probs for g in out.gates], dim=1))
        logits = out.logits[:, :-1].reshape(-1, model.cfg.vocab)
        ce_sum += float(torch.nn.functional.cross_entropy(logits, x[:, 1:].reshape(-1), reduction="sum"))
        ce_n += logits.shape[0]
    seq_ids = np.repeat(np.arange(n_seq, dtype=np.int32), T)
    bits = ce_sum / max(1, ce_n) / math.log(2)
    return torch.cat(experts).numpy(), torch.cat(probs).numpy(), seq_ids, bits


def canonical_command(args: argparse.Namespace) -> str:
    """The full command line with every option explicit, so defaults may change safely."""
    parts = ["python", "-m", "runtime.record", "--out", str(args.out_arg)]
    if args.data_arg is not None:
        parts += ["--data", str(args.data_arg)]
    if args.domains:
        parts += ["--domains", *args.domains]
    for name in (
        "top_k",
        "layers",
        "experts",
        "d_model",
        "d_ff",
        "heads",
        "seq_len",
        "capacity_factor",
        "aux_weight",
        "steps",
        "batch",
        "lr",
        "seed",
        "record_tokens",
        "threads",
    ):
        val = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        parts += [flag, *map(str, val)] if isinstance(val, list) else [flag, str(val)]
    if args.max_bytes:
        parts += ["--max-bytes", str(args.max_bytes)]
    if args.no_probs:
        parts += ["--no-probs"]
    return shlex.join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.record", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the .npz traces")
    p.add_argument("--data", default=None, help=f"directory of *.txt domains (default {DEFAULT_DATA})")
    p.add_argument("--domains", nargs="*", default=None, help="domain names (default: every *.txt)")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="one model per value")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record-tokens", type=int, default=51200, help="held-out tokens recorded per domain")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first N bytes of each domain (tests)")
    p.add_argument("--no-probs", action="store_true", help="omit gate probabilities (smaller files)")
    p.add_argument(
        "--checkpoint-dir", default=None, help="save trained weights here; reuse them when config and options match"
    )
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    args.out_arg, args.data_arg = args.out, args.data
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    data = Path(args.data) if args.data else DEFAULT_DATA
    corpus = load_corpus(data, args.domains, args.record_tokens, args.max_bytes)
    command = canonical_command(args)
    out = Path(args.out)
    written: list[Path] = []
    for k in args.top_k:
        cfg = MoEConfig(
            layers=args.layers,
            d_model=args.d_model,
            d_ff=args.d_ff,
            heads=args.heads,
            experts=args.experts,
            top_k=k,
            capacity_factor=args.capacity_factor,
            seq_len=args.seq_len,
            aux_loss_weight=args.aux_weight,
        )
        model, info = _trained(cfg, corpus, args, log)
        for domain, text in corpus.heldout.items():
            experts, probs, seq_ids, bits = record_domain(model, text, args.batch)
            meta = {
                "model": f"lina-moe-byte-{cfg.layers}L-{cfg.experts}E-top{k}",
                "dataset": domain,
                "num_experts": cfg.experts,
                "top_k": k,
                "source": f"gating of a byte-level MoE on the held-out last {text.size} bytes of "
                f"{domain}.txt in olmoe-routing/text, trained on the rest of all domains",
                "license": LICENSE_NOTE,
                "made_by": command,
                "model_config": cfg.to_dict(),
                "heldout_bits_per_byte": round(bits, 4),
                "torch": torch.__version__,
                **info,
            }
            trace = make_trace(experts, meta, seq_ids=seq_ids, probs=None if args.no_probs else probs)
            path = trace.save(
                out / f"moe12-top{k}-{domain}.npz"
                if cfg.layers == 12 and cfg.experts == 16
                else out / f"moe{cfg.layers}L{cfg.experts}E-top{k}-{domain}.npz"
            )
            log(
                f"wrote {path}: {trace.num_tokens} tokens, held-out {bits:.3f} bits/byte, "
                f"{path.stat().st_size / 1e6:.2f} MB"
            )
            written.append(path)
    return written


def _trained(cfg: MoEConfig, corpus: Corpus, args: argparse.Namespace, log) -> tuple[MoETransformer, dict]:
    """Train, or reuse a checkpoint made by the same configuration and options."""
    ckpt = Path(args.checkpoint_dir) / f"top{cfg.top_k}.pt" if args.checkpoint_dir else None
    # Only what changes the trained weights; output options (--out, --no-probs) do not.
    train_opts = {
        n: getattr(args, n)
        for n in ("data_arg", "domains", "steps", "batch", "lr", "seed", "record_tokens", "max_bytes")
    }
    key = json.dumps({"cfg": cfg.to_dict(), "train": train_opts}, sort_keys=True)
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("key") == key:
            log(f"reusing {ckpt}")
            model = MoETransformer(cfg)
            model.load_state_dict(state["model"])
            return model, state["info"]
    model, info = train_model(cfg, corpus, args, log)
    if ckpt:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "model": model.state_dict(), "info": info}, ckpt)
    return model, info


if __name__ == "__main__":
    main()
