"""Time the initialisation's k-nearest-neighbour distances (x2gs_jax/knn.py): cKDTree vs the brute force.

  python bench/knn.py --points 50000 --methods kdtree,brute

Points: uniform in a unit cube (the init's FDK-sampled clouds are denser in the body; both methods are exact, so
only the timing depends on the layout). Reports seconds per method (the brute force's first call includes its
compilation, timed separately) and the largest relative difference between the methods' results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from x2gs_jax.knn import knn_mean_sq_dist  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=50000)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--methods", default="kdtree,brute")
    args = ap.parse_args()
    p = np.random.default_rng(0).random((args.points, 3), dtype=np.float32)
    out, results = {"points": args.points, "k": args.k, "backend": jax.default_backend()}, {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        r = np.asarray(jax.block_until_ready(knn_mean_sq_dist(p, k=args.k, method=method)))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = np.asarray(jax.block_until_ready(knn_mean_sq_dist(p, k=args.k, method=method)))
        out[f"{method}_first_s"], out[f"{method}_s"] = first, time.perf_counter() - t0
        results[method] = r
    if len(results) == 2:
        a, b = results.values()
        out["max_rel_diff"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
