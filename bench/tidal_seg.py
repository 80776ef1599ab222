"""Time the lung segmentation alone (the per-time work of the tidal curve after voxelization).

  python bench/tidal_seg.py --size 64 --chunk 8 --repeats 5            # 64³ phantom volumes, chunks of 8

The volumes are the embedded phantom's exact voxelisations at `--chunk` times over one breathing cycle (plus
Gaussian noise of --noise × the tissue-lung contrast, so the work is that of a noisy reconstruction); the timed
call is `jit(vmap(tidal.lung_volume_ml))` on one chunk, as `eval_lib.lung_ml_batched` runs it per chunk of times.
Reports the first call (compilation included) and the median of --repeats more, per chunk and per volume, and the
projected cost of a 600-time curve (600 / chunk chunks).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from x2gs_jax import tidal  # noqa: E402
from x2gs_jax.data.breathing import BreathingSignal  # noqa: E402
from x2gs_jax.data.generate import geometry_mm  # noqa: E402
from x2gs_jax.data.phantom import MU_LUNG, MU_SOFT, ThoraxPhantom  # noqa: E402
from x2gs_jax.geometry import Scanner  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.1, help="noise std as a fraction of the tissue-lung contrast")
    ap.add_argument("--lung_threshold", type=float, default=None,
                    help="fixed air threshold (default: the automatic per-volume segmentation)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    sc = Scanner.from_naf(geometry_mm(args.size, 32))
    ph = ThoraxPhantom.default(BreathingSignal(period_s=3.0))
    times = np.arange(args.chunk) / args.chunk * 3.0 / ph.scan_s
    vols = np.stack([ph.volume_at(float(t), sc, supersample=1) for t in times])
    vols = vols + np.random.default_rng(0).normal(0.0, args.noise * (MU_SOFT - MU_LUNG), vols.shape).astype(np.float32)
    vols = jax.device_put(vols)
    mm = sc.d_voxel_mm
    f = jax.jit(jax.vmap(lambda v: tidal.lung_volume_ml(v, mm, args.lung_threshold)))
    t0 = time.perf_counter()
    ml = np.asarray(f(vols))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(vols))
        runs.append(time.perf_counter() - t0)
    med = statistics.median(runs)
    out = {"size": args.size, "chunk": args.chunk, "noise": args.noise, "lung_threshold": args.lung_threshold, "first_chunk_s": first, "median_chunk_s": med,
           "per_volume_ms": 1000 * med / args.chunk, "projected_600_s": med * 600 / args.chunk,
           "lung_ml": [round(float(x), 1) for x in ml], "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
