"""Time the HexPlane field (x2gs_jax/fields/hexplane.py) with the fused spatial kernels vs the pure-JAX path.

  python bench/field.py --gaussians 50000 --repeats 20 --json OUT.json      # GPU
  python bench/field.py --tiny --gaussians 200 --repeats 2                  # CPU smoke test (interpreter)

Case: the X2 config's field (configs/x2_gaussian.py: resolution (64, 64, 64, 300), multires (1, 2, 4, 8), C = 32,
bounds 1.6, time_mapping "full"; --tiny: the :tiny config's (8, 8, 8, 12), (1, 2), C = 8), reference init, N
Gaussian centres concentrated like a body in the field box (normal, sigma 0.5 world units, clipped to the box), one
time t = 0.37 for every point (the training step's case: the time planes take `sample_time_plane`).
Timed: `hexplane_features` forward, and forward + backward (value_and_grad of Σ w·f w.r.t. the grid, xyz and t;
w a fixed random [N, levels·C] cotangent), one jitted call each, median of --repeats calls after a warm-up call.
Modes: "kernel" = X2GS_FIELD_KERNEL=auto (on a CPU: =interpret, the kernels in Triton's interpreter, for the smoke
test only), "xla" = X2GS_FIELD_KERNEL=xla (three `sample_plane`s per level; plane gradients through the Triton
scatter on a GPU, as before this kernel). The variable is read at trace time: each mode gets its own jitted closures.
--time-kernel xla|auto sets X2GS_TIME_KERNEL for the whole run (both modes): the time planes' line gradient as the
dense one-hot product (xla) or the segmented Triton kernel (auto, the default; on a CPU: interpret, smoke test only).
  python bench/field.py --gaussians 200000 --modes kernel --time-kernel xla      # vs --time-kernel auto

Floor: bytes of the spatial tables read once (fwd), plus the spatial gradient tables written once (fwd+bwd), over
4.8 TB/s (H200 HBM3e peak). The time planes, the [N, C] features and the coordinates are not counted (the spatial
tables dominate at the default sizes; the floor is a lower bound).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.render import timeit  # noqa: E402  (median of synchronised calls after a warm-up)
from configs import x2_gaussian  # noqa: E402
from x2gs_jax.fields import hexplane  # noqa: E402

HBM_BPS = 4.8e12  # H200 peak memory bandwidth, bytes/s


def spatial_table_bytes(resolution, multires, features) -> int:
    """float32 bytes of every level's (x,y), (x,z), (y,z) planes."""
    shapes = hexplane.plane_shapes(resolution, multires, features)
    return int(sum(4 * int(np.prod(level[p])) for level in shapes for p in hexplane.SPATIAL_PLANES))


