"""Scanner geometry and X-ray cameras with the reference (R2/X2-Gaussian) conventions.

Units. NAF pickles store lengths in millimetres. `Scanner.from_naf` converts them to metres and then
to *world units* by `scene_scale = 2 / max(sVoxel_m)` (metres^-1), so the longest side of the
reconstruction box is 2 world units. Everything a `Scanner` exposes is in world units unless the
name ends in `_mm`.

Axes (data_format.md §5). World z is the rotation axis. For gantry angle theta the X-ray source sits at
C = DSO (cos theta, sin theta, 0); camera axes in world coordinates are
    right  r = (-sin theta, cos theta, 0)   (+column, pixel x)
    down   d = (0, 0, -1)                  (+row, pixel y; row 0 is the top, largest z)
    fwd    f = (-cos theta, -sin theta, 0)  (source -> isocentre)
Pixel (row i, col j) of a cone-beam detector sits at C + DSD f + u r + v d with
u = (j + 1/2 - W/2) du + off_u, v = (i + 1/2 - H/2) dv + off_v.

Detector offsets. `offDetector = [u, v]` (mm in the pickle) displaces the detector centre by off_u
along r and off_v along d. The reference renderer ignores it; we model it both in the ray generator
and in the camera as a principal-point shift (a translation of NDC), so data with an offset detector
(e.g. half-fan acquisitions) is registered correctly. With zero offsets every matrix equals the
reference's bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from x2gs_jax.mathutil import apply_rows, mm

# Reference constants (rasterizer.md §2.3, §8).
ZNEAR = 0.01
ZFAR = 100.0

MODES = ("cone", "parallel")


@struct.dataclass
class Camera:
    """One X-ray view, a pytree (arrays may carry a leading batch axis under `jax.vmap`).

    Attributes:
      viewmatrix: [4, 4] world -> camera (column-vector convention, V = c2w^-1).
      projmatrix: [4, 4] camera -> clip (P; identity-like for parallel beam).
      full_projmatrix: [4, 4] P @ V.
      tanfovx, tanfovy: [] tan of half the field of view (1 for parallel beam, as the reference).
      focal_x, focal_y: [] focal lengths in pixels (W / (2 tanfovx), H / (2 tanfovy)).
      campos: [3] source position (cone) or detector-plane reference point (parallel), world units.
      width, height: detector size in pixels (static).
      mode: "cone" or "parallel" (static).
    """

    viewmatrix: jax.Array
    projmatrix: jax.Array
    full_projmatrix: jax.Array
    tanfovx: jax.Array
    tanfovy: jax.Array
    focal_x: jax.Array
    focal_y: jax.Array
    campos: jax.Array
    width: int = struct.field(pytree_node=False)
    height: int = struct.field(pytree_node=False)
    mode: str = struct.field(pytree_node=False, default="cone")

    @property
    def viewmatrix_rowvec(self) -> jax.Array:
        """V^T: the 'row-vector' storage handed to the reference CUDA kernel (rasterizer.md §2.2)."""
        return jnp.swapaxes(self.viewmatrix, -1, -2)

    @property
    def fullproj_rowvec(self) -> jax.Array:
        """(P V)^T: the reference kernel's projmatrix storage."""
        return jnp.swapaxes(self.full_projmatrix, -1, -2)

    def world_to_pixel(self, points: jax.Array) -> jax.Array:
        """Project world points [..., 3] to pixel coordinates [..., 2] (x = column, y = row).

        Pixel centres are integers; exactly the reference mapping of rasterizer.md §2.5.
        """
        h = apply_rows(points, self.full_projmatrix[:3, :3]) + self.full_projmatrix[:3, 3]
        hw = jnp.sum(points * self.full_projmatrix[3, :3], axis=-1) + self.full_projmatrix[3, 3]
        ndc = h[..., :2] / (hw[..., None] + 1e-7)
        size = jnp.array([self.width, self.height], dtype=ndc.dtype)
        return ((ndc + 1.0) * size - 1.0) / 2.0


def _as_tuple(value: Any, n: int, key: str) -> tuple[float, ...]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"scanner key '{key}': expected {n} values, got shape {np.shape(value)}")
    return tuple(float(x) for x in arr)


