"""Exact k-nearest-neighbour distances for the Gaussian initialisation (gaussians.md §2.2 step 2).

The reference (simple-knn `distCUDA2`) returns, per point, the mean squared distance to its 3 nearest
*other* points; duplicated positions count as distance 0 and the point itself is excluded exactly
once. Here this is computed exactly by brute force, chunked over query rows so that memory stays
bounded: each block of `chunk` queries is compared with all N points ([chunk, N] distances), the
query's own column is masked out by index, and `lax.top_k` on the negated distances picks the k
smallest. Cost O(N^2) arithmetic; fine on a GPU for the 50k-200k points an init uses.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Distances held per block (floats): bounds the [chunk, N] working set to ~128 MiB.
_BLOCK_ELEMENTS = 1 << 25


def default_chunk(n: int) -> int:
    """Query rows per block so that a [chunk, n] float32 block holds about 2^25 entries (>= 8, <= n)."""
    return int(max(1, min(n, max(8, _BLOCK_ELEMENTS // max(n, 1)))))


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _knn_mean_sq_dist(points: jax.Array, k: int, chunk: int) -> jax.Array:
    n = points.shape[0]
    n_blocks = -(-n // chunk)
    pad = n_blocks * chunk - n
    # Padded query rows are computed against the real points and discarded afterwards.
    queries = jnp.concatenate([points, jnp.zeros((pad, 3), points.dtype)], axis=0)
    queries = queries.reshape(n_blocks, chunk, 3)
    starts = jnp.arange(n_blocks, dtype=jnp.int32) * chunk
    cols = jnp.arange(n, dtype=jnp.int32)

    def block(args):
        q, start = args
        # Differences (not |q|^2 + |p|^2 - 2 q.p) so that duplicates give exactly 0.
        d2 = jnp.zeros((chunk, n), jnp.float32)
        for a in range(3):
            diff = q[:, a, None] - points[None, :, a]
            d2 = d2 + diff * diff
        rows = start + jnp.arange(chunk, dtype=jnp.int32)
        d2 = jnp.where(cols[None, :] == rows[:, None], jnp.inf, d2)  # exclude self exactly once
        neg_smallest, _ = jax.lax.top_k(-d2, k)
        return jnp.mean(-neg_smallest, axis=-1)

    out = jax.lax.map(block, (queries, starts))
    return out.reshape(-1)[:n]


def knn_mean_sq_dist(points, k: int = 3, chunk: Optional[int] = None) -> jax.Array:
    """Mean squared distance from each point to its k nearest other points (exact).

    Args:
      points: [N, 3] positions (world units); converted to float32. Requires N > k.
      k: number of neighbours (the reference uses 3).
      chunk: query rows per block (static); default `default_chunk(N)` (~128 MiB per block).

    Returns:
      [N] float32, squared world units. Coincident points contribute distance 0; each point's own
      entry is excluded exactly once (a duplicate of it still counts). Inputs are not checked for NaN
      (a NaN point gives NaN rows); callers validate.
    """
    pts = jnp.asarray(points, jnp.float32)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"knn_mean_sq_dist: points must have shape [N, 3], got {tuple(pts.shape)}")
    n = int(pts.shape[0])
    if k < 1 or n <= k:
        raise ValueError(f"knn_mean_sq_dist: need N > k >= 1 points, got N={n}, k={k}")
    chunk = default_chunk(n) if chunk is None else int(max(1, min(int(chunk), n)))
    return _knn_mean_sq_dist(pts, k=int(k), chunk=chunk)
