"""Forward projector: closed-form chords, analytic ball/ellipsoid, the breathing phantom, gradients."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from x2gs_jax.ct.projector import n_ray_samples, project
from x2gs_jax.geometry import Scanner
from ray_oracles import rays64


# ----------------------------------------------------------------------------- float64 oracles
def box_chord(o, d, lo, hi, cone):
    with np.errstate(divide="ignore", invalid="ignore"):
        t0, t1 = (lo - o) / d, (hi - o) / d
    tmin = np.where(d == 0, np.where((o >= lo) & (o <= hi), -np.inf, np.inf), np.minimum(t0, t1))
    tmax = np.where(d == 0, np.where((o >= lo) & (o <= hi), np.inf, -np.inf), np.maximum(t0, t1))
    tn, tf = tmin.max(-1), tmax.min(-1)
    if cone:
        tn = np.maximum(tn, 0.0)
    return np.maximum(tf - tn, 0.0)


def ellipsoid_chord(o, d, center, semi, rot):
    """Chord length of lines o + t d (unit d) through the ellipsoid {|diag(1/semi) R^T (x - c)| <= 1}."""
    A = rot / np.asarray(semi)[None, :]  # columns scaled: x_local = R^T (x - c) / semi
    oo = (o - center) @ A
    dd = d @ A
    a = (dd * dd).sum(-1)
    b = (oo * dd).sum(-1)
    c = (oo * oo).sum(-1) - 1.0
    disc = np.maximum(b * b - a * c, 0.0)
    return 2.0 * np.sqrt(disc) / a


def voxelise_ellipsoid(scanner, center, semi, rot, ss=4):
    """Volume fraction of each voxel inside the ellipsoid (float32 [nx, ny, nz]).

    Voxels whose whole cube is provably inside/outside (normalised radius farther from 1 than the
    map's Lipschitz constant times the half diagonal) get 1/0; the others are supersampled ss³.
    """
    A = rot / np.asarray(semi)[None, :]  # row-vector map: x -> (x - c) @ A, unit sphere in the image
    c = scanner.voxel_centers().reshape(-1, 3)
    rho = np.linalg.norm((c - center) @ A, axis=-1)
    dv = np.asarray(scanner.d_voxel)
    margin = np.linalg.norm(A, 2) * 0.5 * np.linalg.norm(dv) * 1.001
    out = (rho < 1.0).astype(np.float64)
    edge = np.flatnonzero(np.abs(rho - 1.0) <= margin)
    sub = (np.arange(ss) + 0.5) / ss - 0.5
    offs = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3) * dv
    pts = c[edge][:, None, :] + offs[None]
    out[edge] = (np.linalg.norm((pts - center) @ A, axis=-1) <= 1.0).mean(-1)
    return out.reshape(scanner.n_voxel).astype(np.float32)


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def rot_zyx(az, ay, ax):
    cz, sz, cy, sy, cx, sx = np.cos(az), np.sin(az), np.cos(ay), np.sin(ay), np.cos(ax), np.sin(ax)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return Rz @ Ry @ Rx


# 128³ box of 256 mm, 96² detector with 4 mm pixels: the whole box is seen at magnification 1.5.
BIG = Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=[96, 96], dDetector=[4.0, 4.0],
                            nVoxel=[128, 128, 128], dVoxel=[2.0, 2.0, 2.0]))
BIG_ANGLES = np.array([0.0, 0.7, 2.1])


def analytic(scanner, angles, fn):
    return np.stack([fn(*rays64(scanner, a)) for a in angles]) / scanner.scene_scale


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["cone", "parallel"])
def test_constant_box_gives_mu_times_chord(mode):
    geo = dict(DSD=900.0, DSO=600.0, nDetector=[40, 48], dDetector=[6.0, 5.0], nVoxel=[24, 32, 20],
               dVoxel=[5.0, 4.0, 6.0], offOrigin=[10.0, -6.0, 8.0], offDetector=[7.0, -3.0], mode=mode)
    sc = Scanner.from_naf(geo)
    mu = 0.37
    angles = np.array([0.0, np.pi / 2, 1.1, 4.0])  # 0 and π/2: axis-parallel rays (slab edge cases)
    got = np.asarray(project(np.full(sc.n_voxel, mu, np.float32), sc, angles))
    lo, hi = sc.bbox
    want = mu * analytic(sc, angles, lambda o, d: box_chord(o, d, lo, hi, mode == "cone"))
    assert got.shape == (4, 40, 48) and got.dtype == np.float32
    hit = want > 0
    assert hit.mean() > 0.3
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6 * want.max())
    # Units: the longest chord is in metres (mm/1000), not world units.
    assert got.max() < 1.01 * mu * np.sqrt(sum((n * d) ** 2 for n, d in zip(geo["nVoxel"], geo["dVoxel"]))) / 1000


def test_row_zero_is_top_and_columns_follow_right():
    sc = Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=[16, 16], dDetector=[4.0, 4.0],
                               nVoxel=[16, 16, 16], dVoxel=[4.0, 4.0, 4.0]))
    vol = np.zeros(sc.n_voxel, np.float32)
    vol[8, 13, 13] = 1.0  # +y, +z corner region
    img = np.asarray(project(vol, sc, np.array([0.0])))[0]
    r, c = np.unravel_index(np.argmax(img), img.shape)
    assert r < 8 and c > 8  # +z -> top rows; at θ=0 the column axis is +y


def test_ball_and_rotated_ellipsoid_match_closed_form_chords():
    objs = {
        "ball": (np.array([0.1, -0.15, 0.2]), np.array([0.55, 0.55, 0.55]), np.eye(3)),
        "ellipsoid": (np.array([-0.1, 0.05, -0.1]), np.array([0.7, 0.35, 0.5]), rot_zyx(0.5, 0.3, -0.4)),
    }
    errs = {}
    for name, (c, s, R) in objs.items():
        vol = voxelise_ellipsoid(BIG, c, s, R)
        got = np.asarray(project(vol, BIG, BIG_ANGLES))
        want = analytic(BIG, BIG_ANGLES, lambda o, d: ellipsoid_chord(o, d, c, s, R))
        errs[name] = rel_l2(got, want)
    print(f"projector vs closed form, rel. L2: {errs}")
    assert all(e <= 0.02 for e in errs.values()), errs


def test_breathing_phantom_projection_matches_analytic():
    phantom = pytest.importorskip("x2gs_jax.data.phantom")
    from x2gs_jax.data.breathing import BreathingSignal

    ph = phantom.ThoraxPhantom.default(BreathingSignal(kind="static"))
    t = 0.25
    vol = np.asarray(ph.volume_at(t, BIG, supersample=3))
    got = np.asarray(project(vol, BIG, BIG_ANGLES))
    want = np.asarray(ph.project(BIG, BIG_ANGLES, np.full(BIG_ANGLES.shape, t)), np.float64)
    err = rel_l2(got, want)
    print(f"projector vs analytic phantom, rel. L2: {err:.4f}")
    assert err <= 0.02


SMALL = Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=[6, 7], dDetector=[40.0, 40.0],
                              nVoxel=[8, 7, 6], dVoxel=[20.0, 20.0, 20.0], offDetector=[10.0, 5.0]))


def test_gradient_matches_explicit_matrix_and_finite_difference():
    angles = np.array([0.3, 2.0])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random(SMALL.n_voxel), jnp.float32)
    y = jnp.asarray(rng.random((2, 6, 7)), jnp.float32)
    budget = 4 * n_ray_samples(SMALL)  # several chunks: the checkpointed lax.map is exercised
    A = lambda v: project(v, SMALL, angles, max_samples_per_chunk=budget)  # noqa: E731
    # Brute-force system matrix from the forward pass on every basis vector (one compiled shape).
    eye = np.eye(x.size, dtype=np.float32)
    M = np.stack([np.asarray(A(e.reshape(SMALL.n_voxel))).ravel() for e in eye], axis=1)  # [rays, voxels]
    np.testing.assert_allclose(M @ np.asarray(x).ravel(), np.asarray(A(x)).ravel(), rtol=1e-4, atol=1e-7)
    # Reverse mode (checkpointed chunks, scatter-add transpose) must be the transpose of that matrix.
    ax, vjp_fn = jax.vjp(A, x)
    (aty,) = vjp_fn(y)
    np.testing.assert_allclose(np.asarray(aty).ravel(), M.T @ np.asarray(y).ravel(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(jnp.vdot(ax, y)), float(jnp.vdot(x, aty)), rtol=1e-5)  # <Ax,y> = <x,A^T y>
    assert np.count_nonzero(np.asarray(aty)) > 0.5 * x.size
    # Central finite difference of the quadratic loss 0.5|Ax - b|^2 (exact up to float32 rounding).
    b = ax * 0.5
    (g,) = vjp_fn(ax - b)
    loss = lambda v: 0.5 * float(jnp.sum((A(v) - b) ** 2))  # noqa: E731
    dirn = jnp.asarray(rng.standard_normal(SMALL.n_voxel), jnp.float32)
    eps = 1e-2
    fd = (loss(x + eps * dirn) - loss(x - eps * dirn)) / (2 * eps)
    np.testing.assert_allclose(fd, float(jnp.vdot(g, dirn)), rtol=2e-3)


def test_chunking_does_not_change_the_result():
    rng = np.random.default_rng(1)
    vol = rng.random(SMALL.n_voxel).astype(np.float32)
    angles = np.linspace(0, 2 * np.pi, 5, endpoint=False)
    s = n_ray_samples(SMALL)
    ref = np.asarray(project(vol, SMALL, angles, max_samples_per_chunk=10**8))  # one chunk holding all views
    for budget in (s, 100 * s):  # one ray per chunk; 2 views per group -> a padded last group and ray padding
        np.testing.assert_allclose(np.asarray(project(vol, SMALL, angles, max_samples_per_chunk=budget)), ref,
                                   rtol=1e-6, atol=1e-8)


def test_rejects_wrong_volume_shape():
    with pytest.raises(ValueError, match="n_voxel"):
        project(np.zeros((8, 7, 5), np.float32), SMALL, np.zeros(1))
