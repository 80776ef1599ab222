"""PhysX-Boosted's own loss terms (physx.md §2.2, §4.1, §4.3, §4.4) as small pure functions.

  balance_loss(α)                      L_balance = (α - 0.5)²
  gate_loss(w_E, valid)                L_gate = mean over active Gaussians of |w_E|
  subsample(key, valid, S)             S distinct random slots among the valid ones (Gumbel top-k: static shape)
  lp_loss(Δ, P, valid, k, mode)        M3: L_LP = mean_i |LP_i|², LP_i = mean of the k nearest others' Δ
                                       (knn_mean) or Δ_i minus it (graph_laplacian); neighbours in P (no gradient)
  cos_penalty(a, b, valid, squared)    M4: mean of cos²(a, b) (or |cos|), cos = <a,b> / ((|a|+1e-8)(|b|+1e-8))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LP_MODES = ("knn_mean", "graph_laplacian")
DECOUPLE_MODES = ("velocity_corr", "stochastic_jacobian_corr")


def balance_loss(alpha):
    return (alpha - 0.5) ** 2


def _masked_mean(x, valid):
    w = valid.astype(x.dtype)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def gate_loss(w_e, valid):
    """w_E [N, 1] or [N]; valid [N] bool."""
    return _masked_mean(jnp.abs(w_e.reshape(valid.shape[0], -1)[:, 0]), valid)


def subsample(key, valid, s: int):
    """(indices [S] int32, their validity [S] bool): S distinct slots, uniform among the valid ones; when fewer
    than S are valid, all of them (the rest of the picks are invalid slots, flagged False)."""
    scores = jnp.where(valid, jax.random.uniform(key, valid.shape), -1.0)
    _, idx = jax.lax.top_k(scores, s)
    return idx.astype(jnp.int32), valid[idx]


def lp_loss(delta, positions, valid, k: int, mode: str = "knn_mean"):
    """M3 low-frequency leakage of the Eulerian residual.

    delta [S, 3] raw Δx_E (with gradient), positions [S, 3] (no gradient), valid [S] bool; k neighbours excluding
    self (static; fewer valid ones: the missing neighbours are left out of the mean).
    """
    p = jax.lax.stop_gradient(positions)
    d2 = jnp.sum((p[:, None, :] - p[None, :, :]) ** 2, axis=-1)
    n = p.shape[0]
    bad = jnp.eye(n, dtype=bool) | ~valid[None, :]
    d2 = jnp.where(bad, jnp.inf, d2)
    neg, nbr = jax.lax.top_k(-d2, k)  # [S, k]
    w = jnp.isfinite(neg).astype(delta.dtype)
    mean = jnp.sum(delta[nbr] * w[..., None], axis=1) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    if mode == "knn_mean":
        lp = mean
    elif mode == "graph_laplacian":
        lp = delta - mean
    else:
        raise ValueError(f"lp_mode must be one of {LP_MODES}, got {mode!r}")
    return _masked_mean(jnp.sum(lp * lp, axis=-1), valid)


def _norm(x):
    """Row norm with a finite gradient at 0 (a zero field, e.g. the Eulerian velocity while the time planes are
    still at their initial 1, would otherwise give 0/0 = NaN gradients)."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), 1e-30))


def cosine(a, b):
    """Row-wise cos = <a, b> / ((|a| + 1e-8)(|b| + 1e-8)) of [S, 3] arrays."""
    return jnp.sum(a * b, -1) / ((_norm(a) + 1e-8) * (_norm(b) + 1e-8))


def cos_penalty(a, b, valid, squared: bool = True):
    c = cosine(a, b)
    return _masked_mean(c * c if squared else jnp.abs(c), valid)
