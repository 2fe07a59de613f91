"""Regime maps: one policy's speedup over a baseline as a heat map over two axes, with the
break-even contour (speedup 1) and markers where real clusters lie; a third axis gives one
panel per value (small multiples)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

# Cells are labelled with their value when a panel has at most this many.
ANNOTATE_CELLS = 100


def _panel(ax: Any, g: pd.DataFrame, x: str, y: str, norm: TwoSlopeNorm, xlog: bool, ylog: bool) -> Any:
    t = g.pivot_table(index=y, columns=x, values="speedup", aggfunc="first").sort_index().sort_index(axis=1)
    xs, ys = t.columns.to_numpy(dtype=float), t.index.to_numpy(dtype=float)
    s = np.ma.masked_invalid(t.to_numpy(dtype=float))
    mesh = ax.pcolormesh(_edges(xs, xlog), _edges(ys, ylog), s, cmap="RdBu", norm=norm, shading="flat")
    values_of = {ax.xaxis: xs, ax.yaxis: ys}
    for log, scale, axis in ((xlog, ax.set_xscale, ax.xaxis), (ylog, ax.set_yscale, ax.yaxis)):
        if log:
            scale("log")
            # 1-2-5 ticks within 1.5 decades; decades only beyond (labels would overlap).
            span = math.log10(values_of[axis].max() / values_of[axis].min())
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if span < 1.5 else (1.0,)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
    finite = s.compressed()
    if finite.size and finite.min() < 1.0 < finite.max() and len(xs) > 1 and len(ys) > 1:
        cs = ax.contour(xs, ys, s, levels=[1.0], colors="k", linewidths=1.5)
        ax.clabel(cs, fmt="break-even", fontsize=7)
    if s.size <= ANNOTATE_CELLS:
        for i, yv in enumerate(ys):
            for j, xv in enumerate(xs):
                if not np.ma.is_masked(s[i, j]):
                    ax.text(xv, yv, f"{s[i, j]:.2f}", ha="center", va="center", fontsize=6)
    return mesh


def _edges(values: np.ndarray, log: bool) -> np.ndarray:
    """Cell edges around sorted cell centres: midpoints (geometric on a log axis), the
    outer cells as wide as their neighbours."""
    v = np.log(values) if log else values.astype(float)
    if v.size == 1:
        e = np.array([v[0] - 0.5, v[0] + 0.5])
    else:
        mid = (v[1:] + v[:-1]) / 2
        e = np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])
    return np.exp(e) if log else e


def _in_range(v: float, values: np.ndarray, log: bool) -> bool:
    lo, hi = float(values.min()), float(values.max())
    if log:  # half a cell beyond the outer values is still on the map
        pad = (math.log(hi) - math.log(lo)) / max(1, len(values) - 1) / 2
        return v > 0 and math.log(lo) - pad <= math.log(v) <= math.log(hi) + pad
    pad = (hi - lo) / max(1, len(values) - 1) / 2
    return lo - pad <= v <= hi + pad


def speedup_map(
    grid: pd.DataFrame,
    path: str | Path,
    x: str,
    y: str,
    z: str | None = None,
    xlog: bool = False,
    ylog: bool = False,
    title: str = "",
    markers: Sequence[dict[str, Any]] = (),
) -> Path:
    """Draw ``grid`` (columns ``x``, ``y``, [``z``], ``speedup``) to ``path``; blue where the
    policy is faster (speedup > 1), red where slower. Markers outside the axes' ranges
    are left off the figure (the caller lists them)."""
    panels = list(dict.fromkeys(grid[z])) if z else [None]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 5.0 * nrows), squeeze=False)
    s = grid["speedup"].to_numpy(dtype=float)
    s = s[np.isfinite(s)]
    lo, hi = (float(s.min()), float(s.max())) if s.size else (0.9, 1.1)
    span = max(1.0 - lo, hi - 1.0, 0.01)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=1.0 - span, vmax=1.0 + span)
    mesh = None
    xs, ys = grid[x].to_numpy(dtype=float), grid[y].to_numpy(dtype=float)
    for k, panel in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        g = grid if z is None else grid[grid[z] == panel]
        mesh = _panel(ax, g, x, y, norm, xlog, ylog)
        # Numbered stars, named in the legend: neighbouring clusters' names would overlap.
        shown = [
            (i, m) for i, m in enumerate(markers, 1) if _in_range(m["x"], xs, xlog) and _in_range(m["y"], ys, ylog)
        ]
        for i, m in shown:
            ax.plot(
                m["x"],
                m["y"],
                marker="*",
                color="gold",
                markeredgecolor="k",
                markersize=13,
                linestyle="none",
                label=f"{i}: {m['label']}",
            )
            ax.annotate(str(i), (m["x"], m["y"]), textcoords="offset points", xytext=(6, 4), fontsize=8, weight="bold")
        if shown and k == 0:
            ax.legend(loc="upper left", bbox_to_anchor=(0, -0.14), fontsize=7, frameon=False)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if z is not None:
            ax.set_title(f"{z} = {panel}", fontsize=9)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes.ravel().tolist(), label="speedup (baseline / policy)")
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
