"""X-ray Gaussian rendering: the rasterizer (projections) and the voxelizer (volumes)."""
from x2gs_jax.render.projection import Projected, preprocess, tile_grid
from x2gs_jax.render.rasterize import BACKENDS, rasterize, rasterize_points, resolve_backend
from x2gs_jax.render.rasterize_ref import RenderAux, count_pairs, pair_capacity, rasterize_dense

try:  # written by a parallel task; the package must import while that file does not exist yet
    from x2gs_jax.render.voxelize import Grid, voxelize, voxelize_points
except ModuleNotFoundError as err:  # pragma: no cover
    if err.name != "x2gs_jax.render.voxelize":
        raise  # a missing dependency *inside* voxelize.py is a real error

__all__ = [
    "BACKENDS",
    "Projected",
    "RenderAux",
    "count_pairs",
    "pair_capacity",
    "preprocess",
    "rasterize",
    "rasterize_dense",
    "rasterize_points",
    "resolve_backend",
    "tile_grid",
]
if "voxelize" in globals():
    __all__ += ["Grid", "voxelize", "voxelize_points"]
