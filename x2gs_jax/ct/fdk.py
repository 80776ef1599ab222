"""FDK (Feldkamp-Davis-Kress) cone-beam reconstruction, parallel-beam FBP and phase-binned 4D-FDK.

Input projections are in pickle units (line integrals with path length in metres, row 0 = top);
they are multiplied by `scanner.scene_scale` so that geometry and data are both in world units and
the reconstruction comes out in density units (the units of the case's GT volume), as the reference
does when it runs TIGRE on the rescaled scene (gaussians.md §2.1).

Algorithm (TIGRE `algs.fdk` with the ram-lak filter, data_format.md §8.6):
  1. cosine pre-weighting (cone only): p · DSD / sqrt(DSD² + u² + v²), (u, v) the pixel's detector
     coordinates (detector offsets included, since they are the true ray angles);
  2. ramp filter along u (detector rows): linear convolution with TIGRE's spatial ram-lak kernel
     h[0] = 1/4, h[odd n] = -1/(π n)², h[even n≠0] = 0, zero-padded to
     L = max(64, 2^ceil(log2(2·max(H, W)))) and applied through the FFT (the kernel's DFT magnitude,
     as TIGRE);
  3. scaling per view: (DSD/DSO) · Δβ_i / (2·du). With Δβ_i = 2π/N this equals TIGRE's
     (DSD/DSO)·(2π/N)/(4·du) times its factor 2 on the filter; the 1/2 accounts for every ray being
     measured twice over a full rotation (no Parker weights). DSD/DSO and du convert the filter to
     the isocentre sampling du·DSO/DSD. Parallel beam: DSD/DSO -> 1, du = 2/W (the detector spans
     [-1, 1] world units, rasterizer.md §2.4);
  4. voxel-driven back-projection: every voxel centre is projected onto each view's detector
     (the pinhole of data_format.md §5), the filtered view is sampled bilinearly (zero outside the
     detector) and accumulated with the FDK distance weight (DSO / depth)², depth = the voxel's
     distance from the source along the central ray (weight 1 for parallel beam).

Angular weights Δβ_i: "uniform" = 2π/N for every view (TIGRE; right for equally spaced views over a
full rotation); "gaps" = half the angular distance between each view's circular neighbours
(angles mod 2π, sum 2π), which is identical for equally spaced views and stays correct when the views
are irregular or clumped — the case of phase bins of a continuous 4D scan. Both assume the views
cover the full rotation.

Chunking: the views are processed in blocks of `view_block` (one jitted call per block, a tqdm
progress bar over blocks), and inside a call the voxels in chunks of `voxel_chunk` (`lax.map`), each
chunk scanning over the block's views; memory ~ voxel_chunk + view_block·H·W floats + the volume.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from x2gs_jax.geometry import Scanner

ANGULAR_WEIGHTS = ("uniform", "gaps")


# ----------------------------------------------------------------------------- filter
def ramp_filter_length(n_detector: tuple[int, int]) -> int:
    """TIGRE's zero-padded filter length L = max(64, 2^ceil(log2(2·max(H, W))))."""
    return max(64, 2 ** int(math.ceil(math.log2(2 * max(n_detector)))))


