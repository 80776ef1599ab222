"""Per-Gaussian preprocessing of the X-ray Gaussian rasterizer (rasterizer.md §2.5, §4, §6.2).

Everything here is vectorised over the Gaussians and differentiable with ordinary JAX autodiff. Where the
reference backward departs from the exact derivative (the 1/(Δ2²+1e-7) and π/(μ+1e-7) guards, the μ == 0
zeroing, the clamped-Jacobian convention) the departure lives in two small pieces selected by
`reference_grads=True`: `conic_and_mu` (a `jax.custom_vjp`) and `_clamped_ray_coordinate` (a straight-through
estimator). With `reference_grads=False` the same forward values are differentiated plainly (the autodiff
oracle of the tests). Everything else in §6.2 (Σ' = TΣTᵀ, Σ = R S² Rᵀ, the NDC divide through P·V, the cone
J(t) path) is exact in the reference, so autodiff reproduces it.

Units: world units for means and scales, pixels for the screen centre, radius and the conic (px⁻²), scene
length for the integration factor μ. Arithmetic is float32 like the reference kernel.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from x2gs_jax.gaussians import covariance
from x2gs_jax.mathutil import apply_rows, mm

# Reference constants (rasterizer.md §8).
TILE = 16  # raster tile edge, pixels
NEAR_PLANE = 0.2  # camera-space depth at or below which a Gaussian is culled
CLAMP_FACTOR = 1.3  # cone-beam Jacobian clamp, in units of tan(FoV/2)
PROJ_EPS = 1e-7  # added to the homogeneous w before the NDC divide
DET_GUARD = 1e-7  # backward: 1/Δ2² is evaluated as 1/(Δ2² + DET_GUARD)
MU_GUARD = 1e-7  # backward: π/μ is evaluated as π/(μ + MU_GUARD)
EIG_GUARD = 0.1  # radius: sqrt(max(EIG_GUARD, mid² − Δ2))


class Projected(NamedTuple):
    """Per-Gaussian screen-space quantities for one view (C = number of Gaussians).

    Attributes:
      means2d: [C, 2] float32 projected centre p in pixels (x = column, y = row; pixel centres are integers).
      conic: [C, 3] float32 (A, B, C), the inverse of the 2×2 pixel-space covariance, px⁻².
      mu: [C] float32 integration factor μ (scene length), 0 where 2πΔ3/Δ2 ≤ 0.
      radii: [C] int32 screen radius in pixels, 0 = culled (near plane, Δ2 == 0 or empty tile rectangle).
      rect_min, rect_max: [C, 2] int32 tile rectangle [min, max) as (tile x, tile y); meaningful where radii > 0.
      depth: [C] float32 camera-space depth t_z (world units).
      cov2d: [C, 3] float32 (a, b, d), the pixel-space 2×2 covariance (px²), for diagnostics.
    """

    means2d: jax.Array
    conic: jax.Array
    mu: jax.Array
    radii: jax.Array
    rect_min: jax.Array
    rect_max: jax.Array
    depth: jax.Array
    cov2d: jax.Array


def tile_grid(width: int, height: int) -> tuple[int, int]:
    """Number of 16×16 tiles (G_x, G_y) = (⌈W/16⌉, ⌈H/16⌉) covering a W×H image."""
    return (int(width) + TILE - 1) // TILE, (int(height) + TILE - 1) // TILE


# ------------------------------------------------------------------------------------------- centre
def project_centres(means: jax.Array, full_projmatrix: jax.Array, width: int, height: int,
                    ndc_offset: Optional[jax.Array] = None, hw_ok: Optional[jax.Array] = None) -> jax.Array:
    """Pixel coordinates [C, 2] of world points [C, 3] (rasterizer.md §2.5).

    h = (P V)[m; 1], ndc = h_xy / (h_w + 1e-7) (+ ndc_offset [C, 2]), p = ((ndc + 1)(W, H) − 1) / 2.
    `hw_ok` [C] bool marks points whose w may be divided by; others use w = 1 so that culled Gaussians
    (w ≈ −1e-7) cannot make NaN/inf gradients.
    """
    h = apply_rows(means, full_projmatrix[:, :3]) + full_projmatrix[:, 3]
    hw = h[:, 3]
    if hw_ok is not None:
        hw = jnp.where(hw_ok, hw, 1.0)
    ndc = h[:, :2] / (hw + PROJ_EPS)[:, None]
    if ndc_offset is not None:
        ndc = ndc + ndc_offset
    size = jnp.array([width, height], dtype=ndc.dtype)
    return ((ndc + 1.0) * size - 1.0) * 0.5


# ------------------------------------------------------------------------------------------- Jacobian
def _clamped_ray_coordinate(t_lat: jax.Array, tz: jax.Array, lim: jax.Array, reference_grads: bool) -> jax.Array:
    """x̂ = clamp(t_x / t_z, ±lim) · t_z (rasterizer.md §4.3).

    With `reference_grads`, the derivative follows the reference backward: ∂x̂/∂t_x = 1 when the ratio was
    not clamped, 0 when it was, and ∂x̂/∂t_z = 0 always (the J entries are differentiated as functions of
    (t_x, t_y, t_z) evaluated at the clamped point).
    """
    ratio = t_lat / tz
    value = jnp.clip(ratio, -lim, lim) * tz
    if not reference_grads:
        return value
    inside = (ratio >= -lim) & (ratio <= lim)
    return jax.lax.stop_gradient(value) + jnp.where(inside, t_lat - jax.lax.stop_gradient(t_lat), 0.0)


def ray_jacobian(t: jax.Array, focal_x, focal_y, tanfovx, tanfovy, mode: str,
                 reference_grads: bool = True) -> jax.Array:
    """EWA Jacobian J [C, 3, 3] at camera-space points t [C, 3] (t_z > 0; rasterizer.md §4.3).

    Rows 1-2 map to pixels, row 3 to scene length along the ray: cone
    [[f_x/t_z, 0, −f_x x̂/t_z²], [0, f_y/t_z, −f_y ŷ/t_z²], [x̂/ℓ, ŷ/ℓ, t_z/ℓ]], parallel diag(f_x, f_y, 1).
    """
    n = t.shape[0]
    if mode == "parallel":
        diag = jnp.stack([jnp.broadcast_to(focal_x, (n,)), jnp.broadcast_to(focal_y, (n,)),
                          jnp.ones((n,), t.dtype)], axis=-1)
        return diag[:, :, None] * jnp.eye(3, dtype=t.dtype)
    if mode != "cone":
        raise ValueError(f"camera mode must be 'cone' or 'parallel', got {mode!r}")
    tz = t[:, 2]
    x = _clamped_ray_coordinate(t[:, 0], tz, CLAMP_FACTOR * tanfovx, reference_grads)
    y = _clamped_ray_coordinate(t[:, 1], tz, CLAMP_FACTOR * tanfovy, reference_grads)
    ell = jnp.sqrt(x * x + y * y + tz * tz)
    inv_z = 1.0 / tz
    inv_z2 = inv_z * inv_z
    zero = jnp.zeros_like(tz)
    rows = [
        [focal_x * inv_z, zero, -focal_x * x * inv_z2],
        [zero, focal_y * inv_z, -focal_y * y * inv_z2],
        [x / ell, y / ell, tz / ell],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def ray_space_covariance(cov3d: jax.Array, jac: jax.Array, view_rot: jax.Array) -> jax.Array:
    """Σ' = T Σ Tᵀ with T = J R_v, returned as its six entries (a, b, c, d, e, f) [C, 6] (rasterizer.md §4.4)."""
    T = mm(jac, view_rot)
    s = mm(mm(T, cov3d), jnp.swapaxes(T, -1, -2))
    return jnp.stack([s[:, 0, 0], s[:, 0, 1], s[:, 0, 2], s[:, 1, 1], s[:, 1, 2], s[:, 2, 2]], axis=-1)


