"""Throughput of the JAX forward projector and FDK on fixed synthetic cases.

    python bench/projector.py [--sizes 64:128,128:256] [--views 32] [--repeats 5] [--json OUT]

Each size `V:D` is a V³ volume (random values, fixed seed) and a D×D cone-beam detector (1.5×
magnification, the whole box in view). For each case: one warm-up call (compilation), then the median
wall time of `--repeats` calls (each ended with block_until_ready). Reports rays/s and trilinear
samples/s for `project`, voxel·views/s for `fdk`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from x2gs_jax.ct.fdk import fdk, fdk_cost  # noqa: E402
from x2gs_jax.ct.projector import project, projector_cost  # noqa: E402
from x2gs_jax.geometry import Scanner  # noqa: E402


def make_scanner(n_vox: int, n_det: int) -> Scanner:
    """V³ voxels over 256 mm, D² detector spanning 1.5 × 256 mm · 1.25 (margin for the cone)."""
    side = 256.0
    return Scanner.from_naf(dict(DSD=1500.0, DSO=1000.0, nDetector=[n_det, n_det],
                                 dDetector=[1.5 * side * 1.25 / n_det] * 2, nVoxel=[n_vox] * 3,
                                 dVoxel=[side / n_vox] * 3))


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(n_vox: int, n_det: int, n_views: int, repeats: int, chunk: int, voxel_chunk: int, view_block: int):
    sc = make_scanner(n_vox, n_det)
    rng = np.random.default_rng(0)
    vol = jax.numpy.asarray(rng.random(sc.n_voxel, dtype=np.float32))
    angles = np.linspace(0.0, 2 * np.pi, n_views, endpoint=False)
    t_proj = timed(lambda: project(vol, sc, angles, max_samples_per_chunk=chunk), repeats)
    cost = projector_cost(sc, n_views)
    proj = np.asarray(project(vol, sc, angles, max_samples_per_chunk=chunk))
    t_fdk = timed(lambda: fdk(proj, sc, angles, voxel_chunk=voxel_chunk, view_block=view_block), repeats)
    return {
        "volume": n_vox, "detector": n_det, "views": n_views,
        "project_s": t_proj, "rays_per_s": cost["rays"] / t_proj, "samples_per_s": cost["samples"] / t_proj,
        "fdk_s": t_fdk, "voxel_views_per_s": fdk_cost(sc, n_views) / t_fdk,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64:128,128:256", help="comma list of VOLUME:DETECTOR sizes")
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=2**21, help="project: max samples per chunk")
    ap.add_argument("--voxel_chunk", type=int, default=2**18, help="fdk: voxels per chunk")
    ap.add_argument("--view_block", type=int, default=32, help="fdk: views per jitted call")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"JAX {jax.__version__} on {dev.platform}: {dev.device_kind}")
    results = []
    for spec in args.sizes.split(","):
        try:
            n_vox, n_det = (int(x) for x in spec.split(":"))
        except ValueError:
            ap.error(f"--sizes: expected VOLUME:DETECTOR pairs like 64:128, got {spec!r}")
        r = run_case(n_vox, n_det, args.views, args.repeats, args.chunk, args.voxel_chunk, args.view_block)
        results.append(r)
        print(f"{n_vox}^3 vol, {n_det}^2 det, {args.views} views | project {r['project_s']*1e3:8.1f} ms "
              f"{r['rays_per_s']/1e6:8.3f} Mrays/s {r['samples_per_s']/1e6:9.2f} Msamples/s | "
              f"fdk {r['fdk_s']*1e3:8.1f} ms {r['voxel_views_per_s']/1e6:9.2f} Mvoxel·views/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{dev.platform}: {dev.device_kind}", "jax": jax.__version__,
                       "settings": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
