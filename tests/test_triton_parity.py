"""Parity of the Triton backend (kernels/) with the pure-JAX reference path (x2gs_jax/render/).

GPU tests (`@pytest.mark.gpu`, skipped on CPU machines) draw fresh random scenes every run (the seed is in the
assertion message), start every output buffer as NaN (`debug_poison`) so an unwritten pixel/voxel fails, and
compare images/volumes (≤ 1e-5 relative L2) and gradients (≤ 1e-4) with the reference path. Small CPU tests run
the same kernels in Triton's interpreter, so CI checks the kernel logic, binning and VJP/vmap wiring too.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.geometry import Scanner
from x2gs_jax.render.rasterize_ref import rasterize_points_ref
from x2gs_jax.render.voxelize import Grid
from x2gs_jax.render.voxelize import voxelize_points as voxelize_dispatch

IMG_TOL = 1e-5
GRAD_TOL = 1e-4


@pytest.fixture(autouse=True)
def _full_f32_matmuls():
    """Both backends (and the cameras) with true float32 matmuls: a GPU's default f32 dot is TF32 (~1e-3)."""
    with jax.default_matmul_precision("highest"):
        yield


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _in_float64(fn, *args):
    """fn(*args) with JAX's 64-bit mode on and every float32 array of args (pytrees too) widened to float64: the
    reference path evaluated (nearly) exactly, as an oracle for the float32 kernels."""
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if jnp.asarray(x).dtype == jnp.float32 else x, args)
        out = fn(*wide)
        return jax.tree.map(lambda x: np.asarray(x), out)


def _scene(rng, n, lo=-0.8, hi=0.8, smin=0.004, smax=0.03, n_inactive=0):
    m = rng.uniform(lo, hi, (n, 3)).astype(np.float32)
    s = np.exp(rng.uniform(np.log(smin), np.log(smax), (n, 3))).astype(np.float32)
    q = rng.normal(size=(n, 4)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d = rng.uniform(0.1, 1.0, n).astype(np.float32)
    d[:n_inactive] = 0.0  # inactive capacity slots
    return m, s, q, d


def _scanner(mode, h, w, s_det=4.0):
    return Scanner(mode=mode, DSD=3.0, DSO=2.0, n_detector=(h, w), d_detector=(s_det / h, s_det / w),
                   n_voxel=(64, 64, 64), d_voxel=(2 / 64,) * 3)


def _raster_loss(render, weights, camera, **kw):
    def loss(m, s, q, d, off):
        return jnp.sum(weights * render(m, s, q, d, camera, ndc_offset=off, **kw)[0])
    return loss


def _check_raster(seed, mode, n, h, w, smin, smax, **kw):
    from kernels.rasterize import rasterize_points

    rng = np.random.default_rng(seed)
    m, s, q, d = _scene(rng, n, smin=smin, smax=smax, n_inactive=n // 10)
    cam = _scanner(mode, h, w).camera(rng.uniform(0, 2 * np.pi))
    img, aux = jax.jit(lambda *a: rasterize_points(*a, cam, debug_poison=True, **kw))(m, s, q, d)
    ref, raux = jax.jit(lambda *a: rasterize_points_ref(*a, cam))(m, s, q, d)
    img = np.asarray(img)
    assert not np.isnan(img).any(), f"seed {seed}: unwritten or NaN pixels"
    assert float(np.abs(ref).max()) > 0, f"seed {seed}: empty reference image"
    assert _rel(img, ref) <= IMG_TOL, f"seed {seed}: image rel L2 {_rel(img, ref):.2e}"
    np.testing.assert_array_equal(aux.radii, raux.radii)
    assert int(aux.num_pairs) == int(raux.num_pairs)
    cap = kw.get("max_pairs")
    assert bool(aux.overflow) == (cap is not None and int(aux.num_pairs) > cap), f"seed {seed}: overflow flag"
    weights = jnp.asarray(rng.uniform(0.0, 1.0, (h, w)).astype(np.float32))
    off = jnp.zeros((n, 2), jnp.float32)
    args = (m, s, q, d, off)
    g_tri = jax.jit(jax.grad(_raster_loss(rasterize_points, weights, cam, **kw), argnums=range(5)))(*args)
    g_ref = jax.jit(jax.grad(_raster_loss(rasterize_points_ref, weights, cam), argnums=range(5)))(*args)
    for name, a, b in zip(("xyz", "scale", "rotation", "density", "ndc_offset"), g_tri, g_ref):
        assert np.isfinite(np.asarray(a)).all(), f"seed {seed}: non-finite {name} gradient"
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}: {name} gradient rel L2 {_rel(a, b):.2e}"


# ------------------------------------------------------------------------------------------- rasterizer
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cone", "parallel"])
@pytest.mark.parametrize("n,h,w,smin,smax", [(300, 48, 64, 0.01, 0.1), (5000, 128, 128, 0.004, 0.05),
                                             (40000, 200, 264, 0.004, 0.03)])
def test_raster_parity(mode, n, h, w, smin, smax):
    _check_raster(_fresh_seed(), mode, n, h, w, smin, smax)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["cone", "parallel"])
