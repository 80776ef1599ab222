"""Benchmark of the X-ray rasterizer and voxelizer backends (reference pure JAX vs Triton) on one GPU.

Cases (fixed seeds, cone beam, scene in [-1, 1]^3, DSD = 3, DSO = 2 (DSD/DSO = 1.5), square detector of side 4
world units (the box's central cross-section, 3 units at magnification 1.5, plus a third), Gaussians uniform in
[-0.8, 0.8]^3, scales log-uniform in [0.004, 0.03], random unit quaternions, densities U(0.1, 1)):
  rasterize 256² N=10k/50k/200k, 512² N=50k/200k: 8 views over 180° rendered by one jitted call (vmap over
    cameras), ms per view = call time / 8; fwd and fwd+bwd (value_and_grad of Σ w·image w.r.t. the four inputs);
    static pair capacity `pair_capacity(count_pairs)` (the production setting).
  voxelize 64³ N=50k, 128³ N=200k, 256³ N=50k/200k: grid size 2 centred at 0; ms per volume, fwd and fwd+bwd.
Timing: warm-up call, then the median of --repeats calls, each ended by block_until_ready.

Floors. The run first measures a device-to-device copy bandwidth (bytes read + written) and a float32 FMA rate
(Triton kernel, 2 flops per FMA), then prints for every case the floor max(bytes / bandwidth, work / rate) and
the measured time as a multiple of it. Bytes: each input read once and each output written once (per view:
Gaussian inputs 44 B × N / 8 views, image 4·H·W; fwd+bwd also reads w and writes the four gradients). Work: the
pixel (voxel) evaluations the tile rule requires, pairs × 256 (× 512), times the float ops of one evaluation
(counted from the kernels: FWD_OPS / BWD_OPS below, exp counted as 4).

Usage: python bench/render.py --backends reference,triton --vs-reference --repeats 20 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from x2gs_jax.geometry import Scanner  # noqa: E402
from x2gs_jax.render import count_pairs, pair_capacity  # noqa: E402
from x2gs_jax.render.rasterize import rasterize_points  # noqa: E402
from x2gs_jax.render.voxelize import Grid, voxel_pair_count, voxelize_points  # noqa: E402

RASTER_CASES = [(256, 10_000), (256, 50_000), (256, 200_000), (512, 50_000), (512, 200_000)]
VOXEL_CASES = [(64, 50_000), (128, 200_000), (256, 50_000), (256, 200_000)]
N_VIEWS = 8
# Upstream CUDA (H200) ms: rasterize per view, voxelize per volume: (fwd, fwd+bwd).
UPSTREAM = {
    ("rasterize", 256, 10_000): (0.19, 0.48), ("rasterize", 256, 50_000): (0.32, 0.87),
    ("rasterize", 256, 200_000): (0.81, 2.75), ("rasterize", 512, 50_000): (0.31, 1.97),
    ("rasterize", 512, 200_000): (0.87, 6.99),
    ("voxelize", 64, 50_000): (0.51, 0.95), ("voxelize", 128, 200_000): (2.19, 8.78),
    ("voxelize", 256, 50_000): (2.02, 18.9), ("voxelize", 256, 200_000): (7.10, 62.6),
}
# Float ops of one pixel / voxel evaluation (forward; forward + backward re-evaluation and moments).
RASTER_FWD_OPS, RASTER_BWD_OPS = 16, 16 + 24
VOXEL_FWD_OPS, VOXEL_BWD_OPS = 24, 24 + 34
GAUSS_BYTES = 44  # means 12 + scales 12 + rotations 16 + density 4


def scene(n: int, seed: int):
    rng = np.random.default_rng(seed)
    m = rng.uniform(-0.8, 0.8, (n, 3)).astype(np.float32)
    s = np.exp(rng.uniform(math.log(0.004), math.log(0.03), (n, 3))).astype(np.float32)
    q = rng.normal(size=(n, 4)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d = rng.uniform(0.1, 1.0, n).astype(np.float32)
    return tuple(jnp.asarray(x) for x in (m, s, q, d))


def scanner(res: int) -> Scanner:
    return Scanner(mode="cone", DSD=3.0, DSO=2.0, n_detector=(res, res), d_detector=(4.0 / res, 4.0 / res),
                   n_voxel=(64, 64, 64), d_voxel=(2.0 / 64,) * 3)


def timeit(fn, args, repeats: int, warmup: int = 1) -> float:
    """Median wall time (ms) of fn(*args) after `warmup` calls, each call synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------- ceilings
