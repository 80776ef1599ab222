"""Gaussians: exact k-NN, point-cloud initialisation, init-file loading, capacity growth, jax inverses."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from x2gs_jax.data.naf import DataError
from x2gs_jax.gaussians import (SCALE_RAW_FLOOR, Gaussians, grow, inverse_scale_activation,
                                inverse_scale_activation_jax, inverse_softplus, inverse_softplus_jax,
                                load_init_points, next_capacity, scale_activation, softplus)
from x2gs_jax.knn import knn_mean_sq_dist


def brute_knn(p, k):
    p = np.asarray(p, np.float64)
    d2 = np.sum((p[:, None] - p[None]) ** 2, axis=-1)
    np.fill_diagonal(d2, np.inf)  # only the point itself; its duplicates stay at 0
    return np.mean(np.sort(d2, axis=1)[:, :k], axis=1)


def cloud_with_duplicates(seed, n=300):
    rng = np.random.default_rng(seed)
    p = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    p[10] = p[11]  # a pair
    p[20] = p[21] = p[22]  # a triple: all three neighbours of 20 include two zeros
    p[30:34] = p[5]  # five coincident points: 3-NN distance exactly 0
    return p


@pytest.mark.parametrize("k,chunk", [(3, None), (3, 37), (1, 64), (5, 300)])
@pytest.mark.parametrize("method", ["brute", "kdtree"])
def test_knn_matches_brute_force(k, chunk, method):
    p = cloud_with_duplicates(k)
    got = np.asarray(knn_mean_sq_dist(p, k=k, chunk=chunk, method=method))
    want = brute_knn(p, k)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)
    if k == 3:
        assert got[5] == 0 and got[30] == 0  # duplicates count as 0
        assert got[20] == pytest.approx(want[20], rel=1e-5) and got[20] > 0  # self excluded exactly once


def test_knn_kdtree_equals_jax_brute_force_with_ties():
    """The CPU path (cKDTree) against the jax brute force on a lattice (many exactly tied distances) with
    duplicated points: the same values to 1 ulp (the mean's rounding), and "auto" picks the tree on a CPU."""
    g = np.arange(6, dtype=np.float32) * 0.25
    p = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    p = np.concatenate([p, p[:7], p[100:101], p[100:101]])  # pairs and a triple of coincident points
    for k in (1, 3, 6):
        tree = np.asarray(knn_mean_sq_dist(p, k=k, method="kdtree"))
        brute = np.asarray(knn_mean_sq_dist(p, k=k, method="brute"))
        np.testing.assert_allclose(tree, brute, rtol=2.5e-7, atol=0)
        h2 = np.float32(0.25) ** 2  # the lattice spacing squared: six tied neighbours of an interior point
        assert tree[50] == pytest.approx(h2, rel=1e-6)  # any k of its six tied neighbours give the same mean
        if k == 1:  # a duplicated point's nearest other point is its copy, at 0
            assert np.all(tree[:7] == 0) and np.all(tree[216:223] == 0) and tree[100] == 0
        if k == 3:  # the triple: two copies at 0 and one lattice neighbour (itself excluded once, not its copies)
            assert tree[100] == pytest.approx(h2 / 3, rel=1e-6)
            assert tree[216] == pytest.approx(2 * h2 / 3, rel=1e-6)
    if jax.default_backend() == "cpu":
        auto = np.asarray(knn_mean_sq_dist(p, k=3))
        np.testing.assert_array_equal(auto, np.asarray(knn_mean_sq_dist(p, k=3, method="kdtree")))


def test_knn_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        knn_mean_sq_dist(np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N > k"):
        knn_mean_sq_dist(np.zeros((3, 3)), k=3)
    with pytest.raises(ValueError, match="method"):
        knn_mean_sq_dist(np.zeros((5, 3)), method="ball")
    bad = np.zeros((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        knn_mean_sq_dist(bad, method="kdtree")


@pytest.mark.parametrize("bound", [None, (0.001, 1.0)], ids=["x2_exp", "r2_bounded"])
def test_from_point_cloud_raw_values(bound):
    rng = np.random.default_rng(7)
    n = 60
    xyz = rng.uniform(-1, 1, (n, 3))
    xyz[:3] = xyz[50]  # duplicates -> d2 = 0 hits the 1e-3 floor
    xyz[40:44] = [[5, 5, 5], [-5, 5, 5], [5, -5, 5], [5, 5, -5]]  # isolated -> d > 1 (clamped when bounded)
    rho = rng.uniform(0.01, 0.6, n)
    rho[7] = 25.0  # softplus identity branch
    pts = np.concatenate([xyz, rho[:, None]], axis=1)
    g = Gaussians.from_point_cloud(pts, capacity=70, scale_bound=bound)

    d = np.sqrt(np.maximum(brute_knn(xyz.astype(np.float32), 3), 1e-6))
    if bound is None:
        raw_s = np.log(d)
    else:
        d = np.clip(d, bound[0] + 1e-5, bound[1] - 1e-5)
        p = (d - bound[0]) / (bound[1] - bound[0])
        raw_s = np.log(p / (1 - p))
    raw_rho = np.where(rho > 20, rho, np.log(np.exp(rho) - 1))
    assert g.capacity == 70 and int(g.num_active()) == n and g.scale_bound == bound
    np.testing.assert_allclose(np.asarray(g.scaling)[:n], np.repeat(raw_s[:, None], 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.density)[:n], raw_rho, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g.xyz)[:n], xyz.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(g.rotation)[:n], np.tile([1, 0, 0, 0], (n, 1)))
    assert not np.any(np.asarray(g.active)[n:])
    np.testing.assert_allclose(np.asarray(g.get_density())[:n], rho, rtol=1e-5)
    s = np.asarray(g.get_scale())[:n, 0]
    np.testing.assert_allclose(s, d, rtol=1e-4)
    floor = 1e-3 if bound is None else bound[0] + 1e-5  # R2's clamp lifts the 1e-3 floor to s_min + 1e-5
    assert s[0] == pytest.approx(floor, rel=1e-4)
    if bound is not None:
        assert s[40] == pytest.approx(bound[1] - 1e-5, rel=1e-5)


def test_from_point_cloud_rejects_bad_input():
    good = np.random.default_rng(0).uniform(0.1, 1, (10, 4))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        Gaussians.from_point_cloud(good[:, :3])
    bad = good.copy()
    bad[3, 3] = 0
    with pytest.raises(ValueError, match="> 0"):
        Gaussians.from_point_cloud(bad)
    with pytest.raises(ValueError, match="capacity"):
        Gaussians.from_point_cloud(good, capacity=5)


def test_load_init_points(tmp_path):
    good = np.random.default_rng(1).uniform(0.1, 1, (12, 4))
    np.save(tmp_path / "ok.npy", good)
    out = load_init_points(tmp_path / "ok.npy")
    assert out.dtype == np.float64 and np.array_equal(out, good)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_init_points(tmp_path / "missing.npy")
    cases = {
        "shape3.npy": (good[:, :3], r"shape \[N, 4\]"),
        "flat.npy": (good.ravel(), r"shape \[N, 4\]"),
        "empty.npy": (np.zeros((0, 4)), r"N >= 1"),
        "nan.npy": (np.where(np.arange(48).reshape(12, 4) == 9, np.nan, good), r"NaN.*first row 2"),
        "neg.npy": (np.where(np.arange(48).reshape(12, 4) == 23, -0.5, good), r"density.*first row 5"),
        "str.npy": (np.array([["a", "b", "c", "d"]]), "numeric"),
    }
    for name, (arr, msg) in cases.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(DataError, match=msg) as e:
            load_init_points(tmp_path / name)
        assert name in str(e.value)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):  # pickled payloads are refused
        load_init_points(tmp_path / "obj.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(DataError, match="junk.npy"):
        load_init_points(tmp_path / "junk.npy")


def test_grow_gaussians_and_trees():
    g = Gaussians.from_activated(np.arange(12.0).reshape(4, 3), np.full((4, 3), 0.1),
                                 np.tile([0.5, 0.5, 0.5, 0.5], (4, 1)), np.full(4, 0.3), capacity=5,
                                 scale_bound=(0.001, 1.0))
    moments = {"xyz": jnp.ones((5, 3)), "count": jnp.asarray(3), "other": jnp.ones((7,))}
    g2, m2 = grow((g, moments), 8, 5)
    assert g2.capacity == 8 and g2.scale_bound == g.scale_bound
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g)):
        assert np.array_equal(np.asarray(a)[:5], np.asarray(b))
    assert not np.any(np.asarray(g2.active)[5:])
    assert np.array_equal(np.asarray(g2.rotation)[5:], np.tile([1, 0, 0, 0], (3, 1)))
    assert np.all(np.asarray(g2.get_density())[5:] == 0)
    assert m2["xyz"].shape == (8, 3) and np.all(np.asarray(m2["xyz"])[5:] == 0)
    assert np.all(np.asarray(m2["xyz"])[:5] == 1)
    assert int(m2["count"]) == 3 and m2["other"].shape == (7,)
    assert grow(g, 5, 5) is g
    with pytest.raises(ValueError, match="new_capacity"):
        grow(g, 4, 5)
    npy = grow({"a": np.ones((5, 2))}, 6, 5)["a"]  # numpy leaves stay numpy
    assert isinstance(npy, np.ndarray) and npy.shape == (6, 2) and npy[5].sum() == 0


def test_next_capacity():
    assert next_capacity(10, 10) == 10
    assert next_capacity(11, 10) == 20
    assert next_capacity(41, 10) == 80
    assert next_capacity(3, 0) == 4
    assert next_capacity(5, 8) == 8


def test_jax_inverses_match_numpy_and_invert():
    y = np.array([1e-6, 1e-3, 0.15, 1.0, 19.9, 20.0, 25.0], np.float32)
    np.testing.assert_allclose(np.asarray(inverse_softplus_jax(y)), inverse_softplus(y), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(softplus(inverse_softplus_jax(y))), y, rtol=2e-5)
    s = np.array([0.0011, 0.01, 0.3, 0.99], np.float32)
    for bound in [None, (0.001, 1.0)]:
        raw = inverse_scale_activation_jax(s, bound)
        np.testing.assert_allclose(np.asarray(raw), inverse_scale_activation(s, bound), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(scale_activation(raw, bound)), s, rtol=1e-5)
    # at or below s_min the bounded inverse is the finite floor, whose activation is exactly s_min
    raw = inverse_scale_activation_jax(np.array([0.001, 0.0005], np.float32), (0.001, 1.0))
    assert np.all(np.asarray(raw) == SCALE_RAW_FLOOR)
    assert np.all(np.asarray(scale_activation(raw, (0.001, 1.0))) == np.float32(0.001))
