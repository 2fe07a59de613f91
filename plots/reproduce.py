"""Figures of ``lina-sim reproduce``.

Each function reads a sweep table (one row per point and policy), draws one figure and
returns the table it plotted, so that REPORT.md shows exactly the numbers behind it.
Times in the returned tables are in ms; speedups and slowdowns are ratios.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lina_sim.results.tables import step_shares  # noqa: E402
from plots.training import save_figure, speedup_vs_experts  # noqa: E402

BASELINE = "deepspeed"
LINESTYLES = ("-", "--", "-.", ":")


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df.columns else df


def _models(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["model"]))


def _over_baseline(df: pd.DataFrame, by: list[str]) -> pd.Series:
    """Each row's speedup over the baseline policy of the same ``by`` group."""
    base = df[df["policy"] == BASELINE].set_index(by)["step_time_s"]
    return base.reindex(pd.MultiIndex.from_frame(df[by]) if len(by) > 1 else df[by[0]]).to_numpy() / df["step_time_s"]


def training_speedup(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Step-time speedup over DeepSpeed against the number of experts, per model."""
    d = _ok(df).copy()
    speedup_vs_experts(d, path, baseline=BASELINE)
    d["speedup"] = _over_baseline(d, ["model", "experts"]).to_numpy()
    return d.pivot_table(index=["model", "experts"], columns="policy", values="speedup", sort=False).reset_index()


def training_ablation(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Speedup over DeepSpeed as Lina's parts are added one at a time, per model."""
    d = _ok(df).copy()
    d["speedup"] = _over_baseline(d, ["model"]).to_numpy()
    models, stages = _models(d), list(dict.fromkeys(d["policy"]))
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(models), 3.4))
    w = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        s = d[d["policy"] == stage].set_index("model").reindex(models)
        x = np.arange(len(models)) + (i - (len(stages) - 1) / 2) * w
        ax.bar(x, s["speedup"], w, label=stage)
        for xi, v, k in zip(x, s["speedup"], s["experts_per_device"]):
            ax.text(xi, v, f"{v:.2f}" + (f"\nk={int(k)}" if k > 1 else ""), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("step-time speedup over deepspeed")
    ax.set_title(f"ablation: Lina's parts added in turn ({int(d['gpus'].iloc[0])} GPUs)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)
    t = d.assign(step_ms=d["step_time_s"] * 1e3)[
        ["model", "policy", "step_ms", "speedup", "experts_per_device", "pipeline_degree"]
    ]
    return pd.concat([t, step_shares(d).round(1)], axis=1)


def microop_size(df: pd.DataFrame, path: str | Path, size_col: str = "policies[lina].micro_op_mb") -> pd.DataFrame:
    """Step time against the micro-op size (MB), one panel per model; DeepSpeed dashed."""
    d = _ok(df).copy()
    d["micro_op_mb"] = d[size_col]
    d["step_ms"] = d["step_time_s"] * 1e3
    models = _models(d)
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        m = d[d["model"] == model]
        for policy, p in m.groupby("policy", sort=False):
            p = p.sort_values("micro_op_mb")
            if policy == BASELINE:
                ax.axhline(p["step_ms"].median(), color="grey", ls="--", lw=1, label=f"{policy} (25 MB buckets)")
            else:
                ax.plot(p["micro_op_mb"], p["step_ms"], marker="o", label=policy)
        ax.set_xscale("log")
        ax.set_xticks([2, 5, 10, 20, 50, 100, 200], ["2", "5", "10", "20", "50", "100", "200"])
        ax.set_xlabel("micro-op size (MB)")
        ax.set_title(model)
    axes[0][0].set_ylabel("step time (ms)")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)
    return d.pivot_table(index=["model", "micro_op_mb"], columns="policy", values="step_ms", sort=False).reset_index()


def a2a_slowdown(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """CDF of the backward all-to-alls' slowdown (time under contention / time alone) at
    the largest expert count, one panel per model, one line per policy."""
    d = _ok(df)
    d = d[d["experts"] == d.groupby("model")["experts"].transform("max")]
    models = _models(d)
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False, sharey=True)
    rows = []
    for ax, model in zip(axes[0], models):
        for i, r in enumerate(d[d["model"] == model].itertuples()):
            s = np.sort(np.asarray(r.bwd_a2a_slowdowns, dtype=float))
            if not s.size:
                continue
            # Policies often coincide (e.g. priority alone = DeepSpeed): dashes keep both visible.
            ax.step(
                np.r_[1.0, s],
                np.r_[0.0, np.arange(1, s.size + 1) / s.size],
                where="post",
                label=r.policy,
                ls=LINESTYLES[i % len(LINESTYLES)],
                lw=1.4,
            )
            rows.append(
                {
                    "model": model,
                    "experts": r.experts,
                    "policy": r.policy,
                    "all_to_alls": s.size,
                    "median": np.median(s),
                    "p90": np.percentile(s, 90),
                    "p95": np.percentile(s, 95),
                    "max": s.max(),
                    "slowed (>1.05x)": float((s > 1.05).mean()),
                }
            )
        ax.set_xlabel("backward all-to-all slowdown (x)")
        ax.set_title(f"{model}, {int(d[d['model'] == model]['experts'].iloc[0])} experts")
    axes[0][0].set_ylabel("fraction of all-to-alls")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
    return pd.DataFrame(rows)


# ---- inference ----------------------------------------------------------------------------
LATENCY_COLUMNS = {"p50": ("p50_s", "latency_p50_s", "p50"), "p95": ("p95_s", "latency_p95_s", "p95")}


def latency_column(df: pd.DataFrame, which: str) -> str:
    """The column holding the ``p50`` / ``p95`` latency, whatever the serving table calls it."""
    for c in LATENCY_COLUMNS[which]:
        if c in df.columns:
            return c
    cands = [c for c in df.columns if which in c and df[c].dtype.kind == "f"]
    if not cands:
        raise KeyError(f"no {which} latency column among {list(df.columns)}")
    return cands[0]


def _setting_labels(d: pd.DataFrame, size: list[str]) -> pd.Series:
    """Per row, the swept fields that the cluster size does not already fix, as
    ``field=value`` (e.g. ``expert_slots=16``); empty when the size says it all."""
    # A swept null is a setting too: it means "the default" of that field.
    text = d.map(lambda v: "default" if v is None or (isinstance(v, float) and v != v) else str(v))
    swept = [c for c in d.columns if ("." in c or "[" in c) and text[c].nunique() > 1]
    sizes = text[size].agg("/".join, axis=1)
    extra = [c for c in swept if text.groupby(sizes)[c].nunique().max() > 1]
    if not extra:
        return pd.Series("", index=d.index)
    return text[extra].apply(lambda r: ", ".join(f"{c.split('.')[-1]}={v}" for c, v in r.items()), axis=1)


def _domains(d: pd.DataFrame) -> pd.Series:
    """Each row's served domain (``mixed`` for tables from before ``serving.domain``)."""
    return d["domain"].astype(str) if "domain" in d.columns else pd.Series("mixed", index=d.index)


def _inference_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series, pd.Series, pd.Series, pd.Series]:
    """An inference sweep's good rows with their served ``domain`` and ``setting`` label
    added, their p50 and p95 latency, each row's policy name and point."""
    d = _ok(df).copy()
    p50, p95 = latency_column(d, "p50"), latency_column(d, "p95")
    d["domain"] = _domains(d)
    d["setting"] = _setting_labels(d.drop(columns=[c for c in d.columns if c.endswith(".domain")]), ["gpus", "experts"])
    name = d["policy_name"] if "policy_name" in d.columns else d["policy"]
    points = d["point"] if "point" in d.columns else pd.Series(0, index=d.index)
    return d, p50, p95, name, points


