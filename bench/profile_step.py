"""Per-kernel GPU time of the jitted training loop (dev tool for profile-guided tuning).

  python bench/profile_step.py --model x2 --gaussians 50000 --detector 512 [--steps 10] [--top 30] [--no-static-phases]
  python bench/profile_step.py --trained RUN/export   # a finished run's Gaussians, case and config

Same cases as bench/train_speed.py; prints the wall time per iteration, the summed GPU kernel time and the top
kernels (count and ms per iteration) from a jax.profiler trace.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax.numpy as jnp  # noqa: E402

from bench.profile import gpu_kernels  # noqa: E402
from bench.train_speed import batches, build  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("static", "x2"), default="x2")
    ap.add_argument("--gaussians", type=int, default=50000)
    ap.add_argument("--detector", type=int, default=512)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--cache", default=os.path.join("runs", "bench_cache"))
    ap.add_argument("--hlo", default="", help="comma-separated fusion names (or auto: the 4 slowest) whose optimized HLO to print")
    ap.add_argument("--hlo-dump", default="", help="write the whole optimized HLO of the profiled program to this file")
    ap.add_argument("--trained", default="", help="a finished run's export directory (RUN/export): profile the "
                    "fine step on its Gaussians, case and config (bench/train_speed.py --trained)")
    ap.add_argument("--static-phases", action=argparse.BooleanOptionalAction, default=True,
                    help="the timed phase's own step function (train.static_phases, train.py's default) or, with "
                         "--no-static-phases, the in-step cond")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    multi, state, data, _ = build(args.model, args.gaussians, args.detector, args.cache, "auto", args.size,
                                  args.steps, donate=False, static_phases=args.static_phases, trained=args.trained)
    batch, keys = batches(data, state, 1, args.steps)
    wall, kernels = gpu_kernels(lambda s: multi(s, batch, keys, jnp.int32(args.steps)), (state,), calls=3)
    total = sum(ms for _, ms in kernels.values())
    what = (f"{args.trained}: N={int(state.active.sum())} of {state.capacity}" if args.trained else
            f"{args.model} N={args.gaussians} {args.detector}^2")
    print(f"== {what}: wall {wall / args.steps:.3f} ms/it, "
          f"GPU kernels {total / args.steps:.3f} ms/it")
    for name, (cnt, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"   {ms / args.steps:8.3f} ms/it  x{cnt / args.steps:6.1f}  {name}")
    if args.hlo or args.hlo_dump:
        text = multi.lower(state, batch, keys, jnp.int32(args.steps)).compile().as_text()
    if args.hlo_dump:
        with open(args.hlo_dump, "w") as f:
            f.write(text)
    if args.hlo:
        names = args.hlo.split(",")
        if args.hlo == "auto":  # the four slowest XLA fusions of this profile
            names = [n for n, _ in sorted(kernels.items(), key=lambda kv: -kv[1][1]) if "fusion" in n][:4]
        for name in names:
            print_fusion(text, name.strip())


def print_fusion(hlo_text: str, name: str, max_lines: int = 60):
    """The instruction that calls fusion `name` and the fused computation's body (what XLA merged there)."""
    lines = hlo_text.splitlines()
    # The kernel of HLO fusion "loop_pad_fusion.20" is named "loop_pad_fusion_20" in the profile: try both spellings.
    spellings = {name, re.sub(r"_(\d+)$", r".\1", name)}
    calls = [ln for ln in lines if any(f" {n} = " in ln or f"%{n} = " in ln for n in spellings)]
    print(f"== {name}: " + (calls[0].strip()[:400] if calls else "not found"))
    if calls and "calls=" in calls[0]:
        comp = calls[0].split("calls=")[1].split(",")[0].split(" ")[0].strip("%")
        start = next((i for i, ln in enumerate(lines) if ln.lstrip("%").startswith(comp + " ") or
                      f"%{comp} " in ln.split("=")[0]), None)
        if start is not None:
            for ln in lines[start:start + max_lines]:
                print("   " + ln.strip()[:300])
                if ln.strip() == "}":
                    break


if __name__ == "__main__":
    main()