def test_raster_parity_capacity(mode):
    """A static capacity that suffices, and one far too small (most tiles take the exact fallback), both equal
    the reference; the second reports overflow."""
    seed = _fresh_seed()
    _check_raster(seed, mode, 3000, 96, 80, 0.004, 0.08, max_pairs=1 << 16)
    _check_raster(seed, mode, 3000, 96, 80, 0.004, 0.08, max_pairs=128)


@pytest.mark.gpu
def test_raster_overflow_reported():
    from kernels.rasterize import rasterize_points

    rng = np.random.default_rng(_fresh_seed())
    m, s, q, d = _scene(rng, 2000, smin=0.01, smax=0.1)
    cam = _scanner("cone", 64, 64).camera(0.3)
    _, aux = rasterize_points(m, s, q, d, cam, max_pairs=100)
    assert bool(aux.overflow) and int(aux.num_pairs) > 100


@pytest.mark.gpu
def test_raster_vmap_cameras_and_states():
    from kernels.rasterize import rasterize_points

    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    m, s, q, d = _scene(rng, 4000, smin=0.004, smax=0.05, n_inactive=100)
    sc = _scanner("cone", 96, 112)
    cams = jax.vmap(sc.camera)(jnp.asarray(rng.uniform(0, np.pi, 5), jnp.float32))
    weights = jnp.asarray(rng.uniform(size=(5, 96, 112)).astype(np.float32))

    def views(render):
        def f(m, s, q, d):
            imgs = jax.vmap(lambda c: render(m, s, q, d, c)[0])(cams)
            return jnp.sum(weights * imgs), imgs
        return jax.jit(jax.value_and_grad(f, argnums=range(4), has_aux=True))

    (l_t, i_t), g_t = views(rasterize_points)(m, s, q, d)
    (l_r, i_r), g_r = views(rasterize_points_ref)(m, s, q, d)
    assert _rel(i_t, i_r) <= IMG_TOL, f"seed {seed}"
    for a, b in zip(g_t, g_r):
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}: {_rel(a, b):.2e}"
    # vmap over Gaussian states (e.g. time steps), one camera.
    states = jnp.stack([m, m + 0.02, m - 0.03])
    dens = jnp.stack([d, 0.5 * d, d])
    one = jax.tree_util.tree_map(lambda x: x[0], cams)
    t = jax.jit(jax.vmap(lambda mm, dd: rasterize_points(mm, s, q, dd, one)[0]))(states, dens)
    r = jax.jit(jax.vmap(lambda mm, dd: rasterize_points_ref(mm, s, q, dd, one)[0]))(states, dens)
    assert _rel(t, r) <= IMG_TOL, f"seed {seed}"


