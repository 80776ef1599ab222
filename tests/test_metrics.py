"""Evaluation metrics vs. brute-force float64 loops (slice skipping, per-projection normalisation)."""
import math

import numpy as np
import pytest

from x2gs_jax import metrics

C1, C2 = 0.01**2, 0.03**2


def ssim_np(a, b, window=11, sigma=1.5):
    """Mean SSIM of two 2-D images, float64, full 2-D window with zero padding, loop over offsets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    k = np.arange(window) - window // 2
    g = np.exp(-(k**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    p = window // 2
    h, wd = a.shape

    def filt(img):
        padded = np.zeros((h + 2 * p, wd + 2 * p))
        padded[p : p + h, p : p + wd] = img
        out = np.zeros((h, wd))
        for di in range(window):
            for dj in range(window):
                out += w[di, dj] * padded[di : di + h, dj : dj + wd]
        return out

    m1, m2 = filt(a), filt(b)
    v1, v2, cov = filt(a * a) - m1**2, filt(b * b) - m2**2, filt(a * b) - m1 * m2
    return np.mean(((2 * m1 * m2 + C1) * (2 * cov + C2)) / ((m1**2 + m2**2 + C1) * (v1 + v2 + C2)))


def ssim_3d_np(gt, pred):
    """Reference loop: per axis, per slice with GT max > 0."""
    per_axis, counts = [], []
    for axis in range(3):
        vals = []
        for i in range(gt.shape[axis]):
            g, q = np.take(gt, i, axis=axis), np.take(pred, i, axis=axis)
            if g.max() > 0:
                vals.append(ssim_np(g, q))
        per_axis.append(np.mean(vals))
        counts.append(len(vals))
    return np.mean(per_axis), per_axis, counts


def test_psnr_3d_known_mse():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 1, (6, 7, 8)).astype(np.float32)
    assert abs(float(metrics.psnr_3d(gt, gt + np.float32(0.1))) - 20.0) < 1e-4  # MSE 0.01
    assert abs(float(metrics.psnr_3d(gt, gt - np.float32(0.01))) - 40.0) < 1e-3  # no clipping
    pred = rng.uniform(-0.2, 1.3, gt.shape).astype(np.float32)
    mse = np.mean((gt.astype(np.float64) - pred) ** 2)
    assert abs(float(metrics.psnr_3d(gt, pred)) - 10 * math.log10(1 / mse)) < 1e-4
    with pytest.raises(ValueError, match="3-D"):
        metrics.psnr_3d(gt[0], pred[0])


def test_ssim_3d_skips_empty_slices():
    rng = np.random.default_rng(1)
    shape = (9, 8, 7)
    gt = rng.uniform(0, 1, shape).astype(np.float32)
    gt[0] = 0.0  # empty x slices
    gt[5] = 0.0
    gt[:, 3] = -0.2  # max < 0 counts as empty too
    gt[:, :, 6] = 0.0  # empty z slice
    pred = np.clip(gt + rng.normal(0, 0.1, shape), 0, None).astype(np.float32)
    mean, per_axis, counts = metrics.ssim_3d_with_counts(gt, pred)
    ref_mean, ref_axes, ref_counts = ssim_3d_np(gt, pred)
    assert list(np.asarray(counts)) == ref_counts == [7, 7, 6]
    np.testing.assert_allclose([float(v) for v in per_axis], ref_axes, atol=1e-6, rtol=0)
    assert abs(float(mean) - ref_mean) < 1e-6
    # Averaging over all slices instead would differ (empty-GT slices vs. pred noise score low/high).
    naive = np.mean([np.mean([ssim_np(np.take(gt, i, a), np.take(pred, i, a)) for i in range(shape[a])]) for a in range(3)])
    assert abs(naive - ref_mean) > 1e-3
    m2, axes2 = metrics.ssim_3d(gt, pred)
    assert float(m2) == float(mean) and [float(v) for v in axes2] == [float(v) for v in per_axis]


def test_ssim_3d_identical_and_host_wrapper():
    rng = np.random.default_rng(2)
    gt = rng.uniform(0, 1, (5, 6, 7)).astype(np.float32)
    mean, axes = metrics.ssim_3d(gt, gt)
    assert abs(float(mean) - 1) < 1e-6 and all(abs(float(v) - 1) < 1e-6 for v in axes)
    out = metrics.volume_metrics_host(gt, gt * np.float32(0.9))
    assert set(out) == {"psnr_3d", "ssim_3d", "ssim_3d_x", "ssim_3d_y", "ssim_3d_z"}
    assert all(isinstance(v, float) for v in out.values())
    mse = np.mean((0.1 * gt.astype(np.float64)) ** 2)
    assert abs(out["psnr_3d"] - 10 * math.log10(1 / mse)) < 1e-4
    ref_mean, _, _ = ssim_3d_np(gt, gt * np.float32(0.9))
    assert abs(out["ssim_3d"] - ref_mean) < 1e-6


def metrics_2d_np(gt, pred):
    ps, ss = [], []
    for g, q in zip(gt.astype(np.float64), pred.astype(np.float64)):
        if g.max() > 0:
            g, q = g / g.max(), q / q.max()
            ps.append(10 * math.log10(1 / np.mean((g - q) ** 2)))
            ss.append(ssim_np(g, q))
        else:
            ps.append(np.nan)
            ss.append(np.nan)
    return np.nanmean(ps), np.nanmean(ss), np.array(ps), np.array(ss)


def test_metrics_2d_bruteforce_and_normalisation():
    rng = np.random.default_rng(3)
    gt = rng.uniform(0, 3, (4, 10, 12)).astype(np.float32)
    gt[2] = 0.0  # not counted
    pred = (gt * rng.uniform(0.5, 2.0, (4, 1, 1)) + rng.normal(0, 0.2, gt.shape)).astype(np.float32)
    pred[2] = rng.uniform(0, 1, (10, 12))
    out = metrics.metrics_2d(gt, pred)
    p_ref, s_ref, pp_ref, sp_ref = metrics_2d_np(gt, pred)
    assert int(out["n_counted_2d"]) == 3
    assert abs(float(out["psnr_2d"]) - p_ref) < 1e-3
    assert abs(float(out["ssim_2d"]) - s_ref) < 1e-6
    np.testing.assert_allclose(np.asarray(out["psnr_2d_projs"]), pp_ref, atol=1e-3, equal_nan=True)
    np.testing.assert_allclose(np.asarray(out["ssim_2d_projs"]), sp_ref, atol=1e-6, equal_nan=True)
    assert np.isnan(np.asarray(out["psnr_2d_projs"])[2])
    # Each image is normalised by its own max: scaling pred (or gt) by a constant changes nothing.
    scaled = metrics.metrics_2d(gt * np.float32(4.0), pred * np.float32(0.125))
    for key in ("psnr_2d", "ssim_2d"):
        assert abs(float(scaled[key]) - float(out[key])) < 1e-4
    # Per projection too (power-of-two scales are exact in float32).
    np.testing.assert_allclose(np.asarray(scaled["ssim_2d_projs"]), np.asarray(out["ssim_2d_projs"]), atol=1e-6, equal_nan=True)


def test_metrics_2d_host():
    rng = np.random.default_rng(4)
    gt = rng.uniform(0, 1, (3, 8, 9)).astype(np.float32)
    gt[0] = 0.0
    out = metrics.metrics_2d_host(gt, gt)
    assert out["n_counted_2d"] == 2 and out["ssim_2d"] == pytest.approx(1.0, abs=1e-6)
    assert out["psnr_2d"] > 100  # identical projections: MSE 0 up to float32 rounding of the two divisions
    assert math.isnan(out["psnr_2d_projs"][0]) and len(out["ssim_2d_projs"]) == 3
    with pytest.raises(ValueError, match="gt shape"):
        metrics.metrics_2d(gt, gt[:, :, :8])



def test_ssim_matches_scikit_image_where_conventions_coincide():
    """scikit-image's SSIM with the reference's settings (Gaussian window σ 1.5 truncated at 3.5σ = 11 taps,
    population covariances, C1 = 0.01², C2 = 0.03², data range 1) equals ours on every pixel whose window lies
    inside the image: skimage reflects at the borders and averages the map without a 5-pixel margin, the
    reference (and we) zero-pad and average the whole map — so the interiors and their means must agree."""
    from skimage.metrics import structural_similarity

    from x2gs_jax import losses

    rng = np.random.default_rng(7)
    gt = rng.uniform(0.0, 1.0, (40, 33)).astype(np.float32)
    pred = np.clip(gt + rng.normal(0.0, 0.1, gt.shape), 0.0, 1.0).astype(np.float32)
    mssim, smap = structural_similarity(gt.astype(np.float64), pred.astype(np.float64), gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True)
    ours = np.asarray(losses.ssim_map(gt, pred), np.float64)
    inner = (slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(ours[inner], smap[inner], atol=2e-5)
    assert abs(float(np.mean(ours[inner])) - mssim) < 1e-5
    # The zero-padded border is where the conventions differ (so the comparison above is not vacuous).
    assert np.max(np.abs(ours[0] - smap[0])) > 1e-3
