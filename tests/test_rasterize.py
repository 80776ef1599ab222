"""Reference rasterizer forward: closed-form oracles (rasterizer.md §10 items 1-5, 8, 9), a brute-force float64
transcription of §4-5, jit/vmap, inactive slots, pair counting and overflow."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.gaussians import Gaussians
from x2gs_jax.geometry import Scanner
from x2gs_jax.render import count_pairs, pair_capacity, rasterize, rasterize_points, resolve_backend

N_SLOTS = 32  # every random scene is padded to this many slots (zero density) so jit compiles once per camera


# ----------------------------------------------------------------------------------------- float64 oracle
def camera_np(cam):
    """Camera fields as float64 numpy (one view)."""
    return dict(view=np.asarray(cam.viewmatrix, np.float64), full=np.asarray(cam.full_projmatrix, np.float64),
                tanx=float(cam.tanfovx), tany=float(cam.tanfovy), fx=float(cam.focal_x), fy=float(cam.focal_y),
                W=cam.width, H=cam.height, mode=cam.mode)


def quat_rot_np(q):
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def render_f64(means, scales, rots, rho, cam, ndc_offset=None, return_masks=False):
    """Dense float64 transcription of rasterizer.md §4-5 (loops over Gaussians; small scenes only).

    Returns image [H, W] and radii [C] (and, with return_masks, the per-Gaussian contribution masks [C, H, W]).
    """
    c = cam if isinstance(cam, dict) else camera_np(cam)
    means, scales, rots, rho = (np.asarray(a, np.float64) for a in (means, scales, rots, rho))
    W, H = c["W"], c["H"]
    gx, gy = (W + 15) // 16, (H + 15) // 16
    xs, ys = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    image = np.zeros((H, W))
    radii = np.zeros(len(means), np.int64)
    masks = np.zeros((len(means), H, W), bool)
    Rv, tv = c["view"][:3, :3], c["view"][:3, 3]
    for i in range(len(means)):
        R = quat_rot_np(rots[i])
        sigma = R @ np.diag(scales[i] ** 2) @ R.T
        t = Rv @ means[i] + tv
        if t[2] <= 0.2:
            continue
        if c["mode"] == "cone":
            lx, ly = 1.3 * c["tanx"], 1.3 * c["tany"]
            x = np.clip(t[0] / t[2], -lx, lx) * t[2]
            y = np.clip(t[1] / t[2], -ly, ly) * t[2]
            ell = math.sqrt(x * x + y * y + t[2] ** 2)
            J = np.array([[c["fx"] / t[2], 0, -c["fx"] * x / t[2] ** 2], [0, c["fy"] / t[2], -c["fy"] * y / t[2] ** 2],
                          [x / ell, y / ell, t[2] / ell]])
        else:
            J = np.diag([c["fx"], c["fy"], 1.0])
        T = J @ Rv
        S = T @ sigma @ T.T
        a, b, cc, d, e, f = S[0, 0], S[0, 1], S[0, 2], S[1, 1], S[1, 2], S[2, 2]
        det2 = a * d - b * b
        if det2 == 0:
            continue
        A, B, C = d / det2, -b / det2, a / det2
        det3 = a * d * f + 2 * b * cc * e - a * e * e - f * b * b - d * cc * cc
        q = 2 * math.pi * det3 / det2
        mu = math.sqrt(q) if q > 0 else 0.0
        mid = 0.5 * (a + d)
        lam = mid + math.sqrt(max(0.1, mid * mid - det2))
        r = math.ceil(3 * math.sqrt(lam))
        h = c["full"] @ np.append(means[i], 1.0)
        ndc = h[:2] / (h[3] + 1e-7)
        if ndc_offset is not None:
            ndc = ndc + np.asarray(ndc_offset, np.float64)[i]
        p = ((ndc + 1) * np.array([W, H]) - 1) / 2
        lo = np.clip(np.trunc((p - r) / 16), 0, [gx, gy]).astype(int)
        hi = np.clip(np.trunc((p + r + 15) / 16), 0, [gx, gy]).astype(int)
        if (hi[0] - lo[0]) * (hi[1] - lo[1]) == 0:
            continue
        radii[i] = r
        dx, dy = p[0] - xs, p[1] - ys
        E = -0.5 * (A * dx * dx + C * dy * dy) - B * dx * dy
        alpha = rho[i] * mu * np.exp(np.minimum(E, 0))
        tile_x, tile_y = xs // 16, ys // 16
        m = ((tile_x >= lo[0]) & (tile_x < hi[0]) & (tile_y >= lo[1]) & (tile_y < hi[1]) & (E <= 0) & (alpha >= 1e-5))
        masks[i] = m
        image += np.where(m, alpha, 0.0)
    return (image, radii, masks) if return_masks else (image, radii)


# ----------------------------------------------------------------------------------------- scenes
def make_scanner(mode, H=40, W=48):
    """NAF-style scanner (DSD 1500 mm, DSO 1000 mm, 256³ × 1 mm box); cone detector spans 3.6 world units."""
    det = 460.8 / np.array([H, W])
    return Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=[H, W], dDetector=det, nVoxel=[256] * 3,
                                 dVoxel=[1.0] * 3, mode=mode))


def random_quats(rng, n):
    q = rng.normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def random_scene(rng, scanner, angle, n_main=20, extras=True):
    """Random Gaussians inside the box, plus (cone) near-plane ones and partly off-image ones, padded to N_SLOTS."""
    xyz = rng.uniform(-0.8, 0.8, (n_main, 3))
    scale = np.exp(rng.uniform(np.log(0.03), np.log(0.15), (n_main, 3)))
    rot = random_quats(rng, n_main)
    rho = rng.uniform(0.2, 1.0, n_main)
    if extras:
        cam = scanner.camera(angle)
        Rv, tv = np.asarray(cam.viewmatrix[:3, :3], np.float64), np.asarray(cam.viewmatrix[:3, 3], np.float64)
        lateral = 1.25 if scanner.mode == "cone" else 0.97  # centre near the detector edge: partly off-image
        t_list = [(lateral, 0.1, scanner.DSO), (-0.2, -lateral, scanner.DSO + 0.3), (lateral, lateral, scanner.DSO)]
        s_list = [(0.08, 0.05, 0.1), (0.06, 0.1, 0.07), (0.1, 0.1, 0.1)]
        if scanner.mode == "cone":  # near the near plane (t_z just above 0.2) and behind it
            t_list += [(0.005, -0.01, 0.25), (0.0, 0.02, 0.45), (0.01, 0.0, 0.19)]
            s_list += [(0.002, 0.003, 0.002), (0.004, 0.003, 0.005), (0.01, 0.01, 0.01)]
        t_arr = np.array(t_list)
        xyz = np.concatenate([xyz, (t_arr - tv) @ Rv])  # camera -> world: m = R_vᵀ (t − t_v)
        scale = np.concatenate([scale, np.array(s_list)])
        rot = np.concatenate([rot, random_quats(rng, len(t_list))])
        rho = np.concatenate([rho, rng.uniform(0.3, 1.0, len(t_list))])
    return pad_scene(xyz, scale, rot, rho)


def pad_scene(xyz, scale, rot, rho, n=N_SLOTS):
    k = n - len(xyz)
    assert k >= 0
    xyz = np.concatenate([xyz, np.zeros((k, 3))])
    scale = np.concatenate([scale, np.full((k, 3), 0.43)])  # large: would cover the image if not density 0
    rot = np.concatenate([rot, np.tile([1.0, 0, 0, 0], (k, 1))])
    rho = np.concatenate([rho, np.zeros(k)])
    return tuple(np.asarray(a, np.float32) for a in (xyz, scale, rot, rho))


@jax.jit
def render(means, scales, rots, rho, camera):
    return rasterize_points(means, scales, rots, rho, camera, backend="reference")


@jax.jit
def render_gaussians(gaussians, camera):
    return rasterize(gaussians, camera, backend="reference", return_aux=True)


count_pairs_jit = jax.jit(count_pairs)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ----------------------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("mode,angle,seed", [("cone", 0.7, 0), ("cone", 3.9, 1), ("parallel", 0.3, 2)])
def test_matches_float64_transcription(mode, angle, seed):
    rng = np.random.default_rng(seed)
    scanner = make_scanner(mode)
    cam = scanner.camera(angle)
    scene = random_scene(rng, scanner, angle)
    image, aux = render(*scene, cam)
    ref, radii = render_f64(*scene, cam)
    assert image.shape == (40, 48) and image.dtype == jnp.float32
    assert rel_l2(image, ref) < 1e-4
    assert np.max(np.abs(np.asarray(image) - ref)) < 1e-4 * ref.max()
    np.testing.assert_array_equal(np.asarray(aux.radii), radii)
    n_main = 20
    # the extras really exercise the edge cases: partly off-image ones are visible, the t_z = 0.19 one is culled
    assert np.all(radii[n_main:n_main + 3] > 0)
    if mode == "cone":
        assert radii[n_main + 3] > 0 and radii[n_main + 4] > 0 and radii[n_main + 5] == 0
    assert np.all(radii[:n_main] > 0)


# ----------------------------------------------------------------------------------------- oracles 1-5
# All oracle tests use the 40×48 detector of `make_scanner`, so they share the two compiled renderers.


def test_parallel_beam_is_the_exact_xray_transform():
    """§10.1: within the touched tiles the image is ρ sqrt(2π/(Σ⁻¹)_zz) exp(−½ wᵀ Σ_xy⁻¹ w)."""
    scanner = make_scanner("parallel")
    cam = scanner.camera(0.0)
    # isotropic σ = 0.1, ρ = 1 at the centre of pixel (24, 20): 0.250663
    y0, z0 = 0.5 * 2 / 48, -0.5 * 2 / 40
    iso = pad_scene(np.array([[0.0, y0, z0]]), np.full((1, 3), 0.1), np.array([[1.0, 0, 0, 0]]), np.ones(1))
    img, _ = render(*iso, cam)
    assert abs(float(img[20, 24]) - math.sqrt(2 * math.pi) * 0.1) < 2e-6

    rng = np.random.default_rng(5)
    cam = scanner.camera(0.8)
    q = random_quats(rng, 1)
    s = np.array([[0.05, 0.09, 0.13]])
    m = np.array([[0.1, -0.2, 0.15]])
    img, aux = render(*pad_scene(m, s, q, np.array([0.7])), cam)
    Rv = np.asarray(cam.viewmatrix[:3, :3], np.float64)
    R = quat_rot_np(q[0].astype(np.float32).astype(np.float64))
    sig_cam = Rv @ R @ np.diag(s[0].astype(np.float32).astype(np.float64) ** 2) @ R.T @ Rv.T
    p = (np.asarray(cam.full_projmatrix, np.float64) @ np.append(m[0], 1))[:2]
    p = ((p + 1) * np.array([48, 40]) - 1) / 2
    np.testing.assert_allclose(np.asarray(aux.means2d[0]), p, atol=2e-5)
    ys, xs = np.mgrid[0:40, 0:48].astype(np.float64)
    w = np.stack([(xs - p[0]) * 2 / 48, (ys - p[1]) * 2 / 40], -1)
    inv_xy = np.linalg.inv(sig_cam[:2, :2])
    exact = 0.7 * math.sqrt(2 * math.pi / np.linalg.inv(sig_cam)[2, 2]) * np.exp(
        -0.5 * np.einsum("...i,ij,...j->...", w, inv_xy, w))
    img = np.asarray(img, np.float64)
    inside = img > 1e-3 * img.max()
    assert inside.sum() > 100
    np.testing.assert_allclose(img[inside], exact[inside], rtol=2e-5, atol=1e-7)


def _camera_point(cam, t):
    """World point with camera-space coordinates t [3]."""
    Rv = np.asarray(cam.viewmatrix[:3, :3], np.float64)
    tv = np.asarray(cam.viewmatrix[:3, 3], np.float64)
    return (np.asarray(t, np.float64) - tv) @ Rv


def _on_pixel(cam, px, py, depth):
    """World point at camera depth `depth` that projects exactly onto the centre of pixel (px, py) (zero offsets)."""
    fx, fy = float(cam.focal_x), float(cam.focal_y)
    cx, cy = (cam.width - 1) / 2, (cam.height - 1) / 2
    return _camera_point(cam, np.array([(px - cx) / fx, (py - cy) / fy, 1.0]) * depth)


def test_cone_value_at_projected_centre_is_the_ray_integral():
    """§10.2: I(p) = ρ sqrt(2π/(uᵀΣ⁻¹u)), u = unit source→centre; isotropic: ρ√(2π)σ anywhere in the FoV."""
    scanner = make_scanner("cone")
    cam = scanner.camera(1.1)
    rng = np.random.default_rng(3)
    pixels = [(10, 7), (30, 25), (44, 33)]  # (column, row), off-axis: the cone factor differs from parallel
    depths = [scanner.DSO - 0.4, scanner.DSO + 0.2, scanner.DSO + 0.5]
    ms = np.array([_on_pixel(cam, px, py, z) for (px, py), z in zip(pixels, depths)])
    s = np.array([[0.04, 0.07, 0.1], [0.05, 0.05, 0.05], [0.1, 0.03, 0.06]])
    q = random_quats(rng, 3)
    rho = np.array([0.9, 0.5, 1.3])
    source = np.asarray(cam.campos, np.float64)
    for i, (px, py) in enumerate(pixels):
        val = float(render(*pad_scene(ms[i:i + 1], s[i:i + 1], q[i:i + 1], rho[i:i + 1]), cam)[0][py, px])
        u = ms[i] - source
        u /= np.linalg.norm(u)
        R = quat_rot_np(q[i].astype(np.float32).astype(np.float64))
        sig = R @ np.diag(s[i].astype(np.float32).astype(np.float64) ** 2) @ R.T
        exact = rho[i] * math.sqrt(2 * math.pi / (u @ np.linalg.inv(sig) @ u))
        assert abs(val - exact) < 2e-5 * exact, (i, val, exact)
        if i == 1:  # isotropic
            assert abs(val - 0.5 * math.sqrt(2 * math.pi) * 0.05) < 2e-5 * val


def test_cone_footprint_width():
    """§10.3: isotropic σ at the isocentre: σ_px = σ f_x / DSO (R2 cone yml: σ = 0.01 → 1.792 px)."""
    # the [R2] cone yml geometry (DSD 7, DSO 5, pixel 4/512) on a smaller detector, so the renderer is reused
    scanner = Scanner(mode="cone", DSD=7.0, DSO=5.0, n_detector=(40, 48), d_detector=(4 / 512, 4 / 512),
                      n_voxel=(256, 256, 256), d_voxel=(2 / 256,) * 3)
    cam = scanner.camera(0.0)
    assert abs(float(cam.focal_x) - 896.0) < 1e-3
    sigma_px = 0.01 * 896 / 5.0
    assert abs(sigma_px - 1.792) < 1e-12
    # centre on pixel (24, 20) at depth DSO (half a pixel off the axis: still the isocentre to 1e-5)
    m = _on_pixel(cam, 24, 20, 5.0)
    img = np.asarray(render(*pad_scene(m[None], np.full((1, 3), 0.01), np.array([[1.0, 0, 0, 0]]), np.ones(1)),
                            cam)[0], np.float64)
    for k in (1, 2, 3):
        assert abs(img[20, 24 + k] / img[20, 24] - math.exp(-k * k / (2 * sigma_px**2))) < 1e-5
        assert abs(img[20 - k, 24] / img[20, 24] - math.exp(-k * k / (2 * sigma_px**2))) < 1e-5
        assert abs(img[20 + k, 24 + k] / img[20, 24] - math.exp(-k * k / sigma_px**2)) < 1e-5


def test_parallel_mass():
    """§10.4: Σ_pixels I = ρ(2π)^{3/2} s₁s₂s₃ (W/2)(H/2) when the footprint lies inside the image."""
    scanner = make_scanner("parallel")
    rng = np.random.default_rng(11)
    s = np.array([[0.04, 0.05, 0.06]])  # σ_px ≈ 1-1.4, radius 5 px
    rho = np.array([10.0])  # ρμ ≈ 1.3: the 1e-5 cut lies beyond 4.8σ
    for angle in (0.0, 2.2):
        cam = scanner.camera(angle)
        # centre on pixel (24, 24), the middle of tile (1, 1): the touched tiles reach ≥ 5σ on every side
        m = _camera_point(cam, [0.5 / 24, 4.5 / 20, scanner.DSO])
        img, aux = render(*pad_scene(m[None], s, random_quats(rng, 1), rho), cam)
        np.testing.assert_allclose(np.asarray(aux.means2d[0]), [24.0, 24.0], atol=1e-4)
        mass = float(np.sum(np.asarray(img, np.float64)))
        exact = 10.0 * (2 * math.pi) ** 1.5 * np.prod(s.astype(np.float32).astype(np.float64)) * 24 * 20
        assert abs(mass - exact) < 1e-4 * exact


def test_parallel_pixel_mapping():
    """§10.5: θ = 0, parallel: world (0, y₀, z₀) lands at p = (y₀W/2 + (W−1)/2, −z₀H/2 + (H−1)/2)."""
    scanner = make_scanner("parallel")
    cam = scanner.camera(0.0)
    pts = np.array([[0.0, 0.3, -0.2], [0.0, -0.55, 0.4], [0.0, 0.0, 0.0]])
    _, aux = render(*pad_scene(pts, np.full((3, 3), 0.06), np.tile([1.0, 0, 0, 0], (3, 1)), np.ones(3)), cam)
    expected = np.stack([pts[:, 1] * 24 + 23.5, -pts[:, 2] * 20 + 19.5], -1)
    np.testing.assert_allclose(np.asarray(aux.means2d[:3], np.float64), expected, atol=2e-5)
    # and the rendered blob of the first point is centred there (intensity centroid of a symmetric footprint)
    img = np.asarray(render(*pad_scene(pts[:1], np.full((1, 3), 0.06), np.array([[1.0, 0, 0, 0]]), np.ones(1)),
                            cam)[0], np.float64)
    ys, xs = np.mgrid[0:40, 0:48]
    cx, cy = (img * xs).sum() / img.sum(), (img * ys).sum() / img.sum()
    assert abs(cx - expected[0, 0]) < 0.02 and abs(cy - expected[0, 1]) < 0.02


# ----------------------------------------------------------------------------------------- §10.8 linearity
def test_linearity_and_invariances():
    scanner = make_scanner("cone")
    cam = scanner.camera(2.0)
    rng = np.random.default_rng(7)
    xyz, s, q, rho = random_scene(rng, scanner, 2.0, n_main=20, extras=False)
    base = np.asarray(render(xyz, s, q, rho, cam)[0], np.float64)
    # linear in ρ, up to the 1e-5 per-pixel threshold (each overlapping Gaussian may add one sub-threshold α)
    twice = np.asarray(render(xyz, s, q, 2 * rho, cam)[0], np.float64)
    assert np.max(np.abs(twice - 2 * base)) < 2e-5 * N_SLOTS
    assert rel_l2(twice, 2 * base) < 1e-4
    # superposition: two halves sum to the whole
    half_a = rho * (np.arange(N_SLOTS) % 2 == 0)
    half_b = rho - half_a
    parts = np.asarray(render(xyz, s, q, half_a, cam)[0], np.float64) + np.asarray(render(xyz, s, q, half_b, cam)[0])
    assert np.max(np.abs(parts - base)) < 1e-5 * base.max()
    # permutation
    perm = rng.permutation(N_SLOTS)
    permuted = np.asarray(render(xyz[perm], s[perm], q[perm], rho[perm], cam)[0], np.float64)
    assert np.max(np.abs(permuted - base)) < 1e-5 * base.max()
    # isotropic Gaussians do not depend on the (unit) quaternion
    iso = np.repeat(s[:, :1], 3, axis=1)
    a = np.asarray(render(xyz, iso, q, rho, cam)[0], np.float64)
    b = np.asarray(render(xyz, iso, random_quats(rng, N_SLOTS).astype(np.float32), rho, cam)[0], np.float64)
    assert np.max(np.abs(a - b)) < 1e-5 * a.max()
    # raw quaternion scaled by c > 0 is a no-op after the Gaussians' normalisation
    g = Gaussians.from_activated(xyz[:20], s[:20], q[:20], rho[:20], capacity=N_SLOTS)
    img1 = np.asarray(render_gaussians(g, cam)[0])
    img2 = np.asarray(render_gaussians(g.replace(rotation=g.rotation * 3.7), cam)[0])
    assert np.max(np.abs(img1 - img2)) < 1e-5 * img1.max()
    assert rel_l2(img1, base) < 1e-5  # the Gaussians pytree path equals rasterize_points on the activated values


# ----------------------------------------------------------------------------------------- §10.9 culling
def test_culling():
    scanner = make_scanner("cone")
    angle = 0.4
    cam = scanner.camera(angle)
    rng = np.random.default_rng(9)
    xyz, s, q, rho = random_scene(rng, scanner, angle, n_main=20, extras=False)
    base = np.asarray(render(xyz, s, q, rho, cam)[0])
    culled = [
        _camera_point(cam, [0.0, 0.0, 0.199]),  # just before the near plane: t_z ≤ 0.2
        _camera_point(cam, [0.0, 0.0, 0.1]),
        _camera_point(cam, [0.0, 0.0, -3.0]),  # behind the source
        _camera_point(cam, [3.0, 0.2, scanner.DSO]),  # 3σ rectangle misses the image (to the right)
        _camera_point(cam, [0.1, -4.0, scanner.DSO]),  # above the image
    ]
    k = len(culled)
    xyz2, s2, q2, rho2 = (a.copy() for a in (xyz, s, q, rho))
    xyz2[20:20 + k] = np.array(culled)
    s2[20:20 + k] = 0.02
    rho2[20:20 + k] = 1.0
    image, aux = render(xyz2, s2, q2, rho2, cam)
    radii = np.asarray(aux.radii)
    assert np.all(radii[20:20 + k] == 0)
    assert np.all(radii[:20] > 0)
    np.testing.assert_array_equal(np.asarray(image), base)  # culled Gaussians add exactly nothing
    _, ref_radii = render_f64(xyz2, s2, q2, rho2, cam)
    np.testing.assert_array_equal(radii, ref_radii)


# ----------------------------------------------------------------------------------------- jit / vmap / slots / pairs
def test_vmap_over_cameras_matches_per_view():
    scanner = make_scanner("cone")
    angles = jnp.array([0.1, 1.7, 4.0], jnp.float32)
    cams = jax.vmap(scanner.camera)(angles)
    rng = np.random.default_rng(13)
    scene = random_scene(rng, scanner, 0.0, extras=False)
    imgs, aux = jax.jit(jax.vmap(lambda c: rasterize_points(*scene, c, backend="reference")))(cams)
    assert imgs.shape == (3, 40, 48) and aux.radii.shape == (3, N_SLOTS)
    for v in range(3):
        single, single_aux = render(*scene, scanner.camera(angles[v]))
        np.testing.assert_allclose(np.asarray(imgs[v]), np.asarray(single), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(aux.radii[v]), np.asarray(single_aux.radii))
        ref, _ = render_f64(*scene, scanner.camera(angles[v]))
        assert rel_l2(imgs[v], ref) < 1e-4
    assert not bool(jnp.any(aux.overflow))


def test_inactive_slots_contribute_nothing():
    scanner = make_scanner("cone")
    cam = scanner.camera(0.9)
    rng = np.random.default_rng(17)
    xyz, s, q, rho = random_scene(rng, scanner, 0.9, n_main=12, extras=False)
    g = Gaussians.from_activated(xyz[:12], s[:12], q[:12], rho[:12], capacity=N_SLOTS)
    # garbage in the inactive slots must not matter
    g = g.replace(xyz=g.xyz.at[12:].set(0.1), scaling=g.scaling.at[12:].set(-1.0), density=g.density.at[12:].set(5.0))
    image, aux = render_gaussians(g, cam)
    ref, _ = render_f64(xyz[:12], s[:12], q[:12], rho[:12], cam)
    assert rel_l2(image, ref) < 1e-4
    assert np.all(np.asarray(aux.radii[12:]) == 0) and np.all(np.asarray(aux.radii[:12]) > 0)
    # the pair count does not include the inactive slots (they would cover the whole image)
    exact_pairs = int(count_pairs_jit(*pad_scene(xyz[:12], s[:12], q[:12], rho[:12]), cam))
    assert int(aux.num_pairs) == exact_pairs


def test_pair_capacity_and_overflow():
    scanner = make_scanner("cone")
    cam = scanner.camera(1.3)
    rng = np.random.default_rng(19)
    scene = random_scene(rng, scanner, 1.3)
    exact, aux = render(*scene, cam)
    n = int(aux.num_pairs)
    assert n == int(count_pairs_jit(*scene, cam)) and n > 20
    assert pair_capacity(n) >= n and pair_capacity(n) & (pair_capacity(n) - 1) == 0
    capped = jax.jit(lambda *a: rasterize_points(*a, backend="reference", max_pairs=16))
    small, aux_small = capped(*scene, cam)
    assert bool(aux_small.overflow) and int(aux_small.num_pairs) == n
    assert float(jnp.sum(small)) < float(jnp.sum(exact))  # contributions were dropped, and it says so
    enough = jax.jit(lambda *a: rasterize_points(*a, backend="reference", max_pairs=pair_capacity(n)))
    full, aux_full = enough(*scene, cam)
    assert not bool(aux_full.overflow)
    np.testing.assert_allclose(np.asarray(full), np.asarray(exact), rtol=1e-6, atol=1e-7)


def test_backend_dispatch():
    if jax.default_backend() != "gpu":
        assert resolve_backend("auto") == "reference"
    assert resolve_backend("reference") == "reference"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda")
    cam = make_scanner("cone").camera(0.0)
    with pytest.raises(ValueError, match="rotations"):
        rasterize_points(np.zeros((3, 3)), np.ones((3, 3)), np.ones((3, 3)), np.ones(3), cam)


# ------------------------------------------------------------------------------- α-cut tile rectangles
@pytest.mark.parametrize("mode,seed", [("cone", 21), ("parallel", 22)])
def test_alpha_cut_rectangles_render_the_same_image_and_gradients_with_fewer_pairs(mode, seed, monkeypatch):
    """contributing_pairs (X2GS_PAIR_RECT=alpha, the default) drops only tiles where every pixel fails α ≥ 1e-5:
    faint, large Gaussians (ρ log-uniform over 4 decades) render the 3σ rectangles' image and gradients (the
    reference backend adds the same non-zero terms in the same order) with fewer pairs."""
    rng = np.random.default_rng(seed)
    scanner = make_scanner(mode, H=80, W=96)
    cam = scanner.camera(0.6)
    n = 24
    xyz = rng.uniform(-0.6, 0.6, (n, 3))
    scale = np.exp(rng.uniform(np.log(0.05), np.log(0.3), (n, 3)))
    rho = 10.0 ** rng.uniform(-5.0, -1.0, n)
    scene = pad_scene(xyz, scale, random_quats(rng, n), rho)
    cot = jnp.asarray(rng.normal(size=(80, 96)), jnp.float32)

    def run(rect_mode):
        monkeypatch.setenv("X2GS_PAIR_RECT", rect_mode)  # read at trace time: a fresh jit per mode

        def loss(*a):
            image, aux = rasterize_points(*a, cam, backend="reference")
            return jnp.sum(image * cot), (image, aux.num_pairs)

        (_, (image, pairs)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*scene)
        counted = jax.jit(lambda *a: count_pairs(*a))(*scene, cam)  # a new function: jax.jit(count_pairs) is cached
        return np.asarray(image), int(pairs), [np.asarray(g) for g in grads], int(counted)

    img_a, pairs_a, grads_a, counted_a = run("alpha")
    img_u, pairs_u, grads_u, counted_u = run("upstream")
    assert float(np.abs(img_u).max()) > 0
    np.testing.assert_array_equal(img_a, img_u)
    for ga, gu in zip(grads_a, grads_u):
        np.testing.assert_allclose(ga, gu, rtol=1e-5, atol=1e-6 * float(np.abs(gu).max()))
    assert pairs_a < pairs_u and counted_a == pairs_a and counted_u == pairs_u
    monkeypatch.setenv("X2GS_PAIR_RECT", "tight")
    with pytest.raises(ValueError, match="X2GS_PAIR_RECT='tight': expected alpha or upstream"):
        jax.jit(lambda *a: count_pairs(*a))(*scene, cam)