@pytest.mark.gpu
def test_training_step_like_loss_and_grads():
    """L1 + 0.25·D-SSIM of a render against a target: loss and gradients agree between the backends."""
    from kernels.rasterize import rasterize_points
    from x2gs_jax.losses import render_loss

    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    m, s, q, d = _scene(rng, 8000, smin=0.004, smax=0.05, n_inactive=500)
    cam = _scanner("cone", 128, 128).camera(0.7)
    target = rasterize_points_ref(*_scene(rng, 8000, smin=0.004, smax=0.05), cam)[0]

    def step(render):
        def f(m, s, q, d, off):
            return render_loss(render(m, s, q, d, cam, ndc_offset=off)[0], target)[0]
        return jax.jit(jax.value_and_grad(f, argnums=range(5)))

    off = jnp.zeros((8000, 2), jnp.float32)
    l_t, g_t = step(rasterize_points)(m, s, q, d, off)
    l_r, g_r = step(rasterize_points_ref)(m, s, q, d, off)
    assert abs(float(l_t) - float(l_r)) <= 1e-5 * abs(float(l_r)), f"seed {seed}"
    for a, b in zip(g_t, g_r):
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}: {_rel(a, b):.2e}"


@pytest.mark.gpu
def test_upstream_raster_cases(upstream_cases):
    """The upstream CUDA outputs (images, gradients of Σ weights·image) through the Triton backend."""
    from kernels.rasterize import rasterize_points

    c = upstream_cases
    for case in ("cone64", "cone96", "parallel64"):
        naf = {k: c[f"{case}_naf_{k}"] for k in ("nDetector", "nVoxel")}
        naf.update({k: c[f"{case}_naf_{k}_mm"] for k in ("DSD", "DSO", "dDetector", "dVoxel")})
        naf["mode"] = "cone" if int(c[f"{case}_mode"]) == 1 else "parallel"
        cams = jax.vmap(Scanner.from_naf(naf).camera)(jnp.asarray(c[f"{case}_angles"], jnp.float32))
        args = tuple(jnp.asarray(c[f"{case}_{k}"]) for k in ("xyz", "scale", "rotation_wxyz", "density"))
        weights = jnp.asarray(c[f"{case}_weights"])

        def run(render):
            def f(*a):
                imgs = jax.vmap(lambda cam: render(*a, cam)[0])(cams)
                return jnp.sum(weights * imgs), imgs
            return jax.jit(jax.value_and_grad(f, argnums=range(4), has_aux=True))(*args)

        (_, i_t), g_t = run(rasterize_points)
        (_, i_r), g_r = run(rasterize_points_ref)
        up_img = c[f"{case}_images"]
        assert _rel(i_t, up_img) <= IMG_TOL, f"{case}: image vs upstream {_rel(i_t, up_img):.2e}"
        for name, a, b in zip(("xyz", "scale", "rotation", "density"), g_t, g_r):
            up = c[f"{case}_grad_{name}"]
            assert _rel(a, b) <= GRAD_TOL, f"{case} {name}: vs reference path {_rel(a, b):.2e}"
            assert _rel(a, up) <= max(GRAD_TOL, 1.5 * _rel(b, up)), f"{case} {name}: vs upstream {_rel(a, up):.2e}"


