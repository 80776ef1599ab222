"""Exact k-nearest-neighbour distances for the Gaussian initialisation (gaussians.md §2.2 step 2).

The reference (simple-knn `distCUDA2`) returns, per point, the mean squared distance to its 3 nearest
*other* points; duplicated positions count as distance 0 and the point itself is excluded exactly
once. Two exact methods, chosen by the backend (`method="auto"`):
  * "brute" (accelerators): chunked over query rows so that memory stays bounded: each block of `chunk` queries
    is compared with all N points ([chunk, N] distances), the query's own column is masked out by index, and
    `lax.top_k` on the negated distances picks the k smallest. O(N^2) arithmetic: fine on a GPU for the
    50k-200k points an init uses, hours on a CPU.
  * "kdtree" (jax.default_backend() == "cpu"): scipy's cKDTree finds the k + 1 nearest points of each point
    (itself or a coincident point first, at distance 0), in float64 on the float32 inputs; the first is dropped
    and the squared distances to the other k are recomputed in float32 as the brute force does. O(N log N).
Both give the same neighbour distances; the means agree to float32 rounding (1 ulp: XLA's reduction and division
differ from numpy's; tests/test_gaussians.py compares them, ties and duplicates included).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

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


def _knn_kdtree(points: np.ndarray, k: int) -> np.ndarray:
    """[N] float32 mean squared distance to the k nearest other points (points: finite float32 [N, 3])."""
    from scipy.spatial import cKDTree  # local: only the CPU path needs scipy

    tree = cKDTree(points.astype(np.float64))
    # k + 1 neighbours: the first is the point itself or a coincident one, both at distance 0, so dropping it
    # removes the point itself exactly once (a duplicate of it still counts, at 0).
    _, idx = tree.query(points.astype(np.float64), k=k + 1)
    nbr = points[idx[:, 1:]]  # [N, k, 3]
    d2 = np.zeros(nbr.shape[:2], np.float32)
    for a in range(3):  # the brute force's float32 arithmetic, axis by axis
        diff = points[:, None, a] - nbr[:, :, a]
        d2 = d2 + diff * diff
    return d2.mean(axis=1, dtype=np.float32)


def knn_mean_sq_dist(points, k: int = 3, chunk: Optional[int] = None, method: str = "auto") -> jax.Array:
    """Mean squared distance from each point to its k nearest other points (exact).

    Args:
      points: [N, 3] positions (world units); converted to float32. Requires N > k.
      k: number of neighbours (the reference uses 3).
      chunk: query rows per block of the brute force (static); default `default_chunk(N)` (~128 MiB per block).
      method: "auto" (cKDTree when jax.default_backend() is "cpu", else the brute force), "kdtree" or "brute".

    Returns:
      [N] float32, squared world units. Coincident points contribute distance 0; each point's own
      entry is excluded exactly once (a duplicate of it still counts). The brute force does not check for NaN
      (a NaN point gives NaN rows; callers validate); the k-d tree raises ValueError on non-finite points.
    """
    pts = jnp.asarray(points, jnp.float32)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"knn_mean_sq_dist: points must have shape [N, 3], got {tuple(pts.shape)}")
    n = int(pts.shape[0])
    if k < 1 or n <= k:
        raise ValueError(f"knn_mean_sq_dist: need N > k >= 1 points, got N={n}, k={k}")
    if method not in ("auto", "kdtree", "brute"):
        raise ValueError(f"knn_mean_sq_dist: method must be 'auto', 'kdtree' or 'brute', got {method!r}")
    if method == "auto":
        method = "kdtree" if jax.default_backend() == "cpu" else "brute"
    if method == "kdtree":
        host = np.asarray(pts)
        if not np.all(np.isfinite(host)):
            raise ValueError("knn_mean_sq_dist: points contain NaN or inf (the k-d tree needs finite points)")
        return jnp.asarray(_knn_kdtree(host, int(k)))
    chunk = default_chunk(n) if chunk is None else int(max(1, min(int(chunk), n)))
    return _knn_mean_sq_dist(pts, k=int(k), chunk=chunk)
