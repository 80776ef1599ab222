"""Losses: SSIM vs a brute-force float64 oracle and closed forms, TV, TV patch sampling, HexPlane terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax import losses

C1, C2 = 0.01**2, 0.03**2

# Jitted once per shape: eager dispatch of the unrolled window taps is slow on CPU.
ssim_map = jax.jit(losses.ssim_map)
ssim = jax.jit(losses.ssim)
dssim = jax.jit(losses.dssim)
ssim_per_image = jax.jit(losses.ssim_per_image)


# ----------------------------------------------------------------------------------------- oracles
def window_2d_np(window=11, sigma=1.5):
    k = np.arange(window) - window // 2
    g = np.exp(-(k**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim_map_np(a, b, window=11, sigma=1.5):
    """Straightforward float64 SSIM: full 2-D window, zero padding, explicit loop over pixels."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    w = window_2d_np(window, sigma)
    p = window // 2
    h, wd = a.shape
    stats = {}
    for name, img in (("m1", a), ("m2", b), ("e11", a * a), ("e22", b * b), ("e12", a * b)):
        padded = np.zeros((h + 2 * p, wd + 2 * p))
        padded[p : p + h, p : p + wd] = img
        out = np.empty((h, wd))
        for i in range(h):
            for j in range(wd):
                out[i, j] = np.sum(padded[i : i + window, j : j + window] * w)
        stats[name] = out
    m1, m2 = stats["m1"], stats["m2"]
    v1, v2, cov = stats["e11"] - m1**2, stats["e22"] - m2**2, stats["e12"] - m1 * m2
    return ((2 * m1 * m2 + C1) * (2 * cov + C2)) / ((m1**2 + m2**2 + C1) * (v1 + v2 + C2))


# ----------------------------------------------------------------------------------------- SSIM
@pytest.mark.parametrize("shape", [(13, 17), (6, 9)])  # (6, 9): every pixel is a border pixel
def test_ssim_matches_bruteforce(shape):
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 2, shape).astype(np.float32)  # raw line integrals may exceed 1
    b = (a + rng.normal(0, 0.3, shape)).astype(np.float32)
    ref = ssim_map_np(a, b)
    got_map = np.asarray(ssim_map(a, b))
    np.testing.assert_allclose(got_map, ref, atol=1e-6, rtol=0)
    assert abs(float(ssim(a, b)) - ref.mean()) < 1e-6
    assert abs(float(dssim(a, b)) - (1 - ref.mean())) < 1e-6


def test_ssim_batched_is_mean_of_images():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (3, 10, 12)).astype(np.float32)
    b = rng.uniform(0, 1, (3, 10, 12)).astype(np.float32)
    refs = np.array([ssim_map_np(a[i], b[i]).mean() for i in range(3)])
    np.testing.assert_allclose(np.asarray(ssim_per_image(a, b)), refs, atol=1e-6, rtol=0)
    assert abs(float(ssim(a, b)) - refs.mean()) < 1e-6


def test_ssim_identical_is_one():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 3, (16, 20)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ssim_map(a, a)), 1.0, atol=1e-6)
    assert abs(float(dssim(a, a))) < 1e-6


def test_ssim_constant_images_closed_form():
    # Constant images a, b: with W(p) the window mass inside the image at pixel p,
    # mu = aW, var = a^2 W(1-W), cov = ab W(1-W); interior (W=1) gives (2ab+C1)/(a^2+b^2+C1).
    h, w, a, b = 24, 26, 0.7, 0.4
    g = window_2d_np()[5] / window_2d_np()[5].sum()  # 1-D taps
    def mass_1d(n):
        return np.array([sum(g[k] for k in range(11) if 0 <= i + k - 5 < n) for i in range(n)])
    mass = np.outer(mass_1d(h), mass_1d(w))
    s = a * a + b * b
    expected = ((2 * a * b * mass**2 + C1) * (2 * a * b * mass * (1 - mass) + C2)) / (
        (s * mass**2 + C1) * (s * mass * (1 - mass) + C2)
    )
    got = np.asarray(ssim_map(np.full((h, w), a, np.float32), np.full((h, w), b, np.float32)))
    # Tolerance 1e-4: float32 E[x^2] - mu^2 cancels to ~1e-7 absolute, which C2 = 9e-4 amplifies
    # (the reference computes in float32 too); the border values themselves vary by ~0.1.
    assert np.ptp(expected) > 0.05
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    interior = (2 * a * b + C1) / (s + C1)
    np.testing.assert_allclose(got[5:-5, 5:-5], interior, atol=1e-4, rtol=0)
    assert abs(float(ssim(np.full((h, w), a), np.full((h, w), b))) - expected.mean()) < 1e-4


