"""``lina-sim trace-stats`` and ``lina-sim trace-gen``: inspect and synthesise traces."""

from __future__ import annotations

import argparse

from lina_sim.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "trace-stats",
        help="statistics of an expert-routing trace (skew, affinity, path estimation, locality)",
        description="Print load skew, inter-layer affinity, path-based estimation accuracy (fit on "
        "some sequences, scored on the others and in sample) and token repeat rate of a trace "
        "(.npz, or JSON lines / a JSON array / .npy imported on the fly; any of them gzipped).",
    )
    p.add_argument("file", help="routing-trace file (.npz, .jsonl, .json, .npy, or any of them .gz)")
    p.add_argument(
        "--experts",
        type=int,
        default=None,
        help="the model's expert count: imported ids must lie below it (default: the trace's metadata; "
        "an import without it infers largest id + 1)",
    )
    p.add_argument("--model", default=None, help="model name to record for an imported trace (default: unknown)")
    p.add_argument(
        "--seq-field",
        default=None,
        metavar="FIELD",
        help="JSON record field holding the sequence id (default: the first present of problem_id, seq_id, "
        "sequence_id, request_id, sample_id, doc_id; none: one sequence)",
    )
    p.add_argument(
        "--drop-incomplete",
        action="store_true",
        help="drop JSON tokens that lack a record at some layer (a ragged dump) and report how many",
    )
    p.add_argument("--plot", metavar="PNG", help="write skew bars and transition heatmaps here")
    p.add_argument(
        "--compare-real", action="store_true", help="put the trace beside the real OLMoE/Mixtral routing counts"
    )
    p.add_argument("--real", metavar="JSON", help="routing_counts.json (default: ../shared/data/olmoe-routing)")
    p.add_argument("--batch-tokens", type=int, default=256, help="batch size for path-based estimation")
    p.add_argument("--path-lengths", type=int, nargs="+", default=[0, 1, 3, 6])
    p.add_argument(
        "--train-fraction",
        type=float,
        default=0.5,
        help="share of the sequences the path estimator is fit on; the rest score it (0..1, exclusive)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draw of training sequences")
    p.add_argument("--json", metavar="OUT", help="also write the statistics as JSON")
    p.set_defaults(func=run_stats)

    g = subparsers.add_parser(
        "trace-gen",
        help="generate a synthetic routing trace, fitted to a real one or from parameters",
        description="Write a synthetic trace (.npz). With --from, fit the generator to a trace and "
        "optionally scale it to more tokens, layers or experts; otherwise build it from parameters.",
    )
    g.add_argument("out", help="output .npz")
    g.add_argument("--from", dest="source", metavar="TRACE", help="fit to this trace")
    g.add_argument("--tokens", type=int, default=None, help="tokens to generate (default: as the source, or 50000)")
    g.add_argument("--layers", type=int, default=None, help="MoE layers (with --from: scale to this many)")
    g.add_argument(
        "--experts",
        type=int,
        default=None,
        help="experts (with --from: a multiple of the source's, each expert split evenly)",
    )
    g.add_argument("--top-k", type=int, default=1, help="experts per token (parameters only)")
    g.add_argument("--popularity", choices=["zipf", "dirichlet"], default="zipf")
    g.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of expert popularity")
    g.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of expert popularity")
    g.add_argument("--affinity", type=float, default=0.5, help="weight of the rank-preserving transition, 0..1")
    g.add_argument("--locality", type=float, default=0.1, help="probability of copying the previous token, 0..1")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: as the source, or 128)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run_gen)


def run_stats(args: argparse.Namespace) -> int:
    from lina_sim.results import tables
    from lina_sim.routing import stats as ts
    from lina_sim.routing import traces as tr

    _check_stats_args(args)
    trace = tr.load(
        args.file,
        num_experts=args.experts,
        seq_field=args.seq_field,
        metadata={"model": args.model} if args.model else None,
        drop_incomplete=args.drop_incomplete,
    )
    if args.compare_real:  # read before the statistics so a bad file fails fast
        real = ts.real_rows(ts.load_real(args.real), args.real or str(ts.DEFAULT_REAL))
    stats = ts.compute(trace, args.path_lengths, args.batch_tokens, args.train_fraction, args.seed)
    print(tables.format_stats(stats))
    if args.compare_real:
        print()
        print(tables.format_comparison(ts.comparison_rows(trace, real)))
    if args.json:
        import json

        from lina_sim.results.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(stats.to_dict(), indent=1))
    if args.plot:
        from plots.trace_plots import plot_trace_stats

        print(f"\nwrote {plot_trace_stats(stats, args.plot)}")
    return 0


def _check_stats_args(args: argparse.Namespace) -> None:
    """One line naming the option, before any file is read."""
    if args.experts is not None and args.experts < 1:
        raise ConfigError("--experts", f"must be >= 1, got {args.experts}")
    if args.batch_tokens < 1:
        raise ConfigError("--batch-tokens", f"must be >= 1, got {args.batch_tokens}")
    if not 0 < args.train_fraction < 1:
        raise ConfigError("--train-fraction", f"must lie strictly between 0 and 1, got {args.train_fraction}")
    bad = [m for m in args.path_lengths if m < 0]
    if bad:
        raise ConfigError("--path-lengths", f"must be >= 0, got {bad[0]}")
    if args.seq_field is not None and not args.seq_field:
        raise ConfigError("--seq-field", "must name a JSON field, got an empty string")


def run_gen(args: argparse.Namespace) -> int:
    from lina_sim.routing import traces as tr
    from lina_sim.routing.generator import RoutingTraceGenerator

    if args.source:
        source = tr.load(args.source)
        gen = RoutingTraceGenerator.fit(source).scaled(num_layers=args.layers, num_experts=args.experts)
        tokens = args.tokens or source.num_tokens
    else:
        if args.layers is None or args.experts is None:
            raise ConfigError("trace-gen", "give --from TRACE, or both --layers and --experts")
        gen = RoutingTraceGenerator.synthetic(
            args.experts,
            args.layers,
            args.top_k,
            args.popularity,
            args.zipf_s,
            args.alpha,
            args.affinity,
            args.locality,
            args.seq_len or 128,
            args.seed,
        )
        tokens = args.tokens or 50_000
    if args.seq_len:
        if args.seq_len < 1:
            raise ConfigError("--seq-len", f"must be >= 1, got {args.seq_len}")
        gen.params.seq_len = args.seq_len
    trace = gen.generate(tokens, seed=args.seed, metadata={"made_by": _gen_command(args, tokens)})
    path = trace.save(args.out)
    print(f"wrote {path}: {trace}")
    return 0


def _gen_command(args: argparse.Namespace, tokens: int) -> str:
    """The trace-gen command with every option that shaped the output spelled out."""
    import shlex

    parts = ["lina-sim", "trace-gen", args.out, "--tokens", str(tokens), "--seed", str(args.seed)]
    if args.source:
        parts += ["--from", args.source]
        names = ("layers", "experts", "seq_len")
    else:
        names = ("layers", "experts", "top_k", "popularity", "zipf_s", "alpha", "affinity", "locality", "seq_len")
    for n in names:
        v = getattr(args, n)
        if v is not None:
            parts += ["--" + n.replace("_", "-"), str(v)]
    return shlex.join(parts)
