"""Lung segmentation, lung-volume curve and dominant breathing period (x2gaussian.md §12, "tidal").

Recipe (the paper's lung-volume figure; not in the reference code):
  * body mask: everything that is not air connected to the in-plane border of its axial (z) slice.
    The fill is per axial slice on purpose: the trachea may leave the reconstruction box through its
    top face, and a 3D flood fill would then leak through it into the lungs.
  * lungs (+ airways) = voxels with mu < lung_threshold inside the body mask eroded by `erode_voxels`
    voxels (the erosion drops the partial-volume rim of the skin, which is dark too).
  * volume (mL) = voxel count * prod(dVoxel in mm) / 1000.
  * dominant period: the peak of the (Hann-windowed, mean-removed) periodogram of V(t), located on a
    coarse FFT grid and refined on a fine frequency grid around it (sub-bin accuracy).

Volumes are indexed [x, y, z] (z = rotation axis = superior), values in the GT's normalised units.
Everything here is jit/vmap friendly except `dominant_period` (host numpy, float64).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

LUNG_THRESHOLD = 0.285  # between lung parenchyma (~0.07) and soft tissue (~0.5) of the normalised GT
ERODE_VOXELS = 2


def _shift(mask: jax.Array, axis: int, step: int, fill: bool) -> jax.Array:
    """mask shifted by `step` voxels along `axis`, the vacated layer set to `fill`."""
    n = mask.shape[axis]
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (1, 0) if step > 0 else (0, 1)
    padded = jnp.pad(mask, pad, constant_values=fill)
    start = 0 if step > 0 else 1
    return jax.lax.slice_in_dim(padded, start, start + n, axis=axis)


def body_mask(volume: jax.Array, air_threshold: float = LUNG_THRESHOLD) -> jax.Array:
    """bool [nx, ny, nz]: voxels not reachable from the x/y border of their axial slice through air.

    Args:
      volume: [nx, ny, nz] attenuation (normalised units).
      air_threshold: voxels with mu < air_threshold are air.
    """
    air = volume < air_threshold
    border = jnp.zeros(air.shape, bool)
    border = border.at[0].set(True).at[-1].set(True).at[:, 0].set(True).at[:, -1].set(True)
    outside0 = air & border

    def grow(state):
        outside, _ = state
        grown = outside
        for axis in (0, 1):  # in-plane 4-connectivity only (see module docstring)
            for step in (1, -1):
                grown = grown | _shift(outside, axis, step, False)
        grown = grown & air
        return grown, jnp.any(grown != outside)

    outside, _ = jax.lax.while_loop(lambda s: s[1], grow, (outside0, jnp.array(True)))
    return ~outside


def erode(mask: jax.Array, voxels: int) -> jax.Array:
    """3D erosion of a bool mask by `voxels` steps of the 6-neighbourhood (outside the array = False)."""
    for _ in range(int(voxels)):
        out = mask
        for axis in range(3):
            for step in (1, -1):
                out = out & _shift(mask, axis, step, False)
        mask = out
    return mask


def lung_mask(volume: jax.Array, lung_threshold: float = LUNG_THRESHOLD, erode_voxels: int = ERODE_VOXELS,
              body: Optional[jax.Array] = None) -> jax.Array:
    """bool [nx, ny, nz]: lungs + airways = mu < lung_threshold inside the eroded body mask.

    body: an explicit body mask (e.g. the phantom's); default `body_mask(volume, lung_threshold)`.
    """
    if body is None:
        body = body_mask(volume, lung_threshold)
    return (volume < lung_threshold) & erode(body, erode_voxels)


def lung_volume_ml(volume: jax.Array, voxel_mm, lung_threshold: float = LUNG_THRESHOLD,
                   erode_voxels: int = ERODE_VOXELS) -> jax.Array:
    """Lung (+ airway) volume in mL of one [nx, ny, nz] volume; voxel_mm = (dx, dy, dz) in mm."""
    voxel_ml = float(np.prod(np.asarray(voxel_mm, np.float64))) / 1000.0
    count = jnp.sum(lung_mask(volume, lung_threshold, erode_voxels), dtype=jnp.int32)
    return count.astype(jnp.float32) * jnp.float32(voxel_ml)


def dominant_period(t_s, values, min_period_s: float = 0.5, max_period_s: Optional[float] = None,
                    refine: int = 2001) -> float:
    """Dominant period (s) of a uniformly sampled signal by the periodogram peak.

    Args:
      t_s: [n] sample times in seconds (uniform spacing).
      values: [n] samples.
      min_period_s, max_period_s: band searched (default max: half the record length, so that at least
        two cycles are seen).
      refine: frequencies evaluated on the fine grid of +-1 coarse bin around the coarse peak.
    Raises:
      ValueError on fewer than 8 samples, non-uniform or non-finite input, or an empty band.
    """
    t = np.asarray(t_s, np.float64).reshape(-1)
    x = np.asarray(values, np.float64).reshape(-1)
    if t.shape != x.shape or t.size < 8:
        raise ValueError(f"dominant_period: need >= 8 matching samples, got t {t.shape}, values {x.shape}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(x))):
        raise ValueError("dominant_period: non-finite times or values")
    dt = np.diff(t)
    if np.any(dt <= 0) or np.ptp(dt) > 1e-6 * np.mean(dt) + 1e-12:
        raise ValueError("dominant_period: times must be increasing and uniformly spaced")
    dt = float(np.mean(dt))
    n = t.size
    record = n * dt
    max_period_s = record / 2 if max_period_s is None else float(max_period_s)
    f_lo, f_hi = 1.0 / max_period_s, min(1.0 / min_period_s, 0.5 / dt)
    if not f_lo < f_hi:
        raise ValueError(f"dominant_period: empty band [{min_period_s}, {max_period_s}] s for dt={dt} s")
    w = np.hanning(n)
    xw = (x - np.mean(x)) * w  # the window tames leakage when the record is not a whole number of cycles
    # Coarse: a 8x zero-padded FFT. Fine: the DTFT evaluated directly around the coarse peak.
    m = 8 * n
    spec = np.abs(np.fft.rfft(xw, m)) ** 2
    freqs = np.fft.rfftfreq(m, dt)
    band = (freqs >= f_lo) & (freqs <= f_hi)
    if not np.any(band):
        raise ValueError("dominant_period: no FFT bin inside the band")
    k = np.flatnonzero(band)[np.argmax(spec[band])]
    df = freqs[1] - freqs[0]
    fine = np.linspace(max(freqs[k] - df, f_lo), min(freqs[k] + df, f_hi), int(refine))
    tt = np.arange(n) * dt
    power = np.abs(np.exp(-2j * np.pi * fine[:, None] * tt[None, :]) @ xw) ** 2
    return float(1.0 / fine[np.argmax(power)])


def curve_agreement(pred_ml, gt_ml) -> dict:
    """Pearson correlation and tidal-amplitude (max - min) agreement of two curves on the same times."""
    p = np.asarray(pred_ml, np.float64)
    g = np.asarray(gt_ml, np.float64)
    corr = float(np.corrcoef(p, g)[0, 1]) if np.std(p) > 0 and np.std(g) > 0 else float("nan")
    amp_p, amp_g = float(np.ptp(p)), float(np.ptp(g))
    return {"tidal_corr": corr, "tidal_amplitude_ml": amp_p, "tidal_amplitude_gt_ml": amp_g,
            "tidal_amplitude_rel_error": abs(amp_p - amp_g) / amp_g if amp_g > 0 else float("nan"),
            "tidal_mean_ml": float(np.mean(p)), "tidal_mean_gt_ml": float(np.mean(g))}


def phantom_breathing_from_meta(meta: dict):
    """The `BreathingSignal` of a case made by x2gs_jax.data.generate (from meta["generator"]), else None."""
    gen = meta.get("generator") if isinstance(meta, dict) else None
    if not isinstance(gen, dict) or "ThoraxPhantom" not in str(gen.get("name", "")):
        return None
    from x2gs_jax.data.breathing import BreathingSignal

    kind = str(gen.get("breathing_kind", "regular"))
    kw = dict(period_s=float(gen["period_s"]), kind=kind, seed=int(gen.get("seed", 0)),
              scan_s=float(gen.get("scan_s", 60.0)))
    if kind == "irregular":  # the generator records the jitters it used
        kw.update(period_jitter=float(gen["period_jitter"]), amplitude_jitter=float(gen["amplitude_jitter"]))
    return BreathingSignal(**kw)


def phantom_gt_curve_ml(breathing, times, scanner) -> np.ndarray:
    """Exact lungs + airways volume (mL) of the default phantom at normalised times [n] (what the
    threshold segmentation measures)."""
    from x2gs_jax.data.phantom import ThoraxPhantom

    ph = ThoraxPhantom.default(breathing)
    air = ph.airway_volume_ml(scanner)
    return np.array([ph.lung_volume_ml(float(t), scanner) + air for t in np.asarray(times).reshape(-1)])


__all__ = ["LUNG_THRESHOLD", "ERODE_VOXELS", "body_mask", "erode", "lung_mask", "lung_volume_ml", "dominant_period",
           "curve_agreement", "phantom_breathing_from_meta", "phantom_gt_curve_ml"]
