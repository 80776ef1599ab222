"""Time a training loop spends in a checkpoint save: synchronous (`save`) against background (`save(background=True)`).

  python bench/checkpoint_save.py --mb 768 --repeats 3       # a default run's state is ~0.8 GB (221k Gaussians)

The state is `--mb` MB of float32 leaves (16 of them) on the default device. Per mode, the median over --repeats
saves of: the time until `save` returns (what the loop waits for), and the time until the save is written and
read back (`wait`), with verify_writes on (the trainer's default). The background save's work then overlaps the
next iterations; this bench does not train, so it shows the blocked time, not the overlap's cost to the steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from x2gs_jax.checkpoint import Checkpointer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=768.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    n = int(args.mb * 2**20 / 4 / 16)
    keys = jax.random.split(jax.random.key(0), 16)
    state = {f"leaf{i:02d}": jax.random.uniform(k, (n,)) for i, k in enumerate(keys)}
    jax.block_until_ready(state)
    out = {"mb": args.mb, "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
           "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as d:
        for mode, background in (("sync", False), ("background", True)):
            ckpt = Checkpointer(os.path.join(d, mode), keep=2)
            blocked, done = [], []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                ckpt.save(r + 1, state, {"step": r + 1}, background=background)
                blocked.append(time.perf_counter() - t0)
                ckpt.wait()
                done.append(time.perf_counter() - t0)
            ckpt.close()
            out[mode] = {"blocked_s": statistics.median(blocked), "written_and_verified_s": statistics.median(done)}
            print(f"{mode:10s}: save returns after {out[mode]['blocked_s']:.2f} s, written and verified after "
                  f"{out[mode]['written_and_verified_s']:.2f} s (median of {args.repeats})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
