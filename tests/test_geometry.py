"""Scanner/camera conventions (rasterizer.md §2, data_format.md §4-5) reproduced numerically."""
import jax
import numpy as np
import pytest

from x2gs_jax.geometry import Scanner

NAF = dict(DSD=1500.0, DSO=1000.0, nDetector=[64, 80], dDetector=[2.0, 1.5], nVoxel=[128, 128, 100],
           dVoxel=[2.0, 2.0, 2.5], offOrigin=[0, 0, 0], offDetector=[0, 0], mode="cone")


def test_from_naf_units_and_scene_scale():
    sc = Scanner.from_naf(NAF)
    s_voxel_m = np.array([0.256, 0.256, 0.25])
    assert sc.scene_scale == pytest.approx(2 / 0.256)
    assert sc.DSD == pytest.approx(1.5 * sc.scene_scale) and sc.DSO == pytest.approx(1.0 * sc.scene_scale)
    np.testing.assert_allclose(sc.s_voxel, s_voxel_m * sc.scene_scale)
    assert max(sc.s_voxel) == pytest.approx(2.0)
    np.testing.assert_allclose(sc.d_detector, np.array([2.0, 1.5]) / 1000 * sc.scene_scale)
    assert (sc.height, sc.width) == (64, 80)
    lo, hi = sc.bbox
    np.testing.assert_allclose(hi - lo, sc.s_voxel)
    np.testing.assert_allclose(sc.d_voxel_mm, [2.0, 2.0, 2.5])
    back = sc.to_naf()
    for k in ("DSD", "DSO", "dDetector", "dVoxel"):
        np.testing.assert_allclose(back[k], NAF[k], rtol=1e-12)


def test_camera_axes_and_examples_theta0():
    """rasterizer.md §2.1: theta = 0, world (0,0.5,0) -> t = (0.5, 0, DSO); (0,0,0.5) -> (0,-0.5,DSO)."""
    sc = Scanner.from_naf(NAF)
    cam = sc.camera(0.0)
    V = np.asarray(cam.viewmatrix, np.float64)
    t1 = V @ np.array([0, 0.5, 0, 1.0])
    t2 = V @ np.array([0, 0, 0.5, 1.0])
    np.testing.assert_allclose(t1[:3], [0.5, 0, sc.DSO], atol=1e-5)
    np.testing.assert_allclose(t2[:3], [0, -0.5, sc.DSO], atol=1e-5)
    np.testing.assert_allclose(np.asarray(cam.campos), [sc.DSO, 0, 0], atol=1e-5)


@pytest.mark.parametrize("theta", [0.0, 0.7, 2.1, 4.4])
def test_camera_axes_any_angle(theta):
    sc = Scanner.from_naf(NAF)
    V = np.asarray(sc.camera(theta).viewmatrix, np.float64)
    c, s = np.cos(theta), np.sin(theta)
    np.testing.assert_allclose(V[0, :3], [-s, c, 0], atol=1e-6)  # x_cam = right (columns)
    np.testing.assert_allclose(V[1, :3], [0, 0, -1], atol=1e-6)  # y_cam = down (rows)
    np.testing.assert_allclose(V[2, :3], [-c, -s, 0], atol=1e-6)  # z_cam = towards the isocentre
    m = np.array([0.3, -0.2, 0.1, 1.0])
    assert (V @ m)[2] == pytest.approx(sc.DSO - (c * m[0] + s * m[1]), abs=1e-5)


def test_projection_matrix_and_focal():
    sc = Scanner.from_naf(NAF)
    cam = sc.camera(0.3)
    su, sv = sc.s_detector[1], sc.s_detector[0]
    assert float(cam.tanfovx) == pytest.approx(su / (2 * sc.DSD), rel=1e-6)
    assert float(cam.tanfovy) == pytest.approx(sv / (2 * sc.DSD), rel=1e-6)
    assert float(cam.focal_x) == pytest.approx(sc.DSD / sc.d_detector[1], rel=1e-5)
    assert float(cam.focal_y) == pytest.approx(sc.DSD / sc.d_detector[0], rel=1e-5)
    P = np.asarray(cam.projmatrix)
    assert P[3, 2] == 1.0 and P[0, 2] == 0 and P[1, 2] == 0
    np.testing.assert_allclose(np.asarray(cam.full_projmatrix), P @ np.asarray(cam.viewmatrix), rtol=1e-6, atol=1e-6)