def measure_bandwidth() -> float:
    """Device-to-device streaming bandwidth (bytes/s, read + write) of a 1 GiB float32 array."""
    x = jnp.arange(1 << 28, dtype=jnp.float32)
    f = jax.jit(lambda a: a * 1.0001 + 1.0)
    ms = timeit(f, (x,), 30, warmup=10)  # the warm-up also lets the clocks ramp up from idle
    return 2 * x.nbytes / (ms * 1e-3)


def measure_fma_rate() -> float:
    """float32 FMA throughput (flops/s, 2 per FMA) of a register-resident Triton loop."""
    from kernels._launch import launch
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(x_ptr, o_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = tl.load(x_ptr + i)
        b = a * 0.5 + 1.0
        c = a * 0.25 + 2.0
        d = a * 0.125 + 3.0
        for _ in range(ITERS):  # four independent FMA chains per element
            a = a * 0.999 + 0.001
            b = b * 0.999 + 0.001
            c = c * 0.999 + 0.001
            d = d * 0.999 + 0.001
        tl.store(o_ptr + i, a + b + c + d)

    n, block, iters = 1 << 24, 1024, 512
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: launch(fma_kernel, (n // block,), [jax.ShapeDtypeStruct((n,), jnp.float32)], a,
                                 ITERS=iters, BLOCK=block, num_warps=8)[0])
    ms = timeit(f, (x,), 30, warmup=5)
    return 2.0 * 4 * iters * n / (ms * 1e-3)


# ------------------------------------------------------------------------------------------- cases
def raster_fns(backend: str, res: int, n: int, seed: int):
    sc = scanner(res)
    cams = jax.vmap(sc.camera)(jnp.asarray(np.arange(N_VIEWS) * np.pi / N_VIEWS, jnp.float32))
    args = scene(n, seed)
    pairs = jax.jit(jax.vmap(lambda c: count_pairs(*args, c)))(cams)
    cap = pair_capacity(pairs)
    w = jnp.asarray(np.random.default_rng(seed + 1).uniform(size=(N_VIEWS, res, res)).astype(np.float32))

    def render(m, s, q, d):
        return jax.vmap(lambda c: rasterize_points(m, s, q, d, c, backend=backend, max_pairs=cap)[0])(cams)

    fwd = jax.jit(render)
    both = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(w * render(*a)), argnums=(0, 1, 2, 3)))
    return fwd, both, args, float(np.sum(np.asarray(pairs))) / N_VIEWS


def voxel_fns(backend: str, res: int, n: int, seed: int):
    """backend: "reference", "triton" (its automatic forward) or "triton:tiles" / "triton:scatter" (that forward
    algorithm, kernels/voxelize.py FORWARD_MODES)."""
    grid = Grid(n=(res,) * 3, size=(2.0, 2.0, 2.0), center=(0.0, 0.0, 0.0))
    args = scene(n, seed)
    w = jnp.asarray(np.random.default_rng(seed + 1).uniform(size=grid.n).astype(np.float32))

    def vox(m, s, q, d):
        if backend.startswith("triton:"):
            from kernels.voxelize import voxelize_points as triton_voxelize
            return triton_voxelize(m, s, q, d, grid, forward=backend.split(":", 1)[1])
        return voxelize_points(m, s, q, d, grid, backend=backend)

    fwd = jax.jit(vox)
    both = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(w * vox(*a)), argnums=(0, 1, 2, 3)))
    # Work: (Gaussian, 8³ tile) pairs × 512 voxels, from the reference setup's 4³-block count (×64 voxels),
    # i.e. the voxels inside the support boxes; the tile kernels evaluate whole 8³ tiles (more).
    blocks = int(voxel_pair_count(*args, grid))
    return fwd, both, args, blocks * 64.0


