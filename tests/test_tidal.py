"""Tidal pipeline: lung segmentation of the analytic phantom vs its closed-form lung + airway volume, the
dominant-period and swing estimators on synthetic and phantom-shaped signals, the figure's title. (The
segmentation on a second anatomy, other units and noise: tests/test_lung_segmentation.py.)"""
import numpy as np
import pytest

import lung_cases as L
from x2gs_jax import tidal
from x2gs_jax.data.breathing import BreathingSignal
from x2gs_jax.data.generate import geometry_mm
from x2gs_jax.data.phantom import ThoraxPhantom
from x2gs_jax.geometry import Scanner


@pytest.fixture(scope="module")
def phantom_scanner():
    scanner = Scanner.from_naf(geometry_mm(48, 32))
    return ThoraxPhantom.default(BreathingSignal(period_s=3.0)), scanner


def test_lung_volume_matches_closed_form(phantom_scanner):
    """End-exhale and end-inhale (0 and 1.5 s), default (automatic) segmentation of the exact voxelisation with 3^3
    sub-points (the generator's default; with 2^3, every half-lung voxel lies exactly on the midpoint threshold)."""
    ph, sc = phantom_scanner
    ts = np.array([0.0, 1.5]) / ph.scan_s
    vols = np.stack([ph.volume_at(float(t), sc, supersample=3) for t in ts])
    lungs, body, _ = L.segment(vols)
    got, _ = L.lung_ml(vols, sc.d_voxel_mm)
    for i, t in enumerate(ts):
        want = ph.lung_volume_ml(t, sc) + ph.airway_volume_ml(sc)
        assert abs(got[i] - want) / want < 0.02, (got[i], want)
        # The image-derived body mask agrees with the phantom's own outline (apart from the skin rim).
        true_body = ph.body_mask(t, sc)
        inner = np.asarray(tidal.erode(true_body, 1))
        outer = ~np.asarray(tidal.erode(~true_body, 1))
        assert np.all(body[i][inner]) and not np.any(body[i][~outer])  # differs on the one-voxel rim at most
        # Lungs are strictly inside the body and not empty.
        assert lungs[i].sum() > 100 and not np.any(lungs[i] & ~true_body)


def test_inhale_bigger_than_exhale(phantom_scanner):
    ph, sc = phantom_scanner
    vols = np.stack([ph.volume_at(s / ph.scan_s, sc, supersample=1) for s in (0.0, 1.5)])
    (v0, v1), _ = L.lung_ml(vols, sc.d_voxel_mm)
    d_true = ph.lung_volume_ml(1.5 / ph.scan_s, sc) - ph.lung_volume_ml(0.0, sc)
    assert d_true > 0
    assert abs((v1 - v0) - d_true) / d_true < 0.25  # the tidal swing itself, at 48^3


def test_erode_box():
    m = np.zeros((9, 9, 9), bool)
    m[1:8, 2:7, 0:9] = True
    e = np.asarray(tidal.erode(m, 1))
    want = np.zeros_like(m)
    want[2:7, 3:6, 1:8] = True
    np.testing.assert_array_equal(e, want)


@pytest.mark.parametrize("period", [3.0, 3.7, 4.25])
def test_fft_period_sine(period):
    t = np.arange(600) * 0.1  # 60 s
    x = 5 + 2 * np.sin(2 * np.pi * t / period + 0.3) + 0.3 * np.sin(2 * np.pi * 3 * t / period)
    assert tidal.dominant_period(t, x) == pytest.approx(period, rel=2e-3)


def test_period_of_phantom_lung_curve(phantom_scanner):
    """The breathing curve of the regular 3 s phantom (closed form, dense over 60 s) -> 3 s within 1 %."""
    ph, sc = phantom_scanner
    t_s = np.arange(600) * 0.1
    curve = tidal.phantom_gt_curve_ml(ph.breathing, t_s / ph.scan_s, sc)
    assert tidal.dominant_period(t_s, curve) == pytest.approx(3.0, rel=0.01)
    r = tidal.curve_agreement(curve + 1.0, curve)
    assert r["tidal_corr"] == pytest.approx(1.0) and r["tidal_amplitude_rel_error"] == pytest.approx(0.0, abs=1e-12)


def test_cycle_swing():
    t = np.arange(600) * 0.1  # 60 s, 20 cycles of 3 s with swings 100 mL, except one deep breath of 300 mL
    amp = np.full(600, 100.0)
    amp[300:330] = 300.0
    x = 2000 + amp * np.sin(np.pi * t / 3.0) ** 2
    assert tidal.cycle_swing(t, x, 3.0) == pytest.approx(100.0, rel=1e-3)  # median over cycles
    assert np.ptp(x) == pytest.approx(300.0, rel=1e-3)  # what the whole record's peak-to-peak would say
    assert tidal.cycle_swing(t, x, None) == pytest.approx(np.ptp(x))  # no period: the whole record
    assert tidal.cycle_swing(t, x, 120.0) == pytest.approx(np.ptp(x))  # no whole window fits


def test_curve_title():
    c = {"tidal_period_s": 3.0012, "tidal_swing_ml": 236.6, "tidal_mean_ml": 1601.2, "lung_threshold_mode": "auto",
         "lung_threshold_used_median": 0.2861, "lung_threshold": None}
    s = tidal.curve_title(c)
    assert "3.001 s" in s and "237 mL" in s and "1601 mL" in s and "auto" in s and "0.2861" in s
    c.update(tidal_period_s=None, lung_threshold_mode="manual", lung_threshold=0.285)
    s = tidal.curve_title(c)
    assert "period -" in s and "0.285 (manual)" in s and "auto" not in s


def test_period_errors():
    with pytest.raises(ValueError, match="uniform"):
        tidal.dominant_period(np.array([0, 1, 3, 4, 5, 6, 7, 8.0]), np.arange(8.0))
    with pytest.raises(ValueError, match=">= 8"):
        tidal.dominant_period(np.arange(4.0), np.arange(4.0))


def test_breathing_from_meta():
    meta = {"generator": {"name": "x2gs_jax.data.generate/ThoraxPhantom", "seed": 3, "breathing_kind": "irregular",
                          "period_s": 3.5, "scan_s": 60.0, "period_jitter": 0.1, "amplitude_jitter": 0.2}}
    b = tidal.phantom_breathing_from_meta(meta)
    assert b == BreathingSignal(period_s=3.5, kind="irregular", seed=3, period_jitter=0.1, amplitude_jitter=0.2)
    assert tidal.phantom_breathing_from_meta({"noise": 0.0}) is None
