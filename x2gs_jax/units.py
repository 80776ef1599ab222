"""Value units of exported volumes: the model's attenuation μ as trained, or Hounsfield units.

The reconstructions live in the units of the case's GT volume (the reference's datasets: attenuation normalised
to [0, 1]; data_format.md §2). Hounsfield units need the attenuation of water in those units:

    HU = 1000 · (μ − μ_water) / μ_water        (air, μ = 0: −1000 HU; water: 0 HU)

The embedded phantom's soft tissue is its water-equivalent material (`data.phantom.MU_SOFT` = 0.5 in its
normalised units), so that is the default μ_water; other data need their own (`eval.py --mu_water`, or the run
config's `eval.mu_water`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

UNITS = ("mu", "hu")


def default_mu_water() -> float:
    """μ_water of the embedded phantom (its soft tissue, in its normalised attenuation units)."""
    from x2gs_jax.data.phantom import MU_SOFT

    return float(MU_SOFT)


def resolve_mu_water(flag: Optional[float], config=None) -> float:
    """The μ_water to use: the flag, else the run config's `eval.mu_water`, else the phantom's. Raises ValueError
    unless it is positive and finite."""
    value = flag
    if value is None and config is not None:
        value = config.get("eval", {}).get("mu_water") if hasattr(config, "get") else None
    if value is None:
        value = default_mu_water()
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"mu_water must be a positive finite attenuation (the volume's units), got {value}")
    return value


def mu_to_hu(volume, mu_water: float) -> np.ndarray:
    """Hounsfield units of attenuation `volume` (any shape, float32 out)."""
    v = np.asarray(volume, np.float32)
    return (np.float32(1000.0) * (v - np.float32(mu_water)) / np.float32(mu_water)).astype(np.float32)


def hu_to_mu(hu, mu_water: float) -> np.ndarray:
    """Inverse of `mu_to_hu`."""
    h = np.asarray(hu, np.float32)
    return (np.float32(mu_water) * (np.float32(1.0) + h / np.float32(1000.0))).astype(np.float32)


def convert(volume, units: str, mu_water: float) -> np.ndarray:
    """`volume` (μ) in `units`: "mu" returns it as float32, "hu" converts."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    return mu_to_hu(volume, mu_water) if units == "hu" else np.asarray(volume, np.float32)


__all__ = ["UNITS", "default_mu_water", "resolve_mu_water", "mu_to_hu", "hu_to_mu", "convert"]
