"""The segmented line-gradient kernel (kernels/line.py) equals the dense one-hot product of `sample_time_plane`.

CPU: the kernel runs in Triton's interpreter (small sizes): d_line against a float64 numpy twin for random and
adversarial point sets (one column for all points, columns spread wider than the local rows, ragged chunks, the last
node), vmap over cotangents, N = 0; `sample_time_plane` gradients with the kernel forced (X2GS_TIME_KERNEL=interpret)
against the default one-hot path, also under vmap over times. GPU (marked): the default field at N = 200 000.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_walk import all_eqns
from kernels import line
from x2gs_jax.fields import hexplane


def _twin(i0, fi, g, r):
    """float64 dense one-hot product w.T @ g (the pure path's definition of d_line)."""
    w = np.zeros((len(i0), r))
    w[np.arange(len(i0)), i0] += 1.0 - np.asarray(fi, np.float64)
    w[np.arange(len(i0)), i0 + 1] += np.asarray(fi, np.float64)
    return w.T @ np.asarray(g, np.float64)


def _lookup(u, r):
    i0, fi, _ = hexplane._axis_lookup(jnp.asarray(u, jnp.float32), r)
    return np.asarray(i0), np.asarray(fi)


def _kernel(u, i0, fi, g, r):
    return line.line_gradient(jnp.argsort(jnp.asarray(u, jnp.float32)), jnp.asarray(i0), jnp.asarray(fi),
                              jnp.asarray(g, jnp.float32), r)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b)))))


def _u(kind, rng, n, r):
    if kind == "random":  # ~20 % clamped at either end, plus exact nodes and ±1
        u = rng.uniform(-1.2, 1.2, n)
        u[:4] = [-1.0, 1.0, -1.0 + 2.0 / (r - 1), 1.0 - 2.0 / (r - 1)][:n]
        return u
    if kind == "one_column":  # every point between the same two nodes: maximal contention
        return np.full(n, -1.0 + 2.0 * (min(1, r - 2) + 0.3) / (r - 1))
    if kind == "spread":  # few points over many columns: a chunk spans more than S rows (fallback atomics)
        return rng.uniform(-1.0, 1.0, n)
    if kind == "last_node":  # i0 = R-2 with fi = 1 (and beyond: clamped), mixed with the first node
        return np.where(np.arange(n) % 3 == 0, -1.5, np.where(np.arange(n) % 3 == 1, 1.0, 1.7))
    raise ValueError(kind)


# N: none a multiple of CHUNK or SUB (ragged last chunk and sub-block) except 1 chunk + 1 point (257).
@pytest.mark.parametrize("kind,n,r,c", [
    ("random", 300, 16, 3), ("random", 517, 64, 8), ("one_column", 600, 64, 8), ("one_column", 257, 2, 3),
    ("spread", 300, 300, 3), ("spread", 77, 40, 8), ("last_node", 290, 5, 3), ("random", 1, 2, 8)])
@pytest.mark.parametrize("variant", ["reduce", "dot"])
def test_line_gradient_equals_one_hot_product(kind, n, r, c, variant, monkeypatch):
    monkeypatch.setenv("X2GS_LINE_KERNEL", variant)
    rng = np.random.default_rng(n + r)
    u = _u(kind, rng, n, r)
    i0, fi = _lookup(u, r)
    if kind == "spread":
        first_chunk = np.sort(i0)[:line.CHUNK]
        local_rows = line.DOT_S if variant == "dot" else line.S
        assert first_chunk[-1] - first_chunk[0] >= local_rows  # the first chunk spans more columns than local rows
    if kind == "last_node":
        assert np.any((i0 == r - 2) & (fi == 1.0)) and np.any((i0 == 0) & (fi == 0.0))
    g = rng.normal(size=(n, c)).astype(np.float32)
    _close(_kernel(u, i0, fi, g, r), _twin(i0, fi, g, r))