# ------------------------------------------------------------------------------------------- voxelizer
def _check_voxel(seed, n, grid, culling, mean_grad, smin, smax, **kw):
    from kernels.voxelize import voxelize_points

    rng = np.random.default_rng(seed)
    m, s, q, d = _scene(rng, n, lo=-1.05, hi=1.05, smin=smin, smax=smax, n_inactive=n // 10)
    opts = dict(culling=culling, mean_grad=mean_grad)
    vol = jax.jit(lambda *a: voxelize_points(*a, grid, debug_poison=True, **opts, **kw))(m, s, q, d)
    ref = jax.jit(lambda *a: voxelize_dispatch(*a, grid, backend="reference", **opts))(m, s, q, d)
    vol = np.asarray(vol)
    assert not np.isnan(vol).any(), f"seed {seed}: unwritten or NaN voxels"
    assert _rel(vol, ref) <= IMG_TOL, f"seed {seed}: volume rel L2 {_rel(vol, ref):.2e}"
    weights = jnp.asarray(rng.uniform(size=grid.n).astype(np.float32))
    g_t = jax.jit(jax.grad(lambda *a: jnp.sum(weights * voxelize_points(*a, grid, **opts, **kw)),
                           argnums=range(4)))(m, s, q, d)
    g_r = jax.jit(jax.grad(lambda *a: jnp.sum(weights * voxelize_dispatch(*a, grid, backend="reference", **opts)),
                           argnums=range(4)))(m, s, q, d)
    for name, a, b in zip(("xyz", "scale", "rotation", "density"), g_t, g_r):
        assert np.isfinite(np.asarray(a)).all(), f"seed {seed}: non-finite {name} gradient"
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}: {name} gradient rel L2 {_rel(a, b):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("forward", ["tiles", "scatter"])
@pytest.mark.parametrize("culling,mean_grad", [("extent", "true"), ("center", "reference_h2")])
@pytest.mark.parametrize("n,shape,smin,smax", [(500, (20, 24, 17), 0.02, 0.15), (20000, (64, 64, 64), 0.004, 0.03),
                                               (30000, (100, 72, 128), 0.004, 0.03)])
def test_voxel_parity(forward, culling, mean_grad, n, shape, smin, smax):
    grid = Grid(n=shape, size=(2.0, 2.0 * shape[1] / shape[0], 1.8), center=(0.02, -0.03, 0.01))
    _check_voxel(_fresh_seed(), n, grid, culling, mean_grad, smin, smax, forward=forward)


@pytest.mark.gpu
def test_voxel_parity_overflow_fallback():
    grid = Grid(n=(32, 32, 32), size=(2.0, 2.0, 2.0), center=(0.0, 0.0, 0.0))
    _check_voxel(_fresh_seed(), 4000, grid, "extent", "true", 0.01, 0.08, pair_capacity=160, forward="tiles")


@pytest.mark.gpu
@pytest.mark.parametrize("forward", ["tiles", "scatter"])
def test_voxel_vmap_states(forward):
    from kernels.voxelize import voxelize_points

    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    m, s, q, d = _scene(rng, 5000, smin=0.005, smax=0.05, n_inactive=200)
    grid = Grid(n=(48, 40, 32), size=(2.0, 1.8, 1.6), center=(0.0, 0.0, 0.0))
    states = jnp.stack([m, m + 0.02, m - 0.01])
    dens = jnp.stack([d, 0.3 * d, d])
    weights = jnp.asarray(rng.uniform(size=(3,) + grid.n).astype(np.float32))

    def run(vox):
        def f(mm, dd):
            vols = jax.vmap(lambda a, b: vox(a, s, q, b, grid))(mm, dd)
            return jnp.sum(weights * vols), vols
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(states, dens)

    (_, v_t), g_t = run(lambda *a: voxelize_points(*a, forward=forward))
    (_, v_r), g_r = run(lambda *a: voxelize_dispatch(*a, backend="reference"))
    assert _rel(v_t, v_r) <= IMG_TOL, f"seed {seed}"
    for a, b in zip(g_t, g_r):
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}: {_rel(a, b):.2e}"


@pytest.mark.gpu
def test_upstream_voxel_case(upstream_cases):
    """Upstream X2 voxelizer (center culling; its mean gradient is h² × the true one)."""
    from kernels.voxelize import voxelize_points

    c = upstream_cases
    grid = Grid(n=tuple(int(v) for v in c["vox_n"]), size=tuple(c["vox_size"]), center=tuple(c["vox_center"]))
    args = tuple(jnp.asarray(c[f"vox_{k}"]) for k in ("xyz", "scale", "rotation_wxyz", "density"))
    weights = jnp.asarray(c["vox_weights"])

    def f(*a):
        vol = voxelize_points(*a, grid, culling="center", mean_grad="reference_h2")
        return jnp.sum(weights * vol), vol

    (_, vol), grads = jax.jit(jax.value_and_grad(f, argnums=range(4), has_aux=True))(*args)
    assert _rel(vol, c["vox_volume"]) <= IMG_TOL
    for name, g in zip(("xyz_reference_bug", "scale", "rotation", "density"), grads):
        assert _rel(g, c[f"vox_grad_{name}"]) <= GRAD_TOL, f"{name}: {_rel(g, c[f'vox_grad_{name}']):.2e}"


