"""X2-Gaussian deformation field: HexPlane features, decoder heads, offset application, period shift."""
from x2gs_jax.fields.decoder import DeformationDecoder, num_decoder_params, torch_default_bias_init
from x2gs_jax.fields.deformation import (
    DeformationConfig,
    apply_offsets,
    deform,
    deformation_offsets,
    init_deformation_params,
    make_deform,
    num_deformation_params,
)
from x2gs_jax.fields.hexplane import (
    PLANE_PAIRS,
    SPATIAL_PLANES,
    TIME_PLANES,
    hexplane_features,
    init_grid,
    normalise_coords,
    num_grid_params,
    plane_shapes,
    sample_plane,
    spatial_planes,
    time_planes,
)
from x2gs_jax.fields.period import TimeShift, init_tau, period_seconds, require_valid, shifted_time

__all__ = [
    "DeformationConfig", "DeformationDecoder", "PLANE_PAIRS", "SPATIAL_PLANES", "TIME_PLANES", "TimeShift",
    "apply_offsets", "deform", "deformation_offsets", "hexplane_features", "init_deformation_params", "init_grid",
    "init_tau", "make_deform", "normalise_coords", "num_decoder_params", "num_deformation_params",
    "num_grid_params", "period_seconds", "plane_shapes", "require_valid", "sample_plane", "shifted_time",
    "spatial_planes", "time_planes", "torch_default_bias_init",
]