def ramp_filter_response(length: int) -> np.ndarray:
    """Real frequency response [length//2 + 1] of TIGRE's spatial ram-lak kernel of `length` taps.

    Unit sample spacing: the response approximates |f| (cycles per sample), e.g. 1/2 at Nyquist.
    """
    m = np.arange(length)
    m = np.where(m < length // 2, m, m - length)  # signed tap offsets, circular layout
    h = np.zeros(length, dtype=np.float64)
    h[m == 0] = 0.25
    odd = (m % 2) != 0
    h[odd] = -1.0 / (np.pi * m[odd]) ** 2
    return np.abs(np.fft.rfft(h))


def angular_weights(angles, method: str = "uniform") -> np.ndarray:
    """Per-view angular integration weights Δβ [n] (radians, summing to 2π). See module docstring."""
    a = np.asarray(angles, dtype=np.float64).reshape(-1)
    n = a.size
    if n == 0:
        raise ValueError("angular_weights: no views")
    if method == "uniform":
        return np.full(n, 2.0 * np.pi / n)
    if method != "gaps":
        raise ValueError(f"angular weighting must be one of {ANGULAR_WEIGHTS}, got {method!r}")
    if n == 1:
        return np.array([2.0 * np.pi])
    a = np.mod(a, 2.0 * np.pi)
    order = np.argsort(a, kind="stable")
    s = a[order]
    nxt = np.roll(s, -1)
    nxt[-1] += 2.0 * np.pi
    prv = np.roll(s, 1)
    prv[0] -= 2.0 * np.pi
    w = np.empty(n)
    w[order] = 0.5 * (nxt - prv)
    return w


def _detector_pitch(scanner: Scanner) -> tuple[float, float]:
    """(dv, du) detector pixel pitch in world units (parallel: 2/H, 2/W)."""
    if scanner.mode == "cone":
        return float(scanner.d_detector[0]), float(scanner.d_detector[1])
    return 2.0 / scanner.height, 2.0 / scanner.width


def filter_projections(proj_world: jax.Array, scanner: Scanner, dbeta: jax.Array) -> jax.Array:
    """Steps 1-3: weighted, ramp-filtered and scaled projections [n, H, W] (float32).

    Args:
      proj_world: [n, H, W] line integrals in world units (pickle units × scene_scale).
      dbeta: [n] angular weight of each view (radians).
    """
    H, W = scanner.n_detector
    dv, du = _detector_pitch(scanner)
    p = proj_world.astype(jnp.float32)
    if scanner.mode == "cone":
        u, v = scanner.detector_uv()
        cosw = scanner.DSD / np.sqrt(scanner.DSD**2 + u[None, :] ** 2 + v[:, None] ** 2)
        p = p * jnp.asarray(cosw, jnp.float32)
        mag = scanner.DSD / scanner.DSO
    else:
        mag = 1.0
    L = ramp_filter_length(scanner.n_detector)
    resp = jnp.asarray(ramp_filter_response(L), jnp.float32)
    # rfft(n=L) zero-pads each row to L >= 2W: the circular convolution equals the linear one.
    q = jnp.fft.irfft(jnp.fft.rfft(p, n=L, axis=-1) * resp, n=L, axis=-1)[..., :W]
    scale = jnp.asarray(dbeta, jnp.float32) * jnp.float32(mag / (2.0 * du))
    return q * scale[:, None, None]


# ----------------------------------------------------------------------------- back-projection
def _voxel_coords(scanner: Scanner, start, size: int):
    """World coordinates (x, y, z) [size] of flat voxel indices start..start+size-1 (C order)."""
    nx, ny, nz = scanner.n_voxel
    lo, _ = scanner.bbox
    idx = start + jnp.arange(size, dtype=jnp.int32)
    idx = jnp.minimum(idx, nx * ny * nz - 1)  # padded tail repeats the last voxel, cropped later
    i = idx // (ny * nz)
    j = (idx // nz) % ny
    k = idx % nz
    dx, dy, dz = scanner.d_voxel
    f32 = jnp.float32
    return (
        f32(lo[0]) + (i.astype(f32) + 0.5) * f32(dx),
        f32(lo[1]) + (j.astype(f32) + 0.5) * f32(dy),
        f32(lo[2]) + (k.astype(f32) + 0.5) * f32(dz),
    )


def _bilinear_padded(img_pad: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
    """Bilinear sample of an image with a 1-pixel zero border ([H+2, W+2]) at pixel coords of the
    unpadded image (centres at integers). Outside the detector the value fades to 0 within one pixel."""
    Hp, Wp = img_pad.shape
    r = jnp.clip(row + 1.0, 0.0, Hp - 1.0)
    c = jnp.clip(col + 1.0, 0.0, Wp - 1.0)
    r0 = jnp.minimum(jnp.floor(r).astype(jnp.int32), Hp - 2)
    c0 = jnp.minimum(jnp.floor(c).astype(jnp.int32), Wp - 2)
    fr = r - r0.astype(r.dtype)
    fc = c - c0.astype(c.dtype)
    flat = img_pad.reshape(-1)

    def g(rr, cc):
        return flat.at[rr * Wp + cc].get(mode="promise_in_bounds")

    return ((1 - fr) * ((1 - fc) * g(r0, c0) + fc * g(r0, c0 + 1))
            + fr * ((1 - fc) * g(r0 + 1, c0) + fc * g(r0 + 1, c0 + 1)))


def _backproject_chunk(filtered_pad, cos_a, sin_a, scanner: Scanner, start, size: int):
    """Distance-weighted back-projection of a block of views into `size` voxels. Returns [size]."""
    x, y, z = _voxel_coords(scanner, start, size)
    H, W = scanner.n_detector
    dv, du = _detector_pitch(scanner)
    off_u, off_v = scanner.off_detector
    cone = scanner.mode == "cone"

    def body(acc, view):
        q, c, s = view
        # Camera coordinates of the voxel (rows of the world->camera rotation: r, d, f; r ⊥ source).
        tx = -s * x + c * y
        ty = -z
        if cone:
            depth = scanner.DSO - (c * x + s * y)
            ok = depth > 1e-6 * scanner.DSO
            safe = jnp.where(ok, depth, 1.0)
            mag = scanner.DSD / safe
            u, v = tx * mag, ty * mag
            w = jnp.where(ok, (scanner.DSO / safe) ** 2, 0.0)
        else:
            u, v, w = tx, ty, 1.0
        col = (u - off_u) / du + (W / 2.0 - 0.5)
        row = (v - off_v) / dv + (H / 2.0 - 0.5)
        return acc + w * _bilinear_padded(q, row, col), None

    acc, _ = jax.lax.scan(body, jnp.zeros((size,), jnp.float32), (filtered_pad, cos_a, sin_a))
    return acc


@functools.partial(jax.jit, static_argnames=("scanner", "voxel_chunk"), donate_argnums=(0,))
def _fdk_block(acc, proj_block, angles_block, dbeta_block, scanner: Scanner, voxel_chunk: int):
    """acc [n_chunks·voxel_chunk] += FDK contribution of one block of views (pickle units)."""
    filtered = filter_projections(proj_block * jnp.float32(scanner.scene_scale), scanner, dbeta_block)
    filtered = jnp.pad(filtered, ((0, 0), (1, 1), (1, 1)))
    ang = angles_block.astype(jnp.float32)
    cos_a, sin_a = jnp.cos(ang), jnp.sin(ang)
    n_chunks = acc.shape[0] // voxel_chunk
    starts = jnp.arange(n_chunks, dtype=jnp.int32) * voxel_chunk
    contrib = jax.lax.map(lambda st: _backproject_chunk(filtered, cos_a, sin_a, scanner, st, voxel_chunk), starts)
    return acc + contrib.reshape(-1)


def _check_inputs(projections, scanner: Scanner, angles) -> tuple[np.ndarray, np.ndarray]:
    proj = np.asarray(projections, dtype=np.float32)
    ang = np.asarray(angles, dtype=np.float64).reshape(-1)
    H, W = scanner.n_detector
    if proj.ndim != 3 or proj.shape[1:] != (H, W):
        raise ValueError(f"fdk: projections must be [n, {H}, {W}] (scanner.n_detector), got {proj.shape}")
    if proj.shape[0] != ang.size:
        raise ValueError(f"fdk: {proj.shape[0]} projections but {ang.size} angles")
    if proj.shape[0] == 0:
        raise ValueError("fdk: no projections")
    return proj, ang


def _fdk_weighted(proj: np.ndarray, ang: np.ndarray, dbeta: np.ndarray, scanner: Scanner, block: int,
                  voxel_chunk: int, progress: bool, desc: str) -> jax.Array:
    """Sum of FDK contributions of views with explicit angular weights (host loop over blocks of
    exactly `block` views, the last one padded)."""
    n = proj.shape[0]
    nvox = int(np.prod(scanner.n_voxel))
    chunk = int(min(voxel_chunk, nvox))
    n_chunks = -(-nvox // chunk)
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    # Padding views get weight 0 so that every block has the same (compiled-once) shape.
    proj = np.concatenate([proj, np.zeros((pad,) + proj.shape[1:], np.float32)])
    ang = np.concatenate([ang, np.zeros(pad)]).astype(np.float32)
    dbeta = np.concatenate([dbeta, np.zeros(pad)]).astype(np.float32)
    acc = jnp.zeros((n_chunks * chunk,), jnp.float32)
    for b in tqdm(range(n_blocks), desc=desc, disable=not progress, leave=False):
        sl = slice(b * block, (b + 1) * block)
        acc = _fdk_block(acc, jnp.asarray(proj[sl]), jnp.asarray(ang[sl]), jnp.asarray(dbeta[sl]), scanner, chunk)
    return acc[:nvox].reshape(scanner.n_voxel)


def fdk(
    projections,
    scanner: Scanner,
    angles,
    *,
    angular_weighting: str = "uniform",
    view_block: int = 32,
    voxel_chunk: int = 2**18,
    progress: bool = False,
) -> jax.Array:
    """FDK (cone) or FBP (parallel) reconstruction, full-rotation weighting.

    Args:
      projections: [n, H, W] line integrals in pickle units (path length in metres), row 0 = top.
      scanner: geometry (world units), cone or parallel; detector offsets honoured.
      angles: [n] gantry angles (radians), assumed to cover a full rotation.
      angular_weighting: "uniform" (2π/n, TIGRE) or "gaps" (see module docstring).
      view_block, voxel_chunk: static memory/throughput knobs (views per jitted call, voxels per chunk).
      progress: show a tqdm bar over view blocks.
    Returns:
      [nx, ny, nz] float32 volume in density units (voxel centres as data_format.md §5).
    """
    proj, ang = _check_inputs(projections, scanner, angles)
    dbeta = angular_weights(ang, angular_weighting)
    block = int(max(1, min(view_block, proj.shape[0])))
    return _fdk_weighted(proj, ang, dbeta, scanner, block, voxel_chunk, progress, "FDK")


def fdk_4d(
    projections,
    scanner: Scanner,
    angles,
    phases,
    n_phases: int = 10,
    *,
    angular_weighting: str = "gaps",
    view_block: int = 32,
    voxel_chunk: int = 2**18,
    progress: bool = False,
) -> jax.Array:
    """Phase-binned 4D-FDK: an FDK of each phase bin's own projections.

    Bin p uses only the views with phases == p; its angular weights are computed from those views
    alone (default "gaps": each view's share of the full rotation from its neighbours *within the
    bin*, summing to 2π per bin; "uniform": 2π / n_p). A bin's views therefore reconstruct the
    object at that phase with the right scale even though a bin holds a fraction of the views,
    irregularly clumped along the rotation.

    Args:
      projections: [n, H, W] pickle units; angles: [n] radians; phases: [n] int in [0, n_phases).
    Returns:
      [n_phases, nx, ny, nz] float32 in density units.
    Raises:
      ValueError if a phase is out of range or a bin has no views.
    """
    proj, ang = _check_inputs(projections, scanner, angles)
    ph = np.asarray(phases).reshape(-1)
    if ph.size != ang.size:
        raise ValueError(f"fdk_4d: {ph.size} phases but {ang.size} angles")
    if not np.all(np.equal(np.mod(ph, 1), 0)) or ph.min() < 0 or ph.max() >= n_phases:
        raise ValueError(f"fdk_4d: phases must be integers in [0, {n_phases}), got range [{ph.min()}, {ph.max()}]")
    ph = ph.astype(np.int64)
    counts = np.bincount(ph, minlength=n_phases)
    if np.any(counts == 0):
        raise ValueError(f"fdk_4d: phase bins {np.flatnonzero(counts == 0).tolist()} have no projections")
    # Pad every bin to the same view count (weight-0 views) so the block function compiles once.
    block = int(max(1, min(view_block, counts.max())))
    out = []
    for p in tqdm(range(n_phases), desc="4D-FDK", disable=not progress):
        idx = np.flatnonzero(ph == p)
        out.append(_fdk_weighted(proj[idx], ang[idx], angular_weights(ang[idx], angular_weighting), scanner, block,
                                 voxel_chunk, False, f"phase {p}"))
    return jnp.stack(out)


def fdk_cost(scanner: Scanner, n_views: int) -> int:
    """Voxel-view updates of one FDK (for throughput reports)."""
    return int(np.prod(scanner.n_voxel)) * int(n_views)


__all__ = ["fdk", "fdk_4d", "angular_weights", "filter_projections", "ramp_filter_length", "ramp_filter_response",
           "fdk_cost", "ANGULAR_WEIGHTS"]
