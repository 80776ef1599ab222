"""Exported volumes (the trainer's final volumes, the evaluator's exports): .npy + NIfTI in the chosen value
units (μ as trained, or HU).

The arrays are the evaluator's volumes on the case's GT grid, in μ (the model's units); `units`/`mu_water` select
what is written (`x2gs_jax.units`). NIfTI frames follow `x2gs_jax.nifti` (spacing, origin and axes from the
scanner).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from x2gs_jax import units as U
from x2gs_jax.fileio import atomic_save_npy
from x2gs_jax.nifti import nifti_frame_mm, units_descrip, write_nifti, write_nifti_4d


def uniform_step(times_s) -> float | None:
    """The spacing (s) of equally spaced increasing times (at least 2, relative tolerance 1e-4), else None: a 4D
    NIfTI holds one time step."""
    if times_s is None or len(times_s) < 2:
        return None
    d = np.diff(np.asarray(times_s, np.float64))
    if not (d[0] > 0 and np.allclose(d, d[0], rtol=1e-4, atol=0)):
        return None
    return float(d[0])


def write_volume_files(stem: str, volume_mu, scanner, units: str = "mu", mu_water: Optional[float] = None
                       ) -> list[str]:
    """`<stem>.npy` and `<stem>.nii.gz` of one [nx, ny, nz] volume (given in μ) in `units`; returns both paths.

    mu_water: needed for units "hu" (the attenuation of water in the volume's units)."""
    if units == "hu" and mu_water is None:
        raise ValueError("write_volume_files: units 'hu' need mu_water")
    v = U.convert(volume_mu, units, mu_water)
    spacing, origin = nifti_frame_mm(scanner)
    atomic_save_npy(stem + ".npy", v)
    write_nifti(stem + ".nii.gz", v, spacing, origin, units_descrip(units, mu_water))
    return [stem + ".npy", stem + ".nii.gz"]


def write_phase_series(path: str, volumes_mu, times_s: Sequence[float], scanner, units: str = "mu",
                       mu_water: Optional[float] = None) -> Optional[str]:
    """One 4D NIfTI of volumes [T, nx, ny, nz] (μ) at equally spaced `times_s` (s), in `units`; returns the path,
    or None (nothing written) when the times are not equally spaced or fewer than 2."""
    step = uniform_step(times_s)
    if step is None:
        return None
    if units == "hu" and mu_water is None:
        raise ValueError("write_phase_series: units 'hu' need mu_water")
    vols = U.convert(volumes_mu, units, mu_water)
    spacing, origin = nifti_frame_mm(scanner)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_nifti_4d(path, vols, spacing, origin, step, float(np.asarray(times_s)[0]), units_descrip(units, mu_water))
    return path


__all__ = ["uniform_step", "write_volume_files", "write_phase_series"]
