"""Densify / prune on fixed-capacity buffers vs a float64 numpy port of the reference's list-based procedure."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from x2gs_jax.densify import (DensifyStats, accumulate, densify_and_prune, is_densify_iteration,
                              required_capacity)
from x2gs_jax.gaussians import SCALE_RAW_FLOOR, Gaussians, grow, next_capacity

BOUNDED = (0.001, 1.0)
BBOX_MIN, BBOX_MAX = np.array([-1.0, -1.0, -1.0]), np.array([1.0, 1.0, 1.0])


# ------------------------------------------------------------------ numpy float64 oracle
def np_softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def np_inv_softplus(y):
    return np.where(y > 20, y, np.log(np.expm1(np.maximum(y, 1e-300))))


def np_scale(raw, bound):
    if bound is None:
        return np.exp(raw)
    return 1 / (1 + np.exp(-raw)) * (bound[1] - bound[0]) + bound[0]


def np_inv_scale(s, bound):
    if bound is None:
        return np.log(s)
    p = np.clip((s - bound[0]) / (bound[1] - bound[0]), 0, 1)
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(p) - np.log1p(-p), SCALE_RAW_FLOOR)


def np_rotmat(q):
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)], -2)


def reference_densify(rows, noise, bound, *, thr=5e-5, sthr=0.2, dmin=1e-5, max_num=500000):
    """The reference's list-based densify_and_prune. rows: dict of float64 arrays over the N live Gaussians
    (key 'slot' = their slot index, used to pick the split normals noise[k, slot]). Returns (rows, densified)."""
    r = {k: v.copy() for k, v in rows.items()}
    n = len(r["xyz"])
    g = np.where(r["count"] > 0, r["grad"] / np.maximum(r["count"], 1), 0.0)
    densified = (not max_num) or n < max_num
    if densified:
        # clone
        smax = np.max(np_scale(r["scaling"], bound), axis=1)
        sel = (g >= thr) & (smax <= sthr)
        r["density"][sel] = np_inv_softplus(np_softplus(r["density"][sel]) * 0.5)
        new = {k: v[sel].copy() for k, v in r.items()}
        new["mu_xyz"][:] = 0
        new["mu_density"][:] = 0
        r = {k: np.concatenate([r[k], new[k]]) for k in r}
        g = np.concatenate([g, np.zeros(int(sel.sum()))])
        # split on the enlarged set
        s = np_scale(r["scaling"], bound)
        sel = (g >= thr) & (np.max(s, axis=1) > sthr)
        R = np_rotmat(r["rotation"][sel])
        kids = []
        for k in range(2):
            z = noise[k, r["slot"][sel].astype(int)] * s[sel]
            kid = {key: v[sel].copy() for key, v in r.items()}
            kid["xyz"] = r["xyz"][sel] + np.einsum("nij,nj->ni", R, z)
            kid["scaling"] = np_inv_scale(s[sel] / 1.6, bound)
            kid["density"] = np_inv_softplus(np_softplus(r["density"][sel]) / 2)
            kid["mu_xyz"][:] = 0
            kid["mu_density"][:] = 0
            kids.append(kid)
        r = {k: np.concatenate([r[k][~sel], kids[0][k], kids[1][k]]) for k in r}
        r["grad"][:] = 0
        r["count"][:] = 0
    # prune
    bad = np_softplus(r["density"]) < dmin
    bad |= np.any((r["xyz"] < BBOX_MIN) | (r["xyz"] > BBOX_MAX), axis=1)
    return {k: v[~bad] for k, v in r.items()}, densified


def features(rows):
    """[N, F] matrix of everything that must match (order-free comparison)."""
    cols = [rows["xyz"], rows["scaling"], rows["rotation"], rows["density"][:, None], rows["max_radii"][:, None],
            rows["grad"][:, None], rows["count"][:, None], rows["mu_xyz"], rows["mu_density"][:, None]]
    return np.concatenate(cols, axis=1)


def assert_same_set(ours, ref, atol=2e-4):
    a, b = features(ours), features(ref)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = np.max(np.abs(a[:, None, :] - b[None, :, :]) / (1 + np.abs(b[None])), axis=-1)
    match = np.argmin(d, axis=0)  # ref row j -> our row match[j]
    assert len(set(match.tolist())) == len(match), "matching is not a bijection"
    worst = d[match, np.arange(len(match))]
    assert np.max(worst, initial=0) < atol, np.max(worst)


# ------------------------------------------------------------------ random scenes
def make_scene(seed, bound, capacity=96, n_live=40):
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.choice(capacity, n_live, replace=False))  # live slots scattered among free ones
    xyz = rng.uniform(-0.9, 0.9, (n_live, 3))
    xyz[:3] = [[1.2, 0, 0], [0, -1.05, 0], [-1.0, 0.2, 1.0]]  # two outside the bbox, one on its faces (kept)
    s = np.exp(rng.uniform(np.log(0.01), np.log(0.5), (n_live, 3)))
    s[3:8] = [0.25, 0.02, 0.02]  # anisotropic split candidates
    q = rng.normal(size=(n_live, 4))
    rho = rng.uniform(0.01, 1.0, n_live)
    rho[8:12] = [1.5e-5, 1.9e-5, 5e-6, 3e-5]  # halving pushes some below 1e-5
    grad = rng.uniform(0, 2e-4, n_live) * 3
    count = rng.integers(0, 4, n_live)
    grad[count == 0] = 0
    grad[8:12] = 1.0
    count[8:12] = 1
    grad[2], count[2] = 0.0, 0  # the boundary point stays where it is
    radii = rng.integers(0, 30, n_live).astype(np.float64)

    g = Gaussians.from_activated(xyz, s, q, rho, capacity=n_live, scale_bound=bound)
    empty = Gaussians.empty(capacity, bound)
    put = lambda full, part: full.at[slots].set(part)  # noqa: E731
    g = jax.tree.map(put, empty, g)
    sl = jnp.asarray(slots)
    stats = DensifyStats(grad_accum=jnp.zeros(capacity).at[sl].set(jnp.asarray(grad, jnp.float32)),
                         count=jnp.zeros(capacity, jnp.int32).at[sl].set(jnp.asarray(count, jnp.int32)),
                         max_radii=jnp.zeros(capacity).at[sl].set(jnp.asarray(radii, jnp.float32)))
    mu = {"xyz": jnp.zeros((capacity, 3)).at[sl].set(jnp.asarray(rng.normal(size=(n_live, 3)), jnp.float32)),
          "density": jnp.zeros(capacity).at[sl].set(jnp.asarray(rng.normal(size=n_live), jnp.float32)),
          "count": jnp.asarray(7, jnp.int32)}
    noise = jnp.asarray(rng.normal(size=(2, capacity, 3)), jnp.float32)
    return g, stats, mu, noise


def live_rows(g, stats, mu):
    a = np.asarray(g.active)
    f = lambda x: np.asarray(x, np.float64)[a]  # noqa: E731
    return {"xyz": f(g.xyz), "scaling": f(g.scaling), "rotation": f(g.rotation), "density": f(g.density),
            "max_radii": f(stats.max_radii), "grad": f(stats.grad_accum), "count": f(stats.count),
            "mu_xyz": f(mu["xyz"]), "mu_density": f(mu["density"]), "slot": np.nonzero(a)[0].astype(np.float64)}


# One jitted entry point: thresholds and the bbox are traced, so changing them does not recompile.
DENSIFY = jax.jit(densify_and_prune, static_argnames=("max_screen_size", "max_scale"))


def run(g, stats, mu, noise, **kw):
    # Always pass every traced keyword so that the jit signature (and cache entry) stays the same.
    kw = {"bbox_min": BBOX_MIN, "bbox_max": BBOX_MAX, "grad_threshold": 5e-5, "scale_threshold": 0.2,
          "density_min": 1e-5, "max_num_gaussians": 500000, **kw}
    return DENSIFY(g, stats, jax.random.PRNGKey(0), per_gaussian=mu, split_noise=noise, **kw)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("bound", [None, BOUNDED], ids=["x2_exp", "r2_bounded"])
def test_matches_reference_procedure(bound):
    g, stats, mu, noise = make_scene(1, bound)
    ref, densified = reference_densify(live_rows(g, stats, mu), np.asarray(noise, np.float64), bound)
    out, st, pg, info = run(g, stats, mu, noise)
    ours = live_rows(out, st, pg)
    ref.pop("slot"), ours.pop("slot")
    assert densified and bool(info["densified"]) and not bool(info["overflow"])
    assert int(info["cloned"]) > 0 and int(info["split"]) > 0 and int(info["pruned"]) > 0
    assert int(info["num_active"]) == len(ref["xyz"])
    assert_same_set(ours, ref)
    assert int(pg["count"]) == 7  # non-per-Gaussian leaves untouched
    assert np.all(np.asarray(st.grad_accum) == 0) and np.all(np.asarray(st.count) == 0)
    # inactive slots are empty (identity rotation, zero moments/statistics)
    off = ~np.asarray(out.active)
    assert np.all(np.asarray(out.rotation)[off] == [1, 0, 0, 0]) and np.all(np.asarray(out.xyz)[off] == 0)
    assert np.all(np.asarray(pg["xyz"])[off] == 0) and np.all(np.asarray(st.max_radii)[off] == 0)


def test_optimizer_rows_and_slot_reuse():
    g, stats, mu, noise = make_scene(2, None)
    act0 = np.asarray(g.active)
    out, st, pg, info = run(g, stats, mu, noise, bbox_min=-10 * BBOX_MAX, bbox_max=10 * BBOX_MAX, density_min=0.0)
    clone, split = _masks(g, stats)
    n_new = clone.sum() + split.sum()
    assert int(info["cloned"]) == clone.sum() and int(info["split"]) == split.sum() and int(info["pruned"]) == 0
    # appended Gaussians take the lowest free slots
    free = np.nonzero(~act0)[0]
    assert np.array_equal(np.asarray(out.active), act0 | np.isin(np.arange(g.capacity), free[:n_new]))
    mu0, mu1 = np.asarray(mu["xyz"]), np.asarray(pg["xyz"])
    kept = act0 & ~split  # survivors incl. clone sources keep their moments
    assert np.array_equal(mu1[kept], mu0[kept])
    assert np.all(mu1[split] == 0) and np.all(mu1[free[:n_new]] == 0)
    # clone sources: density halved in place, position untouched
    rho0, rho1 = np.asarray(g.get_density()), np.asarray(out.get_density())
    np.testing.assert_allclose(rho1[clone], rho0[clone] / 2, rtol=1e-5)
    assert np.array_equal(np.asarray(out.xyz)[clone], np.asarray(g.xyz)[clone])
    # split parent slots hold child 1 and inherit max_radii
    assert np.array_equal(np.asarray(st.max_radii)[split], np.asarray(stats.max_radii)[split])


def _masks(g, stats, thr=5e-5, sthr=0.2):
    gbar = np.asarray(stats.mean_grad())
    smax = np.asarray(g.get_scale()).max(1)
    hot = np.asarray(g.active) & (gbar >= thr)
    return hot & (smax <= sthr), hot & (smax > sthr)


def test_accumulator_reset_rules():
    g, stats, mu, noise = make_scene(3, None)
    n = int(g.num_active())
    # nothing selected but the stage ran: the reference's postfix still resets everything
    hi = dict(grad_threshold=1e9)
    out, st, _, info = run(g, stats, mu, noise, **hi)
    assert bool(info["densified"]) and int(info["cloned"]) == 0 and int(info["split"]) == 0
    assert np.all(np.asarray(st.count) == 0) and np.all(np.asarray(st.grad_accum) == 0)
    # N >= max_num_gaussians: no clone/split, no reset, pruning still runs
    out, st, pg, info = run(g, stats, mu, noise, max_num_gaussians=n)
    assert not bool(info["densified"]) and int(info["cloned"]) == 0 and int(info["split"]) == 0
    assert int(info["pruned"]) >= 2  # the two centres outside the bbox
    a = np.asarray(out.active)
    assert np.array_equal(np.asarray(st.count)[a], np.asarray(stats.count)[a])
    assert np.array_equal(np.asarray(st.grad_accum)[a], np.asarray(stats.grad_accum)[a])
    assert np.array_equal(np.asarray(pg["xyz"])[a], np.asarray(mu["xyz"])[a])
    assert int(info["num_active"]) == n - int(info["pruned"])
    # one below the cap: densifies, and the count may exceed the cap afterwards
    _, _, _, info = run(g, stats, mu, noise, max_num_gaussians=n + 1)
    assert bool(info["densified"]) and int(info["num_active"]) > n + 1


def test_overflow_then_grow():
    g, stats, mu, noise = make_scene(4, None, capacity=48, n_live=40)
    needed = int(jax.jit(required_capacity)(g, stats))
    clone, split = _masks(g, stats)
    assert needed == 40 + clone.sum() + split.sum() > g.capacity
    out, st, pg, info = run(g, stats, mu, noise)
    assert bool(info["overflow"]) and int(info["needed_capacity"]) == needed
    assert int(info["cloned"]) == 0 and int(info["split"]) == 0 and int(info["pruned"]) == 0
    for a, b in zip(jax.tree.leaves((out, st, pg)), jax.tree.leaves((g, stats, mu))):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # unchanged: nothing dropped silently
    # grow everything together and retry; compare with the reference on the same live set
    new_cap = next_capacity(needed, g.capacity)
    assert new_cap == 96
    g2, stats2, mu2 = grow((g, stats, mu), new_cap, g.capacity)
    noise2 = jnp.concatenate([noise, jnp.zeros((2, new_cap - g.capacity, 3))], axis=1)
    out, st, pg, info = run(g2, stats2, mu2, noise2)
    assert not bool(info["overflow"])
    ref, _ = reference_densify(live_rows(g, stats, mu), np.asarray(noise, np.float64), None)
    ours = live_rows(out, st, pg)
    ref.pop("slot"), ours.pop("slot")
    assert_same_set(ours, ref)


def test_split_offsets_from_key_have_parent_covariance():
    n = 3000
    q = np.array([0.9, 0.3, -0.2, 0.25])
    s = np.array([0.5, 0.3, 0.1])
    m = np.array([0.1, -0.2, 0.05])
    g = Gaussians.from_activated(np.tile(m, (n, 1)), np.tile(s, (n, 1)), np.tile(q, (n, 1)), np.full(n, 0.4),
                                 capacity=2 * n)
    stats = DensifyStats.zeros(2 * n).replace(grad_accum=jnp.ones(2 * n), count=jnp.ones(2 * n, jnp.int32))
    fn = functools.partial(DENSIFY, bbox_min=-10 * np.ones(3), bbox_max=10 * np.ones(3))
    out, _, _, info = fn(g, stats, jax.random.PRNGKey(3))
    assert int(info["split"]) == n and int(info["num_active"]) == 2 * n
    x = np.asarray(out.xyz, np.float64) - m
    cov_true = np_rotmat(q[None])[0] @ np.diag(s**2) @ np_rotmat(q[None])[0].T
    assert np.all(np.abs(x.mean(0)) < 4 * np.sqrt(np.diag(cov_true) / (2 * n)))
    assert np.max(np.abs(np.cov(x.T) - cov_true)) < 0.1 * s.max() ** 2
    np.testing.assert_allclose(np.asarray(out.get_scale()), np.tile(s / 1.6, (2 * n, 1)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.get_density()), 0.2, rtol=1e-5)
    # a different key gives different offsets (the key is used)
    out2, _, _, _ = fn(g, stats, jax.random.PRNGKey(4))
    assert not np.allclose(np.asarray(out2.xyz), np.asarray(out.xyz))


def test_bounded_split_below_smin_is_frozen_and_finite():
    s = np.array([[0.3, 0.0012, 0.05]])  # 0.0012 / 1.6 < s_min = 0.001
    g = Gaussians.from_activated(np.zeros((1, 3)), s, np.array([[1.0, 0, 0, 0]]), np.array([0.5]), capacity=2,
                                 scale_bound=BOUNDED)
    stats = DensifyStats.zeros(2).replace(grad_accum=jnp.ones(2), count=jnp.ones(2, jnp.int32))
    out, _, _, info = DENSIFY(g, stats, jax.random.PRNGKey(0), split_noise=jnp.zeros((2, 2, 3)))
    assert int(info["split"]) == 1 and int(info["num_active"]) == 2
    raw = np.asarray(out.scaling)
    assert np.all(np.isfinite(raw)) and np.all(raw[:, 1] == SCALE_RAW_FLOOR)
    sc = np.asarray(out.get_scale())
    assert np.all(sc[:, 1] == np.float32(BOUNDED[0]))
    np.testing.assert_allclose(sc[:, [0, 2]], np.tile([0.3 / 1.6, 0.05 / 1.6], (2, 1)), rtol=1e-4)
    grad = jax.grad(lambda r: jnp.sum(out.replace(scaling=r).get_scale()))(out.scaling)
    assert np.all(np.asarray(grad)[:, 1] == 0)


def test_accumulate_only_visible():
    rng = np.random.default_rng(5)
    c = 50
    ndc = rng.normal(size=(3, c, 2)).astype(np.float32)
    radii = rng.integers(0, 3, size=(3, c)).astype(np.float32)
    fn = jax.jit(accumulate)
    st = DensifyStats.zeros(c)
    for i in range(3):
        st = fn(st, jnp.asarray(ndc[i]), jnp.asarray(radii[i]))
    vis = radii > 0
    np.testing.assert_allclose(np.asarray(st.grad_accum), np.sum(np.linalg.norm(ndc, axis=-1) * vis, 0), rtol=1e-5)
    assert np.array_equal(np.asarray(st.count), vis.sum(0))
    assert np.array_equal(np.asarray(st.max_radii), radii.max(0))
    gbar = np.asarray(st.mean_grad())
    assert np.all(gbar[vis.sum(0) == 0] == 0) and np.all(np.isfinite(gbar))


def test_grow_adam_state_and_stats():
    c = 6
    params = {"xyz": jnp.arange(c * 3, dtype=jnp.float32).reshape(c, 3), "density": jnp.ones(c)}
    opt = optax.adam(1e-3)
    state = opt.init(params)
    _, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
    stats = DensifyStats.zeros(c).replace(count=jnp.arange(c, dtype=jnp.int32))
    other = jnp.ones((4, 3))  # not per-Gaussian: untouched
    st2, stats2, other2 = grow((state, stats, other), 10, c)
    mu = st2[0].mu
    assert mu["xyz"].shape == (10, 3) and st2[0].nu["density"].shape == (10,)
    assert np.array_equal(np.asarray(mu["xyz"])[:c], np.asarray(state[0].mu["xyz"]))
    assert np.all(np.asarray(mu["xyz"])[c:] == 0) and int(st2[0].count) == int(state[0].count) == 1
    assert np.array_equal(np.asarray(stats2.count), np.r_[np.arange(c), np.zeros(4)])
    assert other2.shape == (4, 3)
    # the grown state is usable by the optimiser with grown parameters
    p2 = grow(params, 10, c)
    opt.update(jax.tree.map(jnp.ones_like, p2), st2, p2)


def test_is_densify_iteration():
    its = np.arange(1, 16001)
    hit = np.asarray(jax.jit(is_densify_iteration)(jnp.asarray(its)))
    assert its[hit][0] == 600 and its[hit][-1] == 14900 and hit.sum() == 144
