"""What `eval.py` writes and prints besides volumes and pictures: tidal.csv, the JSON-safe metrics, the summary table."""
from __future__ import annotations

import math

import numpy as np

from x2gs_jax.fileio import atomic_write_bytes


def write_tidal_csv(path: str, t_s, ml, gt_ml=None) -> None:
    cols = ["t_s", "lung_volume_ml"] + (["gt_lung_volume_ml"] if gt_ml is not None else [])
    rows = zip(t_s, ml, gt_ml) if gt_ml is not None else zip(t_s, ml)
    text = ",".join(cols) + "\n" + "".join(",".join(f"{float(x):.6g}" for x in r) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode())


def clean_json(v):
    """JSON-safe: numpy -> python, non-finite -> None."""
    if isinstance(v, dict):
        return {k: clean_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [clean_json(x) for x in np.asarray(v).tolist()] if isinstance(v, np.ndarray) else [clean_json(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def format_table(m: dict) -> str:
    def f(key, fmt="{:.3f}"):
        v = m.get(key)
        return "-" if v is None else fmt.format(v)
    lines = [f"{'':24s}{'PSNR3D':>10s}{'SSIM3D':>10s}",
             f"{'model (' + m['source'] + ')':24s}{f('psnr_3d_mean', '{:.2f}'):>10s}{f('ssim_3d_mean'):>10s}"]
    if "fdk_psnr_3d_mean" in m:
        lines.append(f"{'FDK (static)':24s}{f('fdk_psnr_3d_mean', '{:.2f}'):>10s}{f('fdk_ssim_3d_mean'):>10s}")
    if "fdk4d_psnr_3d_mean" in m:
        lines.append(f"{'4D-FDK (phase-binned)':24s}{f('fdk4d_psnr_3d_mean', '{:.2f}'):>10s}{f('fdk4d_ssim_3d_mean'):>10s}")
    if "psnr_2d_val" in m:
        lines.append(f"2D val: PSNR {f('psnr_2d_val', '{:.2f}')}  SSIM {f('ssim_2d_val')}")
    if m.get("period_gt_s") is not None:
        lines.append("period: " + (f"learned {f('period_learned_s')} s, " if m.get("period_learned_s") else "")
                     + f"GT {f('period_gt_s')} s, "
                     + (f"mean cycle of the scan {f('period_mean_cycle_s')} s, " if "period_mean_cycle_s" in m else "")
                     + f"tidal-curve {f('tidal_period_s')} s")
    for c, pv, sv in zip(m.get("cycles", ()), m.get("psnr_3d_by_cycle", ()), m.get("ssim_3d_by_cycle", ())):
        lines.append(f"{'model, cycle ' + str(c):24s}{pv:>10.2f}{sv:>10.3f}")
    if m.get("tidal_swing_ml") is not None:
        thr = (f"auto (median {f('lung_threshold_used_median', '{:.4g}')})" if m.get("lung_threshold_mode") == "auto"
               else f('lung_threshold', '{:.4g}'))
        lines.append(f"tidal curve: period {f('tidal_period_s')} s, swing {f('tidal_swing_ml', '{:.1f}')} mL per "
                     f"cycle, mean {f('tidal_mean_ml', '{:.1f}')} mL, air threshold {thr}")
    if "tidal_corr" in m:
        lines.append(f"tidal curve vs phantom: corr {f('tidal_corr')}, amplitude {f('tidal_amplitude_ml', '{:.1f}')} "
                     f"mL vs {f('tidal_amplitude_gt_ml', '{:.1f}')} mL")
    return "\n".join(lines)


__all__ = ["write_tidal_csv", "clean_json", "format_table"]
