"""Learnable respiratory period and the periodic-consistency time shift (x2gaussian.md §7).

T = exp(tau) seconds, tau initialised to ln 2.8. For a view at normalised time t (seconds / scan_s):

  t_s   = scan_s * t
  n_cyc = floor(scan_s / T),  c = floor(t_s / T)               (tau detached: integer bookkeeping)
  k     = +m if c + m <= n_cyc - 1       (a later full cycle exists inside the scan)
          -m elif c - m >= 0              (otherwise go back)
          invalid otherwise               (reference: debugger trap; here `valid` = False)
  t'    = (t_s + k * exp(tau)) / scan_s    (NOT detached: d t'/d tau = k exp(tau) / scan_s)

The reference hard-codes scan_s = 60 and m = 1 (`shift_cycles`). On an invalid case t' = t and k = 0
(finite, no gradient to tau) and `valid` is False; check it outside jit with `require_valid`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REFERENCE_PERIOD_S = 2.8  # initial T of the reference (tau = ln 2.8)
REFERENCE_SCAN_S = 60.0


class TimeShift(NamedTuple):
    t_shifted: jax.Array  # normalised time t' (same shape as t), differentiable w.r.t. tau
    k: jax.Array  # int32 signed number of periods shifted (0 where invalid)
    valid: jax.Array  # bool: a shift inside the scan exists


def period_seconds(tau: jax.Array) -> jax.Array:
    """Breathing period T = exp(tau) in seconds."""
    return jnp.exp(jnp.asarray(tau, jnp.float32))


def init_tau(period0_s: float = REFERENCE_PERIOD_S) -> jax.Array:
    """tau [] float32 = ln(period0_s) (reference: ln 2.8)."""
    if not period0_s > 0:
        raise ValueError(f"init_tau: the initial period must be > 0 seconds, got {period0_s}")
    return jnp.asarray(np.log(period0_s), jnp.float32)


def shifted_time(t, tau, scan_s: float = REFERENCE_SCAN_S, shift_cycles: int = 1) -> TimeShift:
    """Periodic-consistency time t' = t + k T / scan_s with the reference's choice of k (module docstring).

    Args:
      t: [] or [V] normalised acquisition time (seconds / scan_s).
      tau: [] or [1] log-period (seconds); gradients flow only through the final exp(tau).
      scan_s: scan length in seconds (reference 60).
      shift_cycles: m, the magnitude of the shift in periods (reference 1).

    Returns TimeShift(t_shifted, k, valid), broadcast to the shape of t.
    """
    if int(shift_cycles) < 1:
        raise ValueError(f"shifted_time: shift_cycles must be >= 1, got {shift_cycles}")
    m = jnp.int32(shift_cycles)
    t = jnp.asarray(t, jnp.float32)
    tau = jnp.asarray(tau, jnp.float32)
    tau = tau.reshape(()) if tau.size == 1 else tau
    t_s = jnp.float32(scan_s) * t
    T_det = jnp.exp(jax.lax.stop_gradient(tau))
    n_cyc = jnp.floor(jnp.float32(scan_s) / T_det).astype(jnp.int32)
    c = jnp.floor(t_s / T_det).astype(jnp.int32)
    forward_ok = c + m <= n_cyc - 1
    backward_ok = c - m >= 0
    k = jnp.where(forward_ok, m, jnp.where(backward_ok, -m, 0))
    k = jnp.broadcast_to(k, t.shape)
    t_shifted = (t_s + k.astype(jnp.float32) * jnp.exp(tau)) / jnp.float32(scan_s)
    return TimeShift(t_shifted=t_shifted, k=k, valid=k != 0)


def require_valid(shift: TimeShift, tau, scan_s: float = REFERENCE_SCAN_S) -> None:
    """Raise (outside jit) if any shift was invalid, i.e. the period is too long for the scan."""
    valid = np.asarray(shift.valid)
    if not np.all(valid):
        T = float(np.exp(np.asarray(tau, np.float64)).reshape(-1)[0])
        raise ValueError(f"periodic consistency: no shift of the learned period T = {T:.4g} s fits inside the "
                         f"{scan_s:g} s scan for {int(np.size(valid) - np.sum(valid))} view(s); T must stay "
                         f"below about scan_s / 2 (tau = ln T diverged?)")
