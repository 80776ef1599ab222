"""Lung segmentation, lung-volume curve and dominant breathing period (x2gaussian.md §12, "tidal").

Recipe (the paper's lung-volume figure; not in the reference code). Unit-free: every threshold comes from the
volume's own histogram and is carried along by any increasing affine change of units, so the same code serves
normalised mu, mu per mm or per cm, or HU (tests/test_lung_segmentation.py checks the masks do not change).
  * air/tissue threshold: Otsu's split of the whole volume's histogram (256 bins over its 0.1 %..99.9 % quantile
    range) separates air from tissue + bone; the threshold is the midpoint of the air peak and the soft-tissue
    peak on either side of it (`air_tissue_threshold`).
  * body mask: the voxels not reachable through air from the in-plane border of their axial (z) slice, then the
    largest 3D connected component of those (`body_mask`). The fill is per axial slice on purpose: the trachea
    may leave the reconstruction box through its top face, and a 3D flood fill would then leak through it into
    the lungs. The largest component drops a couch or streak fragments outside the body.
  * lung/tissue threshold: the midpoint of the lung peak and the soft-tissue peak of the histogram of the
    voxels inside the body (`lung_tissue_threshold`).
  * lungs (+ airways) = the air voxels inside the body eroded by `erode_voxels` voxels (the erosion drops the
    partial-volume rim of the skin, which is dark too), restricted to the connected components holding at
    least MIN_COMPONENT_FRACTION of the largest one (noise specks and small gas pockets go).
  * manual override: `lung_threshold=<number>` uses that threshold for the body and the lungs (the old recipe,
    which used 0.285 for the embedded phantom's normalised units).
  * volume (mL) = voxel count * prod(dVoxel in mm) / 1000.
  * dominant period: the peak of the (Hann-windowed, mean-removed) periodogram of V(t), located on a
    coarse FFT grid and refined on a fine frequency grid around it (sub-bin accuracy).

Volumes are indexed [x, y, z] (z = rotation axis = superior). Everything here is jit/vmap friendly except
`dominant_period` and `cycle_swing` (host numpy, float64); the dense primitives are in `x2gs_jax.segment`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax import segment as seg
from x2gs_jax.segment import erode

ERODE_VOXELS = 2  # the skin's partial-volume rim (voxels, so independent of the density scale)
# An air component inside the body is kept (lung or airway) when it has at least this share of the largest one.
# Measured at 48^3 on the two test anatomies: the airways are 2.5 % (embedded phantom) and 1.4 % (tests/
# lung_cases.py) of the larger lung, its abdominal gas pockets 0.27 %, partial-volume / noise specks 1-2 voxels
# (< 0.1 %). A share, not a voxel count, so the rule does not change with the grid or the voxel size.
MIN_COMPONENT_FRACTION = 0.005


def _bin_centre(lo, hi, k):
    return lo + (k.astype(jnp.float32) + 0.5) * (hi - lo) / seg.HIST_BINS


def air_tissue_threshold(volume: jax.Array, frame=None) -> jax.Array:
    """float32 scalar: the body (air/tissue) threshold of one volume, from its own histogram.

    Otsu's split of the whole volume's histogram (over its robust range) separates air (outside + lungs) from
    tissue + bone; the threshold is the midpoint of the two smoothed histogram peaks on either side of the split
    (the air peak and the soft-tissue peak). The midpoint, not Otsu's split itself: with two separated modes
    Otsu's criterion is flat over the empty gap between them and its argmax can sit next to either mode.
    frame: the histogram range (lo, hi) if already known (default `segment.robust_range(volume)`).
    """
    lo, hi = seg.robust_range(volume) if frame is None else frame
    h = seg.histogram(volume, lo, hi, seg.HIST_BINS)
    air, tissue = seg.mode_bins(h, seg.otsu_bin(h))
    return 0.5 * (_bin_centre(lo, hi, air) + _bin_centre(lo, hi, tissue))


def lung_tissue_threshold(volume: jax.Array, body: jax.Array, split, frame=None) -> jax.Array:
    """float32 scalar: the midpoint of the lung peak (at or below `split`) and the soft-tissue peak (above it) of
    the histogram of the voxels inside `body` [nx, ny, nz]. At the midpoint a voxel half lung and half tissue is
    split evenly, so partial-volume voxels do not bias the lung volume. frame: as in `air_tissue_threshold`."""
    lo, hi = seg.robust_range(volume) if frame is None else frame
    width = (hi - lo) / seg.HIST_BINS
    hb = seg.histogram(volume, lo, hi, seg.HIST_BINS, weights=body)
    split_bin = jnp.clip(jnp.floor((split - lo) / width), 0, seg.HIST_BINS - 2).astype(jnp.int32)
    lung, tissue = seg.mode_bins(hb, split_bin)
    return 0.5 * (_bin_centre(lo, hi, lung) + _bin_centre(lo, hi, tissue))


def body_mask(volume: jax.Array, air_threshold=None) -> jax.Array:
    """bool [nx, ny, nz]: the body = the largest 3D component of the voxels not reachable from the x/y border of
    their axial slice through air (mu < air_threshold; default `air_tissue_threshold(volume)`).

    The per-slice fill closes the body over its internal air; keeping the largest component drops what lies
    outside it apart (a couch, a hollow holder, streak fragments), with any air those enclose.
    """
    t = air_tissue_threshold(volume) if air_threshold is None else air_threshold
    return seg.largest_component(~seg.inplane_border_fill(volume < t))


def segment_lungs(volume: jax.Array, lung_threshold=None, erode_voxels: int = ERODE_VOXELS,
                  min_component_fraction=MIN_COMPONENT_FRACTION):
    """(lungs, body, threshold) of one volume: bool [nx, ny, nz] lungs + airways, bool [nx, ny, nz] body, and the
    float32 air threshold used for the lungs (in the volume's units).

    Args:
      volume: [nx, ny, nz] attenuation, any units (mu per mm, per cm, normalised, HU...); air must be darker than
        soft tissue.
      lung_threshold: None or NaN (default): per-volume thresholds, the body from `air_tissue_threshold`, the lungs
        from `lung_tissue_threshold` inside that body. A number: that threshold for both (the old manual recipe;
        the largest-component and component-size rules still apply). May be a traced scalar.
      erode_voxels: erosion of the body mask before taking the air inside it (static int; drops the skin's dark
        partial-volume rim).
      min_component_fraction: keep air components with at least this share of the largest one (0 keeps every
        air voxel inside the eroded body). May be traced.
    Auto and manual share one program (the choice is a select on the thresholds), so switching between them, or
    changing either number, does not recompile.
    """
    manual = jnp.asarray(jnp.nan if lung_threshold is None else lung_threshold, jnp.float32)
    is_manual = ~jnp.isnan(manual)
    frame = seg.robust_range(volume)
    t_body = jnp.where(is_manual, manual, air_tissue_threshold(volume, frame))
    body = body_mask(volume, t_body)
    t_lung = jnp.where(is_manual, manual, lung_tissue_threshold(volume, body, t_body, frame))
    air = (volume < t_lung) & seg.erode(body, erode_voxels)
    return seg.large_components(air, min_component_fraction), body, t_lung


def lung_mask(volume: jax.Array, lung_threshold=None, erode_voxels: int = ERODE_VOXELS,
              min_component_fraction=MIN_COMPONENT_FRACTION) -> jax.Array:
    """bool [nx, ny, nz]: lungs + airways of `segment_lungs`."""
    return segment_lungs(volume, lung_threshold, erode_voxels, min_component_fraction)[0]


def lung_measure(volume: jax.Array, voxel_mm, lung_threshold=None, erode_voxels: int = ERODE_VOXELS,
                 min_component_fraction=MIN_COMPONENT_FRACTION):
    """(lung + airway volume in mL, threshold used) of one [nx, ny, nz] volume; voxel_mm = (dx, dy, dz) in mm."""
    voxel_ml = float(np.prod(np.asarray(voxel_mm, np.float64))) / 1000.0
    lungs, _, t = segment_lungs(volume, lung_threshold, erode_voxels, min_component_fraction)
    return jnp.sum(lungs, dtype=jnp.int32).astype(jnp.float32) * jnp.float32(voxel_ml), t


def lung_volume_ml(volume: jax.Array, voxel_mm, lung_threshold=None, erode_voxels: int = ERODE_VOXELS,
                   min_component_fraction=MIN_COMPONENT_FRACTION) -> jax.Array:
    """Lung (+ airway) volume in mL (float32 scalar) of one [nx, ny, nz] volume (see `segment_lungs`)."""
    return lung_measure(volume, voxel_mm, lung_threshold, erode_voxels, min_component_fraction)[0]


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


def cycle_swing(t_s, values, period_s) -> float:
    """Median peak-to-peak of `values` over the consecutive whole windows of length `period_s` (the tidal swing per
    breathing cycle, robust to one deep breath); the whole record's peak-to-peak when no whole window fits or the
    period is unknown (None / non-positive).

    Any window one period long holds one full cycle of a periodic signal, so its max - min is the cycle's swing
    wherever the window starts. Args: t_s [n] uniform times (s), values [n], period_s (s). Returns the swing in
    the units of `values`.
    """
    t = np.asarray(t_s, np.float64).reshape(-1)
    x = np.asarray(values, np.float64).reshape(-1)
    if t.shape != x.shape or t.size == 0:
        raise ValueError(f"cycle_swing: need matching non-empty samples, got t {t.shape}, values {x.shape}")
    if period_s is None or not period_s > 0 or t.size < 2:
        return float(np.ptp(x))
    dt = (t[-1] - t[0]) / (t.size - 1)
    per = int(round(float(period_s) / dt))  # samples per window
    n_win = t.size // per if per >= 2 else 0
    if n_win < 1:
        return float(np.ptp(x))
    return float(np.median(np.ptp(x[: n_win * per].reshape(n_win, per), axis=1)))


def curve_agreement(pred_ml, gt_ml) -> dict:
    """Pearson correlation and tidal-amplitude (max - min) agreement of two curves on the same times."""
    p = np.asarray(pred_ml, np.float64)
    g = np.asarray(gt_ml, np.float64)
    corr = float(np.corrcoef(p, g)[0, 1]) if np.std(p) > 0 and np.std(g) > 0 else float("nan")
    amp_p, amp_g = float(np.ptp(p)), float(np.ptp(g))
    return {"tidal_corr": corr, "tidal_amplitude_ml": amp_p, "tidal_amplitude_gt_ml": amp_g,
            "tidal_amplitude_rel_error": abs(amp_p - amp_g) / amp_g if amp_g > 0 else float("nan"),
            "tidal_mean_ml": float(np.mean(p)), "tidal_mean_gt_ml": float(np.mean(g))}


def curve_title(curve: dict) -> str:
    """The tidal figure's title, two lines: dominant period, swing per cycle and mean volume; the threshold used.
    `curve`: the dict of `eval_lib.tidal_curve` (tidal_period_s, tidal_swing_ml, tidal_mean_ml, lung_threshold*)."""
    p = curve.get("tidal_period_s")
    if curve.get("lung_threshold_mode") == "auto":
        thr = f"air threshold: auto, {curve['lung_threshold_used_median']:.4g} (median over the times)"
    else:
        thr = f"air threshold: {curve.get('lung_threshold'):.4g} (manual)"
    return (f"dominant period {'-' if p is None else f'{p:.3f} s'}, tidal swing {curve['tidal_swing_ml']:.0f} mL "
            f"(median per-cycle peak-to-peak), mean {curve['tidal_mean_ml']:.0f} mL\n{thr}")


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


__all__ = ["ERODE_VOXELS", "MIN_COMPONENT_FRACTION", "air_tissue_threshold", "lung_tissue_threshold", "body_mask",
           "erode", "segment_lungs", "lung_mask", "lung_measure", "lung_volume_ml", "dominant_period",
           "cycle_swing", "curve_agreement", "curve_title", "phantom_breathing_from_meta", "phantom_gt_curve_ml"]