def floors(kind, res, n, evals, bw, rate):
    """(fwd floor ms, fwd+bwd floor ms) per view / volume."""
    if kind == "rasterize":
        out = 4.0 * res * res
        b_f = GAUSS_BYTES * n / N_VIEWS + out
        b_b = 2 * GAUSS_BYTES * n / N_VIEWS + out
        w_f, w_b = evals * 256 * RASTER_FWD_OPS, evals * 256 * (RASTER_FWD_OPS + RASTER_BWD_OPS)
    else:
        out = 4.0 * res ** 3
        b_f = GAUSS_BYTES * n + out
        b_b = 2 * GAUSS_BYTES * n + out
        w_f, w_b = evals * VOXEL_FWD_OPS, evals * (VOXEL_FWD_OPS + VOXEL_BWD_OPS)
    return (max(b_f / bw, w_f / rate) * 1e3, max(b_b / bw, w_b / rate) * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="reference,triton",
                    help="comma list of reference, triton; voxelizer cases also triton:tiles, triton:scatter")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ref-repeats", type=int, default=5,
                    help="repeats for the reference backend (slow; fewer runs, stated in the output)")
    ap.add_argument("--vs-reference", action="store_true", help="compare with the upstream CUDA (H200) figures")
    ap.add_argument("--only", default="", help="comma list of case prefixes to run, e.g. rasterize,voxelize-64")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    bw = measure_bandwidth()
    rate = measure_fma_rate() if dev.platform == "gpu" else float("nan")
    print(f"measured: copy bandwidth {bw / 1e12:.2f} TB/s, fp32 FMA rate {rate / 1e12:.1f} TFLOP/s", flush=True)
    results = {"device": dev.device_kind, "bandwidth_Bps": bw, "fma_flops": rate, "cases": []}
    cases = [("rasterize", r, n) for r, n in RASTER_CASES] + [("voxelize", r, n) for r, n in VOXEL_CASES]
    only = [o for o in args.only.split(",") if o]
    for kind, res, n in cases:
        name = f"{kind}-{res}-{n // 1000}k"
        if only and not any(name.startswith(o) for o in only):
            continue
        for backend in backends:
            if kind == "rasterize" and ":" in backend:
                continue  # forward variants are the voxelizer's
            reps = args.repeats if backend != "reference" else min(args.repeats, args.ref_repeats)
            t0 = time.perf_counter()
            make = raster_fns if kind == "rasterize" else voxel_fns
            fwd, both, inputs, evals = make(backend, res, n, seed=res * 1000 + n)
            per = N_VIEWS if kind == "rasterize" else 1
            t_f = timeit(fwd, inputs, reps) / per
            t_b = timeit(both, inputs, reps) / per
            fl_f, fl_b = floors(kind, res, n, evals, bw, rate)
            row = dict(case=name, backend=backend, repeats=reps, fwd_ms=t_f, fwd_bwd_ms=t_b, floor_fwd_ms=fl_f,
                       floor_fwd_bwd_ms=fl_b, evals=evals, setup_s=time.perf_counter() - t0)
            results["cases"].append(row)
            print(f"{name:22s} {backend:9s} fwd {t_f:8.3f} ms (floor {fl_f:.4f}, x{t_f / fl_f:6.1f})  "
                  f"fwd+bwd {t_b:8.3f} ms (floor {fl_b:.4f}, x{t_b / fl_b:6.1f})  "
                  f"{'pairs/view' if kind == 'rasterize' else 'support voxels'} {evals:.3g}  reps {reps}", flush=True)
    if args.vs_reference:
        print("\nvs upstream CUDA (H200), ms: ours / upstream (speed-up), target ≥ 2x")
        for row in results["cases"]:
            kind, res, nk = row["case"].split("-")
            up = UPSTREAM.get((kind, int(res), int(nk[:-1]) * 1000))
            if up is None:
                continue
            sf, sb = up[0] / row["fwd_ms"], up[1] / row["fwd_bwd_ms"]
            ok = "MET" if sf >= 2 and sb >= 2 else "not met"
            print(f"{row['case']:22s} {row['backend']:9s} fwd {row['fwd_ms']:.3f}/{up[0]} ({sf:.2f}x)  "
                  f"fwd+bwd {row['fwd_bwd_ms']:.3f}/{up[1]} ({sb:.2f}x)  {ok}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
