"""Volume queries and reconstruction metrics used during training and by eval.py.

Conventions (gaussians.md §7, x2gaussian.md §12): the full volume is voxelized on the GT grid
(center offOrigin, nVoxel, sVoxel); PSNR3D has peak 1; SSIM3D averages 2D SSIM over non-empty GT
slices along each axis; 2D metrics normalise each projection by its own max. 4D cases are queried at
the mid-times of the phases of the first breathing cycle, t_k = (phase_offset + (k + 1/2) T/P) / scan_s.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax import metrics as M
from x2gs_jax.geometry import Scanner
from x2gs_jax.render import Grid, rasterize, voxelize


def phase_mid_times(n_phases: int = 10, cycle_s: float = 3.0, scan_s: float = 60.0) -> np.ndarray:
    """Normalised query times of the phase volumes: (k + 1/2) cycle/P / scan (0.15 + 0.3 k s for the defaults)."""
    return ((np.arange(n_phases) + 0.5) * cycle_s / n_phases) / scan_s


def full_grid(scanner: Scanner) -> Grid:
    return Grid(n=tuple(scanner.n_voxel), size=tuple(scanner.s_voxel), center=tuple(scanner.off_origin))


def _compiled(jit_cache: Optional[dict], key: tuple, build: Callable) -> Callable:
    """build() once per key when the caller keeps a cache, else every call."""
    if jit_cache is None:
        return build()
    if key not in jit_cache:
        jit_cache[key] = build()
    return jit_cache[key]


def _with_params(gaussians_at: Callable, params) -> Callable:
    """`(params, t) -> Gaussians` from either form of `gaussians_at` (see query_volumes)."""
    return gaussians_at if params is not None else (lambda _, t: gaussians_at(t))


def query_volumes(gaussians_at: Callable, times: Sequence[float], grid: Grid, *, backend: str = "auto",
                  culling: str = "extent", params=None, jit_cache: Optional[dict] = None) -> np.ndarray:
    """Volumes [T, nx, ny, nz] of the Gaussians at each time (one compiled function, looped on host).

    gaussians_at: `t -> Gaussians`, or `(params, t) -> Gaussians` when `params` is given. Pass the parameters
    that way for anything large: a closure would embed them in the compiled program as constants (slow to
    compile, and recompiled for every new value). jit_cache: a dict owned by the caller in which the compiled
    function is kept, so later calls with the same shapes (e.g. every in-training evaluation) reuse it.
    """
    at = _with_params(gaussians_at, params)
    key = ("volumes", tuple(int(v) for v in grid.n), tuple(np.asarray(grid.size, np.float64).tolist()),
           tuple(np.asarray(grid.center, np.float64).tolist()), backend, culling,
           gaussians_at if params is None else None)
    fn = _compiled(jit_cache, key, lambda: jax.jit(
        lambda p, t: voxelize(at(p, t), grid, culling=culling, backend=backend)))
    return np.stack([np.asarray(fn(params, jnp.float32(t))) for t in times])


def volume_report(gt: np.ndarray, pred: np.ndarray) -> dict:
    """PSNR3D/SSIM3D per volume and their means; gt, pred [P, nx, ny, nz] or [nx, ny, nz]."""
    gt = np.asarray(gt, np.float32)
    pred = np.asarray(pred, np.float32)
    if gt.ndim == 3:
        gt, pred = gt[None], pred[None]
    psnr, ssim = [], []
    for g, p in zip(gt, pred):
        r = M.volume_metrics_host(g, p)
        psnr.append(r["psnr_3d"])
        ssim.append(r["ssim_3d"])
    return {"psnr_3d": psnr, "ssim_3d": ssim, "psnr_3d_mean": float(np.mean(psnr)), "ssim_3d_mean": float(np.mean(ssim))}


def render_views(gaussians_at: Callable, cameras, times, *, backend: str = "auto",
                 max_pairs: Optional[int] = None, params=None, jit_cache: Optional[dict] = None) -> np.ndarray:
    """Render every camera (batched Camera [n]) at its time: [n, H, W] scene-scaled projections.

    gaussians_at, params, jit_cache: as in `query_volumes`."""
    at = _with_params(gaussians_at, params)
    key = ("views", backend, max_pairs, gaussians_at if params is None else None)
    fn = _compiled(jit_cache, key, lambda: jax.jit(
        lambda p, cam, t: rasterize(at(p, t), cam, backend=backend, max_pairs=max_pairs)))
    n = int(np.shape(times)[0])
    out = []
    for i in range(n):
        cam = jax.tree.map(lambda x: x[i], cameras)
        out.append(np.asarray(fn(params, cam, jnp.float32(times[i]))))
    return np.stack(out)


def projection_report(gt: np.ndarray, pred: np.ndarray) -> dict:
    r = M.metrics_2d_host(gt, pred)
    return {"psnr_2d": float(r["psnr_2d"]), "ssim_2d": float(r["ssim_2d"])}