def test_voxel_forward_mode_validated():
    """A bad `forward` names the accepted modes (checked before any kernel is built: runs everywhere)."""
    from kernels.voxelize import voxelize_points

    m, s, q, d = _scene(np.random.default_rng(0), 4, smin=0.05, smax=0.1, n_inactive=0)
    grid = Grid(n=(8, 8, 8), size=(2.0, 2.0, 2.0), center=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"forward must be one of .*'scatter'.* got 'atomic'"):
        voxelize_points(m, s, q, d, grid, forward="atomic")


# ------------------------------------------------------------------------------------------- CPU (interpreter)
def _interpreter_available() -> bool:
    import importlib.util

    # find_spec, not import: triton must be first imported by kernels/ (interpreter mode on a CPU).
    return importlib.util.find_spec("triton") is not None and jax.default_backend() == "cpu"


@pytest.mark.skipif(not _interpreter_available(), reason="needs triton (interpreter) on a CPU backend")
@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.slow
def test_kernels_in_interpreter_cpu(split, monkeypatch):
    """The same kernels in Triton's interpreter: a tiny cone render (vmapped over 2 views) and a tiny
    voxelization, with half the pair slots they need (both the pair-list and the overflow-fallback paths),
    values and gradients against the reference path. split=3: every tile's pair range (and the fallback's
    Gaussian range) split over 3 programs, as small detectors and the TV patch get on a GPU. The reference runs in
    float64: with 24 Gaussians one Gaussian's gradient can carry the float32 reference's own rounding (seen:
    1.3e-4 relative on a scale gradient, where the kernels were within 6e-7 of float64)."""
    import kernels.rasterize
    import kernels.voxelize
    from kernels import voxelize as kv

    if split is not None:
        for mod in (kernels.rasterize, kernels.voxelize):
            monkeypatch.setattr(mod, "split_factor", lambda *a, **k: split)
    from kernels.rasterize import rasterize_points
    from kernels.voxelize import voxelize_points
    from x2gs_jax.render.rasterize_ref import count_pairs

    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    m, s, q, d = _scene(rng, 24, smin=0.02, smax=0.12, n_inactive=3)
    sc = _scanner("cone", 20, 24, s_det=6.0)
    cams = jax.vmap(sc.camera)(jnp.asarray([0.3, 2.0], jnp.float32))
    weights = jnp.asarray(rng.uniform(size=(2, 20, 24)).astype(np.float32))

    def views(render, m, s, q, d, cams, weights, **kw):
        def f(m, s, q, d):
            imgs = jax.vmap(lambda c: render(m, s, q, d, c, **kw)[0])(cams)
            return jnp.sum(weights * imgs), imgs
        return jax.jit(jax.value_and_grad(f, argnums=range(4), has_aux=True))(m, s, q, d)

    # Half the needed pair slots: early tiles use their pair lists, later ones the exact fallback.
    need = jax.vmap(lambda c: count_pairs(m, s, q, d, c))(cams)
    (_, i_t), g_t = views(rasterize_points, m, s, q, d, cams, weights, max_pairs=max(int(np.min(need)) // 2, 1),
                          debug_poison=True)
    (_, i_r), g_r = _in_float64(lambda *a: views(rasterize_points_ref, *a), m, s, q, d, cams, weights)
    assert not np.isnan(np.asarray(i_t)).any() and _rel(i_t, i_r) <= IMG_TOL, f"seed {seed}"
    for a, b in zip(g_t, g_r):
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}"

    grid = Grid(n=(10, 8, 9), size=(2.0, 1.8, 1.6), center=(0.05, 0.0, -0.02))
    wv = jnp.asarray(rng.uniform(size=grid.n).astype(np.float32))

    def vox(fn, m, s, q, d, wv):
        f = lambda *a: (lambda v: (jnp.sum(wv * v), v))(fn(*a))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=range(4), has_aux=True))(m, s, q, d)

    _, _, box = kv._setup(kv._Static(grid.n, "extent", "true", 1, False, "tiles"), jnp.asarray(m), jnp.asarray(s),
                          jnp.asarray(q), jnp.asarray(d), grid.size, grid.center)
    half = max(int(jnp.sum(jnp.prod(box[:, 3:6] - box[:, 0:3], axis=-1))) // 2, 1)
    (_, v_t), gv_t = vox(lambda *a: voxelize_points(*a, grid, pair_capacity=half, debug_poison=True, forward="tiles"),
                         m, s, q, d, wv)
    (_, v_r), gv_r = _in_float64(lambda *a: vox(lambda *b: voxelize_dispatch(*b, grid, backend="reference"), *a),
                                 m, s, q, d, wv)
    assert not np.isnan(np.asarray(v_t)).any() and _rel(v_t, v_r) <= IMG_TOL, f"seed {seed}"
    for a, b in zip(gv_t, gv_r):
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}"


