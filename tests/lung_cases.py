"""Test cases for the lung segmentation: a second, independently built breathing chest ("anatomy B"), the embedded
phantom's exact volumes, and the segmentation compiled once for every test module that uses it.

Anatomy B

Built unlike the embedded phantom (x2gs_jax/data/phantom.py) on purpose: painter's-order labels instead of additive
primitives, soft tissue mu 0.30 under a fat layer 0.27 and lungs 0.05 (the densities of the phantom on which the
fixed 0.285 threshold failed, issue 17), a wider and flatter body, lungs with a flat mediastinal face and a round
base (no dome cutter) of different sizes left and right, a heart cutting a notch into the left lung, a spine, a
liver, a trachea, two small gas pockets in the abdomen (not lung) and a hollow patient couch under the body
(air enclosed by a wall outside the body). Breathing state s in [0, 1]: the lung bases descend by DZ s (the lungs
stretch in z about their apex), the chest expands anteriorly about its back wall, the heart and liver follow the
diaphragm.

Coordinates q in [-1, 1]^3 (x left-right, y posterior-anterior, z inferior-superior) on an n^3 grid of voxel
centres; each voxel is the mean over supersample^3 regular sub-points, and the ground truth is the exact share of
those sub-points labelled lung or airway, so `chest_b`'s ground truth is the exact air volume of the voxelised
labels.
"""
from __future__ import annotations

import jax
import numpy as np

from x2gs_jax import tidal

MU = {"air": 0.0, "fat": 0.27, "tissue": 0.30, "liver": 0.33, "heart": 0.35, "couch": 0.35, "bone": 0.80,
      "lung": 0.05, "nodule": 0.28}
BOX_MM = 340.0  # side of the box (mm): voxel size 340 / n mm
DZ, CHEST_AP = 0.15, 0.06
BODY_C, BODY_SEMI, BODY_HALF_Z = (0.0, 0.02), (0.84, 0.62), 0.86
Y_BACK = BODY_C[1] - BODY_SEMI[1]  # the fixed posterior wall
LUNGS = (  # centre, semi-axes, medial plane |x| >= x_medial (the flat mediastinal face)
    ((-0.38, 0.02, 0.14), (0.27, 0.34, 0.50), 0.10),
    ((0.39, 0.02, 0.18), (0.23, 0.31, 0.44), 0.12),
)


