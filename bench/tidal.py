"""Time to compute a tidal-volume curve (lung volume at many times over the whole scan, `eval.py`'s curve).

  python bench/tidal.py --config configs/x2_gaussian.py:ref64 --points 600           # 64³ grid, 50k Gaussians
  python bench/tidal.py --config configs/x2_gaussian.py --points 600                 # 128³ grid, 50k Gaussians
  python bench/tidal.py --config configs/x2_gaussian.py --gaussians 220000 --points 600   # 128³, a trained run's count
  python bench/tidal.py --workdir runs/x2 --points 600                               # a trained run

With --config the model is the config's X2 model at initialisation (FDK-initialised Gaussians, the default
field): the work per time (deform every Gaussian, voxelize the grid, segment, count) does not depend on the
trained values, only on the grid, the field size and the number of Gaussians. With --workdir, the run's
inference export. Timing: the first curve (includes compilation) and the median of --repeats more, each the
full `eval_lib.tidal_curve` (vmapped chunks of --chunk times, host transfer of the curve included).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from x2gs_jax import eval_lib, train_lib  # noqa: E402
from x2gs_jax.data.naf import load_case  # noqa: E402


def load_config(spec: str):
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def run_from_config(spec: str, cache: str, gaussians: int = 0) -> eval_lib.Run:
    config = load_config(spec)
    if cache:
        config.data.cache_dir = cache
    if gaussians:  # as many Gaussians as a trained run has (the FDK initialisation samples that many points)
        config.data.init.n_points = int(gaussians)
    case_path = train_lib.resolve_case_path(config)
    case = load_case(case_path)
    model = train_lib.make_model(config, case)
    points = train_lib.initial_points(case_path, case, config)
    state = train_lib.init_state(config, case, points, model)
    return eval_lib.Run(workdir="", config=config, case=case, case_path=case_path, model=model,
                        params=jax.device_get(state.params), model_state=jax.device_get(state.model_state),
                        active=np.asarray(state.active),
                        scale_bound=state.scale_bound, step=int(config.train.iterations), source="init")


def profile_chunk(run: eval_lib.Run, chunk: int, lung_threshold, fusions=(), top: int = 25):
    """Print the wall time and the top GPU kernels of one chunk: voxelization alone (each volume reduced to its
    sum, so nothing else runs), then the whole per-time work (`eval_lib.lung_ml_batched`); after each, the HLO
    of the named `fusions` of its program (what XLA fused there)."""
    import jax.numpy as jnp

    from bench.profile import gpu_kernels
    from bench.profile_step import print_fusion

    vol = eval_lib.volume_at(run)
    t = jnp.linspace(0.0, 1.0, chunk, endpoint=False)
    whole = eval_lib.lung_ml_batched(run, lung_threshold)
    thr = jnp.float32(jnp.nan if lung_threshold is None else lung_threshold)
    frac = jnp.float32(eval_lib.tidal.MIN_COMPONENT_FRACTION)
    alone = jax.jit(jax.vmap(lambda p, t: jnp.sum(vol(p, t)), in_axes=(None, 0)))
    cases = {"voxelize": (alone, lambda: alone.lower(run.query_params, t)),
             "voxelize+segment": (whole, lambda: eval_lib.lung_ml_program(run).lower(run.query_params, t, thr,
                                                                                    frac))}
    for name, (fn, lower) in cases.items():
        wall, kernels = gpu_kernels(fn, (run.query_params, t))
        total = sum(ms for _, ms in kernels.values())
        print(f"== {name}: {wall:.2f} ms wall, {total:.2f} ms GPU kernels per chunk of {chunk}")
        for k, (n, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"  {ms:8.3f} ms  x{n:6.1f}  {k}")
        if fusions:
            text = lower().compile().as_text()
            for fusion in fusions:
                print_fusion(text, fusion)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config file[:variant] (model at initialisation)")
    src.add_argument("--workdir", help="a trained run directory")
    ap.add_argument("--cache", default="", help="data cache folder (--config)")
    ap.add_argument("--gaussians", type=int, default=0, help="--config: initial Gaussians (0: the config's)")
    ap.add_argument("--points", type=int, default=600)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lung_threshold", type=float, default=None,
                    help="fixed air threshold (default: the automatic per-volume segmentation)")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", action="store_true",
                    help="instead: per-kernel GPU time of one chunk, voxelization alone and the whole per-time work")
    ap.add_argument("--fusion", action="append", default=[],
                    help="--profile: also print this fusion's HLO from each program (repeatable)")
    args = ap.parse_args()
    run = run_from_config(args.config, args.cache, args.gaussians) if args.config else eval_lib.load_run(args.workdir)
    if not run.is_4d:
        raise SystemExit("bench/tidal.py: the run is not a 4D model")
    if args.profile:
        return profile_chunk(run, args.chunk, args.lung_threshold, args.fusion)
    t0 = time.perf_counter()
    curve = eval_lib.tidal_curve(run, args.points, args.lung_threshold, chunk=args.chunk, progress=False)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        eval_lib.tidal_curve(run, args.points, args.lung_threshold, chunk=args.chunk, progress=False)
        times.append(time.perf_counter() - t0)
    out = {"source": args.config or args.workdir, "grid": list(run.case.scanner.n_voxel),
           "gaussians": int(np.sum(run.active)), "points": args.points, "chunk": args.chunk,
           "first_s": first, "median_s": statistics.median(times) if times else None, "repeats": args.repeats,
           "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
           "period_s_curve": curve.get("tidal_period_s"), "lung_threshold": args.lung_threshold,
           "lung_threshold_used_median": curve.get("lung_threshold_used_median")}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