def _edge_scene(rng):
    """Tiny voxelizer scene on a 19×13×10 grid (8³ tiles: 3×2×2, the last ones partial; voxel ≈ 0.1): Gaussians
    whose boxes cross tile borders (centres on voxel 8 planes), clipped by every face of the grid, one centred
    outside the grid (kept by "extent" culling, culled by "center"), a large one over several tiles, a tiny
    one, an elongated one, an inactive slot, and random ones. Returns (grid, means, scales, rotations, densities)."""
    grid = Grid(n=(19, 13, 10), size=(2.0, 1.4, 1.0), center=(0.05, -0.02, 0.01))
    n, size, center = (np.asarray(a, np.float32) for a in (grid.n, grid.size, grid.center))
    h = size / n
    special = [  # (centre in voxel units, scales in voxels, density)
        ((8.0, 8.0, 5.0), (0.7, 0.6, 0.8), 0.9),  # on the x and y tile borders
        ((0.3, 0.4, 0.2), (0.8, 0.7, 0.9), 0.7),  # grid corner (low faces)
        ((18.7, 12.6, 9.8), (0.9, 0.8, 0.7), 0.8),  # grid corner (high faces, partial tiles)
        ((20.0, 6.0, 4.0), (0.8, 0.8, 0.8), 1.0),  # centre outside the grid, reaches in
        ((9.5, 6.5, 5.5), (2.2, 1.8, 2.0), 0.6),  # large: several tiles
        ((3.5, 3.5, 3.5), (0.05, 0.05, 0.05), 0.5),  # tiny: box of a voxel or two
        ((12.0, 7.0, 3.0), (2.5, 0.3, 0.4), 0.9),  # elongated (randomly rotated)
        ((8.0, 4.0, 8.0), (0.8, 0.8, 0.8), 0.0),  # inactive slot
    ]
    ms = np.asarray([c for c, _, _ in special], np.float32) * h + (center - 0.5 * size)
    ss = np.asarray([s for _, s, _ in special], np.float32) * h
    ds = np.asarray([d for _, _, d in special], np.float32)
    qs = rng.normal(size=(len(special), 4)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    m, s, q, d = _scene(rng, 12, lo=-1.1, hi=1.1, smin=0.02, smax=0.12, n_inactive=1)
    return (grid, np.concatenate([ms, m]), np.concatenate([ss, s]), np.concatenate([qs, q]),
            np.concatenate([ds, d]))


def _brute_moments(params, tile_box, cot):
    """Ten moments [C, 10] (float64) over every voxel of each Gaussian's 8³ tile box in the grid, with the
    forward's keep rule: what the old tile-pair backward computed (numpy, independent of the kernel's box)."""
    params = np.asarray(params, np.float64)
    out = np.zeros((params.shape[0], 10))
    for g, (p, bx) in enumerate(zip(params, np.asarray(tile_box))):
        lo = np.minimum(bx[0:3] * 8, cot.shape)
        hi = np.minimum(bx[3:6] * 8, cot.shape)
        if np.any(hi <= lo):
            continue
        i, j, k = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
        dx, dy, dz = p[0] - (i + 0.5), p[1] - (j + 0.5), p[2] - (k + 0.5)
        qxx, qxy, qxz, qyy, qyz, qzz, rho = p[3:10]
        e = -0.5 * (qxx * dx * dx + qyy * dy * dy + qzz * dz * dz) - (qxy * dx * dy + qxz * dx * dz + qyz * dy * dz)
        gauss = np.exp(e)
        gg = np.where((e <= 0) & (rho * gauss >= 1e-6), gauss * cot[i, j, k], 0.0)
        out[g] = [np.sum(x) for x in (gg, gg * dx, gg * dy, gg * dz, gg * dx * dx, gg * dx * dy, gg * dx * dz,
                                       gg * dy * dy, gg * dy * dz, gg * dz * dz)]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not _interpreter_available(), reason="needs triton (interpreter) on a CPU backend")
