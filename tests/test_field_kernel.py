"""The fused spatial-level kernels (kernels/field.py) equal the pure-JAX product of `hexplane.sample_plane`s.

CPU: the kernels run in Triton's interpreter (small sizes): values and gradients (all three planes and the
coordinates) against the pure path and against central finite differences of a float64 numpy twin; vmap; N = 0;
a NaN coordinate; `level_features` with the kernel path forced (X2GS_FIELD_KERNEL=interpret) against the pure path.
GPU (marked): realistic sizes, relative norm errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.fields import hexplane


def _planes(rng, c, rx, ry, rz):
    """(x,y) [C, R_y, R_x], (x,z) [C, R_z, R_x], (y,z) [C, R_z, R_y], values away from 0 (every plane matters)."""
    return [jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32) for s in ((c, ry, rx), (c, rz, rx), (c, rz, ry))]


def _coords(rng, n, sizes):
    """[N, 3]: uniform over [-1.3, 1.3] (~23 % clamped per axis), plus rows exactly on nodes and on ±1."""
    g = rng.uniform(-1.3, 1.3, (n, 3))
    for k, r in enumerate(sizes):  # rows 0..5: grid nodes (incl. the first and last) on every axis
        nodes = -1.0 + 2.0 * np.arange(r) / (r - 1)
        g[:6, k] = nodes[np.arange(6) % r]
    g[6] = [-1.0, 1.0, -1.0]
    g[7] = [1.0, -1.0, 1.0]
    return jnp.asarray(g, jnp.float32)


def _pure(planes, g):
    p_xy, p_xz, p_yz = planes
    return (hexplane.sample_plane(p_xy, g[:, 0], g[:, 1]) * hexplane.sample_plane(p_xz, g[:, 0], g[:, 2])
            * hexplane.sample_plane(p_yz, g[:, 1], g[:, 2]))


def _kernel(planes, g):
    from kernels.field import spatial_level

    return spatial_level(planes, g)


def _twin(planes, g):
    """float64 numpy spatial product (grid_sample align_corners=True, border), for finite differences."""
    def axis(x, size):
        pos = np.clip((x + 1.0) * 0.5 * (size - 1), 0.0, size - 1.0)
        i0 = np.clip(np.floor(pos), 0, size - 2).astype(int)
        return i0, pos - i0

    def sample(p, u, v):
        i0, fi = axis(u, p.shape[2])
        j0, fj = axis(v, p.shape[1])
        fi, fj = fi[:, None], fj[:, None]
        return ((1 - fj) * ((1 - fi) * p[:, j0, i0].T + fi * p[:, j0, i0 + 1].T)
                + fj * ((1 - fi) * p[:, j0 + 1, i0].T + fi * p[:, j0 + 1, i0 + 1].T))

    p_xy, p_xz, p_yz = planes
    return sample(p_xy, g[:, 0], g[:, 1]) * sample(p_xz, g[:, 0], g[:, 2]) * sample(p_yz, g[:, 1], g[:, 2])


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b)))))


CASES = [(3, 5, 7, 6, 40), (8, 9, 6, 4, 130)]  # C, R_x, R_y, R_z, N


@pytest.mark.parametrize("c,rx,ry,rz,n", CASES)
def test_values_and_gradients_match_pure(c, rx, ry, rz, n):
    rng = np.random.default_rng(c)
    planes, g = _planes(rng, c, rx, ry, rz), _coords(rng, n, (rx, ry, rz))
    cot = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    _close(_kernel(planes, g), _pure(planes, g))
    loss = lambda f: lambda p, gg: jnp.sum(f(p, gg) * cot)
    got = jax.grad(loss(_kernel), argnums=(0, 1))(planes, g)
    want = jax.grad(loss(_pure), argnums=(0, 1))(planes, g)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        _close(a, b)
    assert np.count_nonzero(np.asarray(got[1])) > n  # the coordinate gradient is not trivially zero
    assert np.all(np.asarray(got[1])[np.abs(np.asarray(g)) > 1.0] == 0.0)  # clamped: zero derivative

    # Central finite differences of the float64 twin: the largest plane-gradient entry of each plane, and the
    # coordinates of the interior point with the largest gradient.
    p64, g64, cot64 = [np.asarray(p, np.float64) for p in planes], np.asarray(g, np.float64), np.asarray(cot)
    twin_loss = lambda ps, gg: float(np.sum(_twin(ps, gg) * cot64))
    eps = 1e-3
    for k in range(3):
        gk = np.asarray(got[0][k])
        idx = np.unravel_index(np.argmax(np.abs(gk)), gk.shape)
        hi, lo = [p.copy() for p in p64], [p.copy() for p in p64]
        hi[k][idx] += eps
        lo[k][idx] -= eps
        fd = (twin_loss(hi, g64) - twin_loss(lo, g64)) / (2 * eps)
        np.testing.assert_allclose(gk[idx], fd, rtol=1e-4)
    inside = np.all(np.abs(g64) < 0.95, axis=1)
    inside[:8] = False  # the node rows: a kink there, finite differences straddle it
    row = int(np.argmax(np.where(inside, np.abs(np.asarray(got[1])).sum(axis=1), -1.0)))
    for k in range(3):
        hi, lo = g64.copy(), g64.copy()
        hi[row, k] += 1e-6
        lo[row, k] -= 1e-6
        fd = (twin_loss(p64, hi) - twin_loss(p64, lo)) / 2e-6
        np.testing.assert_allclose(float(got[1][row, k]), fd, rtol=1e-3, atol=1e-4)


def test_nan_coordinate_row_forward():
    rng = np.random.default_rng(3)
    planes = _planes(rng, 3, 5, 7, 6)
    g = np.array(_coords(rng, 40, (5, 7, 6)))  # writable copy
    g[9, 1] = np.nan
    got, want = np.asarray(_kernel(planes, jnp.asarray(g))), np.asarray(_pure(planes, jnp.asarray(g)))
    assert np.all(np.isnan(got[9])) and np.all(np.isnan(want[9]))
    ok = np.arange(40) != 9
    assert np.all(np.isfinite(got[ok]))
    _close(got[ok], want[ok])


def test_vmap_over_cotangents_and_coordinates():
    rng = np.random.default_rng(4)
    c, n = 3, 45
    planes, g = _planes(rng, c, 5, 7, 6), _coords(rng, n, (5, 7, 6))
    cots = jnp.asarray(rng.normal(size=(3, n, c)), jnp.float32)
    _, vjp_k = jax.vjp(_kernel, planes, g)
    _, vjp_p = jax.vjp(_pure, planes, g)
    got, want = jax.vmap(vjp_k)(cots), jax.vmap(vjp_p)(cots)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        _close(a, b)
    gb = jnp.stack([g, -g, 0.5 * g])
    _close(jax.vmap(lambda gg: _kernel(planes, gg))(gb), jnp.stack([_pure(planes, gg) for gg in gb]))


def test_zero_points():
    rng = np.random.default_rng(5)
    planes = _planes(rng, 3, 5, 7, 6)
    g = jnp.zeros((0, 3), jnp.float32)
    assert _kernel(planes, g).shape == (0, 3)
    dp, dg = jax.grad(lambda p, gg: jnp.sum(_kernel(p, gg)), argnums=(0, 1))(planes, g)
    assert dg.shape == (0, 3) and all(np.all(np.asarray(d) == 0.0) and d.shape == p.shape
                                      for d, p in zip(dp, planes))


def test_shape_validation():
    rng = np.random.default_rng(6)
    p_xy, p_xz, p_yz = _planes(rng, 3, 5, 7, 6)
    with pytest.raises(ValueError, match="planes .* must be"):
        _kernel([p_xy, p_xz, p_yz.transpose(0, 2, 1)], jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"g_xyz must be \[N, 3\]"):
        _kernel([p_xy, p_xz, p_yz], jnp.zeros((4, 2)))


@pytest.mark.parametrize("per_point_time", [False, True])
def test_level_features_kernel_path_equals_pure(per_point_time, monkeypatch):
    rng = np.random.default_rng(7)
    n, c = 50, 4
    level = [jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32)
             for s in hexplane.plane_shapes((5, 7, 6, 9), (1,), c)[0]]
    g_xyz = _coords(rng, n, (5, 7, 6))
    g_t = jnp.asarray(rng.uniform(-1.2, 1.2, n) if per_point_time else 0.3, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    out = {}
    for mode in ("interpret", "xla"):
        monkeypatch.setenv("X2GS_FIELD_KERNEL", mode)  # read at trace time: fresh closures per mode (trace caches)
        assert hexplane._triton_field() == (mode == "interpret")
        jaxpr = str(jax.make_jaxpr(lambda *a: hexplane.level_features(*a))(level, g_xyz, g_t))
        loss = lambda lv, gx, gt: jnp.sum(hexplane.level_features(lv, gx, gt) * cot)
        launched = "pure_callback" in jaxpr or "triton_kernel_call" in jaxpr  # interpreter (CPU) / jax-triton (GPU)
        assert launched == (mode == "interpret")
        out[mode] = (hexplane.level_features(level, g_xyz, g_t), jax.grad(loss, argnums=(0, 1, 2))(level, g_xyz, g_t))
    for a, b in zip(jax.tree_util.tree_leaves(out["interpret"]), jax.tree_util.tree_leaves(out["xla"])):
        _close(a, b)


# ------------------------------------------------------------------------------------------------ GPU
def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("r", [128, 256])
def test_kernel_equals_pure_gpu(r):
    rng = np.random.default_rng()
    n, c = 50_000, 32
    planes = [jnp.asarray(rng.uniform(0.1, 0.5, (c, r, r)), jnp.float32) for _ in range(3)]
    g = jnp.asarray(np.clip(rng.normal(0.0, 0.3, (n, 3)), -1.1, 1.1), jnp.float32)  # concentrated: contention
    cot = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    out = {}
    for name, f in (("kernel", _kernel), ("pure", _pure)):
        grad = jax.grad(lambda p, gg: jnp.sum(f(p, gg) * cot), argnums=(0, 1))
        out[name] = (jax.jit(f)(planes, g), jax.jit(grad)(planes, g))
    for a, b in zip(jax.tree_util.tree_leaves(out["kernel"]), jax.tree_util.tree_leaves(out["pure"])):
        assert _rel(a, b) <= 1e-5


@pytest.mark.gpu
def test_hexplane_features_kernel_equals_xla_gpu(monkeypatch):
    """The default X2 field (64, 64, 64, 300) × (1, 2, 4, 8), C = 32, one time: features and all gradients."""
    rng = np.random.default_rng()
    grid = hexplane.init_grid(jax.random.PRNGKey(int(rng.integers(1 << 30))), (64, 64, 64, 300), (1, 2, 4, 8), 32)
    xyz = jnp.asarray(rng.normal(0.0, 0.5, (50_000, 3)), jnp.float32)
    t = jnp.float32(0.37)
    cot = jnp.asarray(rng.normal(size=(50_000, 128)), jnp.float32)
    loss = lambda gr, x, tt: jnp.sum(hexplane.hexplane_features(gr, x, tt, time_mapping="full") * cot)
    out = {}
    for mode in ("auto", "xla"):
        monkeypatch.setenv("X2GS_FIELD_KERNEL", mode)  # read at trace time: new jitted closures per mode
        f = jax.jit(lambda gr, x, tt: hexplane.hexplane_features(gr, x, tt, time_mapping="full"))
        out[mode] = (f(grid, xyz, t), jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2)))(grid, xyz, t))
    for a, b in zip(jax.tree_util.tree_leaves(out["auto"]), jax.tree_util.tree_leaves(out["xla"])):
        assert _rel(a, b) <= 1e-5