def test_pixel_mapping_cone_formula():
    """§2.5: p_x = f_x t_x/t_z + (W-1)/2 and the principal point at ((W-1)/2, (H-1)/2)."""
    sc = Scanner.from_naf(NAF)
    cam = sc.camera(1.1)
    pts = np.random.default_rng(0).uniform(-0.8, 0.8, (50, 3)).astype(np.float32)
    px = np.asarray(cam.world_to_pixel(pts), np.float64)
    V = np.asarray(cam.viewmatrix, np.float64)
    t = pts @ V[:3, :3].T + V[:3, 3]
    np.testing.assert_allclose(px[:, 0], float(cam.focal_x) * t[:, 0] / t[:, 2] + (sc.width - 1) / 2, atol=2e-3)
    np.testing.assert_allclose(px[:, 1], float(cam.focal_y) * t[:, 1] / t[:, 2] + (sc.height - 1) / 2, atol=2e-3)


def test_parallel_pixel_mapping_oracle():
    """rasterizer.md §10.5: theta = 0, parallel: (0, y0, z0) -> (y0 W/2 + (W-1)/2, -z0 H/2 + (H-1)/2)."""
    sc = Scanner.from_naf({**NAF, "mode": "parallel"})
    cam = sc.camera(0.0)
    assert float(cam.tanfovx) == 1.0 and float(cam.focal_x) == pytest.approx(sc.width / 2)
    y0, z0 = 0.31, -0.42
    px = np.asarray(cam.world_to_pixel(np.array([[0.0, y0, z0]], np.float32)))[0]
    np.testing.assert_allclose(px, [y0 * sc.width / 2 + (sc.width - 1) / 2, -z0 * sc.height / 2 + (sc.height - 1) / 2],
                               atol=1e-4)


@pytest.mark.parametrize("mode", ["cone", "parallel"])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (24.0, -16.0)])
def test_rays_project_to_their_pixel_centres(mode, offset):
    """A point on a pixel's ray projects to that pixel's centre (camera and ray generator agree),
    with and without a detector offset (principal-point shift)."""
    sc = Scanner.from_naf({**NAF, "mode": mode, "offDetector": list(offset)})
    theta = 0.9
    origins, dirs = sc.rays(theta)
    origins, dirs = np.asarray(origins, np.float64), np.asarray(dirs, np.float64)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-6)
    cam = sc.camera(theta)
    rng = np.random.default_rng(1)
    rows, cols = rng.integers(0, sc.height, 40), rng.integers(0, sc.width, 40)
    dist = sc.DSO + rng.uniform(-0.5, 0.5, 40)
    pts = origins[rows, cols] + dist[:, None] * dirs[rows, cols]
    px = np.asarray(cam.world_to_pixel(pts.astype(np.float32)), np.float64)
    np.testing.assert_allclose(px[:, 0], cols, atol=3e-3)
    np.testing.assert_allclose(px[:, 1], rows, atol=3e-3)


def test_ray_geometry_data_format_section5():
    """data_format.md §5: the cone ray of pixel (i, j) passes through C + DSD f + u r + v d; row 0 is the top."""
    sc = Scanner.from_naf(NAF)
    origins, dirs = (np.asarray(a, np.float64) for a in sc.rays(0.0))
    H, W = sc.height, sc.width
    i, j = 3, 70
    u = (j + 0.5 - W / 2) * sc.d_detector[1]
    v = (i + 0.5 - H / 2) * sc.d_detector[0]
    C = np.array([sc.DSO, 0, 0])
    P = C + sc.DSD * np.array([-1, 0, 0]) + u * np.array([0, 1, 0]) + v * np.array([0, 0, -1])
    np.testing.assert_allclose(origins[i, j], C, atol=1e-5)
    np.testing.assert_allclose(dirs[i, j], (P - C) / np.linalg.norm(P - C), atol=1e-6)
    assert dirs[0, 0, 2] > 0 > dirs[-1, 0, 2]  # row 0 looks up (+z)
    assert dirs[0, -1, 1] > 0 > dirs[0, 0, 1]  # columns increase along +y at theta = 0


def test_vmap_over_angles_matches_single_cameras():
    sc = Scanner.from_naf(NAF)
    angles = np.array([0.0, 1.0, 2.5])
    batch = jax.vmap(sc.camera)(angles)
    for k, a in enumerate(angles):
        np.testing.assert_allclose(np.asarray(batch.full_projmatrix[k]), np.asarray(sc.camera(a).full_projmatrix),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, msg", [
    (dict(mode="fan"), "mode"), (dict(DSD=900.0), "DSD > DSO"), (dict(dVoxel=[1, -1, 1]), "dVoxel"),
    (dict(nDetector=[0, 10]), "n_detector"),
])
def test_bad_scanner_rejected(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Scanner.from_naf({**NAF, **bad})
