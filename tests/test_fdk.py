"""FDK / FBP: filter vs direct convolution, normalisation on analytic cylinders, detector offsets, 4D bins,
and the breathing phantom."""
import numpy as np
import pytest

from x2gs_jax.ct.fdk import angular_weights, fdk, fdk_4d, filter_projections, ramp_filter_length, ramp_filter_response
from x2gs_jax.ct.projector import project
from x2gs_jax.geometry import Scanner
from ray_oracles import rays64


# ----------------------------------------------------------------------------- float64 oracles
def cylinder_projections(scanner, angles, radius, mu, half_height=np.inf, center=(0.0, 0.0)):
    """Exact line integrals (pickle units) of a z-axis cylinder |xy - center| <= radius, |z| <= half_height."""
    out = []
    for a in angles:
        o, d = rays64(scanner, a)
        ox, oy = o[..., 0] - center[0], o[..., 1] - center[1]
        A = d[..., 0] ** 2 + d[..., 1] ** 2
        B = ox * d[..., 0] + oy * d[..., 1]
        C = ox**2 + oy**2 - radius**2
        disc = B * B - A * C
        sq = np.sqrt(np.maximum(disc, 0.0))
        safe = np.maximum(A, 1e-300)
        t1, t2 = np.where(disc > 0, (-B - sq) / safe, 0.0), np.where(disc > 0, (-B + sq) / safe, 0.0)
        if np.isfinite(half_height):
            with np.errstate(divide="ignore", invalid="ignore"):
                za, zb = (-half_height - o[..., 2]) / d[..., 2], (half_height - o[..., 2]) / d[..., 2]
            flat = d[..., 2] == 0
            inside = np.abs(o[..., 2]) <= half_height
            t1 = np.maximum(t1, np.where(flat, np.where(inside, -np.inf, np.inf), np.minimum(za, zb)))
            t2 = np.minimum(t2, np.where(flat, np.where(inside, np.inf, -np.inf), np.maximum(za, zb)))
        out.append(mu * np.maximum(t2 - t1, 0.0))
    return (np.stack(out) / scanner.scene_scale).astype(np.float32)


def geometry(n_detector=(96, 96), off_detector=(0.0, 0.0), mode="cone", n_voxel=(64, 64, 64), pitch=4.0):
    """1.5x magnification; `pitch` (mm) is both the detector pixel and the voxel size."""
    return Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=list(n_detector), dDetector=[pitch, pitch],
                                 nVoxel=list(n_voxel), dVoxel=[pitch] * 3, offDetector=list(off_detector),
                                 mode=mode))


def radial(scanner):
    c = scanner.voxel_centers()
    return np.hypot(c[..., 0], c[..., 1]), c[..., 2]


ANGLES = np.linspace(0.0, 2 * np.pi, 120, endpoint=False)