def test_ssim_input_validation():
    with pytest.raises(ValueError, match="odd"):
        losses.ssim(np.zeros((8, 8)), np.zeros((8, 8)), window=10)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match=r"\[H, W\] or \[B, H, W\]"):
        ssim(np.zeros((2, 2, 8, 8)), np.zeros((2, 2, 8, 8)))


def test_ssim_gradients():
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.uniform(0, 1, (12, 14)), jnp.float32)
    b = jnp.asarray(rng.uniform(0, 1, (12, 14)), jnp.float32)
    grad_fn = jax.jit(jax.grad(losses.ssim))
    # At identical images SSIM is maximal: the gradient exists, is finite and (stationary) ~0.
    g_same = np.asarray(grad_fn(a, a))
    assert np.all(np.isfinite(g_same)) and np.max(np.abs(g_same)) < 1e-5
    # Elsewhere: directional derivative vs. central finite difference of the float64 oracle.
    g = np.asarray(grad_fn(a, b))
    d = rng.normal(size=a.shape)
    eps = 1e-4
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fd = (ssim_map_np(a64 + eps * d, b64).mean() - ssim_map_np(a64 - eps * d, b64).mean()) / (2 * eps)
    np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-3, atol=1e-6)


def test_render_loss():
    rng = np.random.default_rng(4)
    gt = rng.uniform(0, 1, (10, 11)).astype(np.float32)
    pred = gt + np.float32(0.3)
    total, terms = jax.jit(losses.render_loss)(pred, gt)
    assert abs(float(terms["l1"]) - 0.3) < 1e-6
    expected_dssim = 1 - ssim_map_np(pred, gt).mean()
    assert abs(float(terms["dssim"]) - expected_dssim) < 1e-6
    assert abs(float(total) - (0.3 + 0.25 * expected_dssim)) < 1e-6
    # At pred == gt: L1 kink has zero subgradient (PyTorch convention) and SSIM is stationary.
    g = np.asarray(jax.jit(jax.grad(lambda p: losses.render_loss(p, gt)[0]))(jnp.asarray(gt)))
    assert np.all(np.isfinite(g)) and np.max(np.abs(g)) < 1e-5
    total2, _ = jax.jit(losses.render_loss, static_argnames="lambda_dssim")(pred, gt, lambda_dssim=1.0)
    assert abs(float(total2) - (0.3 + expected_dssim)) < 1e-6


# ----------------------------------------------------------------------------------------- TV
def test_tv_step_edge():
    nx, ny, nz, h = 5, 4, 3, 0.8
    v = np.zeros((nx, ny, nz), np.float32)
    v[2:] = h  # one jump of height h along x for every (y, z)
    m = (nx - 1) * ny * nz + nx * (ny - 1) * nz + nx * ny * (nz - 1)
    assert abs(float(losses.tv_3d(v)) - h * ny * nz / m) < 1e-7
    # The same edge along z.
    vz = np.zeros((nx, ny, nz), np.float32)
    vz[:, :, 1:] = -h
    assert abs(float(losses.tv_3d(vz)) - h * nx * ny / m) < 1e-7


