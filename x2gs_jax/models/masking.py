"""Token masks of the PhysX masked-modelling variants (physx.md §1.5, §3). Counts are static: ⌊M·r⌋, ⌊K·M·r⌋.

  bert_mask(key, M, n)           BERT: n distinct anchors, uniform without replacement -> (indices [n], mask [M])
  window_times(t, K, δ)          V16: t_k = clip(t + k δ, 0, 1), k = -⌊K/2⌋ .. K-1-⌊K/2⌋; centre index ⌊K/2⌋ is t
  token_flags(key, K, M, n)      V16: n distinct (time, anchor) tokens flagged 1 -> (flat indices [n], flags [K, M])
  l1_on(idx, pred, target)       mean over the selected rows x 3 of |pred - stopgrad(target)|  (L_phys, L_lagbert)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bert_mask(key, m: int, n: int):
    """(masked anchor indices [n] int32, mask [M] bool)."""
    idx = jax.random.permutation(key, m)[:n].astype(jnp.int32)
    return idx, jnp.zeros((m,), bool).at[idx].set(True)


def window_times(t, k: int, delta: float):
    """[K] window times around t (clamping at 0 / 1 may repeat a time, as the reference)."""
    offsets = jnp.arange(k, dtype=jnp.float32) - float(k // 2)
    return jnp.clip(jnp.asarray(t, jnp.float32) + offsets * delta, 0.0, 1.0)


def token_flags(key, k: int, m: int, n: int):
    """(flat token indices [n] over K*M, flags [K, M] int32 with exactly n ones)."""
    idx = jax.random.permutation(key, k * m)[:n].astype(jnp.int32)
    return idx, jnp.zeros((k * m,), jnp.int32).at[idx].set(1).reshape(k, m)


def l1_on(idx, pred, target):
    """mean over rows `idx` x last axis of |pred - stopgrad(target)| (pred/target [R, 3])."""
    return jnp.mean(jnp.abs(pred[idx] - jax.lax.stop_gradient(target[idx])))
