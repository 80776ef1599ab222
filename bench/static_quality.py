"""Static (R2-Gaussian) acceptance figures: Gaussian reconstruction vs FDK on the same views.

  python bench/static_quality.py --workdir runs/static_quality [--iterations 30000] [--init fdk|random]

With --iterations below 30000 the schedule is compressed (LR decay and densification window scale).

Uses the embedded static phantom of configs/r2_static.py (128^3 GT, 256^2 detector, 50 noiseless views
over 360 deg), trains with the full R2 schedule and prints PSNR3D/SSIM3D of the reconstruction and of
FDK from the same 50 views, plus wall time. Results go to <workdir>/static_quality.json.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import r2_static  # noqa: E402
from x2gs_jax import train_lib  # noqa: E402
from x2gs_jax.ct.fdk import fdk  # noqa: E402
from x2gs_jax.data.naf import load_case  # noqa: E402
from x2gs_jax.metrics import volume_metrics_host  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--iterations", type=int, default=30000)
    ap.add_argument("--init", choices=("fdk", "random"), default="fdk")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--variant", default="", help="config variant of configs/r2_static.py (e.g. demo: 64^3, 96^2)")
    ap.add_argument("--cache", default="", help="folder holding the generated case (default: inside workdir)")
    args = ap.parse_args()
    config = r2_static.get_config(args.variant or None)
    config.train.iterations = config.train.coarse_iterations = args.iterations
    config.data.init.method = args.init
    config.render.backend = args.backend
    config.data.cache_dir = os.path.join(args.workdir, "cache_" + args.init)
    if args.iterations != 30000:
        # Compress the reference 30k schedule: log-linear LR decay and densification window scale with it.
        for group in config.optim.lr.values():
            group.max_steps = args.iterations
        config.densify.until_iter = args.iterations // 2
    config.eval.iterations = (1, args.iterations // 2, args.iterations)
    if args.cache:
        config.data.cache_dir = args.cache
    t0 = time.time()
    report = train_lib.train_and_evaluate(config, os.path.join(args.workdir, "run_" + args.init))
    wall = time.time() - t0
    case = load_case(train_lib.resolve_case_path(config))
    base = volume_metrics_host(case.volumes, np.asarray(fdk(case.train.projections, case.scanner, case.train.angles)))
    out = {"init": args.init, "iterations": args.iterations, "wall_s": wall,
           "psnr_3d": report["psnr_3d_mean"], "ssim_3d": report["ssim_3d_mean"],
           "fdk_psnr_3d": base["psnr_3d"], "fdk_ssim_3d": base["ssim_3d"]}
    print(json.dumps(out, indent=2))
    with open(os.path.join(args.workdir, f"static_quality_{args.init}.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
