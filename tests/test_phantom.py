"""Breathing signal, exact primitives and the analytic thorax phantom (float64 numpy oracles)."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.data import shapes as sh
from x2gs_jax.data.breathing import BreathingSignal
from x2gs_jax.data.phantom import ThoraxPhantom
from x2gs_jax.geometry import Scanner


def make_scanner(n=32, det=24, mode="cone", off_detector=(0.0, 0.0), box=300.0):
    pitch = 2.6 * 256 / det
    return Scanner.from_naf(dict(DSD=1536.0, DSO=1000.0, nDetector=[det, det], dDetector=[pitch, pitch],
                                 nVoxel=[n] * 3, dVoxel=[box / n] * 3, offDetector=list(off_detector), mode=mode))


def erode(mask, n=2):
    """Binary erosion by the 6-neighbourhood, n times (drops partial-volume voxels at the body surface)."""
    for _ in range(n):
        m = mask.copy()
        for ax in range(3):
            for sh_ in (1, -1):
                m &= np.roll(mask, sh_, axis=ax)
        mask = m
    return mask


def np_density(prims, pts):
    """Float64 oracle: sum of increments of the primitives containing each point."""
    return sum(p.value * p.contains(pts) for p in prims)


# ------------------------------------------------------------------------------------- breathing
def test_regular_signal_shape_and_period():
    b = BreathingSignal(period_s=3.0)
    t = np.linspace(0.0, 60.0, 2001)
    s = b.signal(t)
    assert s[0] == 0.0 and np.all(s >= 0) and np.all(s <= 1.0 + 1e-12)
    np.testing.assert_allclose(b.signal(t + 3.0), s, atol=1e-12)
    np.testing.assert_allclose(b.signal(1.5), 1.0)  # end-inhale at mid-cycle
    assert b.signal(np.zeros((2, 3))).shape == (2, 3)


def test_irregular_signal_seeded_continuous_bounded():
    a1, a2 = BreathingSignal(kind="irregular", seed=3), BreathingSignal(kind="irregular", seed=3)
    other = BreathingSignal(kind="irregular", seed=4)
    t = np.linspace(0.0, 60.0, 60001)
    s = a1.signal(t)
    np.testing.assert_array_equal(s, a2.signal(t))
    assert np.max(np.abs(s - other.signal(t))) > 0.05
    assert np.all(s >= 0) and np.all(s <= 1.2 + 1e-12) and s.max() > 1.0
    # Continuity: |ds/dt| <= pi A / T_min, so neighbouring samples differ by at most that x dt.
    assert np.max(np.abs(np.diff(s))) <= np.pi * 1.2 / (3.0 * 0.9) * 1e-3 * 1.01
    # Prefix stability: a value does not depend on how far the query reaches.
    np.testing.assert_array_equal(a1.signal(np.array([7.3])), a1.signal(np.array([7.3, 500.0]))[:1])
    starts, lengths, amps = a1.cycles(60.0)
    assert np.all(np.abs(lengths / 3.0 - 1) <= 0.1 + 1e-12) and np.std(lengths) > 0
    np.testing.assert_allclose(a1.signal(starts[:10]), 0.0, atol=1e-12)  # every cycle starts at end-exhale


def test_mean_cycle_length_of_a_scan():
    assert BreathingSignal(period_s=3.0).mean_cycle_s(60.0) == 3.0
    assert np.isnan(BreathingSignal(kind="static").mean_cycle_s(60.0))
    b = BreathingSignal(kind="irregular", seed=0)
    # Brute force: the cycle boundaries are the zeros of s with a minimum between them; count the cycles that
    # start inside the scan from a fine sampling and average their lengths.
    t = np.linspace(0.0, 80.0, 800001)
    s = b.signal(t)
    zeros = np.concatenate([[0.0], t[1:-1][(s[1:-1] <= s[:-2]) & (s[1:-1] <= s[2:]) & (s[1:-1] < 1e-6)]])
    starts = zeros[zeros < 60.0]
    lengths = np.diff(zeros)[: len(starts)]
    np.testing.assert_allclose(b.mean_cycle_s(60.0), np.mean(lengths), atol=2e-4)
    assert abs(b.mean_cycle_s(60.0) - 3.0) > 1e-3  # irregular: not the nominal period


def test_static_signal_and_bad_kind():
    assert np.all(BreathingSignal(kind="static").signal(np.linspace(0, 60, 7)) == 0)
    with pytest.raises(ValueError, match="kind"):
        BreathingSignal(kind="wobbly")


def test_phase_bin_and_mid_times():
    b = BreathingSignal(period_s=3.0)
    i = np.arange(300)
    # t = 60 i / 300 = i / 5 s; exact integer phase: floor(10 ((i mod 15) / 5) / 3) = floor(2 (i mod 15) / 3).
    np.testing.assert_array_equal(b.phase_bin(60.0 * i / 300), (2 * (i % 15)) // 3)
    mids = b.phase_mid_times_s()
    np.testing.assert_allclose(mids, 0.15 + 0.3 * np.arange(10))
    np.testing.assert_array_equal(b.phase_bin(mids), np.arange(10))


# --------------------------------------------------------------------------------------- shapes
def _chords(prims, o, d):
    return np.asarray(sh.line_integrals(sh.pack(prims), jnp.asarray(o, jnp.float32), jnp.asarray(d, jnp.float32)))


def test_single_ellipsoid_and_cylinder_chords_by_hand():
    a, b, c = 0.5, 0.3, 0.2
    ell = sh.Primitive("e", sh.ellipsoid((0.1, -0.2, 0.05), (a, b, c)), 1.0)
    y0, z0 = 0.1, -0.05  # offsets from the centre; ray along +x from x = -5
    o = np.array([[-5.0, -0.2 + y0, 0.05 + z0], [-5.0, 0.5, 0.0]])
    d = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    expect = [2 * a * np.sqrt(1 - (y0 / b) ** 2 - (z0 / c) ** 2), 0.0]
    np.testing.assert_allclose(_chords([ell], o, d), expect, atol=2e-6)
    # Rotated ellipsoid, ray along its long axis through the centre: chord = 2 x long semi-axis.
    rot = sh.rotation_to((1.0, 1.0, 1.0))
    e2 = sh.Primitive("r", sh.ellipsoid((0, 0, 0), (0.4, 0.1, 0.05), rot), 2.0)
    dirn = np.ones(3) / np.sqrt(3)
    np.testing.assert_allclose(_chords([e2], [-3 * dirn], [dirn]), [2.0 * 0.8], rtol=1e-5)
    # Capped elliptic cylinder, oblique ray through the axis: chord limited by the caps.
    cyl = sh.Primitive("c", sh.cylinder((0, 0, 0), (0.3, 0.2), 0.1), 1.0)
    dz = np.array([0.6, 0.0, 0.8])  # crosses z in [-0.1, 0.1] over a length 0.2 / 0.8, x in [-0.075, 0.075]
    np.testing.assert_allclose(_chords([cyl], [-2 * dz], [dz]), [0.25], rtol=1e-5)
    # Ring = outer minus inner cylinder, horizontal ray through the centre along y: 2 (0.2 - 0.15).
    ring = sh.Primitive("ring", sh.cylinder((0, 0, 0), (0.3, 0.2), 0.1), 1.0, cutter=sh.cylinder((0, 0, 0), (0.25, 0.15), 0.2))
    np.testing.assert_allclose(_chords([ring], [[0, -4, 0.0]], [[0, 1, 0]]), [0.1], rtol=1e-5)
    # The chord starts at the ray origin (t >= 0): from the centre of the sphere, the chord is the radius.
    sph = sh.Primitive("s", sh.ellipsoid((0, 0, 0), (0.5, 0.5, 0.5)), 1.0)
    np.testing.assert_allclose(_chords([sph], [[0, 0, 0]], [[0, 0, 1]]), [0.5], rtol=1e-6)


def test_coaxial_ellipsoid_difference_volume():
    outer = sh.ellipsoid((0.2, -0.1, 0.3), (0.3, 0.45, 0.6))
    rng = np.random.default_rng(0)
    lo, hi = outer.extent()
    for cutter in (sh.ellipsoid((0.2, -0.1, -0.3), (0.39, 0.585, 0.4)),   # dome under the base
                   sh.ellipsoid((0.2, -0.1, 0.2), (0.15, 0.225, 0.3))):  # fully inside
        exact = sh.ellipsoid_minus_coaxial_ellipsoid_volume(outer, cutter)
        pts = lo + (hi - lo) * rng.uniform(size=(1_000_000, 3))
        mc = np.mean(outer.contains(pts) & ~cutter.contains(pts)) * np.prod(hi - lo)
        np.testing.assert_allclose(exact, mc, rtol=0.01)
    inside = sh.ellipsoid((0.2, -0.1, 0.2), (0.15, 0.225, 0.3))
    np.testing.assert_allclose(sh.ellipsoid_minus_coaxial_ellipsoid_volume(outer, inside), outer.volume() - inside.volume(), rtol=1e-12)
    far = sh.ellipsoid((0.2, -0.1, 5.0), (0.6, 0.9, 0.2))
    np.testing.assert_allclose(sh.ellipsoid_minus_coaxial_ellipsoid_volume(outer, far), outer.volume(), rtol=1e-12)
    with pytest.raises(ValueError, match="concentric"):
        sh.ellipsoid_minus_coaxial_ellipsoid_volume(outer, sh.ellipsoid((0, 0, 0), (0.3, 0.3, 0.3)))


# -------------------------------------------------------------------------------------- phantom
PHANTOM = ThoraxPhantom.default(BreathingSignal(period_s=3.0))


@pytest.mark.parametrize("s", [0.0, 0.6, 1.2])
def test_layout_values_in_range_and_lungs_exclusive(s):
    """At dense random points: values in [0, 1]; a lung touches only the body and its own features;
    lung features lie inside their lung and are pairwise disjoint; everything lies inside the box."""
    pts = np.random.default_rng(int(10 * s)).uniform(-1.0, 1.0, size=(160_000, 3))
    parts = PHANTOM.parts_at_state(s)
    dens = np.asarray(sh.densities(sh.pack([p.prim for p in parts]), jnp.asarray(pts, jnp.float32)))
    assert dens.min() >= -1e-6 and dens.max() <= 1.0 + 1e-6
    assert 0.9 < dens.max() and np.mean(dens > 0.3) > 0.2
    for p in parts:
        lo, hi = p.prim.shape.extent()
        assert np.all(lo >= -1.0) and np.all(hi <= 1.0), p.prim.name
    region = {p.prim.name: p.prim.contains(pts) for p in parts}
    for lung in (p for p in parts if p.role == "lung"):
        name = lung.prim.name
        feats = [q.prim.name for q in parts if q.role == "feature:" + name]
        assert len(feats) >= 3
        for q in parts:
            if q.prim.name not in feats + [name] and q.role != "body":
                assert not np.any(region[name] & region[q.prim.name]), (name, q.prim.name)
        for f in feats:
            assert not np.any(region[f] & ~region[name]), f
        for f1, f2 in itertools.combinations(feats, 2):
            assert not np.any(region[f1] & region[f2]), (f1, f2)


def test_volume_at_matches_numpy_supersampling_oracle():
    sc = make_scanner(n=20)
    t = 0.8 / 60
    vol = PHANTOM.volume_at(t, sc, supersample=2)
    assert vol.shape == (20, 20, 20) and vol.dtype == np.float32
    prims = PHANTOM.primitives_at(t, sc)
    centres = sc.voxel_centers()
    frac = np.array([-0.25, 0.25])
    offs = np.stack(np.meshgrid(frac, frac, frac, indexing="ij"), -1).reshape(-1, 3) * np.array(sc.d_voxel)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 20, size=(300, 3))
    pts = centres[idx[:, 0], idx[:, 1], idx[:, 2]][:, None, :] + offs
    expect = np_density(prims, pts).mean(axis=1)
    np.testing.assert_allclose(vol[idx[:, 0], idx[:, 1], idx[:, 2]], expect, atol=1e-5)
    assert 0.05 < np.mean(expect > 0.3)
    assert np.all(vol[0] == 0) and np.all(vol[-1] == 0) and np.all(vol[:, :, 0] == 0)  # mu = 0 at the box edge


def test_lung_volume_closed_form_periodic_and_matches_segmentation():
    sc = make_scanner(n=48)
    period = 3.0 / 60
    voxel_ml = np.prod(sc.d_voxel_mm) / 1000.0
    airways = PHANTOM.airway_volume_ml(sc)
    results = []
    for t in (0.0, 0.6 / 60, 1.5 / 60, 1.5 / 60 + 4 * period):
        vol = PHANTOM.volume_at(t, sc, supersample=3)
        seg = np.sum((vol < 0.285) & erode(PHANTOM.body_mask(t, sc))) * voxel_ml
        exact = PHANTOM.lung_volume_ml(t, sc)
        results.append((seg, exact))
        np.testing.assert_allclose(seg, exact + airways, rtol=0.01)
    (seg0, ex0), (seg1, ex1), (seg2, ex2), (seg3, ex3) = results
    np.testing.assert_allclose(ex3, ex2, rtol=1e-10)  # periodic with the configured period
    np.testing.assert_allclose(seg3, seg2, rtol=1e-3)
    np.testing.assert_allclose(PHANTOM.lung_volume_ml(0.25 / 60 + 7 * period, sc), PHANTOM.lung_volume_ml(0.25 / 60, sc), rtol=1e-10)
    assert ex0 < ex1 < ex2  # inhalation grows the lungs
    assert 150.0 < ex2 - ex0 < 600.0  # tidal volume of a few hundred mL
    assert 1000.0 < ex0 < 4000.0  # two lungs scaled to a 300 mm box


def _brute_force_integral(prims, origin, direction, lo, hi, step):
    """Midpoint-rule integral of the float64 indicator oracle over the ray's crossing of the box [lo, hi]."""
    with np.errstate(divide="ignore"):
        ta, tb = (lo - origin) / direction, (hi - origin) / direction
    t0 = max(0.0, np.max(np.minimum(ta, tb)))
    t1 = np.min(np.maximum(ta, tb))
    if t1 <= t0:
        return 0.0
    n = int(np.ceil((t1 - t0) / step))
    t = t0 + (np.arange(n) + 0.5) * (t1 - t0) / n
    return np.sum(np_density(prims, origin + t[:, None] * direction)) * (t1 - t0) / n


