"""How well the compute model predicts real GPU kernels: the roofline with tile and wave
quantization (:mod:`lina_sim.hardware.compute`) against Vidur's measured per-op times on
A100 and H100 (``shared/data/gpu-kernels/``; ``benchmarks/bench_compute_accuracy.py``,
the README's table, ``tests/test_compute_accuracy.py``).

Each Vidur table (``<gpu>/<org>/<model>/mlp.csv``) times the ops of one LLaMA-style
decoder layer at many token counts with CUDA events, fp16, so the comparison is with
:meth:`RooflineComputeModel.device_time` (the GPU's busy time, no launch overhead):

- GEMMs: ``attn_pre_proj`` (T x d -> (heads + 2 kv heads) x head_dim, over tensor-parallel
  ranks), ``attn_post_proj``, ``mlp_up_proj`` (d -> d_ff, twice that when gated) and
  ``mlp_down_proj``;
- streaming kernels, bytes read + written: ``input_layernorm`` (T d in, T d out),
  ``mlp_act`` (gated: 2 T f in, T f out; else T f in and out) and ``add`` (2 T d in, T d
  out).

Nothing here is fitted: the presets' datasheet peaks and their assumed efficiencies are
used as shipped. Units: seconds, tokens, %.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from lina_sim.hardware.compute import RooflineComputeModel
from lina_sim.hardware.spec import load_preset

# Vidur's GPU folders -> the shipped preset describing that GPU.
PRESET_OF = {"a100": "dgx-a100", "h100": "dgx-h100"}
GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
STREAMING = ("input_layernorm", "mlp_act", "add")
# (label, fewest tokens, most tokens), both inclusive.
TOKEN_BANDS: tuple[tuple[str, int, float], ...] = (
    ("<=128", 0, 128),
    ("129-1024", 129, 1024),
    ("1025-4096", 1025, 4096),
    (">4096", 4097, float("inf")),
)
DTYPE_BYTES = 2  # fp16


def tables(root: Path) -> list[Path]:
    """Vidur's measured tables under ``root`` (``gpu-kernels/vidur``), sorted."""
    return sorted(root.glob("*/*/*/mlp.csv")) if root.is_dir() else []


def _shapes(df: pd.DataFrame) -> dict[str, tuple[np.ndarray, ...]]:
    tp = df["num_tensor_parallel_workers"].to_numpy()
    d = df["n_embd"].to_numpy(float)
    heads = df["n_head"].to_numpy()
    head_dim = d / heads
    ff = (df["n_expanded_embd"].to_numpy() // tp).astype(float)
    gated = df["use_gated_mlp"].astype(bool).to_numpy()
    qkv = (heads // tp + 2 * np.maximum(df["n_kv_head"].to_numpy() // tp, 1)) * head_dim
    t = df["num_tokens"].to_numpy(float)
    return {
        "attn_pre_proj": (t, qkv, d),
        "attn_post_proj": (t, d, d / tp),
        "mlp_up_proj": (t, ff * np.where(gated, 2, 1), d),
        "mlp_down_proj": (t, d, ff),
        "input_layernorm": (2 * t * d,),
        "mlp_act": (t * ff * np.where(gated, 3, 2),),
        "add": (3 * t * d,),
    }


def compare_table(path: Path, waves: bool = True) -> pd.DataFrame:
    """One Vidur table: per op and token count, predicted and measured seconds
    (``waves`` False: the preset without its SM count, a plain roofline, for contrast)."""
    gpu = path.parts[-4]
    cluster = load_preset(PRESET_OF[gpu])
    if not waves:
        cluster = dataclasses.replace(cluster, gpu=dataclasses.replace(cluster.gpu, sms=None))
    model = RooflineComputeModel.from_cluster(cluster, "fp16")
    df = pd.read_csv(path)
    rows = []
    for op, shape in _shapes(df).items():
        if op in GEMMS:
            m, n, k = shape
            pred = [
                model.device_time(2 * a * b * c, (a * c + c * b + a * b) * DTYPE_BYTES, (a, b, c, 1.0))
                for a, b, c in zip(m, n, k)
            ]
        else:
            pred = [model.device_time(0.0, e * DTYPE_BYTES) for e in shape[0]]
        rows.append(
            pd.DataFrame(
                {
                    "gpu": gpu,
                    "model": path.parts[-2],
                    "op": op,
                    "kind": "GEMM" if op in GEMMS else "streaming",
                    "tokens": df["num_tokens"].to_numpy(),
                    "predicted_s": pred,
                    "measured_s": df[f"time_stats.{op}.median"].to_numpy() * 1e-3,
                }
            )
        )
    out = pd.concat(rows, ignore_index=True)
    out["charged_s"] = out["predicted_s"] + model.launch_s
    out["error_pct"] = (out["predicted_s"] / out["measured_s"] - 1) * 100
    out["charged_error_pct"] = (out["charged_s"] / out["measured_s"] - 1) * 100
    return out


def kernel_accuracy(root: Path, waves: bool = True) -> pd.DataFrame:
    """:func:`compare_table` for every table under ``root``."""
    found = tables(root)
    return pd.concat([compare_table(p, waves) for p in found], ignore_index=True) if found else pd.DataFrame()


def band_errors(rows: pd.DataFrame) -> pd.DataFrame:
    """Per GPU, op kind and :data:`TOKEN_BANDS` band: median |error| (%) and the signed
    median (``bias``: + the model is slow) of the kernel's busy time (``device``) and of
    what the simulator charges for it, launch overhead included (``charged``), and the
    row count."""
    out = []
    for (gpu, kind), g in rows.groupby(["gpu", "kind"], sort=True):
        for label, lo, hi in TOKEN_BANDS:
            band = g[(g["tokens"] >= lo) & (g["tokens"] <= hi)]
            if len(band):
                dev, charged = band["error_pct"], band["charged_error_pct"]
                out.append(
                    {
                        "gpu": gpu,
                        "kind": kind,
                        "tokens": label,
                        "device |error| %": float(dev.abs().median()),
                        "device bias %": float(dev.median()),
                        "charged |error| %": float(charged.abs().median()),
                        "charged bias %": float(charged.median()),
                        "rows": len(band),
                    }
                )
    return pd.DataFrame(out)
