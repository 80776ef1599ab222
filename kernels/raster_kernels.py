"""Triton kernels of the X-ray rasterizer's pixel stage (rasterizer.md §5, §6.1).

Layouts (B = batch of views, C = Gaussians per view, T = number of 16×16 tiles, P = pair capacity per view):
  params [B, C, 8] f32     (p_x, p_y, A, B, C, w = ρμ, 0, 0): pixel centre, conic (px⁻²), weight
  box    [B, C, 8] int32   tile box (row0, col0, 0, row1, col1, 1, 0, 0) of the binning; empty = no pairs
  tstart [B, T·SUB + 1]    exclusive prefix sum of the per-(tile, sub-bucket) counts (kernels/binning.py)
  gids   [B, P] int32      Gaussian ids grouped by tile: tile t owns slots tstart[t·SUB] .. tstart[(t+1)·SUB]−1
Exactness: a tile whose slots run past P (capacity too small) ignores its partial pair list and tests every
Gaussian's box instead (slow, but never drops a contribution).
All offsets are int32: B·C·8, B·P and B·H·W must stay below 2³¹.
INTERP (constexpr): Triton's interpreter (CPU tests) cannot range() over tensor bounds, so loops are written
twice: a while loop for it, a for loop for compiled code.
"""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.split_kernels import split_range  # noqa: E402


@triton.jit
def _params(params_ptr, b, g, ok, C):
    base = params_ptr + (b * C + g) * 8
    mx = tl.load(base + 0, mask=ok, other=0.0)
    my = tl.load(base + 1, mask=ok, other=0.0)
    ca = tl.load(base + 2, mask=ok, other=0.0)
    cb = tl.load(base + 3, mask=ok, other=0.0)
    cc = tl.load(base + 4, mask=ok, other=0.0)
    w = tl.load(base + 5, mask=ok, other=0.0)
    return mx, my, ca, cb, cc, w


@triton.jit
def _pairs(params_ptr, gid_ptr, b, k, end, C, P, BLOCK_G: tl.constexpr):
    """Pairs k .. k+BLOCK_G−1 of a tile's list: validity, Gaussian ids and their records [BLOCK_G]."""
    j = k + tl.arange(0, BLOCK_G)
    ok = j < end
    g = tl.load(gid_ptr + b * P + j, mask=ok, other=0)
    mx, my, ca, cb, cc, w = _params(params_ptr, b, g, ok, C)
    return ok, g, mx, my, ca, cb, cc, w


@triton.jit
def _members(params_ptr, box_ptr, b, c0, cend, ty, tx, C, BLOCK_G: tl.constexpr):
    """Fallback: Gaussians c0 .. c0+BLOCK_G−1 (below cend) whose tile box holds tile (ty, tx), with records."""
    g = c0 + tl.arange(0, BLOCK_G)
    inb = g < cend
    base = box_ptr + (b * C + g) * 8
    r0 = tl.load(base + 0, mask=inb, other=0)
    q0 = tl.load(base + 1, mask=inb, other=0)
    r1 = tl.load(base + 3, mask=inb, other=0)
    q1 = tl.load(base + 4, mask=inb, other=0)
    ok = inb & (r0 <= ty) & (ty < r1) & (q0 <= tx) & (tx < q1)
    mx, my, ca, cb, cc, w = _params(params_ptr, b, g, ok, C)
    return ok, g, mx, my, ca, cb, cc, w


@triton.jit
def _fwd_eval(acc, ok, mx, my, ca, cb, cc, w, px, py):
    """acc [256, BLOCK_G] += [E ≤ 0][α ≥ 1e-5] α, α = w exp(E), for the chunk's pairs (axis 1).

    Pixels on axis 0 so each thread needs the records of few pairs (pairs on axis 0 made every thread load
    all BLOCK_G records: ~3 loads per evaluation); the pair sum is taken once, after the loop."""
    dx = mx[None, :] - px[:, None]
    dy = my[None, :] - py[:, None]
    power = -0.5 * (ca[None, :] * dx * dx + cc[None, :] * dy * dy) - cb[None, :] * dx * dy
    alpha = w[None, :] * tl.exp(tl.minimum(power, 0.0))
    keep = ok[None, :] & (power <= 0.0) & (alpha >= 1e-5)
    return acc + tl.where(keep, alpha, 0.0)