# ----------------------------------------------------------------------------- filter
def test_ramp_filter_equals_tigre_direct_convolution():
    sc = geometry(n_detector=(5, 24), off_detector=(6.0, -2.0))
    rng = np.random.default_rng(0)
    p = rng.random((2, 5, 24)).astype(np.float32)
    dbeta = np.array([0.05, 0.3])
    got = np.asarray(filter_projections(p, sc, dbeta))
    # TIGRE, written out: cosine weight, linear convolution with the truncated spatial ram-lak kernel
    # (|n| < L/2), the factor 2 on the filter, then (DSD/DSO)·Δβ/(4·du).
    L = ramp_filter_length(sc.n_detector)
    assert L == 64
    u, v = sc.detector_uv()
    pw = p * (sc.DSD / np.sqrt(sc.DSD**2 + u[None, :] ** 2 + v[:, None] ** 2))
    n = np.arange(-23, 24)
    h = np.where(n == 0, 0.25, np.where(n % 2 != 0, -1.0 / (np.pi * np.where(n == 0, 1, n)) ** 2, 0.0))
    conv = np.stack([[np.convolve(row, h)[23:23 + 24] for row in view] for view in pw])
    want = 2.0 * conv * (sc.DSD / sc.DSO) * dbeta[:, None, None] / (4.0 * sc.d_detector[1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_ramp_response_is_a_ramp():
    L = 256
    resp = ramp_filter_response(L)
    f = np.arange(L // 2 + 1) / L  # cycles per sample
    odd = np.arange(1, L // 2, 2)
    # At Nyquist the kernel sums to 1/4 + 2·Σ_odd 1/(πn)² (-> 1/2 as L grows; truncated at |n| < L/2).
    assert abs(resp[-1] - (0.25 + 2 * np.sum(1.0 / (np.pi * odd) ** 2))) < 1e-12
    assert np.all(np.abs(resp - f) < 1.0 / L) and resp[0] > 0
    assert ramp_filter_length((16, 20)) == 64 and ramp_filter_length((300, 513)) == 2048


def test_angular_weights():
    a = np.linspace(0, 2 * np.pi, 17, endpoint=False) + 0.3
    np.testing.assert_allclose(angular_weights(a, "gaps"), angular_weights(a, "uniform"), rtol=1e-12)
    clumped = np.concatenate([np.linspace(0, 0.1, 3) + k * np.pi / 2 for k in range(4)]) + 2 * np.pi  # > 2π: wraps
    w = angular_weights(np.random.default_rng(1).permutation(clumped), "gaps")
    assert abs(w.sum() - 2 * np.pi) < 1e-12
    # Edge views of a clump carry the gap to the next clump; the middle view only its neighbours.
    w = angular_weights(clumped, "gaps")
    np.testing.assert_allclose(w[:3], [0.5 * (0.05 + np.pi / 2 - 0.1), 0.05, 0.5 * (0.05 + np.pi / 2 - 0.1)])
    with pytest.raises(ValueError, match="angular weighting"):
        angular_weights(a, "parker")


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("mode,off", [("cone", (0.0, 0.0)), ("cone", (20.0, -12.0)), ("parallel", (0.0, 0.0))])
def test_uniform_cylinder_reconstructs_to_mu(mode, off):
    sc = geometry(n_detector=(80, 96), off_detector=off, mode=mode)
    radius, mu = 0.6, 0.7
    vol = np.asarray(fdk(cylinder_projections(sc, ANGLES, radius, mu), sc, ANGLES))
    r, z = radial(sc)
    interior = (r < 0.8 * radius) & (np.abs(z) < 0.6)  # |z| < 0.6: inside the (shifted) cone coverage
    dev = np.abs(vol[interior] / mu - 1.0)
    print(f"{mode} off={off}: interior mean {vol[interior].mean():.5f} (mu {mu}), max rel dev {dev.max():.4f}")
    assert dev.max() < 0.02
    assert np.abs(vol[(r > 1.25 * radius) & (r < 0.95) & (np.abs(z) < 0.6)]).mean() < 0.02 * mu


def test_detector_offset_projects_and_backprojects_consistently():
    off = (24.0, -16.0)
    # Coarser than the other tests (48³, 48 views) to keep the ray-marched projections cheap.
    geo = dict(n_detector=(60, 72), n_voxel=(48, 48, 48), pitch=16.0 / 3.0)
    sc = geometry(off_detector=off, **geo)
    angles = ANGLES[::2]
    radius, mu, hh = 0.55, 0.6, 0.9
    center = (0.12, -0.08)
    # Voxelised finite cylinder (exact in z, 4x4 supersampled in xy), projected by the JAX projector.
    r_sub, _ = radial(sc)
    c = sc.voxel_centers()
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    frac = np.mean([np.hypot(c[..., 0] + a * sc.d_voxel[0] - center[0], c[..., 1] + b * sc.d_voxel[1] - center[1])
                    <= radius for a in sub for b in sub], axis=0)
    zfrac = np.clip((hh - np.abs(c[..., 2])) / sc.d_voxel[2] + 0.5, 0.0, 1.0)
    vol = (mu * frac * zfrac).astype(np.float32)
    proj = np.asarray(project(vol, sc, angles))
    want = cylinder_projections(sc, angles, radius, mu, hh, center)
    err = np.linalg.norm(proj - want) / np.linalg.norm(want)
    assert err < 0.03, err  # partial-volume edges of a 48³ grid (the 128³ figures are in test_projector)
    # FDK with the right (offset) geometry recovers the cylinder; ignoring the offset does not.
    rec = np.asarray(fdk(proj, sc, angles))
    rr = np.hypot(c[..., 0] - center[0], c[..., 1] - center[1])
    slab = np.abs(c[..., 2]) < 0.4  # away from the flat ends' cone-beam artefacts
    interior = (rr < 0.7 * radius) & slab
    mean_dev = abs(rec[interior].mean() / mu - 1.0)
    rel = np.linalg.norm(rec[slab] - vol[slab]) / np.linalg.norm(vol[slab])
    wrong = np.asarray(fdk(proj, geometry(**geo), angles))
    rel_wrong = np.linalg.norm(wrong[slab] - vol[slab]) / np.linalg.norm(vol[slab])
    print(f"offset detector: projector rel. L2 {err:.4f}; FDK interior mean dev {mean_dev:.4f}, "
          f"rel. L2 {rel:.3f} (offset ignored: {rel_wrong:.3f})")
    assert mean_dev < 0.01 and rel < 0.12
    assert rel_wrong > 0.3


# ----------------------------------------------------------------------------- 4D
def test_fdk_4d_two_bins():
    sc = geometry(n_detector=(64, 80), n_voxel=(48, 48, 32))
    phases = (np.arange(ANGLES.size) // 3) % 2  # clumps of 3 views alternate between the two bins
    radii, mus = (0.35, 0.6), (0.8, 0.5)
    proj = np.concatenate([cylinder_projections(sc, ANGLES[i:i + 1], radii[p], mus[p]) for i, p in enumerate(phases)])
    vols = np.asarray(fdk_4d(proj, sc, ANGLES, phases, n_phases=2))
    assert vols.shape == (2, 48, 48, 32)
    r, z = radial(sc)
    core, ring = (r < 0.25) & (np.abs(z) < 0.5), (r > 0.45) & (r < 0.5) & (np.abs(z) < 0.5)
    for p in (0, 1):
        assert np.abs(vols[p][core] / mus[p] - 1.0).max() < 0.03
    assert np.abs(vols[0][ring]).mean() < 0.03 * mus[0]  # bin 0's small cylinder: nothing in the ring
    assert np.abs(vols[1][ring] / mus[1] - 1.0).mean() < 0.02  # bin 1's large cylinder fills it
    # Parity: bin p is exactly the FDK of its own views with its own angular weights.
    own = np.asarray(fdk(proj[phases == 1], sc, ANGLES[phases == 1], angular_weighting="gaps"))
    np.testing.assert_allclose(vols[1], own, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"phase bins \[2\]"):
        fdk_4d(proj, sc, ANGLES, phases, n_phases=3)
    with pytest.raises(ValueError, match="phases must be integers"):
        fdk_4d(proj, sc, ANGLES, phases + 1, n_phases=2)


def test_rejects_bad_shapes():
    sc = geometry(n_detector=(8, 10), n_voxel=(4, 4, 4))
    with pytest.raises(ValueError, match=r"\[n, 8, 10\]"):
        fdk(np.zeros((3, 10, 8), np.float32), sc, np.zeros(3))
    with pytest.raises(ValueError, match="angles"):
        fdk(np.zeros((3, 8, 10), np.float32), sc, np.zeros(2))


# ----------------------------------------------------------------------------- breathing phantom
def test_fdk_of_static_phantom_psnr():
    phantom = pytest.importorskip("x2gs_jax.data.phantom")
    from x2gs_jax.data.breathing import BreathingSignal

    sc = Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=[128, 128], dDetector=[4.0, 4.0],
                               nVoxel=[128, 128, 128], dVoxel=[2.0, 2.0, 2.0]))
    ph = phantom.ThoraxPhantom.default(BreathingSignal(kind="static"))
    angles = np.linspace(0.0, 2 * np.pi, 360, endpoint=False)
    proj = ph.project(sc, angles, np.zeros_like(angles))
    rec = np.asarray(fdk(proj, sc, angles))
    gt = np.asarray(ph.volume_at(0.0, sc, supersample=3), np.float64)
    psnr = 10 * np.log10(1.0 / np.mean((rec - gt) ** 2))
    print(f"FDK of the static phantom (360 views, 128^3): PSNR3D {psnr:.2f} dB")
    assert psnr >= 25.0
