"""Reference rasterizer backward: the custom VJP vs plain autodiff of a dense forward, vs central finite
differences of the float64 transcription (rasterizer.md §10.10), the §6.2 guards, the §6.3 screen-space
gradient, and zero/finite gradients for culled, μ = 0, density-0 and inactive Gaussians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_rasterize import N_SLOTS, make_scanner, random_scene, rel_l2, render, render_f64
from x2gs_jax.gaussians import Gaussians
from x2gs_jax.render import rasterize, rasterize_dense, rasterize_points
from x2gs_jax.render.projection import DET_GUARD, MU_GUARD, conic_and_mu, conic_and_mu_plain

ARGNUMS = (0, 1, 2, 3, 4)
NAMES = ("xyz", "scale", "rotation", "density", "ndc_offset")


def _loss_custom(xyz, scale, rot, rho, ndc, weights, camera):
    image, _ = rasterize_points(xyz, scale, rot, rho, camera, ndc_offset=ndc, backend="reference")
    return jnp.sum(weights * image)


def _loss_dense(xyz, scale, rot, rho, ndc, weights, camera):
    return jnp.sum(weights * rasterize_dense(xyz, scale, rot, rho, camera, ndc_offset=ndc))


grad_custom = jax.jit(jax.grad(_loss_custom, argnums=ARGNUMS))
grad_dense = jax.jit(jax.grad(_loss_dense, argnums=ARGNUMS))


def _scene(mode, angle, seed, n_main):
    rng = np.random.default_rng(seed)
    scanner = make_scanner(mode)
    xyz, s, q, rho = random_scene(rng, scanner, angle, n_main=n_main)
    q = q * rng.uniform(0.8, 1.2, (N_SLOTS, 1)).astype(np.float32)  # raw, non-unit quaternions: used as given
    weights = rng.normal(size=(40, 48)).astype(np.float32)
    return scanner.camera(angle), (xyz, s, q, rho), weights


@pytest.mark.parametrize("mode,angle,seed", [("cone", 0.6, 21), ("parallel", 2.4, 22)])
def test_custom_vjp_matches_autodiff_of_dense_forward(mode, angle, seed):
    """Away from the guards (Δ2 ≫ 3e-4, μ ≫ 1e-7) and the Jacobian clamp, §6 is the exact derivative."""
    cam, scene, weights = _scene(mode, angle, seed, n_main=20)
    ndc = jnp.zeros((N_SLOTS, 2), jnp.float32)
    got = grad_custom(*scene, ndc, weights, cam)
    want = grad_dense(*scene, ndc, weights, cam)
    for name, g, w in zip(NAMES, got, want):
        assert np.all(np.isfinite(np.asarray(g))), name
        assert np.linalg.norm(np.asarray(w)) > 0, name
        assert rel_l2(g, w) < 2e-5, (name, rel_l2(g, w))
    # zero-density padding slots get exactly zero gradient
    for g in got:
        assert np.all(np.asarray(g)[np.asarray(scene[3]) == 0] == 0)


def _fd_check(mode, angle, seed):
    """Central differences (float64) of L = Σ w·I for the first few Gaussians vs the custom VJP (float32)."""
    cam, scene, weights = _scene(mode, angle, seed, n_main=5)
    n_real = 5 + (6 if mode == "cone" else 3)
    real = [np.asarray(a[:n_real], np.float64) for a in scene]
    ndc0 = np.zeros((n_real, 2))
    got = grad_custom(*scene, jnp.zeros((N_SLOTS, 2), jnp.float32), weights, cam)
    w64 = weights.astype(np.float64)

    def loss_and_masks(params):
        image, _, masks = render_f64(*params[:4], cam, ndc_offset=params[4], return_masks=True)
        return float(np.sum(w64 * image)), masks

    params = real + [ndc0]
    results = {}
    skipped = 0
    for k, name in enumerate(NAMES):
        fd = np.zeros_like(params[k])
        keep = np.zeros(params[k].shape, bool)
        for idx in np.ndindex(params[k].shape):
            eps = 1e-6 if name != "ndc_offset" else 1e-7
            plus = [p.copy() for p in params]
            minus = [p.copy() for p in params]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            lp, mp = loss_and_masks(plus)
            lm, mm = loss_and_masks(minus)
            if not np.array_equal(mp, mm):  # a tile or threshold boundary was crossed: FD is meaningless there
                skipped += 1
                continue
            fd[idx] = (lp - lm) / (2 * eps)
            keep[idx] = True
        analytic = np.asarray(got[k], np.float64)[:n_real]
        results[name] = (analytic[keep], fd[keep])
    return results, skipped, got, scene


@pytest.mark.parametrize("mode,angle,seed", [("cone", 1.2, 31), ("parallel", 0.5, 32)])
def test_custom_vjp_matches_float64_finite_differences(mode, angle, seed):
    results, skipped, got, scene = _fd_check(mode, angle, seed)
    assert skipped <= 3
    for name, (analytic, fd) in results.items():
        assert np.linalg.norm(fd) > 0, name
        err = rel_l2(analytic, fd)
        assert err < 5e-4, (name, err)
    if mode == "parallel":
        # §6.2 path (i) only: for parallel beam ∂L/∂m = R_vᵀ (∂L/∂ndc_x, ∂L/∂ndc_y, 0) exactly (J is constant)
        cam = make_scanner("parallel").camera(0.5)
        Rv = np.asarray(cam.viewmatrix[:3, :3], np.float64)
        g_ndc = np.asarray(got[4], np.float64)
        np.testing.assert_allclose(np.asarray(got[0]), g_ndc @ Rv[:2], rtol=1e-5, atol=1e-6 * np.abs(g_ndc).max())


def test_screen_space_gradient_is_pixel_gradient_times_half_size():
    """§6.3: ∂L/∂ndc = (W/2, H/2)·∂L/∂p; shifting p by δ pixels equals shifting ndc by 2δ/(W, H)."""
    cam, scene, weights = _scene("cone", 2.9, 41, n_main=20)
    got = grad_custom(*scene, jnp.zeros((N_SLOTS, 2), jnp.float32), weights, cam)
    g_ndc = np.asarray(got[4], np.float64)
    # ∂L/∂p from the float64 transcription by shifting each projected centre by ±1e-4 px in x and y
    xyz, s, q, rho = (np.asarray(a, np.float64) for a in scene)
    w64 = weights.astype(np.float64)
    idx = np.flatnonzero(rho > 0)[:8]
    for i in idx:
        for axis, size in ((0, 48), (1, 40)):
            off = np.zeros((N_SLOTS, 2))
            off[i, axis] = 2 * 1e-4 / size  # +1e-4 px
            lp = np.sum(w64 * render_f64(xyz, s, q, rho, cam, ndc_offset=off)[0])
            lm = np.sum(w64 * render_f64(xyz, s, q, rho, cam, ndc_offset=-off)[0])
            dldp = (lp - lm) / 2e-4
            assert abs(g_ndc[i, axis] - dldp * size / 2) <= 2e-3 * abs(dldp * size / 2) + 1e-4, (i, axis)


# ----------------------------------------------------------------------------------------- §6.2 guards
@jax.jit
def _vjp_both(cov6, g_conic, g_mu):
    """VJPs of the reference-guarded and the plain conic/μ maps for the same cotangents."""
    out = []
    for fn in (conic_and_mu, conic_and_mu_plain):
        _, pullback = jax.vjp(fn, cov6)
        out.append(pullback((g_conic, g_mu))[0])
    return out


def _vjp(fn, cov6, g_conic, g_mu):
    both = _vjp_both(*(jnp.asarray(a, jnp.float32) for a in (cov6, g_conic, g_mu)))
    return np.asarray(both[0 if fn is conic_and_mu else 1], np.float64)


def _spd_cov6(rng, n, scale):
    m = rng.normal(size=(n, 3, 3)) * scale
    s = m @ np.swapaxes(m, 1, 2) + np.eye(3) * scale**2 * 0.5
    return np.stack([s[:, 0, 0], s[:, 0, 1], s[:, 0, 2], s[:, 1, 1], s[:, 1, 2], s[:, 2, 2]], -1)


def test_conic_mu_guards():
    rng = np.random.default_rng(51)
    g_conic = rng.normal(size=(6, 3))
    g_mu = rng.normal(size=6)
    zeros3, zeros1 = np.zeros((6, 3)), np.zeros(6)
    # well conditioned: the guards are invisible
    cov = _spd_cov6(rng, 6, 3.0)
    for gc, gm in ((g_conic, g_mu), (g_conic, zeros1), (zeros3, g_mu)):
        np.testing.assert_allclose(_vjp(conic_and_mu, cov, gc, gm), _vjp(conic_and_mu_plain, cov, gc, gm), rtol=2e-4,
                                   atol=1e-6)
    # tiny footprints (Δ2 ~ 1e-4): the conic part is scaled by Δ2²/(Δ2² + 1e-7), the μ part by μ/(μ + 1e-7)
    cov = _spd_cov6(rng, 6, 0.05)
    det2 = cov[:, 0] * cov[:, 3] - cov[:, 1] ** 2
    _, mu = jax.jit(conic_and_mu)(jnp.asarray(cov, jnp.float32))
    mu = np.asarray(mu, np.float64)
    assert np.all(det2**2 < DET_GUARD)  # the guard matters here
    conic_ref = _vjp(conic_and_mu, cov, g_conic, zeros1)
    conic_plain = _vjp(conic_and_mu_plain, cov, g_conic, zeros1)
    np.testing.assert_allclose(conic_ref, conic_plain * (det2**2 / (det2**2 + DET_GUARD))[:, None], rtol=2e-3,
                               atol=1e-6 * np.abs(conic_plain).max())
    mu_ref = _vjp(conic_and_mu, cov, zeros3, g_mu)
    mu_plain = _vjp(conic_and_mu_plain, cov, zeros3, g_mu)
    np.testing.assert_allclose(mu_ref, mu_plain * (mu / (mu + MU_GUARD))[:, None], rtol=2e-3,
                               atol=1e-6 * np.abs(mu_plain).max())
    # μ == 0 (Δ3 < 0) and Δ2 == 0: zero, finite gradients
    bad = np.array([[1.0, 0.0, 1.0, 1.0, 1.0, 0.5],  # Δ3 = 0.5 − 1 − 1 < 0 → μ = 0
                    [1.0, 1.0, 0.0, 1.0, 0.0, 1.0],  # Δ2 = 0
                    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    conic, mu = jax.jit(conic_and_mu)(jnp.asarray(bad, jnp.float32))
    assert np.all(np.asarray(mu) == 0) and np.all(np.isfinite(np.asarray(conic)))
    bad6 = np.concatenate([bad, cov[:3]])  # same shapes as above: no recompilation
    g = _vjp(conic_and_mu, bad6, np.ones((6, 3)), np.ones(6))
    assert np.all(g[:3] == 0) and np.all(g[3:] != 0)
    g_plain = _vjp(conic_and_mu_plain, bad6, np.ones((6, 3)), np.ones(6))
    assert np.all(np.isfinite(g_plain))


# ----------------------------------------------------------------------------------------- degenerate cases
def test_degenerate_and_culled_gradients_are_zero_and_finite():
    scanner = make_scanner("parallel")
    cam = scanner.camera(0.0)  # view direction −x
    rng = np.random.default_rng(61)
    xyz, s, q, rho = random_scene(rng, scanner, 0.0, n_main=10, extras=False)
    q = q.copy()
    special = {
        10: dict(xyz=[0.1, 0.1, 0.1], scale=[0.0, 0.08, 0.08], rot=[1, 0, 0, 0], rho=1.0),  # no thickness along the ray: μ = 0
        11: dict(xyz=[0.0, -0.1, 0.2], scale=[0.0, 0.0, 0.0], rot=[1, 0, 0, 0], rho=1.0),  # Σ = 0: Δ2 = 0, culled
        12: dict(xyz=[0.2, 5.0, 0.0], scale=[0.05, 0.05, 0.05], rot=[0.3, 0.1, 0, 0.2], rho=1.0),  # off-image
        13: dict(xyz=[0.0, 0.2, -0.3], scale=[0.06, 0.05, 0.07], rot=[0.9, 0.1, 0.2, 0.3], rho=0.0),  # density 0
        14: dict(xyz=[9.0, 0.0, 0.0], scale=[0.05, 0.05, 0.05], rot=[1, 0, 0, 0], rho=1.0),  # behind the near plane
        15: dict(xyz=[0.1, 0.0, 0.1], scale=[0.05, 0.06, 0.07], rot=[0, 0, 0, 0], rho=1.0),  # zero quaternion
    }
    for i, d in special.items():
        xyz[i], s[i], q[i], rho[i] = d["xyz"], d["scale"], d["rot"], d["rho"]
    scene = (xyz, s, q, rho)
    weights = rng.normal(size=(40, 48)).astype(np.float32)
    ndc = jnp.zeros((N_SLOTS, 2), jnp.float32)
    image, aux = render(*scene, cam)
    radii = np.asarray(aux.radii)
    assert radii[10] > 0 and radii[13] > 0  # μ = 0 and ρ = 0 are still "visible", as in the reference
    assert radii[11] == 0 and radii[12] == 0 and radii[14] == 0
    got = grad_custom(*scene, ndc, weights, cam)
    plain = grad_dense(*scene, ndc, weights, cam)
    for name, g, p in zip(NAMES, got, plain):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(np.isfinite(np.asarray(p))), name
        assert np.all(g[10:15] == 0), name
        assert np.any(g[:10] != 0), name
    ref, _ = render_f64(*scene, cam)
    assert rel_l2(image, ref) < 1e-4


def test_inactive_slots_get_zero_gradient():
    scanner = make_scanner("cone")
    cam = scanner.camera(0.3)
    rng = np.random.default_rng(71)
    xyz, s, q, rho = random_scene(rng, scanner, 0.3, n_main=12, extras=False)
    g = Gaussians.from_activated(xyz[:12], s[:12], q[:12], rho[:12], capacity=N_SLOTS)
    g = g.replace(xyz=g.xyz.at[12:].set(0.05), scaling=g.scaling.at[12:].set(-2.0),
                  density=g.density.at[12:].set(3.0), rotation=g.rotation.at[12:].set(5.0))
    weights = jnp.asarray(rng.normal(size=(40, 48)), jnp.float32)
    fields = ("xyz", "scaling", "rotation", "density")

    def loss(*params):
        return jnp.sum(weights * rasterize(g.replace(**dict(zip(fields, params))), cam, backend="reference"))

    grads = dict(zip(fields, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*(getattr(g, f) for f in fields))))
    for name in fields:
        arr = np.asarray(grads[name])
        assert np.all(np.isfinite(arr)), name
        assert np.all(arr[12:] == 0), name
        assert np.any(arr[:12] != 0), name
    # the raw-rotation gradient is tangent to the unit sphere (normalisation inside `rasterize`)
    rot = np.asarray(g.rotation[:12], np.float64)
    radial = np.sum(np.asarray(grads["rotation"][:12], np.float64) * rot, -1) / np.linalg.norm(rot, axis=-1)
    assert np.max(np.abs(radial)) < 1e-4 * np.abs(np.asarray(grads["rotation"])).max()
