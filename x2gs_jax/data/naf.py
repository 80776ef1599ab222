"""NAF / X2GS-style `*.pickle` cases (3D and 4D): safe loading, validation and atomic saving.

Layout and units: data_format.md §2-§5. Scanner lengths in the pickle are millimetres; projections
are line integrals with path length in metres (TIGRE's convention), row 0 = top.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from x2gs_jax.geometry import Scanner


class DataError(ValueError):
    """A case file is unreadable, unsafe or inconsistent; the message names the file and the key."""


@dataclasses.dataclass
class Split:
    """One split of a case (train or val).

    Attributes:
      projections: [n, H, W] float32, pickle units (line integral, path length in metres).
      angles: [n] float64, gantry angles in radians.
      times: [n] float64 normalised acquisition time (seconds / scan length), or None for 3D cases.
      phases: [n] int64 phase bin, or None for 3D cases.
    """

    projections: np.ndarray
    angles: np.ndarray
    times: Optional[np.ndarray] = None
    phases: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.projections.shape[0])


@dataclasses.dataclass
class Case:
    """A loaded case.

    Attributes:
      scanner: geometry in world units (`Scanner.from_naf` of the pickle's scanner keys).
      train, val: the two splits (first numTrain / numVal entries of the stored arrays).
      volumes: GT volume(s), float32 [P, nx, ny, nz] (4D, P phases) or [nx, ny, nz] (3D).
      meta: every other key of the pickle (generator settings such as noise, totalAngle), kept verbatim
        so that `save_case(load_case(p))` writes the same dictionary.
    """

    scanner: Scanner
    train: Split
    val: Split
    volumes: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def is_4d(self) -> bool:
        return self.volumes.ndim == 4
