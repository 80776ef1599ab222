"""Analytic 4D breathing thorax phantom with exact voxelisation and exact line integrals.

The phantom is a sum of `Primitive`s (x2gs_jax/data/shapes.py): ellipsoids and z-aligned, z-capped
elliptic cylinders, each possibly minus one convex cutter, with ADDITIVE attenuation increments.
A line integral is therefore an exact sum of closed-form chord lengths.

Layout ("box units"): the anatomy is defined in q in [-1, 1]^3 and mapped per axis onto the
reconstruction box (world x = box_centre + box_half * q), so it fills ~90 % of the box laterally and
lies entirely inside it; mu = 0 outside the body. Axes: x = patient left-right, y = posterior (-)
to anterior (+), z = inferior (-) to superior (+) (the rotation axis). For the generator's 300 mm box,
1 box unit = 150 mm.

Composed attenuation (normalised, all values in [0, 1]): air 0, lungs 0.07, vessels 0.45, soft
tissue 0.5, liver 0.56, heart 0.58, tumour 0.67, bone 0.94 (rib over liver 1.0).

Motion with the breathing state s = s(t) (0 end-exhale, 1 nominal end-inhale), each primitive moving
by an axis-aligned affine map (so it stays an ellipsoid / cylinder and chords stay exact):
  * chest: anterior-posterior expansion anchored at the back, anterior wall +0.045 s (6.75 mm at
    150 mm/unit); applies to body, ribs, lungs, domes, heart, lung features.
  * lungs: stretched in z about their (fixed) apex so the base descends DZ s = 0.12 s (18 mm);
    lung features (vessels, tumour) follow the same map, i.e. their SI shift is proportional to the
    distance from the apex.
  * diaphragm domes (lung cutters, liver / stomach tops): translate down DZ s, like the lung bases.
  * heart: translates down DZ s / 2.

Lung air volume is exact in closed form: each lung is an axis-aligned ellipsoid minus a dome
ellipsoid with concentric, similar horizontal cross-sections (see
`shapes.ellipsoid_minus_coaxial_ellipsoid_volume`), minus its embedded, pairwise disjoint features.
No other primitive touches a lung (checked by tests/test_phantom.py on a fine grid).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from x2gs_jax.data import shapes as sh
from x2gs_jax.data.breathing import BreathingSignal
from x2gs_jax.geometry import Scanner

# ------------------------------------------------------------------------------- layout constants
DZ = 0.12  # lung-base / diaphragm descent at s = 1 (box units)
CHEST_AP = 0.045  # anterior chest-wall excursion at s = 1 (box units)
BODY_SEMI = (0.9, 0.6)  # body cross-section semi-axes (x, y)
BODY_HALF_Z = 0.9
Y_BACK = -BODY_SEMI[1]  # posterior body wall: the fixed anchor of the chest expansion

MU_SOFT = 0.50
MU_LUNG = 0.07
MU_BONE = 0.94
MU_VESSEL = 0.45
MU_TUMOUR = 0.67
D_LIVER, D_STOMACH, D_HEART = 0.06, 0.03, 0.08

LUNG_X, LUNG_Y, LUNG_Z = 0.40, 0.0, 0.08
LUNG_SEMI = (0.28, 0.36, 0.54)
DOME_K = 1.3  # dome cross-section / lung cross-section (concentric, similar)
DOME_TOP = -0.30
DOME_C = 0.38
LIVER_SHRINK = 0.95  # liver = dome shrunk about its centre: a soft-tissue diaphragm stays between
ABDOMEN_FLOOR = -0.86
RIB_Z = (0.50, 0.34, 0.18, 0.02, -0.14, -0.30, -0.46)
RIB_OUTER, RIB_INNER, RIB_HALF_Z = (0.84, 0.55), (0.79, 0.50), 0.028


def _lung_apex_z() -> float:
    return LUNG_Z + LUNG_SEMI[2]


@dataclasses.dataclass(frozen=True, eq=False)
class _Part:
    """A primitive at rest (box units) with the names of the motions of its shape and cutter."""

    prim: sh.Primitive
    motion: str
    cutter_motion: Optional[str] = None
    floor: Optional[float] = None  # z clip applied after motion (keeps the liver inside the body)
    role: str = "other"  # "lung", "feature:<lung>", "airway", "body" or "other"


def _motions(s: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Axis-aligned affine maps x -> scale * x + shift (box units) for breathing state s."""
    ay = 1.0 + CHEST_AP / (2 * BODY_SEMI[1]) * s
    chest_scale = np.array([1.0, ay, 1.0])
    chest_shift = np.array([0.0, Y_BACK * (1.0 - ay), 0.0])
    lam = 1.0 + DZ * s / (2 * LUNG_SEMI[2])
    apex = _lung_apex_z()
    lung_scale = chest_scale * np.array([1.0, 1.0, lam])
    lung_shift = chest_shift + np.array([0.0, 0.0, apex * (1.0 - lam)])
    return {
        "fixed": (np.ones(3), np.zeros(3)),
        "chest": (chest_scale, chest_shift),
        "lung": (lung_scale, lung_shift),
        "dome": (chest_scale, chest_shift + np.array([0.0, 0.0, -DZ * s])),
        "heart": (chest_scale, chest_shift + np.array([0.0, 0.0, -0.5 * DZ * s])),
    }


