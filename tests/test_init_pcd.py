"""Initial point cloud: FDK path semantics (threshold, corner convention, rescale), random path, seeding,
errors, and the CLI writing init_<stem>.npy next to the pickle."""
import os

import numpy as np
import pytest

from x2gs_jax.ct.fdk import fdk
from x2gs_jax.ct.init_pcd import corner_positions, init_points, main
from x2gs_jax.data.naf import Case, Split
from x2gs_jax.geometry import Scanner

SC = Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=[32, 40], dDetector=[8.0, 8.0], nVoxel=[24, 20, 16],
                           dVoxel=[8.0, 8.0, 8.0], offOrigin=[16.0, -8.0, 24.0]))


def cylinder_case(radius=0.45, mu=0.8, n_views=48, times=False) -> Case:
    """A 3D (or 4D-labelled) case whose projections are exact line integrals of a z-axis cylinder."""
    angles = np.linspace(0, 2 * np.pi, n_views, endpoint=False)
    proj = []
    for a in angles:
        o, d = (np.asarray(t, np.float64) for t in SC.rays(a))
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        A = d[..., 0] ** 2 + d[..., 1] ** 2
        B = o[..., 0] * d[..., 0] + o[..., 1] * d[..., 1]
        C = o[..., 0] ** 2 + o[..., 1] ** 2 - radius**2
        proj.append(mu * 2 * np.sqrt(np.maximum(B * B - A * C, 0)) / A / SC.scene_scale)
    proj = np.stack(proj).astype(np.float32)
    t = np.arange(n_views) / n_views if times else None
    ph = (np.arange(n_views) % 10) if times else None
    train = Split(proj, angles, t, ph)
    val = Split(proj[:3], angles[:3], None if t is None else t[:3], None if ph is None else ph[:3])
    vols = np.zeros((10,) + SC.n_voxel if times else SC.n_voxel, np.float32)
    return Case(scanner=SC, train=train, val=val, volumes=vols)


@pytest.fixture(scope="module")
def case():
    return cylinder_case(times=True)  # 4D labels: the init must still pool every training view


def test_fdk_init_threshold_corner_convention_and_rescale(case):
    pts = init_points(case, n_points=300, density_thresh=0.3, density_rescale=0.15, seed=3, progress=False)
    assert pts.shape == (300, 4) and pts.dtype == np.float64
    vol = np.asarray(fdk(case.train.projections, SC, case.train.angles), np.float64)  # all views pooled
    idx_f = (pts[:, :3] - np.array(SC.off_origin) + np.array(SC.s_voxel) / 2) / np.array(SC.d_voxel)
    idx = np.rint(idx_f).astype(int)
    np.testing.assert_allclose(idx_f, idx, atol=1e-6)  # positions are voxel corners, not centres
    assert np.all(idx >= 0) and np.all(idx < np.array(SC.n_voxel))
    assert len({tuple(i) for i in idx}) == 300  # drawn without replacement
    vals = vol[idx[:, 0], idx[:, 1], idx[:, 2]]
    assert np.all(vals > 0.3)
    np.testing.assert_allclose(pts[:, 3], 0.15 * vals, rtol=1e-6)
    # The cylinder (μ 0.8) is what passes the threshold: points' voxel centres lie within ~its radius.
    centres = pts[:, :3] + np.array(SC.d_voxel) / 2
    assert np.hypot(centres[:, 0], centres[:, 1]).max() < 0.45 + 2 * SC.d_voxel[0]


def test_corner_convention_on_a_single_voxel():
    vol = np.zeros(SC.n_voxel, np.float32)
    vol[5, 7, 3] = 0.9
    pts = init_points(cylinder_case(n_views=2), n_points=1, volume=vol, seed=0)
    want = np.array([5, 7, 3]) * np.array(SC.d_voxel) - np.array(SC.s_voxel) / 2 + np.array(SC.off_origin)
    np.testing.assert_allclose(pts[0, :3], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(corner_positions(np.array([[5, 7, 3]]), SC)[0], want, atol=1e-12)
    assert pts[0, 3] == pytest.approx(0.9 * 0.15, rel=1e-6)


def test_seeding_is_deterministic(case):
    vol = np.asarray(fdk(case.train.projections, SC, case.train.angles))
    a = init_points(case, n_points=200, seed=11, volume=vol)
    b = init_points(case, n_points=200, seed=11, volume=vol)
    c = init_points(case, n_points=200, seed=12, volume=vol)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_too_few_voxels_names_the_case(case):
    vol = np.zeros(SC.n_voxel, np.float32)
    vol[:2, :2, :2] = 1.0
    with pytest.raises(ValueError, match=r"lungs_42: only 8 voxels .* n_points=9"):
        init_points(case, n_points=9, volume=vol, name="lungs_42")
    with pytest.raises(ValueError, match="method"):
        init_points(case, method="tigre")


def test_random_init_uniform_in_box(case):
    pts = init_points(case, n_points=5000, method="random", seed=4)
    assert pts.shape == (5000, 4) and pts.dtype == np.float64
    lo, hi = SC.bbox
    assert np.all(pts[:, :3] >= lo) and np.all(pts[:, :3] < hi)
    # Uniform: each half of the box along every axis holds about half the points (±5 σ).
    mid = (lo + hi) / 2
    assert np.all(np.abs((pts[:, :3] < mid).mean(0) - 0.5) < 5 * 0.5 / np.sqrt(5000))
    assert pts[:, 3].min() >= 0 and pts[:, 3].max() < 1 and abs(pts[:, 3].mean() - 0.5) < 0.02
    np.testing.assert_array_equal(pts, init_points(case, n_points=5000, method="random", seed=4))


def test_cli_writes_init_next_to_the_pickle(tmp_path, case, capsys):
    from x2gs_jax.data.naf import load_case, save_case

    path = tmp_path / "toy_case.v2.pickle"
    save_case(path, case)
    assert main(["--data", str(path), "--n_points", "120", "--density_thresh", "0.2", "--seed", "5",
                 "--no_progress"]) == 0
    out = tmp_path / "init_toy_case.npy"  # stem = basename cut at the first dot
    got = np.load(out)
    want = init_points(load_case(path), n_points=120, density_thresh=0.2, seed=5, progress=False)
    np.testing.assert_array_equal(got, want)
    assert sorted(os.listdir(tmp_path)) == ["init_toy_case.npy", "toy_case.v2.pickle"]  # no temp files left
    custom = tmp_path / "sub.npy"
    assert main(["--data", str(path), "--n_points", "10", "--method", "random", "--output", str(custom)]) == 0
    assert np.load(custom).shape == (10, 4)
    assert "toy_case" in capsys.readouterr().out
