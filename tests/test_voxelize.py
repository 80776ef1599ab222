"""Tests of the reference voxelizer (x2gs_jax.render.voxelize): upstream parity, float64 oracles, gradients."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.gaussians import Gaussians
from x2gs_jax.geometry import Scanner
from x2gs_jax.render.voxelize import Grid, voxel_pair_count, voxelize, voxelize_points

# Small scenes use a small chunk so that the pair loop runs several iterations.
CHUNK = 48


# ---------------------------------------------------------------------------------- float64 oracles
def rotation64(q):
    """Rotation-like matrices [C, 3, 3] of raw quaternions (w, x, y, z) [C, 4], used as given."""
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def oracle_volume(m, s, q, rho, n, size, center, culling):
    """Dense float64 transcription of rasterizer.md §7.2 (R2 "extent") / §7.3 (X2 "center"): [nx, ny, nz]."""
    m, s, q, rho = (np.asarray(a, np.float64) for a in (m, s, q, rho))
    n = np.asarray(n)
    size, center = np.asarray(size, np.float64), np.asarray(center, np.float64)
    h = size / n
    v = (m - (center - size / 2)) / h
    R = rotation64(q)
    cov = R @ (s[:, :, None] ** 2 * np.swapaxes(R, -1, -2))
    cov_v = cov / (h[:, None] * h[None, :])
    Q = np.linalg.inv(cov_v)
    if culling == "extent":
        r = np.ceil(3 * s.max(1, keepdims=True) / h)
        culled = np.any((v + r < 0) | (v - r > n), axis=1)
    else:
        r = np.repeat(np.ceil(3 * np.max(s / h, axis=1, keepdims=True)), 3, axis=1)
        culled = np.any((v < 0) | (v > n), axis=1)
    tiles = -(-n // 8)
    tmin = np.clip(np.trunc((v - r) / 8), 0, tiles)
    tmax = np.clip(np.trunc((v + r + 7) / 8), 0, tiles)
    culled |= np.any(tmax <= tmin, axis=1)
    idx = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), -1).reshape(-1, 3)  # [V, 3]
    tile = idx // 8
    in_box = np.all((tile[None] >= tmin[:, None]) & (tile[None] < tmax[:, None]), axis=-1)  # [C, V]
    d = v[:, None, :] - (idx[None] + 0.5)
    E = -0.5 * np.einsum("cva,cab,cvb->cv", d, Q, d)
    alpha = rho[:, None] * np.exp(E)
    keep = in_box & ~culled[:, None] & (E <= 0) & (alpha >= 1e-6)
    return np.where(keep, alpha, 0.0).sum(0).reshape(tuple(n))


def dense_autodiff_volume(m, s, q, rho, n, size, center, culling):
    """The same dense model in JAX float32, differentiated by plain autodiff (support masks held fixed)."""
    n_arr = jnp.asarray(n, jnp.float32)
    size, center = jnp.asarray(size, jnp.float32), jnp.asarray(center, jnp.float32)
    h = size / n_arr
    v = (m - (center - size / 2)) / h
    from x2gs_jax.gaussians import covariance

    cov_v = covariance(s, q) / (h[:, None] * h[None, :])
    Q = jnp.linalg.inv(cov_v)
    vs, ss = jax.lax.stop_gradient(v), jax.lax.stop_gradient(s)
    if culling == "extent":
        r = jnp.ceil(3 * ss.max(1, keepdims=True) / h)
        culled = jnp.any((vs + r < 0) | (vs - r > n_arr), axis=1)
    else:
        r = jnp.ceil(3 * jnp.max(ss / h, axis=1, keepdims=True)) * jnp.ones((1, 3))
        culled = jnp.any((vs < 0) | (vs > n_arr), axis=1)
    tiles = jnp.asarray([-(-k // 8) for k in n], jnp.float32)
    tmin = jnp.clip(jnp.trunc((vs - r) / 8), 0, tiles)
    tmax = jnp.clip(jnp.trunc((vs + r + 7) / 8), 0, tiles)
    idx = np.stack(np.meshgrid(*[np.arange(k) for k in n], indexing="ij"), -1).reshape(-1, 3)
    tile = jnp.asarray(idx // 8, jnp.float32)
    in_box = jnp.all((tile[None] >= tmin[:, None]) & (tile[None] < tmax[:, None]), axis=-1)
    d = v[:, None, :] - (jnp.asarray(idx, jnp.float32)[None] + 0.5)
    E = -0.5 * jnp.einsum("cva,cab,cvb->cv", d, Q, d)
    alpha = rho[:, None] * jnp.exp(E)
    keep = in_box & ~culled[:, None] & (jax.lax.stop_gradient(E) <= 0) & (jax.lax.stop_gradient(alpha) >= 1e-6)
    return jnp.where(keep, alpha, 0.0).sum(0).reshape(n)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_scene(rng, c, grid_n, size, center, s_range, outside=0.2, unit_q=False):
    """C Gaussians: centres over the box enlarged by `outside` on each side, log-uniform per-axis scales in
    s_range (voxel units of the first axis), random (optionally non-unit) quaternions, densities in [0.05, 1.5]."""
    size, center = np.asarray(size), np.asarray(center)
    h0 = size[0] / grid_n[0]
    m = center + (rng.uniform(-0.5 - outside, 0.5 + outside, (c, 3))) * size
    s = np.exp(rng.uniform(np.log(s_range[0] * h0), np.log(s_range[1] * h0), (c, 3)))
    q = rng.normal(size=(c, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    if not unit_q:
        q *= rng.uniform(0.9, 1.1, (c, 1))  # the kernel uses the quaternion as given
    rho = rng.uniform(0.05, 1.5, c)
    return [np.asarray(a, np.float32) for a in (m, s, q, rho)]


SMALL_N, SMALL_SIZE, SMALL_CENTER = (20, 16, 12), (1.0, 0.8, 0.7), (0.1, -0.05, 0.02)
SMALL_C = 24  # every small scene has this many slots, so the jitted helpers below compile once per option set


@partial(jax.jit, static_argnames=("culling", "mean_grad", "chunk_pairs"))
def vox_small(m, s, q, rho, grid, culling="extent", mean_grad="true", chunk_pairs=CHUNK):
    return voxelize_points(m, s, q, rho, grid, culling=culling, mean_grad=mean_grad, backend="reference",
                           chunk_pairs=chunk_pairs)


@partial(jax.jit, static_argnames=("culling", "mean_grad"))
def vol_grad_small(w, m, s, q, rho, grid, culling="extent", mean_grad="true"):
    """(volume, gradients of L = sum(w * volume) w.r.t. (means, scales, rotations, densities))."""
    def loss(*a):
        vol = vox_small(*a, grid, culling=culling, mean_grad=mean_grad)
        return jnp.sum(w * vol), vol

    grads, vol = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(m, s, q, rho)
    return vol, grads


def small_grid(center=SMALL_CENTER):
    return Grid(n=SMALL_N, size=SMALL_SIZE, center=center)


# ---------------------------------------------------------------------------------- Grid
def test_grid_pytree_and_geometry():
    grid = Grid(n=(4, 5, 6), size=(2.0, 1.0, 3.0), center=(0.5, 0.0, -1.0))
    leaves, treedef = jax.tree_util.tree_flatten(grid)
    assert len(leaves) == 2 and all(np.shape(x) == (3,) for x in leaves)  # n is static metadata
    assert grid.n == (4, 5, 6)
    np.testing.assert_allclose(grid.h, [0.5, 0.2, 0.5], rtol=1e-7)
    c = np.asarray(grid.voxel_centers())
    assert c.shape == (4, 5, 6, 3)
    np.testing.assert_allclose(c[0, 0, 0], [0.5 - 1 + 0.25, -0.5 + 0.1, -1 - 1.5 + 0.25], rtol=1e-6)
    np.testing.assert_allclose(c[3, 4, 5], [0.5 + 1 - 0.25, 0.5 - 0.1, -1 + 1.5 - 0.25], rtol=1e-6)

    sc = Scanner(mode="cone", DSD=7.0, DSO=5.0, n_detector=(8, 8), d_detector=(0.5, 0.5), n_voxel=(6, 4, 5),
                 d_voxel=(0.3, 0.25, 0.2), off_origin=(0.1, 0.2, -0.3))
    g2 = Grid.from_scanner(sc)
    assert g2.n == (6, 4, 5)
    np.testing.assert_allclose(g2.voxel_centers(), sc.voxel_centers(), atol=1e-6)
    patch = Grid.patch(sc, jnp.array([0.0, 0.1, 0.2]), n=3)
    np.testing.assert_allclose(patch.h, sc.d_voxel, rtol=1e-6)
    np.testing.assert_allclose(patch.center, [0.0, 0.1, 0.2])


def test_input_validation():
    m = np.zeros((2, 3), np.float32)
    s = np.full((2, 3), 0.1, np.float32)
    q = np.tile(np.float32([1, 0, 0, 0]), (2, 1))
    rho = np.ones(2, np.float32)
    grid = Grid(n=(8, 8, 8), size=(2, 2, 2), center=(0, 0, 0))
    with pytest.raises(ValueError, match="rotations"):
        voxelize_points(m, s, q[:, :3], rho, grid)
    with pytest.raises(ValueError, match="densities"):
        voxelize_points(m, s, q, rho[:1], grid)
    with pytest.raises(ValueError, match="culling"):
        voxelize_points(m, s, q, rho, grid, culling="box")
    with pytest.raises(ValueError, match="mean_grad"):
        voxelize_points(m, s, q, rho, grid, mean_grad="h2")
    with pytest.raises(ValueError, match="Grid.n"):
        Grid(n=(8, 8), size=(2, 2, 2), center=(0, 0, 0))
    with pytest.raises(ValueError, match="Grid.size"):
        Grid(n=(8, 8, 8), size=(2, -1, 2), center=(0, 0, 0))


# ---------------------------------------------------------------------------------- upstream parity
def _upstream(upstream_cases):
    d = upstream_cases
    grid = Grid(n=tuple(int(v) for v in d["vox_n"]), size=d["vox_size"], center=d["vox_center"])
    args = [jnp.asarray(d["vox_" + k], jnp.float32) for k in ("xyz", "scale", "rotation_wxyz", "density")]
    return d, grid, args


@jax.jit
def _upstream_center(w, m, s, q, rho, grid):
    """X2 culling: volume and the gradients of sum(w * volume) for both mean-gradient conventions."""
    out = []
    for mode in ("true", "reference_h2"):
        def loss(*a):
            vol = voxelize_points(*a, grid, culling="center", mean_grad=mode, backend="reference")
            return jnp.sum(w * vol), vol

        out.append(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(m, s, q, rho))
    return out


def test_upstream_parity(upstream_cases):
    d, grid, args = _upstream(upstream_cases)
    ref = d["vox_volume"]
    (g_true, vol), (g_h2, _) = _upstream_center(jnp.asarray(d["vox_weights"]), *args, grid)
    assert rel_l2(vol, ref) <= 1e-4
    for grads in (g_true, g_h2):
        assert rel_l2(grads[3], d["vox_grad_density"]) <= 2e-3
        assert rel_l2(grads[1], d["vox_grad_scale"]) <= 2e-3
        assert rel_l2(grads[2], d["vox_grad_rotation"]) <= 2e-3  # w.r.t. the quaternion as given
    # Mean gradient: ours is the true one; x h^2 per axis it is the reference's; the switch reproduces it.
    h2 = np.asarray(grid.h, np.float64) ** 2
    assert rel_l2(np.asarray(g_true[0], np.float64) * h2, d["vox_grad_xyz_reference_bug"]) <= 2e-3
    assert rel_l2(g_h2[0], d["vox_grad_xyz_reference_bug"]) <= 2e-3
    np.testing.assert_allclose(g_h2[0], np.asarray(g_true[0]) * h2, rtol=1e-5, atol=1e-12)
    for a, b in zip(g_h2[1:], g_true[1:]):
        np.testing.assert_array_equal(a, b)  # only the mean path changes

    # R2 extent culling keeps Gaussians centred outside the grid; their tile-masked support reaches up to the
    # 1e-6 threshold, sqrt(2 ln(rho_max / 1e-6)) sigma_max (~5 sigma) from the centre: compare beyond that.
    vol_extent = np.asarray(voxelize_points(*args, grid, backend="reference"))
    reach = np.sqrt(2 * np.log(d["vox_density"].max() / 1e-6)) * d["vox_scale"].max()
    margin = int(np.ceil(reach / np.min(np.asarray(grid.h)))) + 1
    inner = tuple(slice(margin, k - margin) for k in grid.n)
    # The interior still differs slightly: R2's per-axis radius ceil(3 max(s) / h_a) and X2's isotropic
    # ceil(3 max_a(s_a / h_a)) can give different tile boxes, hence different beyond-3-sigma tails (~5e-4 here;
    # X2's radius with extent culling matches to 3.5e-6, checked while writing this test).
    assert rel_l2(vol_extent[inner], ref[inner]) <= 1e-3
    assert rel_l2(vol_extent, ref) > 1e-2  # ... and near the faces the two rules really differ


# ---------------------------------------------------------------------------------- oracles
def test_point_values():
    """rasterizer.md §10.6: rho at the voxel centre, rho exp(-k^2 h^2 / (2 sigma^2)) k voxels away."""
    grid = Grid(n=(16, 16, 16), size=(1.6, 1.6, 1.6), center=(0.0, 0.0, 0.0))
    h, sigma, rho = 0.1, 0.13, 0.7
    centre_idx = (8, 5, 9)
    m = (np.array(centre_idx) + 0.5) * h - 0.8
    vol = np.asarray(voxelize_points(m[None].astype(np.float32), np.full((1, 3), sigma, np.float32),
                                     np.float32([[1, 0, 0, 0]]), np.float32([rho]), grid, backend="reference"))
    i, j, k = centre_idx
    np.testing.assert_allclose(vol[i, j, k], rho, rtol=1e-6)
    for step in (1, 2, 3):
        expect = rho * np.exp(-(step * h) ** 2 / (2 * sigma ** 2))
        np.testing.assert_allclose(vol[i + step, j, k], expect, rtol=1e-5)
        np.testing.assert_allclose(vol[i, j - step, k], expect, rtol=1e-5)
        np.testing.assert_allclose(vol[i, j, k + step], expect, rtol=1e-5)


@pytest.mark.parametrize("culling", ["extent", "center"])
def test_matches_float64_oracle(culling):
    rng = np.random.default_rng(3)
    m, s, q, rho = random_scene(rng, SMALL_C, SMALL_N, SMALL_SIZE, SMALL_CENTER, (0.3, 2.5))
    w = jnp.ones(SMALL_N, jnp.float32)
    # The centre is a traced leaf of the grid: moving it reuses the compiled function.
    for center in (SMALL_CENTER, (0.3, 0.1, -0.1)):
        ref = oracle_volume(m, s, q, rho, SMALL_N, SMALL_SIZE, center, culling)
        vol = np.asarray(vol_grad_small(w, m, s, q, rho, small_grid(center), culling=culling)[0])
        assert vol.shape == SMALL_N
        assert np.count_nonzero(ref) > 300  # the scene really fills the grid
        np.testing.assert_allclose(vol, ref, rtol=2e-5, atol=2e-6)
        # Gaussians centred outside the grid are present (they matter for "extent").
        v = (m - (np.asarray(center) - np.asarray(SMALL_SIZE) / 2)) / (np.asarray(SMALL_SIZE) / SMALL_N)
        assert np.any((v < 0) | (v > SMALL_N))
    assert vol_grad_small._cache_size() <= 3  # extent, center, reference_h2: never one per grid centre


def test_chunking_and_pair_count():
    rng = np.random.default_rng(4)
    m, s, q, rho = random_scene(rng, SMALL_C, SMALL_N, SMALL_SIZE, SMALL_CENTER, (0.3, 2.5))
    grid = small_grid()
    pairs = int(voxel_pair_count(m, s, q, rho, grid))
    assert pairs > 3 * CHUNK
    a = vol_grad_small(jnp.ones(SMALL_N, jnp.float32), m, s, q, rho, grid)[0]
    b = vox_small(m, s, q, rho, grid, chunk_pairs=pairs)  # a single loop step
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- gradients
def _grad_scene(seed):
    # Scales >= 0.8 voxel keep det(Sigma_v)^2 >> 1e-7, so the reference's backward guard is negligible.
    rng = np.random.default_rng(seed)
    return random_scene(rng, SMALL_C, SMALL_N, SMALL_SIZE, SMALL_CENTER, (0.8, 2.5), outside=0.1), rng


@partial(jax.jit, static_argnames=("culling",))
def dense_value_and_grad(w, m, s, q, rho, culling):
    def loss(*a):
        return jnp.sum(w * dense_autodiff_volume(*a, SMALL_N, SMALL_SIZE, SMALL_CENTER, culling))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(m, s, q, rho)


@pytest.mark.parametrize("culling", ["extent", "center"])
def test_gradients_match_autodiff_dense(culling):
    (m, s, q, rho), rng = _grad_scene(5)
    w = jnp.asarray(rng.uniform(-1, 1, SMALL_N), jnp.float32)
    value, want = dense_value_and_grad(w, m, s, q, rho, culling)
    vol, got = vol_grad_small(w, m, s, q, rho, small_grid(), culling=culling)
    np.testing.assert_allclose(jnp.sum(w * vol), value, rtol=1e-4)
    for name, a, b in zip(("means", "scales", "rotations", "densities"), got, want):
        assert rel_l2(a, b) <= 1e-4, name


def test_gradients_match_finite_differences():
    """Directional derivatives of the float64 oracle (central differences) vs the custom VJP (true mean grad)."""
    (m, s, q, rho), rng = _grad_scene(6)
    w = rng.uniform(-1, 1, SMALL_N)

    def loss64(p):
        return float(np.sum(w * oracle_volume(*p, SMALL_N, SMALL_SIZE, SMALL_CENTER, "extent")))

    _, grads = vol_grad_small(jnp.asarray(w, jnp.float32), m, s, q, rho, small_grid())
    base = [np.asarray(a, np.float64) for a in (m, s, q, rho)]
    for k, eps in zip(range(4), (1e-5, 1e-6, 1e-5, 1e-5)):
        for _ in range(2):
            u = rng.normal(size=base[k].shape)
            plus = [b.copy() for b in base]
            minus = [b.copy() for b in base]
            plus[k] += eps * u
            minus[k] -= eps * u
            fd = (loss64(plus) - loss64(minus)) / (2 * eps)
            analytic = float(np.sum(np.asarray(grads[k], np.float64) * u))
            assert abs(analytic - fd) <= 2e-3 * abs(fd) + 1e-3, (k, analytic, fd)


# ---------------------------------------------------------------------------------- Gaussians, vmap
def test_inactive_slots_contribute_nothing():
    rng = np.random.default_rng(8)
    n_act = 16
    m, s, q, rho = random_scene(rng, n_act, SMALL_N, SMALL_SIZE, SMALL_CENTER, (0.5, 2.0), unit_q=True)
    grid = small_grid()
    g = Gaussians.from_activated(m, s, q, rho, capacity=SMALL_C)
    # Give the inactive slots big, central, dense Gaussians: they must still be invisible.
    g = g.replace(xyz=g.xyz.at[n_act:].set(0.0), scaling=g.scaling.at[n_act:].set(np.log(0.1)),
                  density=g.density.at[n_act:].set(5.0))
    w = jnp.asarray(rng.uniform(-1, 1, SMALL_N), jnp.float32)

    @jax.jit
    def vol_and_grad(params):
        def loss(p):
            vol = voxelize(g.replace(xyz=p[0], scaling=p[1], rotation=p[2], density=p[3]), grid,
                           backend="reference", chunk_pairs=CHUNK)
            return jnp.sum(w * vol), vol

        return jax.grad(loss, has_aux=True)(params)

    grad, vol = vol_and_grad((g.xyz, g.scaling, g.rotation, g.density))
    ref = oracle_volume(m, s, q, rho, SMALL_N, SMALL_SIZE, SMALL_CENTER, "extent")
    np.testing.assert_allclose(vol, ref, rtol=2e-5, atol=2e-6)
    for name, leaf in zip(("xyz", "scaling", "rotation", "density"), grad):
        leaf = np.asarray(leaf)
        assert np.all(leaf[n_act:] == 0), name
        assert np.any(leaf[:n_act] != 0), name


def test_vmap_over_gaussian_states():
    rng = np.random.default_rng(9)
    grid = small_grid()
    scenes = [random_scene(rng, SMALL_C, SMALL_N, SMALL_SIZE, SMALL_CENTER, (0.3, 2.5)) for _ in range(3)]
    scenes[1][3][:12] = 0.0  # a state with half its slots inactive: different pair counts per batch element
    batch = [np.stack([sc[i] for sc in scenes]) for i in range(4)]
    w = jnp.asarray(rng.uniform(-1, 1, SMALL_N), jnp.float32)

    vols, grads = jax.jit(jax.vmap(lambda *a: vol_grad_small(w, *a, grid)))(*batch)
    for b, sc in enumerate(scenes):
        vol, single = vol_grad_small(w, *sc, grid)
        np.testing.assert_allclose(vols[b], vol, rtol=1e-6, atol=1e-7)
        for gb, gs in zip(grads, single):  # batched loops may sum in another order: float32 noise only
            np.testing.assert_allclose(gb[b], gs, rtol=1e-4, atol=1e-5 * float(np.abs(gs).max()))


# ---------------------------------------------------------------------------------- voxelizer <-> rasterizer
def test_riemann_sum_matches_parallel_projection():
    """rasterizer.md §10.7: parallel beam, theta = 0, grid (n_x, W, H) of size 2 centred at 0:
    I[y, x] ~= h_x sum_i vol[i, x, H - 1 - y]."""
    rasterize = pytest.importorskip("x2gs_jax.render.rasterize")
    H = W = 64
    nx = 32
    scanner = Scanner(mode="parallel", DSD=7.0, DSO=5.0, n_detector=(H, W), d_detector=(2.0 / H, 2.0 / W),
                      n_voxel=(nx, W, H), d_voxel=(2.0 / nx, 2.0 / W, 2.0 / H))
    camera = scanner.camera(0.0)
    grid = Grid.from_scanner(scanner)
    rng = np.random.default_rng(10)
    # Centres near the middle of both an 8^3 voxel tile and a 16 px tile, sigma 1.5-1.8 voxels: both tile masks
    # then reach > 4.5 sigma, so the two supports agree up to the 1e-5 / 1e-6 thresholds.
    pix = np.array([[24, 24], [40, 24], [24, 40], [40, 40], [23, 41]], np.float64)  # (x = column, y = row)
    c = len(pix)
    vx = np.array([12, 20, 12, 20, 12], np.float64)
    jitter = rng.uniform(-0.3, 0.3, (c, 3))
    mx = -1 + (vx + 0.5 + jitter[:, 0]) * 2 / nx
    my = -1 + (pix[:, 0] + 0.5 + jitter[:, 1]) * 2 / W
    mz = 1 - (pix[:, 1] + 0.5 + jitter[:, 2]) * 2 / H
    m = np.stack([mx, my, mz], -1).astype(np.float32)
    s = (rng.uniform(1.5, 1.8, (c, 3)) * 2 / W).astype(np.float32)
    q = rng.normal(size=(c, 4))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    rho = rng.uniform(0.5, 1.0, c).astype(np.float32)
    image, _ = rasterize.rasterize_points(m, s, q, rho, camera, backend="reference")
    vol = np.asarray(voxelize_points(m, s, q, rho, grid, backend="reference"), np.float64)
    riemann = (2.0 / nx) * vol.sum(0)[:, ::-1].T  # [H, W]: row y <-> z index H-1-y, column x <-> y index
    image = np.asarray(image, np.float64)
    assert image.shape == (H, W)
    assert rel_l2(riemann, image) <= 1e-3
    np.testing.assert_allclose(riemann, image, atol=1e-3 * image.max())