@pytest.mark.parametrize("culling,mean_grad", [("extent", "true"), ("center", "reference_h2")])  # each mode once
def test_voxel_gather_backward_in_interpreter_cpu(culling, mean_grad, monkeypatch):
    """The per-Gaussian box kernels (scatter forward, gather backward) in Triton's interpreter on boxes crossing
    tile and grid borders:
    (1) the voxel boxes lie in the tile forward's tile boxes and the grid, and the backward's moments equal a
    brute-force sum over the whole tile boxes (the tile forward's membership: voxels outside its box contribute
    nothing), for the default vector and others (a step shorter than a z row, longer than a box);
    (2) the scatter forward's values and the gradients (means, scales, rotations, densities) equal the reference
    path's, unbatched and under vmap over two Gaussian states (merge_batch); the scatter forward also with a
    step shorter than a z row."""
    from kernels import voxelize as kv

    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    grid, m, s, q, d = _edge_scene(rng)
    n = np.asarray(grid.n)
    args = tuple(jnp.asarray(a) for a in (m, s, q, d))
    opts = dict(culling=culling, mean_grad=mean_grad)

    # (1) Boxes and moments.
    st = kv._Static(grid.n, culling, mean_grad, 1, False, "scatter")
    sz, ct = jnp.asarray(grid.size, jnp.float32), jnp.asarray(grid.center, jnp.float32)
    setup, params, tile_box = kv._setup(st, *args, sz, ct)
    vbox = np.asarray(kv._voxel_boxes(setup))
    tile_box = np.asarray(tile_box)
    live = np.all(vbox[:, 3:6] > vbox[:, 0:3], axis=-1)
    np.testing.assert_array_equal(live, np.all(tile_box[:, 3:6] > tile_box[:, 0:3], axis=-1))
    assert np.all(vbox[live, 0:3] >= 8 * tile_box[live, 0:3]) and np.all(vbox[live, 3:6] <= 8 * tile_box[live, 3:6])
    assert np.all(vbox[live, 0:3] >= 0) and np.all(vbox[live, 3:6] <= n)
    # The scene does exercise what it is meant to: boxes across tile borders and against both grid faces.
    assert np.any(live[:, None] & (vbox[:, 0:3] // 8 != (vbox[:, 3:6] - 1) // 8)), "no box crosses a tile border"
    assert np.any(live[:, None] & (vbox[:, 0:3] == 0)) and np.any(live[:, None] & (vbox[:, 3:6] == n))
    assert live[3] == (culling == "extent") and not live[7], "outside / inactive Gaussian"
    assert np.prod(vbox[:, 3:6] - vbox[:, 0:3], axis=-1).max() > 2 * kv.BLOCK_V_BWD, "no box takes several steps"
    cot = rng.uniform(-1.0, 1.0, grid.n).astype(np.float32)
    brute = _brute_moments(params, tile_box, cot)
    for block in (kv.BLOCK_V_BWD, 8, 512):
        monkeypatch.setattr(kv, "BLOCK_V_BWD", block)
        mom = kv._moments_op(st, m.shape[0])(params[None], jnp.asarray(vbox)[None], jnp.asarray(cot)[None])
        mom = np.asarray(mom)[0]
        assert not np.isnan(mom).any() and np.all(mom[~live] == 0), f"seed {seed}: unwritten or stray moments"
        for a in range(10):  # float32 sums of signed terms vs float64: ~1e-6; a missing voxel would give ≳1e-2
            err = _rel(mom[:, a], brute[:, a])
            assert err <= GRAD_TOL, f"seed {seed}, BLOCK_V {block}: moment {a} rel L2 {err:.2e}"
    monkeypatch.undo()

    # (2) Gradients against the reference path.
    wv = jnp.asarray(rng.uniform(size=grid.n).astype(np.float32))

    def vox(fn, wv, *args):
        f = lambda *a: (lambda v: (jnp.sum(wv * v), v))(fn(*a, grid, **opts))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=range(4), has_aux=True))(*args)

    (_, v_t), g_t = vox(lambda *a, **k: kv.voxelize_points(*a, forward="scatter", **k), wv, *args)
    (_, v_r), g_r = _in_float64(lambda *x: vox(lambda *a, **k: voxelize_dispatch(*a, backend="reference", **k), *x),
                                wv, *args)
    assert not np.isnan(np.asarray(v_t)).any() and _rel(v_t, v_r) <= IMG_TOL, f"seed {seed}"
    monkeypatch.setattr(kv, "BLOCK_V_SCATTER", 8)
    v_short = kv.voxelize_points(*args, grid, forward="scatter", **opts)
    assert _rel(v_short, v_r) <= IMG_TOL, f"seed {seed}: scatter with 8-voxel steps {_rel(v_short, v_r):.2e}"
    monkeypatch.undo()
    for name, a, b in zip(("xyz", "scale", "rotation", "density"), g_t, g_r):
        assert np.isfinite(np.asarray(a)).all(), f"seed {seed}: non-finite {name} gradient"
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}: {name} gradient rel L2 {_rel(a, b):.2e}"

    states = jnp.stack([args[0], args[0] + 0.03])
    dens = jnp.stack([args[3], 0.5 * args[3]])
    wb = jnp.asarray(rng.uniform(size=(2,) + grid.n).astype(np.float32))

    def batched(fn, states, dens, scales, rotations, wb):
        def f(mm, dd):
            vols = jax.vmap(lambda a, b: fn(a, scales, rotations, b, grid, **opts))(mm, dd)
            return jnp.sum(wb * vols)
        return jax.jit(jax.grad(f, argnums=(0, 1)))(states, dens)

    inputs = (states, dens, args[1], args[2], wb)
    reference = lambda *a, **k: voxelize_dispatch(*a, backend="reference", **k)  # noqa: E731
    scatter = lambda *a, **k: kv.voxelize_points(*a, forward="scatter", **k)  # noqa: E731
    for a, b in zip(batched(scatter, *inputs), _in_float64(lambda *x: batched(reference, *x), *inputs)):
        assert _rel(a, b) <= GRAD_TOL, f"seed {seed}: batched gradient rel L2 {_rel(a, b):.2e}"
    vols = jax.jit(jax.vmap(lambda a, b: scatter(a, args[1], args[2], b, grid, **opts)))(states, dens)
    for k in range(2):  # each batch row lands in its own volume
        want = reference(states[k], args[1], args[2], dens[k], grid, **opts)
        assert _rel(vols[k], want) <= IMG_TOL, f"seed {seed}: batched scatter volume {k}"