def _default_parts() -> list[_Part]:
    E, C, P = sh.ellipsoid, sh.cylinder, sh.Primitive
    parts = [
        _Part(P("body", C((0, 0, 0), BODY_SEMI, BODY_HALF_Z), MU_SOFT), "chest", role="body"),
        _Part(P("spine", C((0, -0.37, 0), (0.085, 0.10), 0.86), MU_BONE - MU_SOFT, cutter=C((0, -0.42, 0), (0.03, 0.03), 0.9)), "fixed"),
        _Part(P("trachea", C((0, 0.06, 0.60), (0.055, 0.05), 0.26), -MU_SOFT), "fixed", role="airway"),
        _Part(P("heart", E((0.04, 0.21, -0.24), (0.15, 0.12, 0.13), sh.rotation_z(-0.5)), D_HEART), "heart"),
    ]
    for z in RIB_Z:
        parts.append(_Part(P(f"rib{z:+.2f}", C((0, 0, z), RIB_OUTER, RIB_HALF_Z), MU_BONE - MU_SOFT, cutter=C((0, 0, z), RIB_INNER, 2 * RIB_HALF_Z)), "chest"))
    for side, sign in (("right", -1.0), ("left", 1.0)):
        x = sign * LUNG_X
        dome = E((x, LUNG_Y, DOME_TOP - DOME_C), (DOME_K * LUNG_SEMI[0], DOME_K * LUNG_SEMI[1], DOME_C))
        parts.append(_Part(P(f"lung_{side}", E((x, LUNG_Y, LUNG_Z), LUNG_SEMI), MU_LUNG - MU_SOFT, cutter=dome), "lung", cutter_motion="dome", role="lung"))
        abdomen = D_LIVER if side == "right" else D_STOMACH
        parts.append(_Part(P(f"liver_{side}" if side == "right" else "stomach", dome.scaled_about_center(LIVER_SHRINK), abdomen), "dome", floor=ABDOMEN_FLOOR))
        parts.append(_Part(P(f"bronchus_{side}", E((sign * 0.045, 0.06, 0.285), (0.06, 0.024, 0.024), sh.rotation_to((sign * 0.6, 0.0, -0.8))), -MU_SOFT), "fixed", role="airway"))
        # Vessels fan out from the hilum; they end well inside the lung and above the dome.
        hilum = np.array([sign * 0.20, 0.0, 0.16])
        for i, (dx, dy, dz) in enumerate(((1, 0, 0.15), (0.7, 0.5, 0.6), (0.7, -0.6, 0.5), (0.6, 0.5, -0.6), (0.5, -0.5, -0.7))):
            direction = np.array([sign * dx, dy, dz]) / np.linalg.norm([dx, dy, dz])
            centre = hilum + direction * (0.035 + 0.10)
            vessel = E(centre, (0.10, 0.018, 0.018), sh.rotation_to(direction))
            parts.append(_Part(P(f"vessel_{side}{i}", vessel, MU_VESSEL - MU_LUNG), "lung", role=f"feature:lung_{side}"))
    parts.append(_Part(P("tumour", E((-0.47, -0.14, -0.12), (0.045, 0.045, 0.045)), MU_TUMOUR - MU_LUNG), "lung", role="feature:lung_right"))
    return parts