def test_tv_matches_bruteforce_and_32_cube_normaliser():
    rng = np.random.default_rng(5)
    v = rng.normal(size=(6, 7, 4))
    total, count = 0.0, 0
    for i in range(6):
        for j in range(7):
            for k in range(4):
                for di, dj, dk in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
                    if i + di < 6 and j + dj < 7 and k + dk < 4:
                        total += abs(v[i + di, j + dj, k + dk] - v[i, j, k])
                        count += 1
    assert abs(float(losses.tv_3d(v.astype(np.float32))) - total / count) < 1e-5
    # For the reference 32^3 patch the normaliser is 3 * 31 * 32^2 = 95,232.
    ones_x = np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None], (32, 32, 32))
    assert abs(float(losses.tv_3d(ones_x)) - 31 * 32 * 32 / 95232) < 1e-6


def test_tv_gradient_finite():
    grad_fn = jax.jit(jax.grad(losses.tv_3d))
    g = np.asarray(grad_fn(jnp.full((4, 5, 6), 0.3, jnp.float32)))  # all differences at the |x| kink
    assert np.all(np.isfinite(g)) and np.all(g == 0)
    rng = np.random.default_rng(6)
    v = rng.normal(size=(4, 5, 6)).astype(np.float32)
    g = np.asarray(grad_fn(v))
    m = 3 * 4 * 5 * 6 - (5 * 6 + 4 * 6 + 4 * 5)
    # d/dv_p sum|v_q - v_p| over forward differences: sign of each difference it enters.
    expected = np.zeros_like(v, dtype=np.float64)
    for axis in range(3):
        s = np.sign(np.diff(v.astype(np.float64), axis=axis))
        sl_hi = [slice(None)] * 3
        sl_lo = [slice(None)] * 3
        sl_hi[axis], sl_lo[axis] = slice(1, None), slice(None, -1)
        expected[tuple(sl_hi)] += s
        expected[tuple(sl_lo)] -= s
    np.testing.assert_allclose(g, expected / m, atol=1e-7)


def test_tv_validation():
    with pytest.raises(ValueError, match=r"\[nx, ny, nz\]"):
        losses.tv_3d(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="no forward differences"):
        losses.tv_3d(np.zeros((1, 1, 1)))


def test_tv_patch_center():
    lo = np.array([-1.0, -0.8, -0.5], np.float32)
    hi = np.array([1.0, 0.8, 0.9], np.float32)
    size = losses.tv_patch_size((0.0125, 0.0125, 0.01))  # 32 voxels
    np.testing.assert_allclose(size, [0.4, 0.4, 0.32], rtol=1e-6)
    keys = jax.random.split(jax.random.key(0), 2000)
    centers = np.asarray(jax.jit(jax.vmap(losses.tv_patch_center, in_axes=(0, None, None, None)))(keys, lo, hi, size))
    assert np.all(centers - size / 2 >= lo - 1e-6) and np.all(centers + size / 2 <= hi + 1e-6)
    # Uniform over the admissible range: the extremes get close to both ends.
    span = hi - lo - size
    frac = (centers - lo - size / 2) / span
    assert np.all(frac.min(0) < 0.01) and np.all(frac.max(0) > 0.99)
    key = jax.random.key(7)
    c1 = np.asarray(losses.tv_patch_center(key, lo, hi, size))
    c2 = np.asarray(losses.tv_patch_center(key, lo, hi, size))
    np.testing.assert_array_equal(c1, c2)
    u = np.asarray(jax.random.uniform(key, (3,), jnp.float32))
    np.testing.assert_allclose(c1, lo + size / 2 + u * span, atol=1e-6)
    assert not np.allclose(c1, np.asarray(losses.tv_patch_center(jax.random.key(8), lo, hi, size)))
    with pytest.raises(ValueError, match="bbox_min/bbox_max"):
        losses.tv_patch_center(key, lo[:2], hi, size)


