"""PhysX-Boosted stream fusion (physx.md §2.2, §4.1, §4.2) as small pure functions.

Every fusion mode reduces to one pair of weights and a residual normaliser H:

  Δx = w_L Δx_L + w_E H(Δx_E),   Δs = w_E H(Δs_E),   Δr = w_E H(Δr_E)

with Δx_L [N, 3] the anchor (Lagrangian) displacement and Δx_E [N, 3], Δs_E [N, 3] (log-scale), Δr_E [N, 4] (raw
quaternion) the Eulerian HexPlane head outputs. w_L, w_E are scalars or per-Gaussian [N, 1]:

  mode                          w_L                 w_E                        H
  plain sum (no balance)        1                   1                          identity
  fixed_alpha, α in (0, 1)      α = sigmoid(τ)      1 - α                      identity
  fixed_alpha, α_init == 0      0                   1                          identity     ("pure hex")
  fixed_alpha, α_init == 1      1                   0                          identity     ("pure anchor")
  uncertainty_gated  m1_2       0.99 - γ            0.01 + γ,  γ = γ_max tanh((τ_g - s_E)/(λ_g + 1e-8))
                     bayes      1 - β               β = clip(σ_L²/(σ_L² + exp(s_E) + 1e-8), β_min, β_max)
                     sigmoid    1 - β               β = clip(sigmoid((τ_g - s_E)/(λ_g + 1e-8)), β_min, β_max)
                     fixed      α_init              1 - α_init                 (M1.3: the gate replaced by α)
  bounded_perturb               1 - ε               ε = ε_max sigmoid(ρ) (then the schedule)   tanh / rmsnorm /
                                                                                                unitnorm / identity

β in the visualisation (`python -m x2gs_jax.viz.beta`) is w_E: the Eulerian stream's share.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

FUSION_MODES = ("fixed_alpha", "uncertainty_gated", "bounded_perturb")
GATE_MODES = ("m1_2", "bayes", "sigmoid", "fixed")
RESIDUAL_MODES = ("tanh", "rmsnorm", "unitnorm", "identity")
SCHEDULE_MODES = ("none", "freeze_rho", "warmup_cap")


def logit(p: float) -> float:
    """ln(p / (1 - p)) for p in (0, 1) (τ₀ of the balance, ρ₀ of the perturbation bound)."""
    return math.log(p / (1.0 - p))


def balance_tau0(alpha_init: float) -> float:
    """Initial balance logit: logit(α_init), or ∓10 for the exact limits 0 / 1 (stored but unused, as the
    reference)."""
    if alpha_init <= 0.0:
        return -10.0
    if alpha_init >= 1.0:
        return 10.0
    return logit(alpha_init)


def fixed_alpha_weights(tau, alpha_init: float, learnable: bool):
    """(w_L, w_E) scalars of `fixed_alpha`; the exact limits α_init = 0 / 1 do not depend on τ."""
    if not learnable:
        return jnp.ones(()), jnp.ones(())
    if alpha_init == 0.0:
        return jnp.zeros(()), jnp.ones(())
    if alpha_init == 1.0:
        return jnp.ones(()), jnp.zeros(())
    alpha = jax.nn.sigmoid(tau)
    return alpha, 1.0 - alpha


def uncertainty_weights(s_e, gate_mode: str, *, gamma_max: float, gate_tau: float, gate_lambda: float,
                        sigma_l2: float, beta_min: float, beta_max: float, alpha_init: float):
    """(w_L, w_E) [N, 1] of `uncertainty_gated` from the Eulerian log-uncertainty s_E [N, 1]."""
    if gate_mode == "m1_2":
        gamma = gamma_max * jnp.tanh((gate_tau - s_e) / (gate_lambda + 1e-8))
        return 0.99 - gamma, 0.01 + gamma
    if gate_mode == "bayes":
        beta = sigma_l2 / (sigma_l2 + jnp.exp(s_e) + 1e-8)
    elif gate_mode == "sigmoid":
        beta = jax.nn.sigmoid((gate_tau - s_e) / (gate_lambda + 1e-8))
    elif gate_mode == "fixed":
        beta = jnp.full_like(s_e, 1.0 - alpha_init)
        return 1.0 - beta, beta
    else:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    beta = jnp.clip(beta, beta_min, beta_max)
    return 1.0 - beta, beta


def perturb_bound(rho, eps_max: float):
    """ε_raw = ε_max sigmoid(ρ)."""
    return eps_max * jax.nn.sigmoid(rho)


def rho_init(eps_init: float, eps_max: float) -> float:
    """ρ₀ = logit(clip(ε_init / ε_max, 1e-6, 1 - 1e-6))."""
    return logit(min(max(eps_init / eps_max, 1e-6), 1.0 - 1e-6))


def scheduled_eps(eps_raw, it, schedule_mode: str, eps_max: float, warmup_steps: int):
    """ε_eff at global iteration `it` (1-based). warmup_cap caps ε by ε_max min(s / warmup_steps, 1) with s = it - 1,
    the counter the reference has set after the previous iteration (its off-by-one); the other modes leave ε
    (freeze_rho acts on ρ's optimiser group instead)."""
    if schedule_mode != "warmup_cap":
        return eps_raw
    s = jnp.asarray(it, jnp.float32) - 1.0
    return jnp.minimum(eps_raw, eps_max * jnp.minimum(s / float(warmup_steps), 1.0))


def normalise_residual(d, mode: str, norm_eps: float = 1e-6):
    """H(Δ) per point over its last axis (3 for Δx / Δs, 4 for Δr)."""
    if mode == "tanh":
        return jnp.tanh(d)
    if mode == "rmsnorm":
        return d / jnp.sqrt(jnp.mean(d * d, axis=-1, keepdims=True) + norm_eps)
    if mode == "unitnorm":
        return d / jnp.sqrt(jnp.sum(d * d, axis=-1, keepdims=True) + norm_eps)
    if mode == "identity":
        return d
    raise ValueError(f"residual_mode must be one of {RESIDUAL_MODES}, got {mode!r}")


def combine(w_l, w_e, dx_l, dx_e, ds_e, dr_e, residual: str = "identity", norm_eps: float = 1e-6):
    """(Δx [N,3], Δs [N,3], Δr [N,4]) of the fused streams (module docstring)."""
    h = lambda d: normalise_residual(d, residual, norm_eps)  # noqa: E731
    return w_l * dx_l + w_e * h(dx_e), w_e * h(ds_e), w_e * h(dr_e)
