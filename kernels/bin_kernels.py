"""Triton kernels of the tile binning (kernels/binning.py), for 2-D pixel tiles and 3-D voxel tiles alike.

A Gaussian's tiles form a half-open box [a0, a1) × [b0, b1) × [c0, c1) of the tile grid (GA, GB, GC), tile id
(a·GB + b)·GC + c; the rasterizer uses a = tile row, b = tile column, c = 0 with GC = 1.
Layouts (B = batch, C = Gaussians, T = tiles, P = pair capacity):
  box    [B, C, 8] int32  (a0, b0, c0, a1, b1, c1, 0, 0); an empty box gives no pairs
  count  [B, T·SUB] int32 Gaussians per (tile, sub-bucket g mod SUB)
  tstart [B, T·SUB + 1]   exclusive prefix sum of count: tile t owns slots tstart[t·SUB] .. tstart[(t+1)·SUB]−1
  gids   [B, P] int32     Gaussian ids grouped by tile
Sub-buckets: every Gaussian of a popular tile hit one counter, and same-address atomics serialise (16×16-px
tiles of 8 views = 2 048 counters for millions of pairs: ~10x slower than the voxel binning's 32 768);
SUB counters per tile spread them.
All offsets are int32: B·C·8, B·T and B·P must stay below 2³¹.
Atomics are "relaxed": Triton's default (acq_rel) fences every atomic, which made binning ~10x slower; only
the atomicity matters here (the kernel boundary orders everything else).
"""
from kernels._launch import prepare_triton

prepare_triton()  # CPU: Triton's interpreter (tests); must precede the triton import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _box(box_ptr, b, g, ok, C):
    """Box corners (a0, b0, c0), extents (na, nb, nc) and tile count n [BLOCK] of Gaussians g (0 when empty)."""
    base = box_ptr + (b * C + g) * 8
    a0 = tl.load(base + 0, mask=ok, other=0)
    b0 = tl.load(base + 1, mask=ok, other=0)
    c0 = tl.load(base + 2, mask=ok, other=0)
    na = tl.load(base + 3, mask=ok, other=0) - a0
    nb = tl.load(base + 4, mask=ok, other=0) - b0
    nc = tl.load(base + 5, mask=ok, other=0) - c0
    n = tl.where(ok & (na > 0) & (nb > 0) & (nc > 0), na * nb * nc, 0)
    return a0, b0, c0, tl.maximum(nb, 1), tl.maximum(nc, 1), n


@triton.jit
def tile_count_kernel(box_ptr, C, count_ptr, T: tl.constexpr, GB: tl.constexpr, GC: tl.constexpr,
                      SUB: tl.constexpr, BLOCK: tl.constexpr):
    """count[b, t] += number of this block's Gaussians whose box holds tile t (count zeroed before)."""
    b = tl.program_id(1)
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = g < C
    a0, b0, c0, nb, nc, n = _box(box_ptr, b, g, ok, C)
    n_max = tl.max(n, axis=0)
    j = 0
    # Lane i visits its j-th tile; lanes with fewer tiles idle (most boxes hold a few tiles). A while loop
    # because Triton's interpreter (CPU tests) cannot range() over a tensor bound.
    while j < n_max:
        act = j < n
        tile = ((a0 + j // (nb * nc)) * GB + b0 + (j // nc) % nb) * GC + c0 + j % nc
        tl.atomic_add(count_ptr + b * (T * SUB) + tile * SUB + g % SUB, 1, mask=act, sem="relaxed")
        j += 1


@triton.jit
def tile_fill_kernel(box_ptr, tstart_ptr, C, P, gid_ptr, cursor_ptr, T: tl.constexpr, GB: tl.constexpr,
                     GC: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr):
    """gids[b, tstart[b, t·SUB + s] + k] = g for the k-th Gaussian (atomic order) of tile t in sub-bucket
    s = g mod SUB; slots ≥ P are not written. `cursor` [B, T·SUB] is zeroed before the launch."""
    b = tl.program_id(1)
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = g < C
    a0, b0, c0, nb, nc, n = _box(box_ptr, b, g, ok, C)
    n_max = tl.max(n, axis=0)
    j = 0
    while j < n_max:
        act = j < n
        tile = ((a0 + j // (nb * nc)) * GB + b0 + (j // nc) % nb) * GC + c0 + j % nc
        bucket = tile * SUB + g % SUB
        slot = tl.atomic_add(cursor_ptr + b * (T * SUB) + bucket, 1, mask=act, sem="relaxed")
        pos = tl.load(tstart_ptr + b * (T * SUB + 1) + bucket, mask=act, other=0) + slot
        tl.store(gid_ptr + b * P + pos, g, mask=act & (pos < P))
        j += 1
