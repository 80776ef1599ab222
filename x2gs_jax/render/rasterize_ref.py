"""Reference (pure-JAX) X-ray Gaussian rasterizer: tile-pair forward and analytic backward (rasterizer.md §5, §6.1).

Scheme. X-ray rendering is an order-independent sum, so there is no depth sort. After the per-Gaussian
preprocessing (`projection.preprocess`) every Gaussian that can contribute owns the (Gaussian, tile) pairs of
its tile rectangle; pair k is found from the running sum of the per-Gaussian pair counts (`searchsorted`), so
the pair list is never materialised. Pairs are processed in fixed-size chunks inside a `fori_loop` whose trip
count is the (traced) number of pairs: each chunk evaluates its 16×16 pixels per pair and scatter-adds whole
tile rows into a [tiles, 256] image. Memory is O(C + chunk·256 + H·W) whatever the number of pairs, and the
result is exact (no capacity, no overflow) unless the caller caps the work with `max_pairs`.

The backward (`jax.custom_vjp`) re-walks the same pairs, reduces each pair's 256 pixels to six moments of the
weighted footprint and segment-sums them per Gaussian into ∂L/∂(ρ, μ, A, B, C, p) (§6.1). The per-Gaussian
chain (§6.2) is autodiff through `preprocess`, whose guards reproduce the reference.

A Gaussian contributes only if it is visible (radius > 0) and ρμ ≥ 1e-5; otherwise every pixel would fail the
α ≥ 1e-5 test anyway (α = ρμ·exp(E), exp(E) ≤ 1), so skipping its pairs changes nothing and keeps zero-density
(inactive) slots free.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax.render.projection import TILE, Projected, preprocess, tile_grid, tile_rect

ALPHA_MIN = 1e-5  # per-pixel skip threshold (rasterizer.md §5)
PIXELS_PER_TILE = TILE * TILE
DEFAULT_CHUNK = 1024  # pairs per loop step: 1024·256 floats = 1 MiB per temporary


class RenderAux(NamedTuple):
    """Side outputs of a render.

    Attributes:
      radii: [C] int32 screen radius in pixels, 0 = culled (the reference "visibility filter" is radii > 0).
      overflow: [] bool, True when `max_pairs` was smaller than the number of pairs and contributions were dropped.
      num_pairs: [] int32 number of (Gaussian, tile) pairs the exact render needs.
      means2d: [C, 2] float32 projected centres in pixels (x = column, y = row), not differentiable here
        (use `ndc_offset` for the screen-space gradient).
    """

    radii: jax.Array
    overflow: jax.Array
    num_pairs: jax.Array
    means2d: jax.Array


class _Static(NamedTuple):
    width: int
    height: int
    chunk: int


# ------------------------------------------------------------------------------------------- pairs
def pair_counts(proj: Projected, densities: jax.Array) -> jax.Array:
    """Tiles [C] int32 each Gaussian must visit: its rectangle's area if it can contribute, else 0."""
    area = (proj.rect_max[:, 0] - proj.rect_min[:, 0]) * (proj.rect_max[:, 1] - proj.rect_min[:, 1])
    weight = jax.lax.stop_gradient(densities * proj.mu)
    contributes = (proj.radii > 0) & (weight >= ALPHA_MIN)
    return jnp.where(contributes, area, 0).astype(jnp.int32)


def alpha_rect_mode() -> str:
    """X2GS_PAIR_RECT, read at trace time: "alpha" (default: `contributing_pairs` cuts each tile rectangle to where
    the Gaussian can pass the α test) or "upstream" (the reference's 3σ rectangle; an A/B, the same images)."""
    mode = os.environ.get("X2GS_PAIR_RECT", "alpha")
    if mode not in ("alpha", "upstream"):
        raise ValueError(f"X2GS_PAIR_RECT={mode!r}: expected alpha or upstream")
    return mode