def _move(part: _Part, motions: dict) -> _Part:
    scale, shift = motions[part.motion]
    shape = part.prim.shape.transformed(scale, shift)
    if part.floor is not None:
        shape = shape.clipped(part.floor, sh.UNBOUNDED)
    cutter = part.prim.cutter
    if cutter is not None:
        cutter = cutter.transformed(*motions[part.cutter_motion or part.motion])
    return dataclasses.replace(part, prim=dataclasses.replace(part.prim, shape=shape, cutter=cutter))


def _box_map(scanner: Scanner) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = scanner.bbox
    return (hi - lo) / 2.0, (hi + lo) / 2.0


def _to_world(prim: sh.Primitive, scanner: Scanner) -> sh.Primitive:
    half, centre = _box_map(scanner)
    cutter = None if prim.cutter is None else prim.cutter.transformed(half, centre)
    return dataclasses.replace(prim, shape=prim.shape.transformed(half, centre), cutter=cutter)


def _box_volume_to_ml(scanner: Scanner) -> float:
    half, _ = _box_map(scanner)
    mm_per_world = 1000.0 / scanner.scene_scale
    return float(np.prod(half)) * mm_per_world**3 / 1000.0


@dataclasses.dataclass(frozen=True, eq=False)
class ThoraxPhantom:
    """The breathing thorax. Times t are normalised (seconds / scan_s), as the pickle's `time`."""

    breathing: BreathingSignal
    parts: tuple

    @classmethod
    def default(cls, breathing: Optional[BreathingSignal] = None) -> "ThoraxPhantom":
        return cls(breathing if breathing is not None else BreathingSignal(), tuple(_default_parts()))

    @property
    def scan_s(self) -> float:
        return self.breathing.scan_s

    def state(self, t) -> np.ndarray:
        """Breathing state s at normalised time(s) t."""
        return self.breathing.signal_normalised(t)

    # ----------------------------------------------------------------------- primitives at a time
    def parts_at_state(self, s: float) -> list[_Part]:
        """Parts moved to breathing state s (box units)."""
        motions = _motions(float(s))
        return [_move(p, motions) for p in self.parts]

    def primitives_at(self, t: float, scanner: Scanner) -> list[sh.Primitive]:
        """The primitives at normalised time t in world units of `scanner`."""
        return [_to_world(p.prim, scanner) for p in self.parts_at_state(float(self.state(t)))]

    def _packed(self, t: float, scanner: Scanner) -> dict:
        return sh.pack(self.primitives_at(t, scanner))

    # ----------------------------------------------------------------------------- voxelisation
    def volume_at(self, t: float, scanner: Scanner, supersample: int = 3, chunk: int = 1 << 16) -> np.ndarray:
        """Voxelised attenuation at normalised time t -> float32 [nx, ny, nz] in [0, 1].

        Each voxel is the mean of the exact attenuation at supersample^3 sub-points on a regular
        grid inside the voxel (offsets ((k + 1/2) / n - 1/2) dVoxel), voxel centres as
        `scanner.voxel_centers()`.
        """
        if int(supersample) < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        n = int(supersample)
        frac = (np.arange(n) + 0.5) / n - 0.5
        offs = np.stack(np.meshgrid(frac, frac, frac, indexing="ij"), -1).reshape(-1, 3) * np.array(scanner.d_voxel)
        centres = scanner.voxel_centers().reshape(-1, 3).astype(np.float32)
        total = centres.shape[0]
        chunk = min(int(chunk), total)
        pad = (-total) % chunk
        centres = np.concatenate([centres, np.zeros((pad, 3), np.float32)])
        packed = jax.tree_util.tree_map(jnp.asarray, self._packed(t, scanner))
        offs = jnp.asarray(offs, jnp.float32)
        out = [np.asarray(_voxel_chunk(packed, jnp.asarray(centres[i : i + chunk]), offs)) for i in range(0, centres.shape[0], chunk)]
        return np.concatenate(out)[:total].reshape(scanner.n_voxel)

    def body_mask(self, t: float, scanner: Scanner) -> np.ndarray:
        """bool [nx, ny, nz]: voxel centres inside the body outline at normalised time t."""
        body = [_to_world(p.prim, scanner) for p in self.parts_at_state(float(self.state(t))) if p.role == "body"]
        return body[0].contains(scanner.voxel_centers())

    # ------------------------------------------------------------------------------- projection
    def project(self, scanner: Scanner, angles, times, progress: Optional[bool] = None, chunk_rays: int = 1 << 18) -> np.ndarray:
        """Exact line integrals -> float32 [n, H, W] in pickle units (mu x path length in metres).

        Args:
          scanner: geometry (world units); rays from `scanner.rays(angle)` (row 0 = top).
          angles: [n] gantry angles (radians). times: [n] normalised acquisition times.
          progress: show a tqdm bar (default: when more than 20 views).
          chunk_rays: rays per compiled call (views are batched up to this many rays).
        """
        angles = np.asarray(angles, dtype=np.float64).reshape(-1)
        times = np.asarray(times, dtype=np.float64).reshape(-1)
        if angles.shape != times.shape:
            raise ValueError(f"project: angles {angles.shape} and times {times.shape} must have the same length")
        n = angles.shape[0]
        H, W = scanner.n_detector
        if n == 0:
            return np.zeros((0, H, W), np.float32)
        # Views per compiled call: a power of two (few distinct shapes to compile), at most chunk_rays rays.
        per = max(1, min(1 << (n - 1).bit_length(), int(chunk_rays) // (H * W)))
        pad = (-n) % per
        states = np.concatenate([self.state(times), np.full(pad, self.state(times[-1:])[0])])
        angles_p = np.concatenate([angles, np.full(pad, angles[-1])])
        out = []
        show = n > 20 if progress is None else progress
        for i in tqdm(range(0, n + pad, per), desc="projecting", unit="chunk", disable=not show):
            packs = [sh.pack([_to_world(p.prim, scanner) for p in self.parts_at_state(s)]) for s in states[i : i + per]]
            packed = jax.tree_util.tree_map(jnp.asarray, sh.stack_packed(packs))
            out.append(np.asarray(_project_chunk(scanner, packed, jnp.asarray(angles_p[i : i + per], jnp.float32))))
        return np.concatenate(out)[:n]

    # ---------------------------------------------------------------------------------- volumes
    def lung_volume_ml(self, t: float, scanner: Scanner) -> float:
        """Exact lung air volume (mL) at normalised time t: lungs minus domes minus embedded features."""
        parts = self.parts_at_state(float(self.state(t)))
        vol = 0.0
        for p in parts:
            if p.role == "lung":
                vol += sh.ellipsoid_minus_coaxial_ellipsoid_volume(p.prim.shape, p.prim.cutter)
            elif p.role.startswith("feature:"):
                vol -= p.prim.shape.volume()
        return vol * _box_volume_to_ml(scanner)

    def airway_volume_ml(self, scanner: Scanner) -> float:
        """Exact volume (mL) of the air-filled airways (trachea, bronchi), constant in time.

        A threshold segmentation of air inside the body finds lungs + airways.
        """
        return sum(p.prim.shape.volume() for p in self.parts if p.role == "airway") * _box_volume_to_ml(scanner)


@jax.jit
def _voxel_chunk(packed: dict, centres: jax.Array, offsets: jax.Array) -> jax.Array:
    """Mean attenuation over sub-points centres[:, None] + offsets -> [N] float32."""

    def body(i, acc):
        return acc + sh.densities(packed, centres + offsets[i])

    acc = jax.lax.fori_loop(0, offsets.shape[0], body, jnp.zeros(centres.shape[0], jnp.float32))
    return acc / offsets.shape[0]


@functools.partial(jax.jit, static_argnums=0)
def _project_chunk(scanner: Scanner, packed: dict, angles: jax.Array) -> jax.Array:
    """Line integrals [v, H, W] (metres) for v views with per-view primitives packed [v, P, ...]."""

    def one(pk, angle):
        origins, dirs = scanner.rays(angle)
        if scanner.mode == "cone":
            origins = origins[:1, :1]  # one source per view: keeps origin-only work out of the ray loop
        return sh.line_integrals(pk, origins, dirs) / scanner.scene_scale

    return jax.vmap(one)(packed, angles)
