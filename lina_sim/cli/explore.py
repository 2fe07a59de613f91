"""``lina-sim explore``: a regime map of one policy's speedup over a baseline."""

from __future__ import annotations

import argparse

EXPLORE_HELP = """\
Run a scenario over a grid of two axes (a third gives small multiples) and map where one
policy beats a baseline: DIR/map.png (heat map of baseline / policy, the break-even
contour, markers where the scenario and each shipped cluster preset lie), DIR/grid.parquet
(one row per point) and DIR/markers.csv. Points run through the sweep machinery: validated
first, cached, resumable, local processes or Ray.

An axis is FIELD=RANGE. FIELD is a field path as sweeps take it (cluster.nic.bandwidth,
policies[lina].micro_op_mb, serving.batching.tokens_per_gpu, ...) or a derived knob:
  inter_node_bw_per_gpu  bytes/s of NIC bandwidth per GPU (sets cluster.nic.bandwidth)
  compute_speed          scale on every peak FLOP/s of the GPU
  grad_bytes             non-expert gradient bytes per rank and step (through model.vocab)
  experts_per_gpu        model.experts / GPUs
  batch_tokens_per_gpu   inference: batching budget per GPU; training: micro_batch x seq_len
  skew                   inference: busiest expert over uniform, in a trace generated from
                         the scenario's first trace (the skew produced is in the grid)
RANGE is START:STOP:log|lin:N (1e9:1e11:log:15) or a comma-separated list (1,2,4).

Example:
  lina-sim explore scenarios/default.yaml --x inter_node_bw_per_gpu=1e9:1e11:log:15 \\
      --y compute_speed=0.25:4:log:15 --policy lina --baseline deepspeed --out results/map"""


def register(sub) -> None:
    p = sub.add_parser(
        "explore",
        help="map where a policy beats a baseline over two (or three) axes",
        description=EXPLORE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", help="scenario YAML (its sweep: block, if any, is replaced by the axes)")
    p.add_argument("--x", required=True, metavar="FIELD=RANGE", help="horizontal axis")
    p.add_argument("--y", required=True, metavar="FIELD=RANGE", help="vertical axis")
    p.add_argument("--z", default=None, metavar="FIELD=VALUES", help="one panel per value (small multiples)")
    p.add_argument("--policy", required=True, help="the policy mapped (its label in the scenario)")
    p.add_argument("--baseline", required=True, help="the policy it is compared with (its label)")
    p.add_argument(
        "--metric", default=None, help="result column, lower is better (default: step_time_s, latency_p95_s)"
    )
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="fix a field for every point")
    p.add_argument("--out", required=True, help="output directory (grid.parquet, markers.csv, map.png)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: CPU count)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="local processes or Ray")
    p.add_argument("--address", default=None, help="Ray cluster address, HOST:PORT or ray://HOST:PORT")
    p.add_argument("--cache", default=None, help="cache directory (default: results/.cache/points)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--max-points", type=int, default=None, help="raise the grid's point limit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_explore)


def parse_sets(items: list[str]) -> dict[str, object]:
    """``--set FIELD=VALUE`` (VALUE as YAML: numbers, null, lists)."""
    import yaml

    from lina_sim.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError("--set", f"cannot parse {item!r}", "FIELD=VALUE, e.g. serving.requests=300")
        try:
            out[name.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(
                f"--set {name.strip()}", f"cannot parse value {value!r}", "a YAML scalar or list"
            ) from None
    return out


def cmd_explore(args: argparse.Namespace) -> int:
    import sys

    from lina_sim.errors import ConfigError
    from lina_sim.experiments import explore as ex
    from lina_sim.experiments.sweep import DEFAULT_CACHE, Cache, SweepInterrupted, make_backend

    axes = [ex.parse_axis(args.x, "--x"), ex.parse_axis(args.y, "--y")]
    if args.z:
        axes.append(ex.parse_axis(args.z, "--z", numeric=False))
    if args.max_points is not None and args.max_points < 1:
        raise ConfigError("--max-points", f"must be >= 1, got {args.max_points}")
    cache = None if args.no_cache else Cache(args.cache or DEFAULT_CACHE)
    # Generated traces are inputs named by their content, kept beside the point cache
    # (also with --no-cache: --out only ever receives the finished map).
    trace_dir = (cache.root if cache else DEFAULT_CACHE).parent / "traces"
    plan = ex.plan_map(
        args.scenario,
        axes,
        args.policy,
        args.baseline,
        args.metric,
        parse_sets(args.set),
        trace_dir,
        args.max_points or ex.MAX_POINTS,
    )
    backend = make_backend(args.backend, args.workers, args.address)
    try:
        result = ex.run_map(plan, backend, cache, progress=not args.quiet)
    except SweepInterrupted as e:
        print(f"lina-sim explore: {e.summary(cache.root if cache else None)}", file=sys.stderr)
        return 130
    finally:
        backend.close()
    paths = ex.write_map(result, args.out)
    sw = result.sweep
    print(
        f"# {sw.points} points: {sw.ran} ran, {sw.cached} from cache, {len(sw.failed)} failed "
        f"in {sw.wall_s:.1f} s ({sw.cpu_s:.1f} s CPU in workers)"
    )
    panels = list(dict.fromkeys(result.grid[axes[2].name])) if len(axes) > 2 else [None]
    for panel in panels:
        if panel is not None:
            print(f"\n## {axes[2].name} = {panel}")
        print(ex.format_grid(result, panel))
    print(ex.summary(result))
    g = result.grid
    for col in [c for c in g.columns if c.endswith("_produced")]:
        knob = col.removesuffix("_produced")
        pairs = g.groupby(knob)[col].first()
        print(f"# {col}: " + ", ".join(f"{k:.4g} -> {v:.4g}" for k, v in pairs.items()))
    for m in plan.markers:
        print(f"# marker {m['label']}: {axes[0].name}={m['x']:.4g}, {axes[1].name}={m['y']:.4g}")
    if sw.failed:
        from lina_sim.results.tables import format_failures

        print(format_failures(sw.failed))
    print(f"# map: {paths[2]}; grid: {paths[0]}")
    return 1 if sw.failed else 0