def test_any_permutation_gives_the_same_sums():
    """Correctness does not rest on the sort (a NaN coordinate sorts last with column 0): only speed does."""
    rng = np.random.default_rng(1)
    n, r, c = 300, 20, 3
    i0, fi = _lookup(rng.uniform(-1, 1, n), r)
    g = rng.normal(size=(n, c)).astype(np.float32)
    got = line.line_gradient(jnp.asarray(rng.permutation(n)), jnp.asarray(i0), jnp.asarray(fi), jnp.asarray(g), r)
    _close(got, _twin(i0, fi, g, r))


def test_vmap_over_cotangents_and_zero_points():
    rng = np.random.default_rng(2)
    n, r, c = 270, 12, 3
    u = rng.uniform(-1.1, 1.1, n)
    i0, fi = _lookup(u, r)
    gs = rng.normal(size=(3, n, c)).astype(np.float32)
    got = jax.vmap(lambda g: _kernel(u, i0, fi, g, r))(jnp.asarray(gs))
    _close(got, np.stack([_twin(i0, fi, g, r) for g in gs]))
    empty = line.line_gradient(jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), jnp.zeros((0,)),
                               jnp.zeros((0, 5)), 7)
    assert empty.shape == (7, 5) and np.all(np.asarray(empty) == 0.0)


def test_unknown_line_kernel_variant_is_refused(monkeypatch):
    monkeypatch.setenv("X2GS_LINE_KERNEL", "fast")
    with pytest.raises(ValueError, match="X2GS_LINE_KERNEL='fast': expected reduce or dot"):
        _kernel(np.zeros(3), np.zeros(3, np.int32), np.zeros(3, np.float32), np.ones((3, 2), np.float32), 4)


def test_a_launch_that_does_not_match_the_kernel_fails_on_any_backend():
    """kernels._launch checks each call against the kernel's parameters (jax-triton only would, when it compiles on
    a GPU; the interpreter ignores an unknown constexpr)."""
    from kernels import line_kernels as lk
    from kernels._launch import launch

    ins = (jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.float32),
           jnp.zeros((1, 4, 2), jnp.float32))
    out = [jax.ShapeDtypeStruct((1, 3, 2), jnp.float32)]
    meta = dict(C=2, CP=2, CHUNK=4, SUB=4, S=4, DOT=False, PREC="ieee")
    with pytest.raises(TypeError, match=r"\['H'\] are not parameters"):
        launch(lk.line_grad_kernel, (1, 1), out, *ins, scalars=(4, 3), H=16, **meta)
    with pytest.raises(TypeError, match="constexprs for the kernel's"):
        launch(lk.line_grad_kernel, (1, 1), out, *ins[:3], scalars=(4, 3), **meta)


def _time_grads(plane, u, g_t, cot, vmap_times):
    loss = lambda p, uu, t: jnp.sum(hexplane.sample_time_plane(p, uu, t) * cot)
    if vmap_times:  # two times per step (the training step's case): u unbatched, the cotangent batched
        loss = lambda p, uu, t, f=loss: jnp.sum(jax.vmap(lambda tt: f(p, uu, tt))(t))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(plane, u, g_t)