def fns(field, w):
    """(fwd, fwd+bwd) jitted closures, traced anew (X2GS_FIELD_KERNEL is read at trace time)."""
    feats = lambda grid, xyz, t: hexplane.hexplane_features(grid, xyz, t, bounds=field.bounds,
                                                            time_mapping=field.time_mapping)
    fwd = jax.jit(feats)
    both = jax.jit(jax.value_and_grad(lambda grid, xyz, t: jnp.sum(w * feats(grid, xyz, t)), argnums=(0, 1, 2)))
    return fwd, both


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gaussians", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="the :tiny config's field (CPU smoke test)")
    ap.add_argument("--modes", default="kernel,xla", help="comma list of kernel, xla")
    ap.add_argument("--time-kernel", default="auto", choices=("xla", "auto"),
                    help="X2GS_TIME_KERNEL for the run: time planes' line gradient by one-hot product or kernel")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    field = x2_gaussian.get_config("tiny" if args.tiny else None).model.field
    res, multires, c = tuple(field.resolution), tuple(field.multires), int(field.features)
    dev = jax.devices()[0]
    # Read at trace time (every closure is traced after this); on a CPU the kernel runs in Triton's interpreter.
    time_env = "auto" if dev.platform == "gpu" else "interpret"
    old_time = os.environ.get("X2GS_TIME_KERNEL")
    os.environ["X2GS_TIME_KERNEL"] = "xla" if args.time_kernel == "xla" else time_env
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; field {res} x {multires}, C={c}, "
          f"N={args.gaussians}, time kernel {os.environ['X2GS_TIME_KERNEL']} "
          f"(used: {hexplane._triton_time_line()})", flush=True)

    rng = np.random.default_rng(0)
    grid = hexplane.init_grid(jax.random.PRNGKey(0), res, multires, c)
    xyz = jnp.asarray(np.clip(rng.normal(0.0, 0.5, (args.gaussians, 3)), -field.bounds, field.bounds), jnp.float32)
    t = jnp.float32(0.37)
    w = jnp.asarray(rng.normal(size=(args.gaussians, len(multires) * c)), jnp.float32)
    table_bytes = spatial_table_bytes(res, multires, c)
    floor_fwd, floor_both = table_bytes / HBM_BPS * 1e3, 2 * table_bytes / HBM_BPS * 1e3
    results = {"device": dev.device_kind, "backend": dev.platform, "resolution": res, "multires": multires,
               "features": c, "gaussians": args.gaussians, "repeats": args.repeats,
               "time_kernel": args.time_kernel, "time_kernel_used": hexplane._triton_time_line(),
               "line_kernel": os.environ.get("X2GS_LINE_KERNEL", "dot"),
               "spatial_table_bytes": table_bytes, "floor_fwd_ms": floor_fwd, "floor_fwd_bwd_ms": floor_both,
               "modes": {}}
    outputs = {}
    old = os.environ.get("X2GS_FIELD_KERNEL")
    try:
        for mode in [m for m in args.modes.split(",") if m]:
            if mode not in ("kernel", "xla"):
                raise SystemExit(f"--modes: unknown mode {mode!r} (kernel, xla)")
            os.environ["X2GS_FIELD_KERNEL"] = "xla" if mode == "xla" else ("auto" if dev.platform == "gpu"
                                                                            else "interpret")
            fwd, both = fns(field, w)
            # The mode really switched (traces are cached per function, the variable is read at trace time):
            # kernel launches in the forward's jaxpr (jax-triton's primitive on a GPU, the interpreter's callback).
            jaxpr = str(jax.make_jaxpr(lambda *a: hexplane.hexplane_features(
                *a, bounds=field.bounds, time_mapping=field.time_mapping))(grid, xyz, t))
            launches = jaxpr.count("triton_kernel_call") + jaxpr.count("pure_callback")
            if (launches > 0) != (mode == "kernel"):
                raise SystemExit(f"mode {mode}: {launches} kernel launches in the forward's jaxpr")
            ms_fwd = timeit(fwd, (grid, xyz, t), args.repeats)
            ms_both = timeit(both, (grid, xyz, t), args.repeats)
            outputs[mode] = (fwd(grid, xyz, t), both(grid, xyz, t))
            results["modes"][mode] = {"fwd_ms": ms_fwd, "fwd_bwd_ms": ms_both, "fwd_x_floor": ms_fwd / floor_fwd,
                                      "fwd_bwd_x_floor": ms_both / floor_both}
            print(f"{mode:6s} fwd {ms_fwd:9.3f} ms ({ms_fwd / floor_fwd:6.1f}x floor {floor_fwd:.3f})   fwd+bwd "
                  f"{ms_both:9.3f} ms ({ms_both / floor_both:6.1f}x floor {floor_both:.3f})", flush=True)
    finally:
        if old is None:
            os.environ.pop("X2GS_FIELD_KERNEL", None)
        else:
            os.environ["X2GS_FIELD_KERNEL"] = old
        if old_time is None:
            os.environ.pop("X2GS_TIME_KERNEL", None)
        else:
            os.environ["X2GS_TIME_KERNEL"] = old_time
    if len(outputs) == 2:  # the two paths must agree (relative norm error of features and every gradient)
        leaves = zip(jax.tree_util.tree_leaves(outputs["kernel"]), jax.tree_util.tree_leaves(outputs["xla"]))
        errs = [float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                      / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30)) for a, b in leaves]
        results["max_rel_err"] = max(errs)
        k, x = results["modes"]["kernel"], results["modes"]["xla"]
        results["speedup_fwd"] = x["fwd_ms"] / k["fwd_ms"]
        results["speedup_fwd_bwd"] = x["fwd_bwd_ms"] / k["fwd_bwd_ms"]
        print(f"speed-up fwd {results['speedup_fwd']:.2f}x, fwd+bwd {results['speedup_fwd_bwd']:.2f}x; "
              f"max relative error kernel vs xla {results['max_rel_err']:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
