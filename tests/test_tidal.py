"""Tidal pipeline: lung segmentation of the analytic phantom vs its closed-form lung + airway volume,
and the dominant-period estimator on synthetic and phantom-shaped signals."""
import jax
import numpy as np
import pytest

from x2gs_jax import tidal
from x2gs_jax.data.breathing import BreathingSignal
from x2gs_jax.data.generate import geometry_mm
from x2gs_jax.data.phantom import ThoraxPhantom
from x2gs_jax.geometry import Scanner


@pytest.fixture(scope="module")
def phantom_scanner():
    scanner = Scanner.from_naf(geometry_mm(48, 32))
    return ThoraxPhantom.default(BreathingSignal(period_s=3.0)), scanner


@pytest.mark.parametrize("t_s", [0.0, 1.5])  # end-exhale and end-inhale
def test_lung_volume_matches_closed_form(phantom_scanner, t_s):
    ph, sc = phantom_scanner
    t = t_s / ph.scan_s
    vol = ph.volume_at(t, sc, supersample=2)
    got = float(jax.jit(lambda v: tidal.lung_volume_ml(v, sc.d_voxel_mm))(vol))
    want = ph.lung_volume_ml(t, sc) + ph.airway_volume_ml(sc)
    assert abs(got - want) / want < 0.02, (got, want)
    # The image-derived body mask agrees with the phantom's own outline (apart from the skin rim).
    body = np.asarray(tidal.body_mask(vol))
    true_body = ph.body_mask(t, sc)
    inner = np.asarray(tidal.erode(true_body, 1))
    outer = ~np.asarray(tidal.erode(~true_body, 1))
    assert np.all(body[inner]) and not np.any(body[~outer])  # differs on the one-voxel rim at most
    # Lungs are strictly inside the body and not empty.
    lungs = np.asarray(tidal.lung_mask(vol))
    assert lungs.sum() > 100 and not np.any(lungs & ~true_body)


def test_inhale_bigger_than_exhale(phantom_scanner):
    ph, sc = phantom_scanner
    f = jax.jit(lambda v: tidal.lung_volume_ml(v, sc.d_voxel_mm))
    v0, v1 = (float(f(ph.volume_at(s / ph.scan_s, sc, supersample=1))) for s in (0.0, 1.5))
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