@pytest.mark.parametrize("mode,off", [("cone", (0.0, 0.0)), ("cone", (30.0, -20.0)), ("parallel", (0.0, 0.0))])
def test_projection_matches_brute_force_ray_sampling(mode, off):
    sc = make_scanner(n=32, det=16, mode=mode, off_detector=off)
    angle, t = 0.7, 1.1 / 60
    proj = PHANTOM.project(sc, [angle], [t])
    assert proj.shape == (1, 16, 16) and proj.dtype == np.float32
    prims = PHANTOM.primitives_at(t, sc)
    origins, dirs = (np.asarray(a, np.float64) for a in sc.rays(angle))
    lo, hi = sc.bbox
    # Rays through the body at spread-out levels of attenuation, plus a corner ray that misses it.
    order = np.argsort(proj[0].ravel())
    nonzero = order[proj[0].ravel()[order] > 0]
    picks = [nonzero[int(q * (len(nonzero) - 1))] for q in (0.1, 0.4, 0.7, 1.0)] + [0]
    for flat in picks:
        i, j = divmod(int(flat), 16)
        d = dirs[i, j] / np.linalg.norm(dirs[i, j])
        ref = _brute_force_integral(prims, origins[i, j], d, lo, hi, 1e-4) / sc.scene_scale
        np.testing.assert_allclose(proj[0, i, j], ref, rtol=2e-3, atol=1e-6)
    assert proj[0, 0, 0] == 0 and len(nonzero) > 40
    # Row 0 is the top: the rays of the first row point up (+z) in cone beam.
    if mode == "cone":
        assert dirs[0, 8, 2] > 0 > dirs[-1, 8, 2]


def test_projection_time_dependence_and_batching():
    sc = make_scanner(n=32, det=16)
    angles = np.array([0.3, 0.3, 0.3, 1.0, 2.0])
    times = np.array([0.0, 1.5 / 60, 3.0 / 60, 0.4 / 60, 2.2 / 60])
    batch = PHANTOM.project(sc, angles, times, chunk_rays=2 * 16 * 16)
    for k in range(len(angles)):
        np.testing.assert_allclose(batch[k], PHANTOM.project(sc, angles[k:k + 1], times[k:k + 1])[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(batch[2], batch[0], atol=1e-6)  # one period later
    assert np.max(np.abs(batch[1] - batch[0])) > 1e-3  # breathing changes the projection
    with pytest.raises(ValueError, match="same length"):
        PHANTOM.project(sc, angles, times[:2])
