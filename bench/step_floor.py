"""A floor for the X2 fine-stage training step (issue 18): the least memory traffic and work one iteration must do.

  python bench/step_floor.py --gaussians 200000 --detector 512 --measured 21.25,15.90

Counted per iteration of the fine stage with the periodic render on (the view at t and the render at t + kT), for
the default X2 config (configs/x2_gaussian.py; `--config` picks another file, `:variant` allowed):
  * optimiser: every trained float is read as parameter, gradient and two moments and written as parameter and two
    moments (28 B), and its gradient is written once by the backward pass (4 B): field planes, decoder, Gaussians
    (11 floats each: xyz 3, log-scale 3, rotation 4, density 1), the period;
  * field: the planes read once by the forward pass and once by the backward pass (4 B each per float);
  * decoder: 2·(weights) flops per point and time, forward and two backward products (×3), at the H200's dense TF32
    tensor-core rate (what XLA uses for these float32 GEMMs by default);
  * render: `--render-floor-ms` per view, forward + backward (default: BENCHMARKS.md's rasterizer floor at 512²,
    200k Gaussians, 0.326 ms, from `bench/render.py`), times 2 views.
Memory at the H200's peak 4.8 TB/s. Not counted: the [N, features] intermediate arrays (a fully fused field and
decoder would not write them), the TV patch, the losses, the densification statistics — so this is a lower bound.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from x2gs_jax.fields import hexplane  # noqa: E402
from x2gs_jax.fields.decoder import num_decoder_params  # noqa: E402
from x2gs_jax.fields.deformation import DeformationConfig  # noqa: E402

HBM_BPS = 4.8e12  # H200 peak memory bandwidth, bytes/s
TF32_FLOPS = 495e12  # H200 dense TF32 tensor-core rate, flop/s
GAUSSIAN_FLOATS = 11  # xyz 3, log-scale 3, rotation 4, density 1
TIMES = 2  # the view at t and the periodic render at t + kT


def step_floor(field: DeformationConfig, gaussians: int, render_floor_ms: float) -> dict:
    """{component: ms} and the total, for one fine-stage iteration (see the module docstring)."""
    grid = hexplane.num_grid_params(field.resolution, field.multires, field.features)
    dec = num_decoder_params(field.feature_dim, field.net_width, field.defor_depth)
    trained = grid + dec + GAUSSIAN_FLOATS * gaussians + 1
    parts = {
        "optimiser + gradient write (32 B per trained float)": 32 * trained / HBM_BPS * 1e3,
        "field planes read by forward and backward (8 B per float)": 8 * grid / HBM_BPS * 1e3,
        "decoder GEMMs (TF32)": 3 * 2 * dec * gaussians * TIMES / TF32_FLOPS * 1e3,
        "render forward + backward (2 views)": TIMES * render_floor_ms,
    }
    return {"trained_floats": trained, "grid_floats": grid, "decoder_floats": dec, "parts_ms": parts,
            "floor_ms": sum(parts.values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/x2_gaussian.py", help="config file[:variant]")
    ap.add_argument("--gaussians", type=int, default=200_000)
    ap.add_argument("--render-floor-ms", type=float, default=0.326, help="rasterizer fwd+bwd floor per view")
    ap.add_argument("--measured", default="", help="comma-separated measured ms/it to divide by the floor")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    import importlib.util

    path, _, variant = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    field = DeformationConfig.from_config(mod.get_config(variant or None).model.field)
    out = step_floor(field, args.gaussians, args.render_floor_ms)
    print(f"X2 fine step floor, {args.config}, N = {args.gaussians}: {out['trained_floats'] / 1e6:.1f} M trained "
          f"floats ({out['grid_floats'] / 1e6:.1f} M in the planes)")
    for name, ms in out["parts_ms"].items():
        print(f"  {ms:7.3f} ms  {name}")
    print(f"  {out['floor_ms']:7.3f} ms  floor")
    out["measured"] = {}
    for m in filter(None, args.measured.split(",")):
        out["measured"][m] = float(m) / out["floor_ms"]
        print(f"  measured {float(m):.2f} ms/it = {float(m) / out['floor_ms']:.1f}x the floor")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(out, config=args.config, gaussians=args.gaussians), f, indent=1)


if __name__ == "__main__":
    main()
