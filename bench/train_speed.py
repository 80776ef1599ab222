"""Training-step throughput: iterations per second and peak GPU memory of the jitted training loop.

  python bench/train_speed.py --model static --gaussians 50000,200000 --detector 512 --json OUT.json
  python bench/train_speed.py --model x2 --gaussians 50000,200000 --detector 512 --json OUT.json
  python bench/train_speed.py --model physx --gaussians 50000,200000 --detector 512 --json OUT.json
  python bench/train_speed.py --model physx_boosted --gaussians 50000,200000 --detector 512 --json OUT.json
  python bench/train_speed.py --model x2 --gaussians 200000 --devices 4 --views-per-step 4   # data parallel

Cases (fixed seeds): the embedded phantom (128³ GT) projected on a `--detector`² detector (static: 50 views;
x2/physx: 300 views over the 60 s scan), FDK-initialised with exactly N Gaussians, densification off so N stays
fixed. `static` times the R2 step (render + L1/D-SSIM + 3D TV on a 32³ patch + Adam); `x2` times the fine
stage of X2-Gaussian with the default field and the periodic-consistency render on (the reference's slowest
phase; the step function of that phase, as train.py with train.static_phases; `--no-static-phases`: the step with
the in-step cond, the case of the figures before 2026-12-04); `physx` the fine stage of PhysX-Gaussian (1024 anchors, masked render pass + teacher pass, L_phys and
L_smooth on, no 3D TV as configs/physx.py); `physx_boosted` the fine stage of the main PhysX-Boosted recipe
(configs/physx_boosted.py: boosted HexPlane + anchor streams, α 0.99, no mask, 4D-TV, L_smooth). Each call runs `train.steps_per_call` iterations in one jitted `lax.scan`, exactly as `train.py`.
The step runs as in train.py: per device under shard_map over `--devices` devices (default 1: the program of a
single-device step, no collectives), each step's `--views-per-step` views split over them.
Timing: one warm-up call (compilation), then the median over --repeats calls; it/s = iterations / call time
(views/s = it/s x views per step).
Peak memory: the device allocator's peak after the runs (`memory_stats()["peak_bytes_in_use"]`).
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import physx, physx_boosted, r2_static, x2_gaussian  # noqa: E402
from x2gs_jax import parallel, train_lib  # noqa: E402
from x2gs_jax.data.naf import load_case  # noqa: E402
from x2gs_jax.train_step import make_multi_step, make_train_step  # noqa: E402


def bench_config(model: str, detector: int, cache: str, backend: str, size: int = 128, per_call: int = 50,
                 capacity_multiple: int = 0):
    if model == "static":
        c = r2_static.get_config()
    else:
        c = {"x2": x2_gaussian, "physx": physx, "physx_boosted": physx_boosted}[model].get_config()
        c.data.phantom.views = 300
        c.train.coarse_iterations = 0  # straight into the fine stage
        c.loss.periodic_start = 0  # X2: periodic render on from the first fine iteration
        if model == "physx":
            c.physx.phys_warmup_steps = 0  # L_phys (with its teacher pass) on from the first fine iteration
    c.data.phantom.detector = detector
    c.data.phantom.size = size
    c.train.steps_per_call = per_call
    c.data.phantom.val_views = 1
    c.data.cache_dir = cache
    c.densify.enabled = False
    c.render.backend = backend
    if capacity_multiple:  # 0: the config's (buffers of N x 1.25 slots rounded up to this multiple)
        c.model.capacity_multiple = capacity_multiple
    return c


def trained_config(export: str, per_call: int = 50):
    """The config of a finished run (its export's meta.json) set up as `bench_config` sets the bench's: straight
    into the fine stage with the periodic render on, densification off."""
    import ml_collections

    with open(os.path.join(export, "meta.json")) as f:
        c = ml_collections.ConfigDict(json.load(f)["config"])
    c.train.coarse_iterations = 0
    c.loss.periodic_start = 0
    c.train.steps_per_call = per_call
    c.densify.enabled = False
    return c


def trained_state(export: str, config, case, dyn):
    """A TrainState holding a finished run's exported Gaussians and model parameters (its capacity; fresh
    optimiser state): the step's cost with trained Gaussians (their sizes decide the rasterizer's pairs)."""
    from x2gs_jax.export import load_export
    from x2gs_jax.run_state import fresh_state

    params, model_state, active, meta = load_export(export, dyn, case)
    return fresh_state(config, params, active, model_state, meta["scale_bound"], dyn)


def build(model: str, n: int, detector: int, cache: str, backend: str, size: int = 128, per_call: int = 50,
          donate: bool = True, devices: int = 1, capacity_multiple: int = 0, static_phases: bool = False,
          trained: str = ""):
    """(jitted multi-step, initial state, TrainData, config) of one benchmark case, on the first `devices` devices.
    trained: a finished run's export directory: its case, config and Gaussians instead of the FDK-initialised N
    (model, n, detector, size, backend and capacity_multiple then come from the run)."""
    dyn = None
    if trained:
        config = trained_config(trained, per_call)
        case = load_case(train_lib.resolve_case_path(config))
        dyn = train_lib.make_model(config, case)
        state = trained_state(trained, config, case, dyn)
    else:
        config = bench_config(model, detector, cache, backend, size, per_call, capacity_multiple)
        case = load_case(train_lib.resolve_case_path(config))
        from x2gs_jax.ct.init_pcd import init_points
        from x2gs_jax.gaussians import load_init_points

        pts_path = os.path.join(cache, f"init_{model}_s{size}_d{detector}_n{n}.npy")
        if not os.path.exists(pts_path):
            np.save(pts_path, init_points(case, n_points=n, density_thresh=config.data.init.density_thresh,
                                          density_rescale=config.data.init.density_rescale, method="fdk", seed=0))
        points = load_init_points(pts_path)
        dyn = train_lib.make_model(config, case)
        state = train_lib.init_state(config, case, points, dyn)
    par = parallel.Parallel(jax.sharding.Mesh(np.array(jax.devices()[:devices]), (parallel.AXIS,)))
    state = par.replicate(state)
    data = train_lib.TrainData(case, par)
    stage = "coarse" if not dyn.is_4d else "fine"
    max_pairs = train_lib.grown_pair_capacity(par.local(state), data, None)
    # --static-phases: the step of the timed iterations' phase (train.static_phases), not the in-step lax.cond.
    phase = dyn.phase(per_call + 1, stage) if static_phases else None
    settings = train_lib.step_settings(config, case.scanner, stage, max_pairs, phase=phase)
    opt = train_lib.build_optimizer(config, state.params, dyn)
    step = make_train_step(dyn, settings, opt, axis_name=parallel.AXIS)
    multi = jax.jit(par.shard(make_multi_step(step)), donate_argnums=0 if donate else ())
    return multi, state, data, config


def batches(data, state, first_it: int, k: int, views_per_step: int = 1):
    its = np.arange(first_it, first_it + k)
    b = views_per_step
    views = np.array([[train_lib.view_index((int(i) - 1) * b + j + 1, 1, data.n_train, 0) for j in range(b)]
                      for i in its])
    keys = jax.vmap(lambda i: jax.random.fold_in(state.key, i))(jnp.asarray(its, jnp.int32))
    return data.sharded_batch(views), keys


def run_case(model: str, n: int, detector: int, cache: str, backend: str, repeats: int, size: int = 128,
             per_call: int = 50, devices: int = 1, views_per_step: int = 1, capacity_multiple: int = 0,
             static_phases: bool = False, trained: str = "") -> dict:
    multi, state, data, config = build(model, n, detector, cache, backend, size, per_call, devices=devices,
                                       capacity_multiple=capacity_multiple, static_phases=static_phases,
                                       trained=trained)
    if trained:  # the run's
        model, n = str(config.model.kind), int(np.asarray(state.active).sum())
        detector = int(config.data.phantom.detector)
    capacity = int(state.capacity)
    k = int(config.train.steps_per_call)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

    def call(state, first_it):
        batch, keys = batches(data, state, first_it, k, views_per_step)
        t0 = time.perf_counter()
        state, m = multi(state, batch, keys, jnp.int32(k))
        done = np.asarray(jax.device_get(m["done"]))
        return state, time.perf_counter() - t0, bool(done.all()), float(np.asarray(m["loss"])[-1])

    t0 = time.perf_counter()
    state, _, ok, _ = call(state, 1)
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        state, dt, ok_r, loss = call(state, 1 + k * (r + 1))
        ok = ok and ok_r
        times.append(dt)
    if not ok:
        raise RuntimeError(f"{model} N={n}: an iteration did not complete (pair-buffer overflow?)")
    med = statistics.median(times)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {"model": model, "gaussians": n, "capacity": capacity, "static_phases": static_phases, "trained": trained,
            "detector": detector, "backend": backend,
            "devices": devices,
            "views_per_step": views_per_step,
            "iterations_per_call": k, "calls": repeats, "median_call_s": med, "it_per_s": k / med,
            "ms_per_it": 1e3 * med / k, "first_call_s": compile_s, "params": n_params, "final_loss": loss,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": dev.device_kind,
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("X2GS_") or k == "XLA_FLAGS"}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("static", "x2", "physx", "physx_boosted"), default="static")
    ap.add_argument("--gaussians", default="50000,200000")
    ap.add_argument("--detector", type=int, default=512)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=128, help="phantom GT size (smaller: smoke runs)")
    ap.add_argument("--steps-per-call", type=int, default=50)
    ap.add_argument("--cache", default=os.path.join("runs", "bench_cache"))
    ap.add_argument("--json", default="")
    ap.add_argument("--devices", type=int, default=1, help="devices of the mesh (the first ones)")
    ap.add_argument("--views-per-step", type=int, default=1, help="global batch of views (a multiple of --devices)")
    ap.add_argument("--capacity-multiple", type=int, default=0,
                    help="model.capacity_multiple (0: the config's; 1: buffers of exactly 1.25 N slots, as before)")
    ap.add_argument("--trained", default="", help="a finished run's export directory (RUN/export): time the fine "
                    "step on its Gaussians, case and config (the periodic phase) instead of N FDK-initialised ones")
    ap.add_argument("--static-phases", action=argparse.BooleanOptionalAction, default=True,
                    help="the step function of the timed phase (train.static_phases, train.py's default since "
                         "2026-12-04) or, with --no-static-phases, the in-step cond (the figures before that date)")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    results = []
    for n in (int(v) for v in args.gaussians.split(",")):
        r = run_case(args.model, n, args.detector, args.cache, args.backend, args.repeats, args.size,
                     args.steps_per_call, args.devices, args.views_per_step, args.capacity_multiple,
                     args.static_phases, args.trained)
        print(json.dumps(r), flush=True)
        results.append(r)
        if args.json:  # after every case: a cut-off run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