# ------------------------------------------------------------------------------------------- conic, μ
def _determinants(cov6: jax.Array):
    a, b, c, d, e, f = (cov6[:, i] for i in range(6))
    det2 = a * d - b * b
    # The explicit expansion of the reference (not the Schur form), so μ matches bit-for-bit in spirit.
    det3 = a * d * f + 2.0 * b * c * e - a * e * e - f * b * b - d * c * c
    return det2, det3


def _conic_mu_forward(cov6: jax.Array):
    a, b, d = cov6[:, 0], cov6[:, 1], cov6[:, 3]
    det2, det3 = _determinants(cov6)
    safe_det2 = jnp.where(det2 == 0.0, 1.0, det2)  # Δ2 == 0 is culled; keep the arithmetic finite
    det_inv = jnp.where(det2 == 0.0, 0.0, 1.0 / safe_det2)
    conic = jnp.stack([d * det_inv, -b * det_inv, a * det_inv], axis=-1)
    q = 2.0 * math.pi * det3 / safe_det2
    positive = (q > 0.0) & (det2 != 0.0)
    mu = jnp.where(positive, jnp.sqrt(jnp.where(positive, q, 1.0)), 0.0)
    return conic, mu, det2, det3


@jax.custom_vjp
def conic_and_mu(cov6: jax.Array):
    """Conic (A, B, C) [C, 3] and integration factor μ [C] from Σ' entries (a..f) [C, 6] (rasterizer.md §4.5-6).

    The VJP is the reference's (§6.2): exact derivatives of the 2×2 inverse with 1/Δ2² → 1/(Δ2² + 1e-7),
    ∂μ = π/(μ + 1e-7) · ∂(Δ3/Δ2), both summed into ∂(a..f), and everything zeroed where μ == 0 or the
    guarded inverse is 0. b, c, e are single symmetric parameters.
    """
    conic, mu, _, _ = _conic_mu_forward(cov6)
    return conic, mu


