"""Static-capacity binning of (Gaussian, tile) pairs by tile, shared by the rasterizer and the voxelizer.

Counting scatter, no sort (an X-ray image is an order-independent sum):
  1. count  — every Gaussian atomically increments the counter of each tile in its box   (Triton)
  2. scan   — tstart = exclusive prefix sum of the per-tile counts                      (JAX, tiny)
  3. fill   — every Gaussian takes a slot in each of its tiles with an atomic cursor and
              writes its id at tstart[tile] + slot                                       (Triton)
Tile t then owns gids[tstart[t·SUB] : tstart[(t+1)·SUB]] (each tile has SUB counters, see bin_kernels.py). The order inside a tile is the
atomics' order, so float sums over a tile vary at the rounding level between runs, as in the reference CUDA.
Slots ≥ P are not written; a tile with tstart[t+1] > P has an incomplete list, and the pixel/voxel kernels
then test every Gaussian's box for that tile instead (exact, slow; the callers report it as overflow).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._launch import launch, merge_batch

BIN_BLOCK = 128  # Gaussians per binning program
SUB = 16  # counters per tile (sub-buckets g mod SUB): spreads same-address atomics


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _binner(c: int, n_tiles: int, grid_b: int, grid_c: int, capacity: int):
    """Batched binning op for static sizes: box [B, C, 8] → (tstart [B, T·SUB+1], gids [B, P])."""
    from kernels import bin_kernels as bk  # lazy: imports triton

    def run(box):
        b = box.shape[0]
        grid = (_cdiv(c, BIN_BLOCK), b)
        (counts,) = launch(bk.tile_count_kernel, grid, [jax.ShapeDtypeStruct((b, n_tiles * SUB), jnp.int32)], box,
                           scalars=(c,), zeroed=(0,), T=n_tiles, GB=grid_b, GC=grid_c, SUB=SUB, BLOCK=BIN_BLOCK)
        tstart = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(counts, axis=-1, dtype=jnp.int32)],
                                 axis=-1)
        gids, _ = launch(bk.tile_fill_kernel, grid,
                         [jax.ShapeDtypeStruct((b, capacity), jnp.int32),
                          jax.ShapeDtypeStruct((b, n_tiles * SUB), jnp.int32)],
                         box, tstart, scalars=(c, capacity), zeroed=(1,), T=n_tiles, GB=grid_b, GC=grid_c, SUB=SUB,
                         BLOCK=BIN_BLOCK)
        return tstart, gids

    return merge_batch(run)


def bin_tiles(box: jax.Array, *, tile_grid: tuple, capacity: int):
    """Group (Gaussian, tile) pairs by tile.

    Args:
      box: [B, C, 8] int32 (a0, b0, c0, a1, b1, c1, 0, 0) half-open tile boxes; empty boxes give no pairs.
      tile_grid: (GA, GB, GC) tiles per axis (tile id (a·GB + b)·GC + c). capacity: P, pair slots per batch row.
    Returns:
      tstart [B, T·SUB + 1] int32 (tile t owns slots tstart[t·SUB] .. tstart[(t+1)·SUB] − 1; tstart[:, -1] =
      number of pairs, may exceed P), gids [B, P] int32.
    """
    ga, gb, gc = (int(v) for v in tile_grid)
    return _binner(box.shape[1], ga * gb * gc, gb, gc, int(capacity))(box)


def empty_boxes(box: jax.Array, keep: jax.Array) -> jax.Array:
    """`box` [..., C, 8] with the rows where `keep` [..., C] is False emptied (no pairs)."""
    return jnp.where(keep[..., None], box, 0)


def default_capacity(c: int, n_tiles: int, per_item: int = 4) -> int:
    """Pair slots per batch row when the caller gives none: a power of two ≥ per_item·C, ≥ 2·T and ≥ 4096."""
    need = max(4096, 2 * int(n_tiles), per_item * int(c))
    return 1 << (need - 1).bit_length()
