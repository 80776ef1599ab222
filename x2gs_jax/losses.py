"""Training losses of R2-/X2-Gaussian as small pure functions (gaussians.md §5, x2gaussian.md §8).

Everything here is jit-able, differentiable and computed in float32. Window sizes and other
shape-determining arguments are plain Python values (static under `jax.jit`).

Terms and default weights (x2gaussian.md §8):
  L = L1 + 0.25 DSSIM                                   (render_loss, every iteration)
    + [fine, it > 7000] (L1' + 0.25 DSSIM')             (render_loss on the periodic-prior render)
    + 0.05 TV3D                                         (tv_3d on a random 32^3 voxelised patch)
    + [fine] (1e-4 sum S(spatial) + 1e-3 sum S(time) + 1e-4 sum mean|1 - time|)   (hexplane_regularisers)
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# SSIM stabilisers with the data range assumed to be 1 (no normalisation of raw line integrals).
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2

# HexPlane plane order per level (x2gaussian.md §4): 0:(x,y) 1:(x,z) 2:(x,t) 3:(y,z) 4:(y,t) 5:(z,t).
SPATIAL_PLANES = (0, 1, 3)
TIME_PLANES = (2, 4, 5)


# ----------------------------------------------------------------------------------------- images
def abs_zero_subgradient(x: jax.Array) -> jax.Array:
    """|x| whose derivative at x == 0 is 0 (PyTorch's convention); `jnp.abs` uses +1 there.

    It matters: differences in empty space are exactly 0 (TV) and time planes start exactly at 1
    (mean |1 - P|), and Adam would turn a +-1 subgradient there into a full-size step.
    """
    return x * jax.lax.stop_gradient(jnp.sign(x))


def l1(pred: jax.Array, gt: jax.Array) -> jax.Array:
    """Mean absolute error over all elements; any matching shapes. Returns a float32 scalar."""
    pred, gt = _same_shape_f32(pred, gt, "l1")
    return jnp.mean(abs_zero_subgradient(pred - gt))


def gaussian_window_1d(window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian taps [window] (float32, sum 1) centred on tap window // 2.

    The reference's 2-D window is the outer product of this vector with itself, so a 2-D
    convolution with it equals a row pass followed by a column pass.
    """
    if int(window) != window or window < 1 or window % 2 == 0:
        raise ValueError(f"SSIM window must be a positive odd integer (zero padding window//2 keeps the size), got {window}")
    if not sigma > 0:
        raise ValueError(f"SSIM sigma must be > 0, got {sigma}")
    k = np.arange(window, dtype=np.float64) - window // 2
    g = np.exp(-(k**2) / (2.0 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _blur_axis(x: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
    """Correlate `x` with `taps` along `axis`, zero padding len(taps)//2 on both sides ('same' size).

    Written as a sum of shifted slices rather than `lax.conv`: elementwise float32 arithmetic is exact
    on every backend, whereas GPU convolutions default to reduced (TF32) precision.
    """
    k = len(taps)
    pad = k // 2
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    xp = jnp.pad(x, widths)
    out = jnp.zeros_like(x)
    for t in range(k):  # k is static (11): unrolled into k fused multiply-adds
        out = out + taps[t] * jax.lax.slice_in_dim(xp, t, t + n, axis=axis)
    return out


def ssim_map(img1: jax.Array, img2: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Per-pixel SSIM map [..., H, W] of two images [..., H, W] (reference `loss_utils.ssim` kernel).

    Local statistics use the normalised separable Gaussian window (window x window, std `sigma`
    pixels) with zero padding window//2, so border pixels see a window partly filled with zeros,
    exactly as the reference. sigma^2 = E[x^2] - mu^2, sigma_12 = E[xy] - mu_1 mu_2, C1 = 0.01^2,
    C2 = 0.03^2 (data range 1, no normalisation).
    """
    img1, img2 = _same_shape_f32(img1, img2, "ssim")
    if img1.ndim < 2:
        raise ValueError(f"ssim: expected images [..., H, W], got shape {img1.shape}")
    taps = gaussian_window_1d(window, sigma)
    # Blur the five moment images in one batched pass.
    moments = jnp.stack([img1, img2, img1 * img1, img2 * img2, img1 * img2])
    blurred = _blur_axis(_blur_axis(moments, taps, axis=-2), taps, axis=-1)
    mu1, mu2, e11, e22, e12 = blurred
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    var1, var2, cov = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
    num = (2.0 * mu12 + SSIM_C1) * (2.0 * cov + SSIM_C2)
    den = (mu1_sq + mu2_sq + SSIM_C1) * (var1 + var2 + SSIM_C2)
    return num / den


def ssim_per_image(img1: jax.Array, img2: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """SSIM of each image: [..., H, W] x2 -> [...] (mean of the map over H, W including borders)."""
    return jnp.mean(ssim_map(img1, img2, window, sigma), axis=(-2, -1))


def ssim(img1: jax.Array, img2: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Mean SSIM over the full map of [H, W] or [B, H, W] images (all B maps averaged). Scalar."""
    if jnp.ndim(img1) not in (2, 3):
        raise ValueError(f"ssim: expected [H, W] or [B, H, W] images, got shape {jnp.shape(img1)}")
    return jnp.mean(ssim_map(img1, img2, window, sigma))


def dssim(img1: jax.Array, img2: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Structural dissimilarity 1 - ssim(img1, img2). Scalar."""
    return 1.0 - ssim(img1, img2, window, sigma)


def render_loss(pred: jax.Array, gt: jax.Array, lambda_dssim: float = 0.25) -> tuple[jax.Array, dict]:
    """Projection loss L1 + lambda_dssim (1 - SSIM) of a rendering vs. its measured projection.

    Args:
      pred, gt: [H, W] or [B, H, W] projections (raw scene-scaled line integrals, not normalised).
      lambda_dssim: D-SSIM weight (reference 0.25).
    Returns:
      (total scalar, {"l1": scalar, "dssim": scalar}).
    """
    l1_term = l1(pred, gt)
    dssim_term = dssim(pred, gt)
    return l1_term + lambda_dssim * dssim_term, {"l1": l1_term, "dssim": dssim_term}


# ----------------------------------------------------------------------------------------- volumes
def tv_3d(volume: jax.Array) -> jax.Array:
    """Anisotropic L1 total variation of a volume [nx, ny, nz] (reference `tv_3d_loss`, "mean").

    (sum |D_x v| + sum |D_y v| + sum |D_z v|) / M with forward differences and
    M = (nx-1) ny nz + nx (ny-1) nz + nx ny (nz-1), the number of difference terms. |.| has zero
    derivative at 0 (`abs_zero_subgradient`, as in the reference), so flat regions get zero gradient.
    """
    v = jnp.asarray(volume, jnp.float32)
    if v.ndim != 3:
        raise ValueError(f"tv_3d: expected a volume [nx, ny, nz], got shape {v.shape}")
    nx, ny, nz = v.shape
    m = (nx - 1) * ny * nz + nx * (ny - 1) * nz + nx * ny * (nz - 1)
    if m <= 0:
        raise ValueError(f"tv_3d: volume of shape {v.shape} has no forward differences")
    total = (
        jnp.sum(abs_zero_subgradient(jnp.diff(v, axis=0)))
        + jnp.sum(abs_zero_subgradient(jnp.diff(v, axis=1)))
        + jnp.sum(abs_zero_subgradient(jnp.diff(v, axis=2)))
    )
    return total / m


def tv_patch_size(d_voxel: Sequence[float], n_tv: int = 32) -> np.ndarray:
    """Side lengths [3] (world units) of the TV patch: n_tv voxels at the full-resolution spacing."""
    d = np.asarray(d_voxel, dtype=np.float32).reshape(-1)
    if d.shape != (3,):
        raise ValueError(f"tv_patch_size: expected d_voxel with 3 values, got shape {np.shape(d_voxel)}")
    return np.float32(n_tv) * d


def tv_patch_center(key: jax.Array, bbox_min: jax.Array, bbox_max: jax.Array, patch_size: jax.Array) -> jax.Array:
    """Random centre [3] (world units) of the TV patch so the cube lies inside the bbox.

    c = bbox_min + size/2 + U * (bbox_max - bbox_min - size), U ~ U[0,1)^3 drawn from `key`
    (deterministic per key). If the patch is larger than the box along an axis the reference formula
    is kept (the patch then overhangs the box); nothing is clipped.

    Args:
      key: a jax PRNG key.
      bbox_min, bbox_max: [3] reconstruction box corners (world units).
      patch_size: [3] or scalar patch side (world units), e.g. `tv_patch_size(scanner.d_voxel)`.
    """
    lo = jnp.asarray(bbox_min, jnp.float32)
    hi = jnp.asarray(bbox_max, jnp.float32)
    size = jnp.broadcast_to(jnp.asarray(patch_size, jnp.float32), (3,))
    if lo.shape != (3,) or hi.shape != (3,):
        raise ValueError(f"tv_patch_center: expected bbox_min/bbox_max of shape (3,), got {lo.shape}, {hi.shape}")
    u = jax.random.uniform(key, (3,), dtype=jnp.float32)
    return lo + 0.5 * size + u * (hi - lo - size)


# ----------------------------------------------------------------------------------------- HexPlane
def plane_smoothness(plane: jax.Array) -> jax.Array:
    """S(P): mean squared second difference along the ROW axis of one plane [C, rows, cols].

    mean over (c, rows-2, cols) of (P[:, r+2] - 2 P[:, r+1] + P[:, r])^2 (reference
    `compute_plane_smoothness`; also accepts a leading batch axis [1, C, rows, cols]). Rows are the
    pair's second coordinate, so for time planes this smooths along t.
    """
    p = jnp.asarray(plane, jnp.float32)
    if p.ndim < 2 or p.shape[-2] < 3:
        raise ValueError(f"plane_smoothness: expected a plane [C, rows>=3, cols], got shape {p.shape}")
    d2 = p[..., 2:, :] - 2.0 * p[..., 1:-1, :] + p[..., :-2, :]
    return jnp.mean(d2 * d2)


def l1_time_plane(plane: jax.Array) -> jax.Array:
    """mean |1 - P| of one time plane [C, rows, cols] (time planes are initialised to 1)."""
    return jnp.mean(abs_zero_subgradient(1.0 - jnp.asarray(plane, jnp.float32)))


def smoothness_sum(planes: Sequence[jax.Array]) -> jax.Array:
    """Sum of plane_smoothness over a list of planes (e.g. all spatial planes of all levels)."""
    return _sum_over(planes, plane_smoothness)


def l1_time_planes(planes: Sequence[jax.Array]) -> jax.Array:
    """Sum over a list of time planes of mean |1 - P| (reference `_l1_regulation`)."""
    return _sum_over(planes, l1_time_plane)


def split_hexplane(levels: Sequence[Sequence[jax.Array]]) -> tuple[list, list]:
    """(spatial planes, time planes) from per-level lists of the 6 planes in the reference order."""
    spatial, time = [], []
    for i, level in enumerate(levels):
        if len(level) != 6:
            raise ValueError(f"split_hexplane: level {i} has {len(level)} planes, expected 6 (xy, xz, xt, yz, yt, zt)")
        spatial += [level[j] for j in SPATIAL_PLANES]
        time += [level[j] for j in TIME_PLANES]
    return spatial, time


def hexplane_regularisers(
    spatial_planes: Sequence[jax.Array],
    time_planes: Sequence[jax.Array],
    plane_tv_weight: float = 1e-4,
    time_smoothness_weight: float = 1e-3,
    l1_time_planes_weight: float = 1e-4,
) -> tuple[jax.Array, dict]:
    """Fine-stage HexPlane regularisation (x2gaussian.md §8).

    Returns (plane_tv_weight * sum S(spatial) + time_smoothness_weight * sum S(time)
             + l1_time_planes_weight * sum mean|1 - time|,
             {"plane_tv": ..., "time_smoothness": ..., "l1_time_planes": ...} unweighted sums).
    """
    terms = {
        "plane_tv": smoothness_sum(spatial_planes),
        "time_smoothness": smoothness_sum(time_planes),
        "l1_time_planes": l1_time_planes(time_planes),
    }
    total = (
        plane_tv_weight * terms["plane_tv"]
        + time_smoothness_weight * terms["time_smoothness"]
        + l1_time_planes_weight * terms["l1_time_planes"]
    )
    return total, terms


# ----------------------------------------------------------------------------------------- helpers
def _sum_over(planes: Sequence[jax.Array], fn) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for p in planes:  # static Python list of differently-shaped planes
        total = total + fn(p)
    return total


def _same_shape_f32(a: jax.Array, b: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {a.shape} vs {b.shape}")
    return a, b