def _conic_mu_fwd(cov6):
    conic, mu, det2, det3 = _conic_mu_forward(cov6)
    return (conic, mu), (cov6, mu, det2, det3)


def _conic_mu_bwd(res, cts):
    cov6, mu, det2, det3 = res
    g_conic, g_mu = cts
    a, b, c, d, e, f = (cov6[:, i] for i in range(6))
    gA, gB, gC = g_conic[:, 0], g_conic[:, 1], g_conic[:, 2]

    # Conic (A, B, C) = (d, −b, a)/Δ2 → (a, b, d), with the guarded 1/Δ2².
    inv2 = 1.0 / (det2 * det2 + DET_GUARD)
    ga = inv2 * (-d * d * gA + b * d * gB + (det2 - a * d) * gC)
    gd = inv2 * ((det2 - a * d) * gA + a * b * gB - a * a * gC)
    gb = inv2 * (2.0 * b * d * gA - (det2 + 2.0 * b * b) * gB + 2.0 * a * b * gC)
    gc = jnp.zeros_like(a)
    ge = jnp.zeros_like(a)
    gf = jnp.zeros_like(a)

    # μ = sqrt(2π R), R = Δ3/Δ2: ∂μ/∂x = π/(μ + 1e-7) · (∂Δ3/∂x − R ∂Δ2/∂x)/Δ2.
    safe_det2 = jnp.where(det2 == 0.0, 1.0, det2)
    ratio = det3 / safe_det2
    k = g_mu * math.pi / (mu + MU_GUARD) / safe_det2
    ga = ga + k * ((d * f - e * e) - ratio * d)
    gb = gb + k * ((2.0 * c * e - 2.0 * f * b) + ratio * 2.0 * b)
    gc = gc + k * (2.0 * b * e - 2.0 * d * c)
    gd = gd + k * ((a * f - c * c) - ratio * a)
    ge = ge + k * (2.0 * b * c - 2.0 * a * e)
    gf = gf + k * (a * d - b * b)

    keep = (mu != 0.0) & (inv2 != 0.0) & (det2 != 0.0)
    grad = jnp.stack([ga, gb, gc, gd, ge, gf], axis=-1)
    return (jnp.where(keep[:, None], grad, 0.0),)


conic_and_mu.defvjp(_conic_mu_fwd, _conic_mu_bwd)


def conic_and_mu_plain(cov6: jax.Array):
    """The same values as `conic_and_mu`, differentiated by plain autodiff (safe at Δ2 == 0 and μ == 0)."""
    conic, mu, _, _ = _conic_mu_forward(cov6)
    return conic, mu