def _ell(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def _chest_inverse(y, s):
    """Rest y of a point at y in state s (anterior expansion about the back wall)."""
    ay = 1.0 + CHEST_AP * s / (2 * BODY_SEMI[1])
    return Y_BACK + (y - Y_BACK) / ay


POCKETS = ((0.35, 0.18, -0.62), (0.05, -0.12, -0.70))  # gas pocket centres (rest position)


def _couch(x, y):
    """(outer, hollow): the couch's outline and its air-filled inside (fixed, independent of z)."""
    # Walls 0.09 thick (>= 2 voxels at 48^3) so that they stay closed at the tests' resolution.
    outer = (np.abs(x) <= 0.95) & (y >= -0.99) & (y <= Y_BACK - 0.10)
    hollow = (np.abs(x) <= 0.86) & (y >= -0.90) & (y <= Y_BACK - 0.19)
    return outer, hollow


def regions(n: int, pocket_radius: float = 0.05) -> dict:
    """bool [n, n, n] masks of voxel centres at s = 0: "couch" (wall + hollow), "hollow", "pockets" (dilated by
    one voxel so partial-volume voxels count)."""
    c = -1.0 + (np.arange(n) + 0.5) * 2.0 / n
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    outer, hollow = _couch(x, y)
    h = 2.0 / n
    pockets = np.zeros((n, n, n), bool)
    for p in POCKETS:
        pockets |= _ell(x, y, z, p, (pocket_radius + h,) * 3)
    return {"couch": outer, "hollow": hollow, "pockets": pockets}


def _labels(x, y, z, s, with_couch=True, pocket_radius=0.05):
    """(mu, is_lung_or_airway) at points (broadcastable arrays) in breathing state s."""
    shape = np.broadcast(x, y, z).shape
    mu = np.zeros(shape, np.float32)
    air = np.zeros(shape, bool)
    yr = _chest_inverse(y, s)
    def section(shrink):  # the body's elliptic cross-section shrunk by `shrink` (a 0.06 fat layer under the skin)
        return ((x - BODY_C[0]) / (BODY_SEMI[0] - shrink)) ** 2 + ((yr - BODY_C[1]) / (BODY_SEMI[1] - shrink)) ** 2 <= 1

    body = section(0.0) & (np.abs(z) <= BODY_HALF_Z)
    mu = np.where(body, MU["fat"], mu)
    inner = section(0.06) & (np.abs(z) <= BODY_HALF_Z - 0.04)
    mu = np.where(inner, MU["tissue"], mu)
    mu = np.where(_ell(x, yr, z, (-0.25, -0.02, -0.62 - DZ * s), (0.48, 0.42, 0.30)) & inner, MU["liver"], mu)
    for c, r, x_medial in LUNGS:
        apex = c[2] + r[2]
        lam = 1.0 + DZ * s / (2 * r[2])
        zr = apex + (z - apex) / lam
        lung = _ell(x, yr, zr, c, r) & (np.abs(x) >= x_medial)
        mu = np.where(lung, MU["lung"], mu)
        air |= lung
        if c[0] < 0:  # a nodule in the right lung, moving with it
            nod = _ell(x, yr, zr, (-0.45, 0.10, 0.05), (0.06, 0.06, 0.07))
            mu = np.where(nod, MU["nodule"], mu)
            air &= ~nod
    heart = _ell(x, yr, z, (0.10, 0.20, -0.14 - 0.5 * DZ * s), (0.24, 0.17, 0.19))
    mu = np.where(heart, MU["heart"], mu)
    air &= ~heart
    spine = ((x / 0.10) ** 2 + ((y + 0.44) / 0.09) ** 2 <= 1.0) & (np.abs(z) <= BODY_HALF_Z - 0.04)
    mu = np.where(spine, MU["bone"], mu)
    air &= ~spine
    trachea = ((x / 0.055) ** 2 + ((yr - 0.12) / 0.05) ** 2 <= 1.0) & (z >= 0.40) & (z <= 0.78)
    mu = np.where(trachea, MU["air"], mu)
    air |= trachea
    if pocket_radius > 0:  # gas in the bowel: air inside the body that is not lung
        for c in POCKETS:
            mu = np.where(_ell(x, yr, z, c, (pocket_radius,) * 3), MU["air"], mu)
    if with_couch:  # a hollow plate under the patient, 0.1 below the back wall, running through the whole box
        outer, hollow = _couch(x, y)
        mu = np.where(outer & ~hollow, MU["couch"], mu)
    return mu, air


def chest_b(n: int, s: float, supersample: int = 3, **kw):
    """(volume float32 [n, n, n], exact lung + airway volume in mL, voxel_mm (3,)) at breathing state s."""
    h = 2.0 / n
    centres = -1.0 + (np.arange(n) + 0.5) * h
    frac = (np.arange(supersample) + 0.5) / supersample - 0.5
    vol = np.zeros((n, n, n), np.float64)
    air = np.zeros((n, n, n), np.float64)
    for ox in frac:
        for oy in frac:
            for oz in frac:
                mu, a = _labels((centres + ox * h)[:, None, None], (centres + oy * h)[None, :, None],
                                (centres + oz * h)[None, None, :], s, **kw)
                vol += mu
                air += a
    k = supersample**3
    voxel_mm = BOX_MM / n
    return (vol / k).astype(np.float32), float(air.sum() / k) * voxel_mm**3 / 1000.0, (voxel_mm,) * 3


# ------------------------------------------------------------------------------------------- shared segmentation
# One compiled program for all the test modules (the segmentation compiles in ~10 s on the dev CPU): every call
# passes [BATCH, n, n, n] volumes (n = 48 in the tests), the threshold (NaN = auto) and the component fraction as
# traced values, and converts voxel counts to mL on the host.
BATCH = 6
_segment = jax.jit(jax.vmap(lambda v, t, f: tidal.segment_lungs(v, t, tidal.ERODE_VOXELS, f), in_axes=(0, None, None)))


def segment(vols, lung_threshold=None, min_component_fraction=tidal.MIN_COMPONENT_FRACTION):
    """(lungs bool [k, ...], body bool [k, ...], thresholds [k]) of k <= BATCH volumes [k, n, n, n]."""
    vols = np.asarray(vols, np.float32)
    k = vols.shape[0]
    if k > BATCH:
        raise ValueError(f"segment: at most {BATCH} volumes per call, got {k}")
    padded = np.concatenate([vols, np.repeat(vols[-1:], BATCH - k, axis=0)])
    t = np.float32(np.nan if lung_threshold is None else lung_threshold)
    out = _segment(padded, t, np.float32(min_component_fraction))
    return tuple(np.asarray(x)[:k] for x in out)


def lung_ml(vols, voxel_mm, lung_threshold=None):
    """(lung + airway volumes in mL [k], thresholds [k]) of k volumes (see `segment`)."""
    lungs, _, thr = segment(vols, lung_threshold)
    return lungs.reshape(lungs.shape[0], -1).sum(axis=1) * float(np.prod(voxel_mm)) / 1000.0, thr
