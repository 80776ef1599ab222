"""PhysX-Gaussian anchors (physx.md §1.2-1.3, §1.6-1.7): farthest-point sampling, the KNN skinning binding of
every Gaussian to its nearest anchors, zero-order skinning, and the anchors' own neighbour table.

All functions are pure and jit-able; sizes (number of anchors M, neighbours K, row chunks) are static.
Positions are raw world units (no normalisation), as in the reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Distances held per KNN block (floats): bounds the [chunk, M] working set (~16 MiB).
_BLOCK_ELEMENTS = 1 << 22


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """[n, m] squared distances from differences (exact 0 for duplicates, unlike |a|^2 + |b|^2 - 2ab)."""
    d2 = jnp.zeros((a.shape[0], b.shape[0]), jnp.float32)
    for ax in range(3):
        diff = a[:, ax, None] - b[None, :, ax]
        d2 = d2 + diff * diff
    return d2


@functools.partial(jax.jit, static_argnames=("m",))
def farthest_point_sampling(points: jax.Array, m: int, key: jax.Array, valid=None) -> jax.Array:
    """Indices [m] int32 of m farthest points (classic FPS on squared Euclidean distance).

    The start is uniformly random among the valid points (`key`); each step records the current point,
    lowers every distance-to-set with it and moves to the argmax (first index on ties). Invalid rows
    (`valid` [N] bool, default all) are never chosen. Requires m <= number of valid points.
    """
    pts = jnp.asarray(points, jnp.float32)
    n = pts.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    start_rank = jax.random.randint(key, (), 0, jnp.maximum(n_valid, 1))
    start = jnp.nonzero(valid, size=n, fill_value=0)[0][start_rank].astype(jnp.int32)
    dmin = jnp.where(valid, jnp.inf, -jnp.inf)

    def body(i, carry):
        idx, dmin, cur = carry
        idx = idx.at[i].set(cur)
        d = jnp.sum((pts - pts[cur]) ** 2, axis=-1)
        dmin = jnp.where(valid, jnp.minimum(dmin, d), -jnp.inf)
        return idx, dmin, jnp.argmax(dmin).astype(jnp.int32)

    idx, _, _ = jax.lax.fori_loop(0, m, body, (jnp.zeros((m,), jnp.int32), dmin, start))
    return idx


def knn_chunk(n_rows: int, m: int) -> int:
    """Rows per KNN block so that a [chunk, m] block holds about 2^22 distances (>= 8, <= n_rows)."""
    return int(max(1, min(n_rows, max(8, _BLOCK_ELEMENTS // max(m, 1)))))


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def _knn_bind(xyz, anchors, active, tau, k: int, chunk: int):
    c = xyz.shape[0]
    n_blocks = -(-c // chunk)
    pad = n_blocks * chunk - c
    q = jnp.concatenate([xyz, jnp.zeros((pad, 3), xyz.dtype)]).reshape(n_blocks, chunk, 3)

    def block(rows):
        neg, idx = jax.lax.top_k(-_sq_dists(rows, anchors), k)  # k smallest distances, ascending
        return idx.astype(jnp.int32), jax.nn.softmax(neg / tau, axis=-1)

    idx, w = jax.lax.map(block, q)
    idx, w = idx.reshape(-1, k)[:c], w.reshape(-1, k)[:c]
    return jnp.where(active[:, None], idx, 0), jnp.where(active[:, None], w, 0.0)


def knn_bind(xyz: jax.Array, anchors: jax.Array, k: int, tau: float = 0.01, active=None,
             chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Skinning binding of each Gaussian to its k nearest anchors (physx.md §1.3).

    Args:
      xyz: [C, 3] canonical centres (world units). anchors: [M, 3]. k: neighbours (clamped to M).
      tau: softmax temperature (squared world units; the reference's 0.01).
      active: [C] bool; inactive rows get index 0 and weight 0.
      chunk: rows per block (static); default `knn_chunk(C, M)`.

    Returns (idx [C, k] int32 ascending by distance, w [C, k] float32 = softmax_j(-|x - a_j|^2 / tau)).
    Exact: a dense comparison against every anchor per block (no approximate search).
    """
    xyz = jnp.asarray(xyz, jnp.float32)
    anchors = jnp.asarray(anchors, jnp.float32)
    k = int(min(k, anchors.shape[0]))
    active = jnp.ones(xyz.shape[:1], bool) if active is None else jnp.asarray(active, bool)
    chunk = knn_chunk(xyz.shape[0], anchors.shape[0]) if chunk is None else int(max(1, min(chunk, xyz.shape[0])))
    return _knn_bind(xyz, anchors, active, jnp.float32(tau), k=k, chunk=chunk)


def anchor_neighbours(anchors: jax.Array, k: int = 8) -> jax.Array:
    """[M, min(k, M-1)] int32: each anchor's nearest *other* anchors (the smoothness loss's N_8, §1.7)."""
    a = jnp.asarray(anchors, jnp.float32)
    m = a.shape[0]
    k = int(min(k, m - 1))
    d2 = jnp.where(jnp.eye(m, dtype=bool), jnp.inf, _sq_dists(a, a))
    return jax.lax.top_k(-d2, k)[1].astype(jnp.int32)


def skin(delta_a: jax.Array, idx: jax.Array, w: jax.Array) -> jax.Array:
    """Zero-order skinning: [C, 3] = sum_j w[c, j] * delta_a[idx[c, j]] (delta_a [M, 3])."""
    return jnp.einsum("ck,ckd->cd", w, delta_a[idx], precision=jax.lax.Precision.HIGHEST)


def smoothness_loss(delta_a: jax.Array, neighbours: jax.Array) -> jax.Array:
    """Anchor-motion smoothness: mean over the M x k (anchor, neighbour) pairs of |da_j - da_n|^2."""
    diff = delta_a[:, None, :] - delta_a[neighbours]
    return jnp.mean(jnp.sum(diff * diff, axis=-1))