@triton.jit
def _tile_pixels(t, GX: tl.constexpr):
    lin = tl.arange(0, 256)
    return (t % GX) * 16 + lin % 16, (t // GX) * 16 + lin // 16


@triton.jit
def raster_fwd_kernel(params_ptr, box_ptr, tstart_ptr, gid_ptr, init_ptr, C, P, SPLIT, img_ptr,
                      T: tl.constexpr, GX: tl.constexpr, W: tl.constexpr, H: tl.constexpr,
                      BLOCK_G: tl.constexpr, SUB: tl.constexpr, INTERP: tl.constexpr):
    """One program per (tile, split part, view): the partial image of part s of the tile's pairs,
    I_s(x, y) = Σ_pairs [E ≤ 0][α ≥ 1e-5] α (§5), summed in registers and written to img[b, s] (the caller
    sums the SPLIT partial images: a fixed order, so the result is deterministic).

    `init` aliases `img` and is never read: every in-image pixel of every part is written (the tests pass a NaN
    init). The next chunk's records are loaded before the current chunk is evaluated (hides gather latency)."""
    t = tl.program_id(0) // SPLIT
    s = tl.program_id(0) % SPLIT
    b = tl.program_id(1)
    pxi, pyi = _tile_pixels(t, GX)
    px = pxi.to(tl.float32)
    py = pyi.to(tl.float32)
    start = tl.load(tstart_ptr + b * (T * SUB + 1) + t * SUB)
    end = tl.load(tstart_ptr + b * (T * SUB + 1) + (t + 1) * SUB)
    acc = tl.zeros((256, BLOCK_G), dtype=tl.float32)
    if end <= P:
        lo, hi = split_range(start, end, s, SPLIT, BLOCK_G)
        ok, g, mx, my, ca, cb, cc, w = _pairs(params_ptr, gid_ptr, b, lo, hi, C, P, BLOCK_G)
        if INTERP:
            k = lo
            while k < hi:
                ok2, g2, mx2, my2, ca2, cb2, cc2, w2 = _pairs(params_ptr, gid_ptr, b, k + BLOCK_G, hi, C, P,
                                                              BLOCK_G)
                acc = _fwd_eval(acc, ok, mx, my, ca, cb, cc, w, px, py)
                ok, g, mx, my, ca, cb, cc, w = ok2, g2, mx2, my2, ca2, cb2, cc2, w2
                k += BLOCK_G
        else:
            for k in range(lo, hi, BLOCK_G):
                ok2, g2, mx2, my2, ca2, cb2, cc2, w2 = _pairs(params_ptr, gid_ptr, b, k + BLOCK_G, hi, C, P,
                                                              BLOCK_G)
                acc = _fwd_eval(acc, ok, mx, my, ca, cb, cc, w, px, py)
                ok, g, mx, my, ca, cb, cc, w = ok2, g2, mx2, my2, ca2, cb2, cc2, w2
    else:  # capacity overflow on this tile: test every Gaussian's box (part s of them)
        ty = t // GX
        tx = t % GX
        c_lo, c_hi = split_range(0, C, s, SPLIT, BLOCK_G)
        if INTERP:
            c0 = c_lo
            while c0 < c_hi:
                ok, g, mx, my, ca, cb, cc, w = _members(params_ptr, box_ptr, b, c0, c_hi, ty, tx, C, BLOCK_G)
                acc = _fwd_eval(acc, ok, mx, my, ca, cb, cc, w, px, py)
                c0 += BLOCK_G
        else:
            for c0 in range(c_lo, c_hi, BLOCK_G):
                ok, g, mx, my, ca, cb, cc, w = _members(params_ptr, box_ptr, b, c0, c_hi, ty, tx, C, BLOCK_G)
                acc = _fwd_eval(acc, ok, mx, my, ca, cb, cc, w, px, py)
    inside = (pxi < W) & (pyi < H)
    tl.store(img_ptr + (b * SPLIT + s) * (H * W) + pyi * W + pxi, tl.sum(acc, axis=1), mask=inside)


@triton.jit
def _bwd_eval(mom_ptr, b, ok, g, mx, my, ca, cb, cc, w, px, py, gup, C):
    """Six moments per pair of the upstream-weighted footprint, pixels on axis 0 (a per-pair sum is then a
    reduction inside each thread plus one across warps), added into mom[b, g, 0:6] with relaxed atomics."""
    dx = mx[None, :] - px[:, None]
    dy = my[None, :] - py[:, None]
    power = -0.5 * (ca[None, :] * dx * dx + cc[None, :] * dy * dy) - cb[None, :] * dx * dy
    gauss = tl.exp(tl.minimum(power, 0.0))
    keep = ok[None, :] & (power <= 0.0) & (w[None, :] * gauss >= 1e-5)
    gg = tl.where(keep, gauss * gup[:, None], 0.0)
    gx = gg * dx
    gy = gg * dy
    out = mom_ptr + (b * C + g) * 8
    tl.atomic_add(out + 0, tl.sum(gg, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 1, tl.sum(gx, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 2, tl.sum(gy, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 3, tl.sum(gx * dx, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 4, tl.sum(gx * dy, axis=0), mask=ok, sem="relaxed")
    tl.atomic_add(out + 5, tl.sum(gy * dy, axis=0), mask=ok, sem="relaxed")


@triton.jit
def raster_bwd_kernel(params_ptr, box_ptr, tstart_ptr, gid_ptr, gimg_ptr, C, P, SPLIT, mom_ptr,
                      T: tl.constexpr, GX: tl.constexpr, W: tl.constexpr, H: tl.constexpr,
                      BLOCK_G: tl.constexpr, SUB: tl.constexpr, INTERP: tl.constexpr):
    """One program per (tile, split part, view): per pair of the part, (Σ Gg, Σ Gg δx, Σ Gg δy, Σ Gg δx²,
    Σ Gg δx δy, Σ Gg δy²) over the tile's contributing pixels (G = exp(E), g = ∂L/∂I), added into mom[b, g, 0:6]
    (zeroed before); §6.1's per-Gaussian sums are linear in them. Same pair walk as the forward."""
    t = tl.program_id(0) // SPLIT
    s = tl.program_id(0) % SPLIT
    b = tl.program_id(1)
    pxi, pyi = _tile_pixels(t, GX)
    px = pxi.to(tl.float32)
    py = pyi.to(tl.float32)
    inside = (pxi < W) & (pyi < H)
    gup = tl.load(gimg_ptr + b * (H * W) + pyi * W + pxi, mask=inside, other=0.0)
    start = tl.load(tstart_ptr + b * (T * SUB + 1) + t * SUB)
    end = tl.load(tstart_ptr + b * (T * SUB + 1) + (t + 1) * SUB)
    if end <= P:
        lo, hi = split_range(start, end, s, SPLIT, BLOCK_G)
        ok, g, mx, my, ca, cb, cc, w = _pairs(params_ptr, gid_ptr, b, lo, hi, C, P, BLOCK_G)
        if INTERP:
            k = lo
            while k < hi:
                ok2, g2, mx2, my2, ca2, cb2, cc2, w2 = _pairs(params_ptr, gid_ptr, b, k + BLOCK_G, hi, C, P,
                                                              BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, mx, my, ca, cb, cc, w, px, py, gup, C)
                ok, g, mx, my, ca, cb, cc, w = ok2, g2, mx2, my2, ca2, cb2, cc2, w2
                k += BLOCK_G
        else:
            for k in range(lo, hi, BLOCK_G):
                ok2, g2, mx2, my2, ca2, cb2, cc2, w2 = _pairs(params_ptr, gid_ptr, b, k + BLOCK_G, hi, C, P,
                                                              BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, mx, my, ca, cb, cc, w, px, py, gup, C)
                ok, g, mx, my, ca, cb, cc, w = ok2, g2, mx2, my2, ca2, cb2, cc2, w2
    else:
        ty = t // GX
        tx = t % GX
        c_lo, c_hi = split_range(0, C, s, SPLIT, BLOCK_G)
        if INTERP:
            c0 = c_lo
            while c0 < c_hi:
                ok, g, mx, my, ca, cb, cc, w = _members(params_ptr, box_ptr, b, c0, c_hi, ty, tx, C, BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, mx, my, ca, cb, cc, w, px, py, gup, C)
                c0 += BLOCK_G
        else:
            for c0 in range(c_lo, c_hi, BLOCK_G):
                ok, g, mx, my, ca, cb, cc, w = _members(params_ptr, box_ptr, b, c0, c_hi, ty, tx, C, BLOCK_G)
                _bwd_eval(mom_ptr, b, ok, g, mx, my, ca, cb, cc, w, px, py, gup, C)