def inference_latency(df: pd.DataFrame, path: str | Path, reference: str = "ideal") -> pd.DataFrame:
    """p50 and p95 latency per placement policy normalised to ``reference`` (ideal) of the
    same point and served domain; one panel per cluster size and other swept setting
    (rows) and domain (columns), with the batches' skew in the panel title."""
    d, p50, p95, name, points = _inference_rows(df)
    rows = []
    for _, g in d.groupby([points, d["domain"]], sort=False):
        ref = g[name.loc[g.index] == reference]
        if ref.empty:
            continue
        for r in g.itertuples():
            rows.append(
                {
                    "gpus": r.gpus,
                    "experts": r.experts,
                    "setting": r.setting,
                    "domain": r.domain,
                    "skew": getattr(r, "batch_skew_mean", float("nan")),
                    "policy": r.policy,
                    "p50_ms": getattr(r, p50) * 1e3,
                    "p95_ms": getattr(r, p95) * 1e3,
                    "p50_vs_ideal": getattr(r, p50) / ref[p50].iloc[0],
                    "p95_vs_ideal": getattr(r, p95) / ref[p95].iloc[0],
                }
            )
    t = pd.DataFrame(rows)
    panels = list(dict.fromkeys(zip(t["gpus"], t["experts"], t["setting"])))
    domains = list(dict.fromkeys(t["domain"]))
    width = max(4.5, 0.55 * t["policy"].nunique() + 1)
    fig, axes = plt.subplots(
        len(panels), len(domains), figsize=(width * len(domains), 3.3 * len(panels)), squeeze=False, sharey=True
    )
    for i, (gpus, experts, setting) in enumerate(panels):
        for j, domain in enumerate(domains):
            ax = axes[i][j]
            g = t[(t["gpus"] == gpus) & (t["experts"] == experts) & (t["setting"] == setting) & (t["domain"] == domain)]
            if g.empty:
                ax.set_visible(False)
                continue
            x = np.arange(len(g))
            ax.bar(x - 0.2, g["p50_vs_ideal"], 0.4, label="p50")
            ax.bar(x + 0.2, g["p95_vs_ideal"], 0.4, label="p95")
            ax.set_xticks(x, g["policy"], rotation=35, ha="right", fontsize=7)
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            title = f"{gpus} GPUs, {experts} experts, {domain} (skew {g['skew'].iloc[0]:.2f})"
            ax.set_title(title + (f"; {setting}" if setting else ""), fontsize=8)
        axes[i][0].set_ylabel(f"latency / {reference}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    drop = [c for c in ("setting", "domain") if not (t[c].astype(bool).any() and t[c].nunique() > 1)]
    return t.drop(columns=drop)


def domain_ratios(df: pd.DataFrame, path: str | Path, baseline: str = "static") -> pd.DataFrame:
    """p50 and p95 latency of each policy over ``baseline``'s (static) per served domain,
    with the skew of the domain's batches (busiest expert's tokens over the uniform
    share, mean over batches and layers; ``baseline``'s batches). The table covers every
    point; the figure the largest cluster, one row of panels (p50, p95) per other setting."""
    d, p50, p95, name, points = _inference_rows(df)
    rows = []
    for _, g in d.groupby([points, d["domain"]], sort=False):
        base = g[name.loc[g.index] == baseline]
        if base.empty:
            continue
        b = base.iloc[0]
        row = {
            "gpus": b["gpus"],
            "experts": b["experts"],
            "setting": b["setting"],
            "domain": b["domain"],
            "skew": b.get("batch_skew_mean", float("nan")),
        }
        for r in g.itertuples():
            if r.policy == b["policy"]:
                continue
            row[f"{r.policy} p50"] = getattr(r, p50) / b[p50]
            row[f"{r.policy} p95"] = getattr(r, p95) / b[p95]
        rows.append(row)
    t = pd.DataFrame(rows)
    big = t[t["gpus"] == t["gpus"].max()]
    settings = list(dict.fromkeys(big["setting"]))
    policies = [c[: -len(" p50")] for c in t.columns if c.endswith(" p50")]
    fig, axes = plt.subplots(len(settings), 2, figsize=(4 + 1.1 * len(big["domain"].unique()) * 2, 3.2 * len(settings)))
    axes = np.atleast_2d(axes)
    w = 0.8 / max(1, len(policies))
    for i, setting in enumerate(settings):
        g = big[big["setting"] == setting]
        labels = [f"{dom}\nskew {sk:.2f}" for dom, sk in zip(g["domain"], g["skew"])]
        for j, q in enumerate(("p50", "p95")):
            ax = axes[i][j]
            for k, pol in enumerate(policies):
                x = np.arange(len(g)) + (k - (len(policies) - 1) / 2) * w
                ax.bar(x, g[f"{pol} {q}"], w, label=pol)
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_xticks(np.arange(len(g)), labels, fontsize=7)
            ax.set_ylabel(f"{q} latency / {baseline}")
            ax.set_title(f"{q}, {int(g['gpus'].iloc[0])} GPUs" + (f"; {setting}" if setting else ""), fontsize=9)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
    return t if t["setting"].astype(bool).any() else t.drop(columns="setting")


def path_length(df: pd.DataFrame, path: str | Path, length_col: str, reference: str = "ideal") -> pd.DataFrame:
    """Lina's p95 latency (ms) against the estimator's path length; ``reference`` dashed."""
    d = _ok(df)
    p95 = latency_column(d, "p95")
    name = d["policy_name"] if "policy_name" in d.columns else d["policy"]
    lina = d[name == "lina"].groupby(length_col, sort=True)[p95].mean() * 1e3
    t = pd.DataFrame({"path_length": lina.index, "lina_p95_ms": lina.to_numpy()})
    ref = d[name == reference]
    if len(ref):
        t[f"{reference}_p95_ms"] = ref[p95].mean() * 1e3
        t[f"lina_p95_vs_{reference}"] = t["lina_p95_ms"] / t[f"{reference}_p95_ms"]
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.plot(t["path_length"], t["lina_p95_ms"], marker="o", label="lina")
    if len(ref):
        ax.axhline(t[f"{reference}_p95_ms"].iloc[0], color="grey", ls="--", lw=1, label=reference)
    ax.set_xticks(t["path_length"])
    ax.set_xlabel("path length (layers)")
    ax.set_ylabel("p95 latency (ms)")
    ax.set_title("Lina's p95 against path length")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return t


def estimation_accuracy(acc: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Per layer: share of batches whose estimated top-2k expert set equals the actual
    one, one line per path length (``acc``: layer, path_length, exact, overlap)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for m, g in acc.groupby("path_length", sort=True):
        ax.plot(g["layer"], g["exact"], marker=".", label=f"path length {m}" if m else "popularity only")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("estimate = actual top-2k set")
    ax.set_title("estimation accuracy per layer")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    t = acc.pivot_table(index="layer", columns="path_length", values=["exact", "overlap"])
    t.columns = [f"{what} (path {m})" for what, m in t.columns]
    return t.reset_index()
