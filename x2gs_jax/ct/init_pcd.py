"""Initial Gaussian point cloud `init_<stem>.npy` from an FDK of the training projections.

Semantics of the reference `initialize_pcd.py` (gaussians.md §2.1, x2gaussian.md §13, data_format.md §6):
  * "fdk": FDK of ALL training projections (every time pooled: a motion-blurred average for 4D cases),
    in world geometry so values are in density units; keep voxels with value > `density_thresh`;
    draw `n_points` of them uniformly without replacement (error if fewer exist);
    position = (i, j, k)·dVoxel − sVoxel/2 + offOrigin (voxel *corner* convention, half a voxel off the
    voxel centres — kept as in the reference), density = value × `density_rescale`.
  * "random": positions uniform in the box offOrigin + sVoxel·(U[0,1)³ − ½), density U[0, 1).
Output: float64 [n_points, 4] = (x, y, z) in world units, density.

CLI: python -m x2gs_jax.ct.init_pcd --data case.pickle [--n_points 50000 --density_thresh 0.05
     --density_rescale 0.15 --method fdk|random --seed 0 --output PATH]
writes `<dir of the pickle>/init_<stem>.npy` (stem = basename cut at the first dot) atomically.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from x2gs_jax.ct.fdk import fdk
from x2gs_jax.data.naf import Case

METHODS = ("fdk", "random")


def corner_positions(indices: np.ndarray, scanner) -> np.ndarray:
    """World positions [N, 3] (float64) of voxel indices [N, 3] with the reference's corner convention."""
    d = np.asarray(scanner.d_voxel, np.float64)
    s = np.asarray(scanner.s_voxel, np.float64)
    return np.asarray(indices, np.float64) * d - s / 2.0 + np.asarray(scanner.off_origin, np.float64)


def init_points(
    case: Case,
    n_points: int = 50000,
    density_thresh: float = 0.05,
    density_rescale: float = 0.15,
    method: str = "fdk",
    seed: int = 0,
    *,
    name: Optional[str] = None,
    progress: bool = True,
    volume: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Initial point cloud of a case.

    Args:
      case: a loaded case (`case.scanner`, `case.train.projections` [n, H, W] pickle units, `case.train.angles`).
      n_points: points to draw.
      density_thresh: FDK value a voxel must exceed (density units).
      density_rescale: factor from FDK value to initial Gaussian density.
      method: "fdk" or "random".
      seed: seed of the numpy Generator used for the draw.
      name: case name used in error messages (e.g. the pickle's stem).
      progress: tqdm progress bar over the FDK's view blocks.
      volume: optional precomputed FDK volume [nx, ny, nz] (skips the FDK; for reuse and tests).
    Returns:
      float64 [n_points, 4]: x, y, z (world units), density.
    Raises:
      ValueError: bad arguments, or fewer than n_points voxels above the threshold (names the case).
    """
    label = name or "case"
    if method not in METHODS:
        raise ValueError(f"{label}: init method must be one of {METHODS}, got {method!r}")
    if int(n_points) != n_points or n_points <= 0:
        raise ValueError(f"{label}: n_points must be a positive integer, got {n_points}")
    n_points = int(n_points)
    rng = np.random.default_rng(seed)
    scanner = case.scanner
    if method == "random":
        s = np.asarray(scanner.s_voxel, np.float64)
        lo = np.asarray(scanner.off_origin, np.float64) - s / 2.0
        xyz = lo + s * rng.random((n_points, 3))
        dens = rng.random(n_points)
        return np.concatenate([xyz, dens[:, None]], axis=1)

    if volume is None:
        if len(case.train) == 0:
            raise ValueError(f"{label}: no training projections to reconstruct from")
        volume = fdk(case.train.projections, scanner, case.train.angles, progress=progress)
    vol = np.asarray(volume, dtype=np.float64)
    if vol.shape != tuple(scanner.n_voxel):
        raise ValueError(f"{label}: FDK volume shape {vol.shape} != nVoxel {tuple(scanner.n_voxel)}")
    idx = np.argwhere(vol > density_thresh)  # C order (i, j, k)
    if idx.shape[0] < n_points:
        raise ValueError(
            f"{label}: only {idx.shape[0]} voxels have FDK value > density_thresh={density_thresh}, "
            f"fewer than n_points={n_points}; lower --density_thresh or --n_points, or use --method random")
    pick = idx[rng.choice(idx.shape[0], size=n_points, replace=False)]
    xyz = corner_positions(pick, scanner)
    dens = vol[pick[:, 0], pick[:, 1], pick[:, 2]] * density_rescale
    return np.concatenate([xyz, dens[:, None]], axis=1)


def save_points(path: str, points: np.ndarray) -> None:
    """Write a float64 [N, 4] point cloud as .npy atomically (temp file in the same folder + os.replace)."""
    from x2gs_jax.fileio import atomic_writer

    with atomic_writer(path) as f:
        np.save(f, np.asarray(points, dtype=np.float64))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from x2gs_jax.data.naf import case_stem, init_path, load_case

    ap = argparse.ArgumentParser(prog="python -m x2gs_jax.ct.init_pcd", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="case pickle (*.pickle / *.pkl)")
    ap.add_argument("--n_points", type=int, default=50000)
    ap.add_argument("--density_thresh", type=float, default=0.05)
    ap.add_argument("--density_rescale", type=float, default=0.15)
    ap.add_argument("--method", choices=METHODS, default="fdk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="output .npy (default: <dir>/init_<stem>.npy)")
    ap.add_argument("--no_progress", action="store_true", help="hide the FDK progress bar")
    args = ap.parse_args(argv)

    stem = case_stem(args.data)
    case = load_case(args.data)
    points = init_points(case, n_points=args.n_points, density_thresh=args.density_thresh,
                         density_rescale=args.density_rescale, method=args.method, seed=args.seed,
                         name=stem, progress=not args.no_progress)
    out = args.output or init_path(args.data)
    save_points(out, points)
    print(f"{stem}: wrote {points.shape[0]} points ({args.method}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