# ----------------------------------------------------------------------------------------- HexPlane
def test_plane_smoothness_closed_forms():
    c, rows, cols = 3, 9, 5
    r = np.arange(rows, dtype=np.float32)[None, :, None]
    col_pattern = np.random.default_rng(7).normal(size=(c, 1, cols)).astype(np.float32)
    ramp = 0.7 * r + col_pattern  # linear along rows, arbitrary along columns
    assert abs(float(losses.plane_smoothness(ramp))) < 1e-9
    q = 0.25
    quad = q * r**2 + np.zeros((c, rows, cols), np.float32)  # second difference 2q everywhere
    assert abs(float(losses.plane_smoothness(quad)) - 4 * q * q) < 1e-6
    # Variation only along columns is not penalised (row axis only).
    cols_only = np.broadcast_to(np.random.default_rng(8).normal(size=(c, 1, cols)), (c, rows, cols))
    assert abs(float(losses.plane_smoothness(cols_only))) < 1e-9
    # Transposed quadratic (along columns) is not penalised either.
    assert abs(float(losses.plane_smoothness(np.swapaxes(quad, 1, 2)[:, :, :rows]))) < 1e-9


def test_plane_smoothness_bruteforce_and_batch_axis():
    rng = np.random.default_rng(9)
    p = rng.normal(size=(2, 6, 4))
    vals = [
        (p[ci, ri + 2, wi] - 2 * p[ci, ri + 1, wi] + p[ci, ri, wi]) ** 2
        for ci in range(2)
        for ri in range(4)
        for wi in range(4)
    ]
    got = float(losses.plane_smoothness(p.astype(np.float32)))
    assert abs(got - np.mean(vals)) < 1e-5
    assert abs(float(losses.plane_smoothness(p[None].astype(np.float32))) - got) < 1e-7
    with pytest.raises(ValueError, match="rows>=3"):
        losses.plane_smoothness(np.zeros((2, 2, 5)))


def test_hexplane_regularisers():
    rng = np.random.default_rng(10)
    # Two levels in the reference order (xy, xz, xt, yz, yt, zt) with [C, R_b, R_a] shapes.
    levels = []
    for res in (4, 8):
        rs = {"x": res, "y": res + 1, "z": res + 2, "t": 5}
        level = [rng.normal(1.0, 0.2, (2, rs[b], rs[a])).astype(np.float32) for a, b in
                 (("x", "y"), ("x", "z"), ("x", "t"), ("y", "z"), ("y", "t"), ("z", "t"))]
        levels.append(level)
    spatial, time = losses.split_hexplane(levels)
    assert len(spatial) == 6 and len(time) == 6
    assert spatial[2] is levels[0][3] and spatial[3] is levels[1][0] and time[1] is levels[0][4]

    def s_np(p):
        p = p.astype(np.float64)
        return np.mean((p[:, 2:] - 2 * p[:, 1:-1] + p[:, :-2]) ** 2)

    s_sp = sum(s_np(p) for p in spatial)
    s_t = sum(s_np(p) for p in time)
    l1_t = sum(np.mean(np.abs(1 - p.astype(np.float64))) for p in time)
    total, terms = jax.jit(losses.hexplane_regularisers)(spatial, time)
    np.testing.assert_allclose(float(terms["plane_tv"]), s_sp, rtol=1e-5)
    np.testing.assert_allclose(float(terms["time_smoothness"]), s_t, rtol=1e-5)
    np.testing.assert_allclose(float(terms["l1_time_planes"]), l1_t, rtol=1e-5)
    np.testing.assert_allclose(float(total), 1e-4 * s_sp + 1e-3 * s_t + 1e-4 * l1_t, rtol=1e-5)
    # Freshly initialised time planes (all ones) contribute nothing.
    ones = [np.ones_like(p) for p in time]
    _, terms_ones = jax.jit(losses.hexplane_regularisers)(spatial, ones)
    assert float(terms_ones["l1_time_planes"]) == 0.0 and float(terms_ones["time_smoothness"]) == 0.0
    # Gradients are finite, and zero at the |1 - P| kink of all-ones planes (PyTorch's abs'(0) = 0).
    grad_fn = jax.jit(jax.grad(lambda ps: losses.hexplane_regularisers(spatial, ps)[0]))
    g = grad_fn(ones)
    assert all(np.all(np.asarray(x) == 0) for x in g)
    g = grad_fn(time)
    assert all(np.all(np.isfinite(np.asarray(x))) and np.any(np.asarray(x) != 0) for x in g)
    with pytest.raises(ValueError, match="expected 6"):
        losses.split_hexplane([levels[0][:5]])