def contributing_pairs(proj: Projected, densities: jax.Array, width: int, height: int) -> tuple[Projected, jax.Array]:
    """(proj with tile rectangles cut to the α-reachable disc, pair counts [C] int32) — the pairs every backend walks.

    A pixel at distance d from the centre has E ≤ −d² / (2 λ_max), so α = w·exp(E) ≥ ALPHA_MIN (w = ρμ) needs
    d ≤ σ·sqrt(2 ln(w / ALPHA_MIN)) with σ = sqrt(λ_max) ≤ radius / 3 (radius = ceil(3σ)). Each rectangle is taken
    from min(radius, ceil(that bound) + 1): the extra pixel covers the rectangle's truncation at its far edge, so
    every tile dropped holds only pixels whose α fails the test — the rendered image and its gradients are the
    3σ rectangles' (bit-identical images on the reference backend, tests/test_rasterize.py). Why: the rasterizer's
    cost is per pair, and many trained Gaussians are faint (a short `:tiny` X2 run: 42 % with w < 9e-4, where the
    bound is below 3σ)."""
    if alpha_rect_mode() == "alpha":
        w = jax.lax.stop_gradient(densities * proj.mu)
        ext = jnp.sqrt(2.0 * jnp.log(jnp.maximum(w, ALPHA_MIN) / ALPHA_MIN))
        r3 = proj.radii.astype(jnp.float32)
        radius = jnp.minimum(r3, jnp.ceil(r3 / 3.0 * ext) + 1.0).astype(jnp.int32)  # min in float: no int overflow
        rect_min, rect_max = tile_rect(jax.lax.stop_gradient(proj.means2d), radius, width, height)
        proj = proj._replace(rect_min=rect_min, rect_max=rect_max)
    return proj, pair_counts(proj, densities)


def _chunk_pairs(start, chunk: int, cum_end, counts, rect_min, rect_max, n_pairs):
    """Gaussian id, tile (x, y) and validity [chunk] of pairs start .. start+chunk−1 (pairs ordered by Gaussian)."""
    k = start + jnp.arange(chunk, dtype=jnp.int32)
    ok = k < n_pairs
    gid = jnp.searchsorted(cum_end, k, side="right").astype(jnp.int32)
    gid = jnp.minimum(gid, cum_end.shape[0] - 1)
    local = k - (cum_end[gid] - counts[gid])
    lo = rect_min[gid]
    span_x = jnp.maximum(rect_max[gid, 0] - lo[:, 0], 1)
    tile_x = lo[:, 0] + local % span_x
    tile_y = lo[:, 1] + local // span_x
    return gid, tile_x, tile_y, ok