# ------------------------------------------------------------------------------------------- radius, tiles
def screen_radius(cov6: jax.Array, det2: jax.Array) -> jax.Array:
    """r = ceil(3 sqrt(λ_max)) pixels [C] int32, λ± = mid ± sqrt(max(0.1, mid² − Δ2)) (rasterizer.md §4.7)."""
    mid = 0.5 * (cov6[:, 0] + cov6[:, 3])
    lam = mid + jnp.sqrt(jnp.maximum(EIG_GUARD, mid * mid - det2))
    # A valid Σ' is PSD so λ > 0; the max only keeps degenerate (culled) inputs finite.
    r = jnp.ceil(3.0 * jnp.sqrt(jnp.maximum(lam, 0.0)))
    return jnp.clip(r, 0.0, 2.0**30).astype(jnp.int32)


def tile_rect(means2d: jax.Array, radii: jax.Array, width: int, height: int):
    """Tile rectangle [min, max) per Gaussian (rasterizer.md §4.9); returns (rect_min, rect_max) [C, 2] int32.

    rect_min = clamp(trunc((p − r)/16), 0, G), rect_max = clamp(trunc((p + r + 15)/16), 0, G). Clamping is done
    in float before the integer cast so huge or off-screen centres cannot overflow int32.
    """
    grid = jnp.array(tile_grid(width, height), dtype=means2d.dtype)
    r = radii.astype(means2d.dtype)[:, None]
    lo = jnp.clip(jnp.trunc((means2d - r) / TILE), 0.0, grid)
    hi = jnp.clip(jnp.trunc((means2d + r + (TILE - 1)) / TILE), 0.0, grid)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


# ------------------------------------------------------------------------------------------- all of §4
def preprocess(means: jax.Array, scales: jax.Array, rotations: jax.Array, camera, *,
               ndc_offset: Optional[jax.Array] = None, reference_grads: bool = True) -> Projected:
    """Per-Gaussian forward of the reference rasterizer (rasterizer.md §4) for one camera.

    Args:
      means: [C, 3] world centres. scales: [C, 3] activated std-devs (world units).
      rotations: [C, 4] quaternions (w, x, y, z) used as given (no normalisation, like the kernel).
      camera: `x2gs_jax.geometry.Camera` (unbatched; vmap for several views).
      ndc_offset: optional [C, 2] added to the NDC centre; its gradient is the screen-space mean gradient (§6.3).
      reference_grads: True = the reference backward's guards and clamp convention; False = plain autodiff.
    Returns:
      `Projected`; culled Gaussians have radii 0 and finite (meaningless) other fields.
    """
    means = jnp.asarray(means, jnp.float32)
    scales = jnp.asarray(scales, jnp.float32)
    rotations = jnp.asarray(rotations, jnp.float32)
    width, height, mode = camera.width, camera.height, camera.mode
    view = camera.viewmatrix
    view_rot = view[:3, :3]

    t = apply_rows(means, view_rot) + view[:3, 3]
    in_front = t[:, 2] > NEAR_PLANE
    # Culled points get a harmless depth so J (1/t_z) stays finite and their (zero) cotangents stay zero.
    t_safe = jnp.where(in_front[:, None], t, jnp.array([0.0, 0.0, 1.0], t.dtype))

    cov3d = covariance(scales, rotations)
    jac = ray_jacobian(t_safe, camera.focal_x, camera.focal_y, camera.tanfovx, camera.tanfovy, mode,
                       reference_grads)
    cov6 = ray_space_covariance(cov3d, jac, view_rot)
    conic, mu = (conic_and_mu if reference_grads else conic_and_mu_plain)(cov6)

    cov6_ng = jax.lax.stop_gradient(cov6)
    det2 = cov6_ng[:, 0] * cov6_ng[:, 3] - cov6_ng[:, 1] * cov6_ng[:, 1]
    radius = screen_radius(cov6_ng, det2)

    hw_ok = in_front if mode == "cone" else None
    means2d = project_centres(means, camera.full_projmatrix, width, height, ndc_offset, hw_ok)
    rect_min, rect_max = tile_rect(jax.lax.stop_gradient(means2d), radius, width, height)
    area = (rect_max[:, 0] - rect_min[:, 0]) * (rect_max[:, 1] - rect_min[:, 1])
    visible = in_front & (det2 != 0.0) & (area > 0)
    radii = jnp.where(visible, radius, 0)
    return Projected(
        means2d=means2d,
        conic=conic,
        mu=mu,
        radii=radii,
        rect_min=rect_min,
        rect_max=rect_max,
        depth=t[:, 2],
        cov2d=cov6[:, jnp.array([0, 1, 3])],
    )
