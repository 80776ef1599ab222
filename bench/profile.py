"""Per-kernel GPU time of the benchmark cases (jax.profiler trace, parsed with jax.profiler.ProfileData).

For each selected case and mode it prints the wall time per call, the summed GPU kernel time per call and the
top kernels (name, count per call, ms per call). Dev tool for profile-guided tuning; same cases as render.py.
Usage: python bench/profile.py --backend triton --only rasterize-256-200k,voxelize-64 [--modes fwd,both]
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from bench.render import RASTER_CASES, VOXEL_CASES, N_VIEWS, raster_fns, voxel_fns  # noqa: E402


def gpu_kernels(fn, args, calls: int = 5):
    """(wall ms per call, {kernel name: (count per call, ms per call)}) from a profiler trace of `calls` calls."""
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    wall = (time.perf_counter() - t0) * 1e3 / calls
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    stats = collections.defaultdict(lambda: [0, 0.0])
    for plane in ProfileData.from_file(path).planes:
        if "GPU" not in plane.name:
            continue
        for line in plane.lines:
            if "Stream" not in line.name:
                continue
            for ev in line.events:
                s = stats[ev.name[:90]]
                s[0] += 1
                s[1] += ev.duration_ns * 1e-6
    return wall, {k: (c / calls, ms / calls) for k, (c, ms) in stats.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--only", default="")
    ap.add_argument("--modes", default="fwd,both")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--set", action="append", default=[],
                    help="override a launch constant, e.g. --set kernels.rasterize.NUM_WARPS=8")
    args = ap.parse_args(argv)
    import importlib

    for item in args.set:  # dev-only sweep of launch shapes; applied before anything is traced
        target, value = item.split("=")
        mod, const = target.rsplit(".", 1)
        setattr(importlib.import_module(mod), const, int(value))
        print(f"set {target} = {value}")
    only = [o for o in args.only.split(",") if o]
    cases = [("rasterize", r, n) for r, n in RASTER_CASES] + [("voxelize", r, n) for r, n in VOXEL_CASES]
    for kind, res, n in cases:
        name = f"{kind}-{res}-{n // 1000}k"
        if only and not any(name.startswith(o) for o in only):
            continue
        make = raster_fns if kind == "rasterize" else voxel_fns
        fwd, both, inputs, _ = make(args.backend, res, n, seed=res * 1000 + n)
        for mode, fn in (("fwd", fwd), ("both", both)):
            if mode not in args.modes:
                continue
            wall, k = gpu_kernels(fn, inputs)
            total = sum(ms for _, ms in k.values())
            per = N_VIEWS if kind == "rasterize" else 1
            print(f"== {name} {mode}: wall {wall:.3f} ms/call, GPU kernels {total:.3f} ms/call "
                  f"({wall / per:.3f} / {total / per:.3f} ms per view or volume)")
            for kname, (cnt, ms) in sorted(k.items(), key=lambda kv: -kv[1][1])[:args.top]:
                print(f"   {ms:8.3f} ms  x{cnt:5.1f}  {kname}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