def _pixel_offsets(dtype):
    lin = jnp.arange(PIXELS_PER_TILE, dtype=jnp.int32)
    return (lin % TILE).astype(dtype), (lin // TILE).astype(dtype)


def _footprint(gid, tile_x, tile_y, ok, means2d, conic, weight):
    """δ (x, y), exp(E) and the contribution mask [chunk, 256] of every pair's 16×16 pixels (§5)."""
    off_x, off_y = _pixel_offsets(means2d.dtype)
    pix_x = (tile_x * TILE).astype(means2d.dtype)[:, None] + off_x
    pix_y = (tile_y * TILE).astype(means2d.dtype)[:, None] + off_y
    dx = means2d[gid, 0][:, None] - pix_x
    dy = means2d[gid, 1][:, None] - pix_y
    A, B, C = conic[gid, 0][:, None], conic[gid, 1][:, None], conic[gid, 2][:, None]
    power = -0.5 * (A * dx * dx + C * dy * dy) - B * dx * dy
    gauss = jnp.exp(jnp.minimum(power, 0.0))
    alpha = weight[gid][:, None] * gauss
    keep = ok[:, None] & (power <= 0.0) & (alpha >= ALPHA_MIN)
    return dx, dy, gauss, alpha, keep


_TILE_MID = (TILE - 1) / 2.0


def _moment_basis() -> jax.Array:
    """[256, 6] (1, o_x, o_y, o_x², o_x o_y, o_y²) of each tile pixel's offset o from the tile centre."""
    off_x, off_y = _pixel_offsets(jnp.float32)
    off_x, off_y = off_x - _TILE_MID, off_y - _TILE_MID
    return jnp.stack([jnp.ones_like(off_x), off_x, off_y, off_x * off_x, off_x * off_y, off_y * off_y], axis=-1)


def _tiles_to_image(tiles: jax.Array, width: int, height: int) -> jax.Array:
    gx, gy = tile_grid(width, height)
    img = tiles.reshape(gy, gx, TILE, TILE).transpose(0, 2, 1, 3).reshape(gy * TILE, gx * TILE)
    return img[:height, :width]


def _image_to_tiles(image: jax.Array, width: int, height: int) -> jax.Array:
    gx, gy = tile_grid(width, height)
    padded = jnp.pad(image, ((0, gy * TILE - height), (0, gx * TILE - width)))
    return padded.reshape(gy, TILE, gx, TILE).transpose(0, 2, 1, 3).reshape(gy * gx, PIXELS_PER_TILE)


# ------------------------------------------------------------------------------------------- core
def _num_chunks(n_pairs, chunk: int):
    return (n_pairs + (chunk - 1)) // chunk


def _raster_forward(st: _Static, means2d, conic, mu, rho, rect_min, rect_max, counts, cum_end, n_pairs):
    gx, gy = tile_grid(st.width, st.height)
    n_tiles = gx * gy
    weight = rho * mu

    def body(i, acc):
        gid, tile_x, tile_y, ok = _chunk_pairs(i * st.chunk, st.chunk, cum_end, counts, rect_min, rect_max, n_pairs)
        _, _, _, alpha, keep = _footprint(gid, tile_x, tile_y, ok, means2d, conic, weight)
        tile_id = jnp.where(ok, tile_y * gx + tile_x, n_tiles)
        return acc.at[tile_id].add(jnp.where(keep, alpha, 0.0), mode="drop")

    # Accumulate in the inputs' precision (float32 in use; float64 when tests evaluate an oracle in x64 mode).
    tiles = jax.lax.fori_loop(0, _num_chunks(n_pairs, st.chunk), body,
                              jnp.zeros((n_tiles, PIXELS_PER_TILE), weight.dtype))
    return _tiles_to_image(tiles, st.width, st.height)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _raster(st: _Static, means2d, conic, mu, rho, rect_min, rect_max, counts, cum_end, n_pairs):
    """Image [H, W] = Σ over pairs of the tile-masked, thresholded footprints ρ μ exp(E) (rasterizer.md §5)."""
    return _raster_forward(st, means2d, conic, mu, rho, rect_min, rect_max, counts, cum_end, n_pairs)


def _raster_fwd(st, means2d, conic, mu, rho, rect_min, rect_max, counts, cum_end, n_pairs):
    image = _raster_forward(st, means2d, conic, mu, rho, rect_min, rect_max, counts, cum_end, n_pairs)
    return image, (means2d, conic, mu, rho, rect_min, rect_max, counts, cum_end, n_pairs)


def _raster_bwd(st, res, g_image):
    means2d, conic, mu, rho, rect_min, rect_max, counts, cum_end, n_pairs = res
    gx, _ = tile_grid(st.width, st.height)
    n_gauss = means2d.shape[0]
    weight = rho * mu
    g_tiles = _image_to_tiles(g_image.astype(weight.dtype), st.width, st.height)
    basis = _moment_basis()

    def body(i, acc):
        gid, tile_x, tile_y, ok = _chunk_pairs(i * st.chunk, st.chunk, cum_end, counts, rect_min, rect_max, n_pairs)
        _, _, gauss, _, keep = _footprint(gid, tile_x, tile_y, ok, means2d, conic, weight)
        tile_id = jnp.where(ok, tile_y * gx + tile_x, 0)
        gg = jnp.where(keep, gauss * g_tiles[tile_id], 0.0)  # G·g on contributing pixels [chunk, 256]
        # Raw moments about the tile centre in one matmul (2× faster on CPU than six reductions), then shifted
        # to moments of δ = p − pixel: δ = c − o with c = p − tile centre, o = pixel − tile centre.
        # HIGHEST keeps TF32 off on GPUs; the shift loses ~1e-6 relative, below the reference's own atomics noise.
        raw = jnp.dot(gg, basis, precision=jax.lax.Precision.HIGHEST)
        cx = means2d[gid, 0] - (tile_x * TILE + _TILE_MID).astype(means2d.dtype)
        cy = means2d[gid, 1] - (tile_y * TILE + _TILE_MID).astype(means2d.dtype)
        m0, mx, my, mxx, mxy, myy = (raw[:, k] for k in range(6))
        moments = jnp.stack([m0, cx * m0 - mx, cy * m0 - my, cx * cx * m0 - 2.0 * cx * mx + mxx,
                             cx * cy * m0 - cx * my - cy * mx + mxy, cy * cy * m0 - 2.0 * cy * my + myy], axis=-1)
        return acc.at[gid].add(moments, indices_are_sorted=True)

    mom = jax.lax.fori_loop(0, _num_chunks(n_pairs, st.chunk), body, jnp.zeros((n_gauss, 6), weight.dtype))
    s0, sx, sy, sxx, sxy, syy = (mom[:, i] for i in range(6))
    A, B, C = conic[:, 0], conic[:, 1], conic[:, 2]
    g_rho = mu * s0
    g_mu = rho * s0
    g_conic = jnp.stack([-0.5 * weight * sxx, -weight * sxy, -0.5 * weight * syy], axis=-1)
    g_means2d = jnp.stack([weight * (-A * sx - B * sy), weight * (-B * sx - C * sy)], axis=-1)
    return g_means2d, g_conic, g_mu, g_rho, None, None, None, None, None


_raster.defvjp(_raster_fwd, _raster_bwd)


# ------------------------------------------------------------------------------------------- public
def count_pairs(means, scales, rotations, densities, camera, *, ndc_offset=None) -> jax.Array:
    """Number [] int32 of (Gaussian, tile) pairs an exact render of this view needs (vmappable, jit-safe)."""
    proj = preprocess(means, scales, rotations, camera, ndc_offset=ndc_offset)
    _, counts = contributing_pairs(proj, jnp.asarray(densities, jnp.float32), camera.width, camera.height)
    return jnp.sum(counts)


def pair_capacity(num_pairs) -> int:
    """Host-side capacity for `max_pairs`: the next power of two ≥ num_pairs (max over views), at least 1024."""
    n = int(np.max(np.asarray(num_pairs)))
    return max(1024, 1 << max(0, (n - 1).bit_length()))


def check_inputs(means, scales, rotations, densities, ndc_offset=None) -> None:
    """Raise ValueError unless the per-Gaussian arrays have shapes [C,3], [C,3], [C,4], [C] (and [C,2])."""
    n = jnp.shape(means)[0] if jnp.ndim(means) == 2 else -1
    expected = {"means": (means, (n, 3)), "scales": (scales, (n, 3)), "rotations": (rotations, (n, 4)),
                "densities": (densities, (n,))}
    if ndc_offset is not None:
        expected["ndc_offset"] = (ndc_offset, (n, 2))
    for name, (arr, shape) in expected.items():
        if n < 0 or tuple(jnp.shape(arr)) != shape:
            raise ValueError(f"rasterize_points: '{name}' must have shape {shape if n >= 0 else '[C, 3]'} "
                             f"(C Gaussians), got {tuple(jnp.shape(arr))}")


def rasterize_points_ref(means, scales, rotations, densities, camera, *, ndc_offset=None,
                         max_pairs: Optional[int] = None, chunk: int = DEFAULT_CHUNK):
    """Reference render of one view; see `x2gs_jax.render.rasterize.rasterize_points` for the contract.

    `max_pairs=None` renders every pair (exact, under jit too; the loop length is the traced pair count).
    An int caps the work at that many pairs and sets `aux.overflow` when more were needed.
    Returns (image [H, W] float32, RenderAux).
    """
    check_inputs(means, scales, rotations, densities, ndc_offset)
    means = jnp.asarray(means, jnp.float32)
    densities = jnp.asarray(densities, jnp.float32)
    n = means.shape[0]
    if ndc_offset is None:
        ndc_offset = jnp.zeros((n, 2), jnp.float32)
    proj = preprocess(means, scales, rotations, camera, ndc_offset=ndc_offset)
    if n == 0:
        zero = jnp.zeros((), jnp.int32)
        return (jnp.zeros((camera.height, camera.width), jnp.float32),
                RenderAux(proj.radii, jnp.zeros((), bool), zero, proj.means2d))
    proj, counts = contributing_pairs(proj, densities, camera.width, camera.height)
    cum_end = jnp.cumsum(counts)
    total = cum_end[-1]
    n_pairs = total if max_pairs is None else jnp.minimum(total, jnp.int32(max_pairs))
    chunk = int(chunk) if max_pairs is None else max(1, min(int(chunk), int(max_pairs)))
    st = _Static(int(camera.width), int(camera.height), chunk)
    image = _raster(st, proj.means2d, proj.conic, proj.mu, densities, proj.rect_min, proj.rect_max, counts,
                    cum_end, n_pairs)
    return image, RenderAux(radii=proj.radii, overflow=total > n_pairs, num_pairs=total,
                            means2d=jax.lax.stop_gradient(proj.means2d))


def rasterize_dense(means, scales, rotations, densities, camera, *, ndc_offset=None,
                    reference_grads: bool = False) -> jax.Array:
    """Dense closed form of §5 (O(C·H·W) memory; small scenes and tests only), differentiable by autodiff.

    I(x, y) = Σᵢ [radiusᵢ > 0]·[tile(x, y) ∈ rectᵢ]·[Eᵢ ≤ 0]·[αᵢ ≥ 1e-5]·ρᵢ μᵢ exp(Eᵢ(x, y)).
    With `reference_grads=False` (default) every derivative is plain autodiff: the oracle for the custom VJP.
    """
    means = jnp.asarray(means, jnp.float32)
    densities = jnp.asarray(densities, jnp.float32)
    proj = preprocess(means, scales, rotations, camera, ndc_offset=ndc_offset, reference_grads=reference_grads)
    W, H = camera.width, camera.height
    xs = jnp.arange(W, dtype=jnp.float32)
    ys = jnp.arange(H, dtype=jnp.float32)
    dx = proj.means2d[:, 0, None, None] - xs[None, None, :]
    dy = proj.means2d[:, 1, None, None] - ys[None, :, None]
    A, B, C = (proj.conic[:, i, None, None] for i in range(3))
    power = -0.5 * (A * dx * dx + C * dy * dy) - B * dx * dy
    alpha = (densities * proj.mu)[:, None, None] * jnp.exp(jnp.minimum(power, 0.0))
    tx = jnp.arange(W) // TILE
    ty = jnp.arange(H) // TILE
    in_x = (tx[None, :] >= proj.rect_min[:, 0, None]) & (tx[None, :] < proj.rect_max[:, 0, None])
    in_y = (ty[None, :] >= proj.rect_min[:, 1, None]) & (ty[None, :] < proj.rect_max[:, 1, None])
    keep = ((proj.radii > 0)[:, None, None] & in_x[:, None, :] & in_y[:, :, None]
            & (power <= 0.0) & (alpha >= ALPHA_MIN))
    return jnp.sum(jnp.where(keep, alpha, 0.0), axis=0)