@pytest.mark.parametrize("vmap_times", [False, True])
def test_sample_time_plane_gradients_kernel_equal_default(vmap_times, monkeypatch):
    rng = np.random.default_rng(3)
    n, c, rt, ra = 600, 4, 9, 24
    plane = jnp.asarray(rng.uniform(0.5, 1.5, (c, rt, ra)), jnp.float32)
    u = jnp.asarray(np.clip(rng.normal(0.0, 0.4, n), -1.1, 1.1), jnp.float32)  # concentrated, some clamped
    g_t = jnp.asarray([-0.3, 0.55] if vmap_times else 0.2, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    out = {}
    for mode in ("interpret", None):  # read at trace time: fresh jitted closures per mode
        if mode is None:
            monkeypatch.delenv("X2GS_TIME_KERNEL", raising=False)
        else:
            monkeypatch.setenv("X2GS_TIME_KERNEL", mode)
        # unset = auto: the kernel on a GPU, the one-hot product elsewhere (this test's twin on a CPU)
        assert hexplane._triton_time_line() == (mode == "interpret" or jax.default_backend() == "gpu")
        out[mode] = _time_grads(plane, u, g_t, cot, vmap_times)
    for a, b in zip(out["interpret"], out[None]):
        assert np.any(np.asarray(b) != 0.0)
        _close(a, b)


@pytest.mark.parametrize("vmap_times", [pytest.param(False, marks=pytest.mark.slow), True])  # True: the step's case
def test_hexplane_features_sort_once_per_axis_and_match_one_hot(vmap_times, monkeypatch):
    """Through the whole field (2 levels, kernel forced): one argsort per spatial axis, shared by the levels (XLA
    did not merge the levels' identical sorts: 12 radix sorts per step on an H200), not one per level or time; all
    gradients (grid, xyz, t) equal those of the one-hot path."""
    rng = np.random.default_rng(5)
    shapes = hexplane.plane_shapes((6, 5, 7, 9), (1, 2), 4)
    grid = [[jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32) for s in level] for level in shapes]
    xyz = jnp.asarray(np.clip(rng.normal(0.0, 0.6, (300, 3)), -1.7, 1.7), jnp.float32)
    t = jnp.asarray([0.15, 0.8] if vmap_times else 0.4, jnp.float32)
    cot = jnp.asarray(rng.normal(size=((2,) if vmap_times else ()) + (300, 8)), jnp.float32)

    def loss(gr, x, tt):
        f = lambda ti: hexplane.hexplane_features(gr, x, ti, time_mapping="full")  # noqa: E731
        return jnp.sum((jax.vmap(f)(tt) if vmap_times else f(tt)) * cot)

    out = {}
    for mode in ("interpret", "xla"):
        monkeypatch.setenv("X2GS_TIME_KERNEL", mode)  # read at trace time
        grad = jax.grad(loss, argnums=(0, 1, 2))
        sorts = [e for e in all_eqns(jax.make_jaxpr(grad)(grid, xyz, t).jaxpr) if e.primitive.name == "sort"]
        assert len(sorts) == (3 if mode == "interpret" else 0), (mode, len(sorts))
        out[mode] = grad(grid, xyz, t)
    for a, b in zip(jax.tree_util.tree_leaves(out["interpret"]), jax.tree_util.tree_leaves(out["xla"])):
        assert np.any(np.asarray(b) != 0.0)
        _close(a, b)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["reduce", "dot"])
def test_hexplane_features_time_kernel_equals_one_hot_gpu(variant, monkeypatch):
    """The default X2 field (64, 64, 64, 300) × (1, 2, 4, 8), C = 32, N = 200 000, one time: all gradients."""
    monkeypatch.setenv("X2GS_LINE_KERNEL", variant)
    rng = np.random.default_rng()
    n = 200_000
    grid = hexplane.init_grid(jax.random.PRNGKey(int(rng.integers(1 << 30))), (64, 64, 64, 300), (1, 2, 4, 8), 32)
    grid = [[p * jnp.asarray(rng.uniform(0.5, 1.5, p.shape), jnp.float32) for p in level] for level in grid]
    xyz = jnp.asarray(np.clip(rng.normal(0.0, 0.5, (n, 3)), -1.6, 1.6), jnp.float32)
    t = jnp.float32(0.37)
    cot = jnp.asarray(rng.normal(size=(n, 128)), jnp.float32)
    loss = lambda gr, x, tt: jnp.sum(hexplane.hexplane_features(gr, x, tt, time_mapping="full") * cot)
    out = {}
    for mode in ("auto", "xla"):
        monkeypatch.setenv("X2GS_TIME_KERNEL", mode)  # read at trace time: new jitted closures per mode
        assert hexplane._triton_time_line() == (mode == "auto")
        out[mode] = jax.jit(jax.grad(lambda *a: loss(*a), argnums=(0, 1, 2)))(grid, xyz, t)
    for a, b in zip(jax.tree_util.tree_leaves(out["auto"]), jax.tree_util.tree_leaves(out["xla"])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30)
