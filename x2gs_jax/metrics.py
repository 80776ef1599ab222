"""Evaluation metrics of R2-/X2-Gaussian (gaussians.md §7, x2gaussian.md §12).

Ground truth comes first in every signature (reference `metric_vol` / `metric_proj`). The jnp
functions are jit-compiled (window/sigma static) and vectorised over slices/projections; the
`*_host` wrappers return Python floats/lists for logging.

Conventions kept from the reference:
  * PSNR peak is fixed at 1 (volumes are assumed in [0, 1]); no clipping of the prediction.
  * 3-D SSIM skips slices whose GT maximum is <= 0; each axis average counts only the kept slices.
  * 2-D metrics divide the GT and the rendering each by ITS OWN maximum; projections with GT max <= 0
    are not counted. A rendering whose maximum is 0 gives NaN for that projection (0/0), as the
    reference does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from x2gs_jax.losses import ssim_per_image


def psnr(gt: jax.Array, pred: jax.Array) -> jax.Array:
    """10 log10(1 / mean((gt - pred)^2)) over all elements (peak 1, no clipping). Scalar, dB."""
    gt, pred = _pair(gt, pred, "psnr", None)
    return _psnr_from_mse(jnp.mean((gt - pred) ** 2))


@jax.jit
def psnr_3d(gt: jax.Array, pred: jax.Array) -> jax.Array:
    """PSNR of a predicted volume [nx, ny, nz] vs. the GT volume (peak 1). Scalar, dB."""
    gt, pred = _pair(gt, pred, "psnr_3d", 3)
    return psnr(gt, pred)


def _masked_slice_mean(gt_slices: jax.Array, pred_slices: jax.Array, window: int, sigma: float):
    """Mean SSIM over slices [S, H, W] whose GT max > 0, and the number of such slices."""
    values = ssim_per_image(gt_slices, pred_slices, window, sigma)
    keep = jnp.max(gt_slices, axis=(-2, -1)) > 0
    count = jnp.sum(keep)
    return jnp.sum(jnp.where(keep, values, 0.0)) / count, count


@functools.partial(jax.jit, static_argnames=("window", "sigma"))
def ssim_3d_with_counts(gt: jax.Array, pred: jax.Array, window: int = 11, sigma: float = 1.5):
    """`ssim_3d` plus the number of slices counted per axis ([3] int32).

    Returns (mean, (ssim_x, ssim_y, ssim_z), counts). An axis with no non-empty GT slice is NaN.
    """
    gt, pred = _pair(gt, pred, "ssim_3d", 3)
    per_axis, counts = [], []
    for axis in range(3):
        # Slices orthogonal to `axis`, batched: [n_axis, the other two axes in order].
        value, count = _masked_slice_mean(jnp.moveaxis(gt, axis, 0), jnp.moveaxis(pred, axis, 0), window, sigma)
        per_axis.append(value)
        counts.append(count)
    mean = (per_axis[0] + per_axis[1] + per_axis[2]) / 3.0
    return mean, tuple(per_axis), jnp.stack(counts).astype(jnp.int32)


def ssim_3d(gt: jax.Array, pred: jax.Array, window: int = 11, sigma: float = 1.5):
    """3-D SSIM of volumes [nx, ny, nz]: (mean of the 3 axis averages, (ssim_x, ssim_y, ssim_z)).

    For each axis every slice orthogonal to it whose GT max > 0 gets the 2-D SSIM of
    `losses.ssim` on raw slices; the axis value is the average over those slices only.
    """
    mean, per_axis, _ = ssim_3d_with_counts(gt, pred, window=window, sigma=sigma)
    return mean, per_axis


@functools.partial(jax.jit, static_argnames=("window", "sigma"))
def metrics_2d(gt: jax.Array, pred: jax.Array, window: int = 11, sigma: float = 1.5) -> dict:
    """Projection metrics of renderings [n, H, W] vs. measured projections [n, H, W].

    Each projection with max(gt) > 0 is normalised by its own max (gt and pred separately), then
    PSNR (peak 1) and SSIM are taken; averages run over the counted projections.

    Returns dict:
      psnr_2d, ssim_2d: scalars (NaN if no projection counts);
      psnr_2d_projs, ssim_2d_projs: [n] per-projection values, NaN for projections not counted;
      n_counted_2d: int32 scalar.
    """
    gt, pred = _pair(gt, pred, "metrics_2d", 3)
    gmax = jnp.max(gt, axis=(1, 2))
    keep = gmax > 0
    # Guard the division for skipped projections only; their values are masked out below.
    gt_n = gt / jnp.where(keep, gmax, 1.0)[:, None, None]
    pred_n = pred / jnp.max(pred, axis=(1, 2))[:, None, None]
    psnr_each = _psnr_from_mse(jnp.mean((gt_n - pred_n) ** 2, axis=(1, 2)))
    ssim_each = ssim_per_image(gt_n, pred_n, window, sigma)
    count = jnp.sum(keep)

    def avg(x):
        return jnp.sum(jnp.where(keep, x, 0.0)) / count

    nan = jnp.float32(jnp.nan)
    return {
        "psnr_2d": avg(psnr_each),
        "ssim_2d": avg(ssim_each),
        "psnr_2d_projs": jnp.where(keep, psnr_each, nan),
        "ssim_2d_projs": jnp.where(keep, ssim_each, nan),
        "n_counted_2d": count.astype(jnp.int32),
    }


# ----------------------------------------------------------------------------------------- host
def volume_metrics_host(gt, pred) -> dict:
    """{psnr_3d, ssim_3d, ssim_3d_x, ssim_3d_y, ssim_3d_z} as Python floats."""
    mean, (sx, sy, sz) = ssim_3d(gt, pred)
    return {
        "psnr_3d": float(psnr_3d(gt, pred)),
        "ssim_3d": float(mean),
        "ssim_3d_x": float(sx),
        "ssim_3d_y": float(sy),
        "ssim_3d_z": float(sz),
    }


def metrics_2d_host(gt, pred) -> dict:
    """metrics_2d with Python floats (averages) and lists of floats (per projection, NaN = not counted)."""
    out = jax.device_get(metrics_2d(gt, pred))
    return {
        "psnr_2d": float(out["psnr_2d"]),
        "ssim_2d": float(out["ssim_2d"]),
        "psnr_2d_projs": [float(v) for v in out["psnr_2d_projs"]],
        "ssim_2d_projs": [float(v) for v in out["ssim_2d_projs"]],
        "n_counted_2d": int(out["n_counted_2d"]),
    }


# ----------------------------------------------------------------------------------------- helpers
def _psnr_from_mse(mse: jax.Array) -> jax.Array:
    return 10.0 * jnp.log10(1.0 / mse)


def _pair(gt, pred, name: str, ndim):
    gt = jnp.asarray(gt, jnp.float32)
    pred = jnp.asarray(pred, jnp.float32)
    if gt.shape != pred.shape:
        raise ValueError(f"{name}: gt shape {gt.shape} != pred shape {pred.shape}")
    if ndim is not None and gt.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-D arrays, got shape {gt.shape}")
    return gt, pred
