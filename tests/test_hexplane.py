"""HexPlane field: bilinear sampling, coordinate mapping, feature combination, gradients, sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpr_walk import all_eqns
from x2gs_jax import losses
from x2gs_jax.fields import hexplane
from x2gs_jax.fields.deformation import DeformationConfig, init_deformation_params, num_deformation_params

PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))  # reference plane order, written out independently


# ------------------------------------------------------------------------------- float64 oracles
def bilinear_ref(plane, u, v):
    """grid_sample(align_corners=True, padding_mode='border') for one plane [C, H, W] -> [N, C] (float64)."""
    plane = np.asarray(plane, np.float64)
    C, H, W = plane.shape
    out = np.zeros((len(u), C))
    for n, (uu, vv) in enumerate(zip(np.asarray(u, np.float64), np.asarray(v, np.float64))):
        x = min(max((uu + 1) / 2 * (W - 1), 0.0), W - 1)
        y = min(max((vv + 1) / 2 * (H - 1), 0.0), H - 1)
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        x1, y1 = min(x0 + 1, W - 1), min(y0 + 1, H - 1)
        wx, wy = x - x0, y - y0
        out[n] = ((1 - wy) * ((1 - wx) * plane[:, y0, x0] + wx * plane[:, y0, x1])
                  + wy * ((1 - wx) * plane[:, y1, x0] + wx * plane[:, y1, x1]))
    return out


def features_ref(grid, xyz, t, bounds=1.6):
    """Brute-force HexPlane feature: product over the 6 planes of a level, concatenated over levels."""
    xyz = np.asarray(xyz, np.float64)
    g = np.concatenate([-xyz / bounds, np.full((len(xyz), 1), float(t))], axis=1)
    levels = []
    for level in grid:
        f = 1.0
        for plane, (a, b) in zip(level, PAIRS):
            f = f * bilinear_ref(plane, g[:, a], g[:, b])
        levels.append(f)
    return np.concatenate(levels, axis=1)


def random_grid(seed, res=(5, 4, 6, 7), multires=(1, 2), C=3):
    """Random planes (not the reference init) so that every plane matters in the product."""
    rng = np.random.default_rng(seed)
    return [[jnp.asarray(rng.uniform(0.5, 1.5, s), jnp.float32) for s in level]
            for level in hexplane.plane_shapes(res, multires, C)]


# ------------------------------------------------------------------------------- sampling
def test_sample_plane_matches_bruteforce_incl_out_of_range():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(4, 5, 7)).astype(np.float32)  # [C, R_b, R_a], non-square on purpose
    u = rng.uniform(-1.4, 1.4, 300).astype(np.float32)  # about 30 % outside [-1, 1]
    v = rng.uniform(-1.4, 1.4, 300).astype(np.float32)
    u[:4] = [-1.0, 1.0, -1.0, 1.0]  # exact corners
    v[:4] = [-1.0, -1.0, 1.0, 1.0]
    got = np.asarray(jax.jit(hexplane.sample_plane)(jnp.asarray(plane), jnp.asarray(u), jnp.asarray(v)))
    np.testing.assert_allclose(got, bilinear_ref(plane, u, v), rtol=1e-5, atol=1e-5)
    # a NaN coordinate gives NaN for that point only (indices stay in bounds)
    u_nan = jnp.asarray(u).at[5].set(jnp.nan)
    bad = np.asarray(jax.jit(hexplane.sample_plane)(jnp.asarray(plane), u_nan, jnp.asarray(v)))
    assert np.all(np.isnan(bad[5])) and np.isfinite(np.delete(bad, 5, axis=0)).all()
    # corners hit the corner nodes exactly: u indexes columns (R_a), v rows (R_b)
    np.testing.assert_allclose(got[:4], plane[:, [0, 0, -1, -1], [0, -1, 0, -1]].T, atol=1e-6)


def test_sample_plane_gradients_vs_finite_differences_and_clamp():
    rng = np.random.default_rng(1)
    C, H, W = 3, 5, 6
    plane = rng.normal(size=(C, H, W))
    # interior points away from cell edges (bilinear is smooth inside a cell), then clamped ones
    cells_u = rng.integers(0, W - 1, 20) + rng.uniform(0.2, 0.8, 20)
    cells_v = rng.integers(0, H - 1, 20) + rng.uniform(0.2, 0.8, 20)
    u = np.concatenate([cells_u / (W - 1) * 2 - 1, [1.3, -1.2, 0.1]])
    v = np.concatenate([cells_v / (H - 1) * 2 - 1, [0.2, -0.3, 1.5]])
    cot = rng.normal(size=(len(u), C))

    def loss(p, uu, vv):
        return jnp.sum(hexplane.sample_plane(p, uu, vv) * cot)

    gp, gu, gv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        jnp.asarray(plane, jnp.float32), jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32))
    eps = 1e-4

    def ref_loss_per_point(uu, vv):
        return np.sum(bilinear_ref(plane, uu, vv) * cot, axis=1)

    fd_u = (ref_loss_per_point(u + eps, v) - ref_loss_per_point(u - eps, v)) / (2 * eps)
    fd_v = (ref_loss_per_point(u, v + eps) - ref_loss_per_point(u, v - eps)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(gu), fd_u, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gv), fd_v, rtol=1e-3, atol=1e-4)
    # clamped coordinates have exactly zero gradient (u of point -3, -2; v of point -1)
    assert gu[-3] == 0.0 and gu[-2] == 0.0 and gv[-1] == 0.0
    assert gv[-3] != 0.0 and gu[-1] != 0.0  # the unclamped coordinate of those points still moves
    # plane gradient: the loss is linear in the plane, so d loss / d P[c,j,i] = loss(unit plane)
    ref_gp = np.zeros_like(plane)
    for idx in np.ndindex(plane.shape):
        unit = np.zeros_like(plane)
        unit[idx] = 1.0
        ref_gp[idx] = np.sum(bilinear_ref(unit, u, v) * cot)
    np.testing.assert_allclose(np.asarray(gp), ref_gp, rtol=1e-4, atol=1e-4)


def _max_intermediate_size(jaxpr) -> int:
    """Largest array produced by any equation of a jaxpr, including nested jaxprs."""
    return max((int(np.prod(getattr(var.aval, "shape", ()))) for eqn in all_eqns(jaxpr) for var in eqn.outvars),
               default=0)


@pytest.mark.parametrize("g_t", [-1.3, -0.37, 0.0, 0.5, 1.0, 1.4])
def test_time_plane_fast_path_equals_general_sampling(g_t):
    """One shared time (training, volume queries): same values and gradients (plane, u, t) as the general
    per-point path, also with the time clamped at either end and under vmap over times."""
    rng = np.random.default_rng(11)
    plane = jnp.asarray(rng.uniform(0.2, 1.5, (4, 7, 9)), jnp.float32)
    u = jnp.asarray(rng.uniform(-1.3, 1.3, 50), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)
    g_t = jnp.float32(g_t)

    def general(pl, uu, tt):
        return jnp.sum(hexplane.sample_plane(pl, uu, jnp.full_like(uu, tt)) * cot)

    def fast(pl, uu, tt):
        return jnp.sum(hexplane.sample_time_plane(pl, uu, tt) * cot)

    np.testing.assert_allclose(np.asarray(hexplane.sample_time_plane(plane, u, g_t)),
                               bilinear_ref(plane, u, np.full(50, float(g_t))), rtol=1e-6, atol=1e-6)
    ga = jax.grad(general, argnums=(0, 1, 2))(plane, u, g_t)
    gb = jax.grad(fast, argnums=(0, 1, 2))(plane, u, g_t)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    times = jnp.asarray([g_t, 0.25, -0.9], jnp.float32)
    va = jax.vmap(jax.grad(general, argnums=(0, 2)), in_axes=(None, None, 0))(plane, u, times)
    vb = jax.vmap(jax.grad(fast, argnums=(0, 2)), in_axes=(None, None, 0))(plane, u, times)
    for a, b in zip(va, vb):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_scalar_time_and_per_point_time_give_the_same_features():
    grid = random_grid(3)
    xyz = jnp.asarray(np.random.default_rng(4).uniform(-1.5, 1.5, (40, 3)), jnp.float32)
    a = hexplane.hexplane_features(grid, xyz, jnp.float32(0.37))
    b = hexplane.hexplane_features(grid, xyz, jnp.full((40,), 0.37, jnp.float32))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_sample_plane_forward_and_backward_keep_nothing_bigger_than_NC():
    C, H, W, N = 4, 6, 5, 200  # N*C = 800 > plane size 120: any [4N, C] or [N, 4, C] buffer would show
    plane = jnp.ones((C, H, W))
    u = jnp.linspace(-1, 1, N)
    fn = jax.value_and_grad(lambda p, a, b: jnp.sum(hexplane.sample_plane(p, a, b) ** 2), argnums=(0, 1, 2))
    jaxpr = jax.make_jaxpr(fn)(plane, u, u).jaxpr
    assert _max_intermediate_size(jaxpr) <= N * C


# ------------------------------------------------------------------------------- coordinates
def test_reference_coordinate_mapping_sign_flip_and_time_half_axis():
    """Every plane encodes its own (column, row) index: value = col + 1000 row (bilinear-exact)."""
    res, C = (5, 7, 9, 150), 1
    shapes = hexplane.plane_shapes(res, (1,), C)[0]
    xyz = np.array([[1.6, -1.6, 0.0], [-1.6, 0.8, 0.4], [0.32, 0.0, -1.6]], np.float32)
    R = {0: res[0], 1: res[1], 2: res[2], 3: res[3]}
    feats = jax.jit(lambda level, t: hexplane.hexplane_features([level], jnp.asarray(xyz), t))
    for t, t_row in ((0.0, 74.5), (1.0, 149.0), (0.5, 111.75)):
        for p in range(6):
            a, b = PAIRS[p]
            assert shapes[p] == (C, R[b], R[a])  # layout [C, R_b, R_a]
            rows, cols = np.meshgrid(np.arange(R[b]), np.arange(R[a]), indexing="ij")
            level = [jnp.ones(s, jnp.float32) for s in shapes]
            level[p] = jnp.asarray((cols + 1000.0 * rows)[None], jnp.float32)
            f = np.asarray(feats(level, t))[:, 0]

            def index(coord, axis):
                if axis == 3:  # time: g_t = t, row (t + 1) / 2 * (R_t - 1)
                    return np.full(len(xyz), t_row)
                g = -xyz[:, axis] / 1.6  # sign flip
                return (g + 1) / 2 * (R[axis] - 1)

            np.testing.assert_allclose(f, index(xyz, a) + 1000.0 * index(xyz, b), rtol=1e-6, atol=2e-3,
                                       err_msg=f"plane {p} {PAIRS[p]} t={t}")
    # spot values spelled out: x = +1.6 -> column 0, x = -1.6 -> last column
    g = np.asarray(hexplane.normalise_coords(jnp.asarray(xyz), 0.25))
    np.testing.assert_allclose(g[:, :3], -xyz / 1.6, rtol=1e-6)
    np.testing.assert_allclose(g[:, 3], 0.25)


def test_full_time_mapping_spans_the_whole_axis():
    g0 = hexplane.normalise_coords(jnp.zeros((2, 3)), 0.0, time_mapping="full")
    g1 = hexplane.normalise_coords(jnp.zeros((2, 3)), 1.0, time_mapping="full")
    assert np.allclose(g0[:, 3], -1.0) and np.allclose(g1[:, 3], 1.0)
    with pytest.raises(ValueError, match="time_mapping"):
        hexplane.normalise_coords(jnp.zeros((2, 3)), 0.0, time_mapping="half")


# ------------------------------------------------------------------------------- features
def test_features_product_within_level_concat_across_levels():
    grid = random_grid(3)
    rng = np.random.default_rng(4)
    xyz = rng.uniform(-2.0, 2.0, (64, 3)).astype(np.float32)  # some beyond the +-1.6 box (border)
    fn = jax.jit(lambda g, p, t: hexplane.hexplane_features(g, p, t))
    for t in (0.0, 0.37, 0.99):
        got = np.asarray(fn(grid, jnp.asarray(xyz), t))
        assert got.shape == (64, 2 * 3)
        np.testing.assert_allclose(got, features_ref(grid, xyz, t), rtol=2e-5, atol=1e-6)



@pytest.mark.parametrize("remat", [False, True])
def test_feature_gradients_wrt_position_and_time_vs_finite_differences(remat):
    grid = random_grid(5, multires=(1,))  # one level: the backward compile dominates this test
    rng = np.random.default_rng(6)
    xyz = rng.uniform(-1.0, 1.0, (8, 3))
    t = 0.413
    w = rng.normal(size=(8, 3))

    def loss(g, p, tt):
        return jnp.sum(hexplane.hexplane_features(g, p, tt, remat=remat) * w)

    val, (g_grid, g_xyz, g_t) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        grid, jnp.asarray(xyz, jnp.float32), jnp.float32(t))
    ref = lambda p, tt: np.sum(features_ref(grid, p, tt) * w)
    np.testing.assert_allclose(float(val), ref(xyz, t), rtol=1e-5)
    eps = 1e-5
    fd_t = (ref(xyz, t + eps) - ref(xyz, t - eps)) / (2 * eps)
    np.testing.assert_allclose(float(g_t), fd_t, rtol=2e-3, atol=1e-4)
    fd_xyz = np.zeros_like(xyz)
    for n in range(xyz.shape[0]):
        for d in range(3):
            e = np.zeros_like(xyz)
            e[n, d] = eps
            fd_xyz[n, d] = (ref(xyz + e, t) - ref(xyz - e, t)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g_xyz), fd_xyz, rtol=2e-3, atol=1e-4)
    # plane values: finite differences on a few random entries of every plane
    for p, plane in enumerate(grid[0]):
        for idx in list(np.ndindex(plane.shape))[::17][:4]:
            bumped = [[np.asarray(q, np.float64).copy() for q in grid[0]]]
            bumped[0][p][idx] += eps
            lowered = [[np.asarray(q, np.float64).copy() for q in grid[0]]]
            lowered[0][p][idx] -= eps
            fd = (np.sum(features_ref(bumped, xyz, t) * w) - np.sum(features_ref(lowered, xyz, t) * w)) / (2 * eps)
            np.testing.assert_allclose(float(g_grid[0][p][idx]), fd, rtol=2e-3, atol=1e-4)


# ------------------------------------------------------------------------------- init / sizes
def test_reference_init_and_plane_lists_for_regularisers():
    grid = jax.jit(hexplane.init_grid, static_argnums=(1, 2, 3))(jax.random.key(0), (8, 8, 8, 10), (1, 2, 4, 8), 32)
    assert len(grid) == 4 and all(len(level) == 6 for level in grid)
    for l, level in enumerate(grid):
        m = 2**l
        for p, (a, b) in enumerate(PAIRS):
            res = (8 * m, 8 * m, 8 * m, 10)
            assert level[p].shape == (32, res[b], res[a]) and level[p].dtype == jnp.float32
            if 3 in (a, b):
                assert np.all(np.asarray(level[p]) == 1.0)
            else:
                vals = np.asarray(level[p])
                assert vals.min() >= 0.1 and vals.max() <= 0.5
                assert abs(vals.mean() - 0.3) < 0.02 and vals.std() > 0.1  # U(0.1, 0.5): mean 0.3, sd 0.115
    sp, tp = hexplane.spatial_planes(grid), hexplane.time_planes(grid)
    ref_sp, ref_tp = losses.split_hexplane(grid)
    assert len(sp) == len(tp) == 12
    assert all(a is b for a, b in zip(sp, ref_sp)) and all(a is b for a, b in zip(tp, ref_tp))
    total, terms = jax.jit(losses.hexplane_regularisers)(sp, tp)
    assert float(terms["time_smoothness"]) == 0.0 and float(terms["l1_time_planes"]) == 0.0  # time planes = 1
    assert float(terms["plane_tv"]) > 0.0


def test_default_field_parameter_count():
    shapes = jax.eval_shape(lambda k: init_deformation_params(k, DeformationConfig()), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    spatial = 3 * 32 * 64 * 64 * (1 + 4 + 16 + 64)
    time = 3 * 32 * 150 * 64 * (1 + 2 + 4 + 8)
    trunk = 128 * 64 + 64
    heads = sum(64 * 64 + 64 + 64 * k + k for k in (3, 3, 4))
    assert spatial == 33_423_360 and time == 13_824_000
    assert n == spatial + time + trunk + heads == num_deformation_params() == 47_268_746


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="resolution"):
        hexplane.plane_shapes((8, 8, 8), (1,), 4)
    with pytest.raises(ValueError, match="level 0 has 5 planes"):
        hexplane.hexplane_features([[jnp.ones((2, 3, 3))] * 5], jnp.zeros((2, 3)), 0.0)
    with pytest.raises(ValueError, match=r"xyz must have shape \[N, 3\]"):
        hexplane.normalise_coords(jnp.zeros((2, 4)), 0.0)


def test_times_batched_by_vmap_share_the_spatial_samples_and_their_gradient():
    """Under jax.vmap over times (positions not mapped) the features and their gradients equal a loop over the
    times, and only the time planes' samples carry the time axis: the spatial planes are sampled once for all
    times, so the backward pass scatters their gradient once (the periodic render, the tidal curve's chunks)."""
    grid = random_grid(11)
    rng = np.random.default_rng(12)
    xyz = jnp.asarray(rng.uniform(-1.7, 1.7, (30, 3)), jnp.float32)
    ts = jnp.asarray([0.1, 0.45, 0.8], jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 30, 6)), jnp.float32)

    def loss_vmapped(g, p):
        return jnp.sum(jax.vmap(lambda t: hexplane.hexplane_features(g, p, t, time_mapping="full"))(ts) * w)

    def loss_loop(g, p):
        return sum(jnp.sum(hexplane.hexplane_features(g, p, t, time_mapping="full") * w[k]) for k, t in enumerate(ts))

    feats = jax.vmap(lambda t: hexplane.hexplane_features(grid, xyz, t, time_mapping="full"))(ts)
    for k, t in enumerate(ts):
        np.testing.assert_array_equal(np.asarray(feats[k]), np.asarray(
            hexplane.hexplane_features(grid, xyz, t, time_mapping="full")))
    gv = jax.grad(loss_vmapped, argnums=(0, 1))(grid, xyz)
    gl = jax.grad(loss_loop, argnums=(0, 1))(grid, xyz)
    for a, b in zip(jax.tree.leaves(gv), jax.tree.leaves(gl)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    # Structure: per level the spatial planes sampled without the time axis, once (pure JAX: 3 `sample_plane`s; on a
    # GPU the fused kernel pair: one spatial product), and one time-batched product of the 3 time planes' samples
    # with the spatial product (`_times_temporal`).
    jaxpr = jax.make_jaxpr(lambda g: jax.vmap(lambda t: hexplane.hexplane_features(g, xyz, t))(ts))(grid)
    shapes = [tuple(e.outvars[0].aval.shape) for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("custom_vjp")]
    spatial_per_level = 1 if hexplane._triton_field() else 3
    assert sorted(shapes) == sorted([(30, 3)] * (2 * spatial_per_level) + [(3, 30, 3)] * 2), shapes


def test_time_product_keeps_no_per_time_samples_for_the_backward(capsys):
    """Under jax.vmap over times the backward needs no [T, N, C] array saved from the forward: the time samples are
    re-sampled from the small lines (autodiff kept ~5 of them per level); values and gradients as the loop above."""
    from jax.ad_checkpoint import print_saved_residuals

    grid = random_grid(15)
    xyz = jnp.asarray(np.random.default_rng(16).uniform(-1.5, 1.5, (40, 3)), jnp.float32)
    ts = jnp.asarray([0.2, 0.7], jnp.float32)
    capsys.readouterr()
    print_saved_residuals(lambda g: jax.vmap(lambda t: hexplane.hexplane_features(g, xyz, t))(ts), grid)
    saved = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert any(s.startswith("f32[40,") for s in saved), saved  # the shared spatial products (a sanity check)
    assert [s for s in saved if s.startswith("f32[2,40,")] == [], saved


def test_time_plane_gradient_under_vmap_builds_no_plane_per_time():
    """The time planes' gradient under jax.vmap over times: no scatter into a per-time copy of a plane (the old
    form, two row scatters into zeros, made one full [C, R_t, R_a] buffer per time before summing them); the rows
    still get exactly (1 - fj)·d_line and fj·d_line (checked against a loop in the test above)."""
    grid = random_grid(13)
    xyz = jnp.asarray(np.random.default_rng(14).uniform(-1.5, 1.5, (20, 3)), jnp.float32)
    ts = jnp.asarray([0.2, 0.7], jnp.float32)

    def loss(g):
        return jnp.sum(jax.vmap(lambda t: hexplane.hexplane_features(g, xyz, t, time_mapping="full"))(ts) ** 2)

    planes = {tuple(p.shape) for level in grid for p in (level[i] for i in hexplane.TIME_PLANES)}
    scatters = [tuple(e.outvars[0].aval.shape) for e in all_eqns(jax.make_jaxpr(jax.grad(loss))(grid).jaxpr)
                if e.primitive.name.startswith("scatter") and tuple(e.outvars[0].aval.shape)[-3:] in planes]
    assert scatters == [], scatters


def test_time_line_barrier_changes_no_value_or_gradient(monkeypatch):
    """X2GS_TIME_LINE_BARRIER=1 (the time line materialised before its gathers) puts an optimization_barrier in
    the program and leaves the vmapped features and every gradient bit-identical."""
    grid = random_grid(5)
    rng = np.random.default_rng(6)
    xyz = jnp.asarray(rng.uniform(-1.7, 1.7, (40, 3)), jnp.float32)
    ts = jnp.asarray([0.2, 0.7], jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 40, 6)), jnp.float32)

    def loss(g, p, t):
        return jnp.sum(jax.vmap(lambda s: hexplane.hexplane_features(g, p, s + t, time_mapping="full"))(ts) * w)

    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("X2GS_TIME_LINE_BARRIER", flag)
        fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
        jaxpr = str(jax.make_jaxpr(fn)(grid, xyz, jnp.float32(0.05)))
        assert ("optimization_barrier" in jaxpr) == (flag == "1")
        out[flag] = jax.jit(fn)(grid, xyz, jnp.float32(0.05))
    for a, b in zip(jax.tree.leaves(out["0"]), jax.tree.leaves(out["1"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