@dataclasses.dataclass(frozen=True)
class Scanner:
    """A CT scanner in world units (hashable, so it can be a static argument of `jax.jit`).

    Attributes (world units unless stated):
      mode: "cone" or "parallel".
      DSD, DSO: source-detector and source-isocentre distances.
      n_detector: (H, W) = (rows, cols) in pixels.
      d_detector: (dv, du) pixel pitch.
      n_voxel: (nx, ny, nz); d_voxel: (dx, dy, dz); off_origin: (x, y, z) volume centre.
      off_detector: (off_u, off_v) detector-centre offset.
      scene_scale: world units per metre (2 / max(sVoxel in metres)).
    """

    mode: str
    DSD: float
    DSO: float
    n_detector: tuple[int, int]
    d_detector: tuple[float, float]
    n_voxel: tuple[int, int, int]
    d_voxel: tuple[float, float, float]
    off_origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    off_detector: tuple[float, float] = (0.0, 0.0)
    scene_scale: float = 1.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"scanner mode must be one of {MODES}, got {self.mode!r}")
        for name in ("n_detector", "n_voxel"):
            if any(int(v) <= 0 for v in getattr(self, name)):
                raise ValueError(f"scanner {name} must be positive, got {getattr(self, name)}")
        for name in ("d_detector", "d_voxel"):
            if any(not (v > 0 and math.isfinite(v)) for v in getattr(self, name)):
                raise ValueError(f"scanner {name} must be positive and finite, got {getattr(self, name)}")
        if self.mode == "cone" and not (self.DSD > self.DSO > 0):
            raise ValueError(f"cone beam needs DSD > DSO > 0, got DSD={self.DSD}, DSO={self.DSO}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_naf(cls, d: Mapping[str, Any]) -> "Scanner":
        """Build from a NAF pickle's scanner keys (lengths in mm), as the reference reader does."""
        missing = [k for k in ("DSD", "DSO", "nDetector", "dDetector", "nVoxel", "dVoxel") if k not in d]
        if missing:
            raise KeyError(f"scanner keys missing: {missing}")
        n_voxel = tuple(int(v) for v in np.asarray(d["nVoxel"]).reshape(-1))
        n_detector = tuple(int(v) for v in np.asarray(d["nDetector"]).reshape(-1))
        if len(n_voxel) != 3:
            raise ValueError(f"scanner key 'nVoxel': expected 3 values, got {n_voxel}")
        if len(n_detector) != 2:
            raise ValueError(f"scanner key 'nDetector': expected 2 values, got {n_detector}")
        d_voxel_m = np.array(_as_tuple(d["dVoxel"], 3, "dVoxel")) / 1000.0
        if np.any(d_voxel_m <= 0):
            raise ValueError(f"scanner key 'dVoxel' must be positive, got {d['dVoxel']}")
        s_voxel_m = np.array(n_voxel) * d_voxel_m
        scale = 2.0 / float(np.max(s_voxel_m))
        mm = scale / 1000.0  # mm -> world units
        off_origin = _as_tuple(d.get("offOrigin", (0, 0, 0)) if d.get("offOrigin") is not None else (0, 0, 0), 3, "offOrigin")
        off_det = _as_tuple(d.get("offDetector", (0, 0)) if d.get("offDetector") is not None else (0, 0), 2, "offDetector")
        mode = str(d.get("mode", "cone"))
        return cls(
            mode=mode,
            DSD=float(d["DSD"]) * mm,
            DSO=float(d["DSO"]) * mm,
            n_detector=(n_detector[0], n_detector[1]),
            d_detector=tuple(v * mm for v in _as_tuple(d["dDetector"], 2, "dDetector")),
            n_voxel=n_voxel,
            d_voxel=tuple(float(v) * scale for v in d_voxel_m),
            off_origin=tuple(v * mm for v in off_origin),
            off_detector=tuple(v * mm for v in off_det),
            scene_scale=scale,
        )

    def to_naf(self) -> dict:
        """The scanner keys of a NAF pickle (lengths in mm, inverse of `from_naf`)."""
        to_mm = 1000.0 / self.scene_scale
        return {
            "DSD": self.DSD * to_mm,
            "DSO": self.DSO * to_mm,
            "nDetector": np.array(self.n_detector, dtype=np.int64),
            "dDetector": np.array(self.d_detector) * to_mm,
            "nVoxel": np.array(self.n_voxel, dtype=np.int64),
            "dVoxel": np.array(self.d_voxel) * to_mm,
            "offOrigin": np.array(self.off_origin) * to_mm,
            "offDetector": np.array(self.off_detector) * to_mm,
            "mode": self.mode,
        }

    # ------------------------------------------------------------------ derived sizes
    @property
    def height(self) -> int:
        return int(self.n_detector[0])

    @property
    def width(self) -> int:
        return int(self.n_detector[1])

    @property
    def s_detector(self) -> tuple[float, float]:
        """Detector size (sv, su) in world units."""
        return (self.n_detector[0] * self.d_detector[0], self.n_detector[1] * self.d_detector[1])

    @property
    def s_voxel(self) -> tuple[float, float, float]:
        """Reconstruction box size (sx, sy, sz) in world units."""
        return tuple(n * d for n, d in zip(self.n_voxel, self.d_voxel))

    @property
    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruction box (min [3], max [3]) in world units: offOrigin -/+ sVoxel/2."""
        c, s = np.array(self.off_origin), np.array(self.s_voxel)
        return c - s / 2, c + s / 2

    @property
    def d_voxel_mm(self) -> tuple[float, float, float]:
        return tuple(v * 1000.0 / self.scene_scale for v in self.d_voxel)

    def voxel_centers(self) -> np.ndarray:
        """World coordinates [nx, ny, nz, 3] of the voxel centres (data_format.md §5)."""
        lo, _ = self.bbox
        axes = [lo[a] + (np.arange(self.n_voxel[a]) + 0.5) * self.d_voxel[a] for a in range(3)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    # ------------------------------------------------------------------ per-view geometry
    def frame(self, angle):
        """Source C [3] and unit axes (r, d, f) [3] each, for gantry angle(s) (rad); works on arrays."""
        angle = jnp.asarray(angle, dtype=jnp.float32)
        c, s = jnp.cos(angle), jnp.sin(angle)
        zero, one = jnp.zeros_like(c), jnp.ones_like(c)
        source = jnp.stack([self.DSO * c, self.DSO * s, zero], axis=-1)
        right = jnp.stack([-s, c, zero], axis=-1)
        down = jnp.stack([zero, zero, -one], axis=-1)
        fwd = jnp.stack([-c, -s, zero], axis=-1)
        return source, right, down, fwd

    def camera(self, angle) -> Camera:
        """The reference camera for a gantry angle (radians); `jax.jit(jax.vmap(scanner.camera))(angles)` batches
        (as the trainer and the evaluator do: one compiled program instead of one per op, the same rounding)."""
        source, right, down, fwd = self.frame(angle)
        rot_w2c = jnp.stack([right, down, fwd], axis=0)  # rows = camera axes in world coords
        trans = -apply_rows(source, rot_w2c)
        view = jnp.eye(4, dtype=jnp.float32).at[:3, :3].set(rot_w2c).at[:3, 3].set(trans)
        H, W = self.n_detector
        if self.mode == "cone":
            su = W * self.d_detector[1]
            sv = H * self.d_detector[0]
            tanx = su / 2.0 / self.DSD
            tany = sv / 2.0 / self.DSD
            # Principal-point shift from the detector offset: NDC moves by -off / (s/2).
            proj = np.zeros((4, 4), dtype=np.float64)
            proj[0, 0] = 1.0 / tanx
            proj[1, 1] = 1.0 / tany
            proj[0, 2] = -self.off_detector[0] / (su / 2.0)
            proj[1, 2] = -self.off_detector[1] / (sv / 2.0)
            proj[3, 2] = 1.0
            proj[2, 2] = ZFAR / (ZFAR - ZNEAR)
            proj[2, 3] = -(ZFAR * ZNEAR) / (ZFAR - ZNEAR)
        else:
            tanx = tany = 1.0
            proj = np.eye(4, dtype=np.float64)
            proj[0, 3] = -self.off_detector[0]
            proj[1, 3] = -self.off_detector[1]
        proj = jnp.asarray(proj, dtype=jnp.float32)
        return Camera(
            viewmatrix=view,
            projmatrix=proj,
            full_projmatrix=mm(proj, view),
            tanfovx=jnp.float32(tanx),
            tanfovy=jnp.float32(tany),
            focal_x=jnp.float32(W / (2.0 * tanx)),
            focal_y=jnp.float32(H / (2.0 * tany)),
            campos=source,
            width=W,
            height=H,
            mode=self.mode,
        )

    def detector_uv(self) -> tuple[np.ndarray, np.ndarray]:
        """Detector-plane coordinates (u [W], v [H]) of the pixel centres, offsets included.

        Cone: lengths on the detector (world units). Parallel: lateral ray offsets (the detector spans
        [-1, 1] world units, as the reference's identity projection implies).
        """
        H, W = self.n_detector
        if self.mode == "cone":
            u = (np.arange(W) + 0.5 - W / 2) * self.d_detector[1]
            v = (np.arange(H) + 0.5 - H / 2) * self.d_detector[0]
        else:
            u = (2 * np.arange(W) + 1) / W - 1.0
            v = (2 * np.arange(H) + 1) / H - 1.0
        return u + self.off_detector[0], v + self.off_detector[1]

    def rays(self, angle) -> tuple[jax.Array, jax.Array]:
        """Per-pixel ray origins [H, W, 3] and unit directions [H, W, 3] in world units.

        Cone: every origin is the source. Parallel: origins on the plane through the source
        perpendicular to the view direction; directions all equal f.
        """
        source, right, down, fwd = self.frame(angle)
        u, v = self.detector_uv()
        u = jnp.asarray(u, jnp.float32)[None, :, None]
        v = jnp.asarray(v, jnp.float32)[:, None, None]
        H, W = self.n_detector
        if self.mode == "cone":
            det = source + self.DSD * fwd + u * right + v * down
            dirs = det - source
            dirs = dirs / jnp.linalg.norm(dirs, axis=-1, keepdims=True)
            origins = jnp.broadcast_to(source, (H, W, 3))
        else:
            origins = source + u * right + v * down
            dirs = jnp.broadcast_to(fwd, (H, W, 3))
        return origins, dirs
