"""The training loop behind `train.py`: data, initialisation, stages, densification, evaluation,
logging and checkpoints. The per-iteration math is the jitted step of `train_step.py`.

Run directory layout:
  config.json          the resolved config
  metrics.jsonl        one JSON record per logged iteration / evaluation
  checkpoints/<step>/  orbax full-state checkpoints (exact continuation)
  export/              inference export (Gaussians, field, period, config, scanner)
  volume.npy, volume.nii.gz (static) or volumes/ (4D)
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from x2gs_jax import evaluation as E
from x2gs_jax.checkpoint import Checkpointer
from x2gs_jax.data.naf import Case, init_path, load_case
from x2gs_jax.densify import DensifyStats, densify_and_prune, required_capacity
from x2gs_jax.fileio import atomic_save_npy, atomic_write_bytes, write_nifti
from x2gs_jax.gaussians import Gaussians, grow, load_init_points, next_capacity
from x2gs_jax.optim import group_specs_from_config, make_optimizer
from x2gs_jax.train_state import (GAUSSIAN_KEYS, TrainState, gaussians_from_params, param_labels,
                                  params_from_gaussians)
from x2gs_jax.train_step import (StaticModel, StepSettings, is_densify_iteration, make_multi_step, make_train_step,
                                  padded_length)


class NonFiniteLossError(FloatingPointError):
    pass


# ----------------------------------------------------------------------------------------- data
def resolve_case_path(config: ml_collections.ConfigDict) -> str:
    """The case to train on: config.data.path, or the embedded phantom (generated once and cached)."""
    if config.data.path:
        if not os.path.exists(config.data.path):
            raise FileNotFoundError(f"config.data.path: no such file {config.data.path!r}")
        return config.data.path
    from x2gs_jax.data.generate import generate_case

    p = config.data.phantom
    cache = config.data.cache_dir or os.environ.get("X2GS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "x2gs_jax")
    name = f"phantom_{p.breathing}_s{p.size}_d{p.detector}_v{p.views}_val{p.val_views}_n{p.noise:g}_T{p.period_s:g}_seed{p.seed}"
    if p.box_mm != 300.0:
        name += f"_box{p.box_mm:g}"
    path = os.path.join(cache, name.replace(".", "p") + ".pickle")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        print(f"generating the embedded phantom case once: {path}")
        generate_case(path, size=p.size, detector=p.detector, views=p.views, val_views=p.val_views,
                      noise=p.noise, period=p.period_s, static=(p.breathing == "static"),
                      irregular=(p.breathing == "irregular"), seed=p.seed, preview=False, box_mm=p.box_mm)
    return path


def initial_points(case_path: str, case: Case, config) -> np.ndarray:
    """init_<stem>.npy beside the pickle when present (X2GS ships them), else our FDK init writes it."""
    path = init_path(case_path)
    if not os.path.exists(path):
        from x2gs_jax.ct.init_pcd import init_points

        c = config.data.init
        pts = init_points(case, n_points=c.n_points, density_thresh=c.density_thresh,
                          density_rescale=c.density_rescale, method=c.method, seed=c.seed)
        atomic_save_npy(path, pts)
        print(f"wrote initial point cloud {path} ({len(pts)} points)")
    return load_init_points(path)


def scale_bound_from_config(config, scanner) -> Optional[tuple]:
    V = max(scanner.s_voxel)
    if config.model.scale_min > 0 and config.model.scale_max > 0:
        return (config.model.scale_min * V, config.model.scale_max * V)
    return None


# ------------------------------------------------------------------------------------ the state
def init_state(config, case: Case, points: np.ndarray, model) -> TrainState:
    scale_bound = scale_bound_from_config(config, case.scanner)
    capacity = int(np.ceil(len(points) * config.model.initial_capacity_factor))
    g = Gaussians.from_point_cloud(points, capacity=capacity, scale_bound=scale_bound)
    params = params_from_gaussians(g)
    key = jax.random.PRNGKey(config.seed)
    params.update(model.init_params(jax.random.fold_in(key, 1), case) if hasattr(model, "init_params") else {})
    optimizer = build_optimizer(config, params)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, active=g.active, opt_state=optimizer.init(params),
                      stats=DensifyStats.zeros(capacity), key=key, scale_bound=scale_bound)


def build_optimizer(config, params):
    specs = group_specs_from_config(config.optim.lr.to_dict(), config.optim.controls.to_dict())
    return make_optimizer(specs, param_labels(params))


def per_gaussian_opt_rows(opt_state):
    """{group: (mu, nu)} rows of the Gaussian groups' Adam state (leading axis = capacity)."""
    return {k: (opt_state.inner_states[k].inner_state.mu[k], opt_state.inner_states[k].inner_state.nu[k])
            for k in GAUSSIAN_KEYS}


def with_per_gaussian_opt_rows(opt_state, rows):
    inner = dict(opt_state.inner_states)
    for k, (mu, nu) in rows.items():
        masked = inner[k]
        st = masked.inner_state
        st = st._replace(mu={**st.mu, k: mu}, nu={**st.nu, k: nu})
        inner[k] = masked._replace(inner_state=st)
    return type(opt_state)(inner)


def grow_state(state: TrainState, new_capacity: int) -> TrainState:
    """Re-allocate every per-Gaussian buffer to `new_capacity` (outside jit), carrying Adam moments."""
    old = state.capacity
    g = grow(state.gaussians(), new_capacity, old)
    params = dict(state.params)
    params.update(params_from_gaussians(g))
    rows = grow(per_gaussian_opt_rows(state.opt_state), new_capacity, old)
    opt_state = with_per_gaussian_opt_rows(state.opt_state, rows)
    return state.replace(params=params, active=g.active, opt_state=opt_state,
                         stats=grow(state.stats, new_capacity, old))


def grown_capacity(needed: int, capacity: int, headroom: float, max_gaussians: int) -> int:
    """New buffer capacity when `needed` slots exceed `capacity`: doubling until it holds headroom x needed
    (but not more than needed when that would pass max_gaussians)."""
    if headroom < 1.0:
        raise ValueError(f"config.model.capacity_headroom must be >= 1, got {headroom}")
    target = max(int(needed), min(int(np.ceil(needed * headroom)), int(max_gaussians)))
    return next_capacity(target, capacity)


def densify_step(state: TrainState, config, scanner, it: int) -> tuple[TrainState, dict]:
    """Densify and prune between steps (gaussians.md §6), growing buffers first when needed."""
    d = config.densify
    V = max(scanner.s_voxel)
    lo, hi = scanner.bbox
    kwargs = dict(grad_threshold=d.grad_threshold, scale_threshold=d.scale_threshold * V,
                  max_num_gaussians=d.max_num_gaussians)
    needed = int(required_capacity(state.gaussians(), state.stats, **kwargs))
    if needed > state.capacity:
        state = grow_state(state, grown_capacity(needed, state.capacity, config.model.capacity_headroom,
                                                 d.max_num_gaussians))
    key = jax.random.fold_in(jax.random.fold_in(state.key, 0x5EED), it)
    g, stats, rows, info = _densify_jit(state.gaussians(), state.stats, key, per_gaussian_opt_rows(state.opt_state),
                                        tuple(lo), tuple(hi), d.density_min, tuple(sorted(kwargs.items())))
    params = dict(state.params)
    params.update(params_from_gaussians(g))
    state = state.replace(params=params, active=g.active, stats=stats,
                          opt_state=with_per_gaussian_opt_rows(state.opt_state, rows))
    return state, {k: (int(v) if np.ndim(v) == 0 else v) for k, v in info.items()}


def _densify_impl(g, stats, key, rows, lo, hi, density_min, kw):
    return densify_and_prune(g, stats, key, density_min=density_min, bbox_min=jnp.asarray(lo),
                             bbox_max=jnp.asarray(hi), per_gaussian=rows, **dict(kw))


_densify_jit = jax.jit(_densify_impl, static_argnums=(4, 5, 6, 7))


# ------------------------------------------------------------------------------------- the loop
class RunLogger:
    """metrics.jsonl and TensorBoard scalar events in <workdir>/tb (our own writer: no extra dependency)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        from x2gs_jax.tb_events import EventWriter

        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = EventWriter(os.path.join(workdir, "tb")) if tensorboard else None

    def write(self, step: int, record: dict, prefix: str = "train"):
        rec = {"step": int(step), "kind": prefix}
        for k, v in record.items():
            if isinstance(v, (list, tuple)):
                rec[k] = [float(x) for x in v]
            else:
                rec[k] = float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def view_index(iteration: int, stage_start: int, n_views: int, seed: int) -> int:
    """Epoch-wise sampling without replacement (the reference's popped stack), as a pure function of the
    iteration so that a resumed run draws exactly the same views: iteration i of a stage that started at
    `stage_start` uses permutation(epoch) at position (i - stage_start) mod n."""
    k = iteration - stage_start
    epoch, pos = divmod(k, n_views)
    perm = np.random.default_rng([seed, stage_start, epoch]).permutation(n_views)
    return int(perm[pos])




# --------------------------------------------------------------------------------- orchestration
class TrainData:
    """Device-resident training data: scene-scaled projections, stacked cameras, times."""

    def __init__(self, case: Case):
        sc = case.scanner
        self.scanner = sc
        self.n_train = len(case.train)
        self.images = jnp.asarray(case.train.projections * sc.scene_scale, jnp.float32)
        self.cameras = jax.vmap(sc.camera)(jnp.asarray(case.train.angles, jnp.float32))
        times = case.train.times if case.train.times is not None else np.zeros(self.n_train)
        self.times = jnp.asarray(times, jnp.float32)

    def batch(self, indices) -> dict:
        idx = jnp.asarray(indices, jnp.int32)
        return {"image": self.images[idx], "camera": jax.tree.map(lambda x: x[idx], self.cameras),
                "time": self.times[idx]}


def grown_pair_capacity(state: TrainState, data: "TrainData", current: Optional[int], views: int = 16) -> int:
    """A power-of-two pair capacity with 2x headroom over the worst of a spread of training views."""
    from x2gs_jax.render.rasterize_ref import count_pairs, pair_capacity

    g = state.gaussians()
    args = (g.get_xyz(), g.get_scale(), g.get_rotation(), g.get_density())
    idx = np.unique(np.linspace(0, data.n_train - 1, min(views, data.n_train)).astype(int))
    counts = jax.vmap(lambda cam: count_pairs(*args, cam))(jax.tree.map(lambda x: x[idx], data.cameras))
    needed = pair_capacity(2 * int(jnp.max(counts)))
    return max(needed, 2 * current) if current else needed


def step_settings(config, scanner, stage: str, max_pairs) -> StepSettings:
    lo, hi = scanner.bbox
    d = config.densify
    stage_end = config.train.coarse_iterations if stage == "coarse" else config.train.iterations
    return StepSettings(
        stage=stage, stage_end=int(stage_end), backend=config.render.backend, max_pairs=max_pairs,
        lambda_dssim=config.loss.lambda_dssim, lambda_tv=config.loss.lambda_tv, tv_n=config.loss.tv_vol_size,
        tv_size=tuple(float(config.loss.tv_vol_size * h) for h in scanner.d_voxel),
        tv_culling=config.loss.tv_culling, tv_mean_grad=config.loss.tv_mean_grad,
        bbox_min=tuple(float(x) for x in lo), bbox_max=tuple(float(x) for x in hi),
        densify_interval=d.interval, densify_from=d.from_iter, densify_until=d.until_iter,
        densify_enabled=bool(d.enabled), scale_bound=scale_bound_from_config(config, scanner))


def make_model(config, case: Case):
    if config.model.kind == "static":
        return StaticModel()
    from x2gs_jax.model4d import make_dynamic_model  # the 4D model (X2-Gaussian)

    return make_dynamic_model(config, case)


def evaluate(state: TrainState, model, case: Case, config, stage: str, jit_cache: Optional[dict] = None) -> dict:
    """Volume metrics (per phase for 4D) and 2D metrics on the val projections.

    The state enters the compiled functions as arguments (never as closure constants) and `jit_cache` (owned
    by the training loop) keeps them, so every evaluation of a stage at the same capacity reuses one compile."""
    sc = case.scanner
    settings = step_settings(config, sc, stage, None)
    inputs = (state.params, state.active)

    def gaussians_at(inputs, t):
        params, active = inputs
        canonical = gaussians_from_params(params, active, settings.scale_bound)
        g, _ = model.gaussians_at(params, canonical, t, jax.random.PRNGKey(0), settings)
        return g

    # One traced function per stage (the model's behaviour differs) in the caller's cache.
    stage_cache = None if jit_cache is None else jit_cache.setdefault(stage, {})
    grid = E.full_grid(sc)
    times = model.eval_times(case) if case.is_4d else [0.0]
    vols = E.query_volumes(gaussians_at, times, grid, backend=config.render.backend, params=inputs,
                           jit_cache=stage_cache)
    report = E.volume_report(case.volumes, vols if case.is_4d else vols[0])
    n_val = min(len(case.val), config.eval.max_val_views)
    if n_val > 0:
        cams = jax.vmap(sc.camera)(jnp.asarray(case.val.angles[:n_val], jnp.float32))
        vt = case.val.times[:n_val] if case.val.times is not None else np.zeros(n_val)
        pred = E.render_views(gaussians_at, cams, vt, backend=config.render.backend, params=inputs,
                              jit_cache=stage_cache)
        report.update(E.projection_report(case.val.projections[:n_val] * sc.scene_scale, pred))
    report["volumes"] = vols
    return report


def save_outputs(workdir: str, report: dict, case: Case) -> None:
    from x2gs_jax.fileio import nifti_frame_mm

    vols = report["volumes"]
    spacing, origin = nifti_frame_mm(case.scanner)
    if case.is_4d:
        os.makedirs(os.path.join(workdir, "volumes"), exist_ok=True)
        for k, v in enumerate(vols):
            atomic_save_npy(os.path.join(workdir, "volumes", f"vol_pred_T{k}.npy"), v)
            write_nifti(os.path.join(workdir, "volumes", f"vol_pred_T{k}.nii.gz"), v, spacing, origin)
    else:
        atomic_save_npy(os.path.join(workdir, "volume.npy"), vols[0])
        write_nifti(os.path.join(workdir, "volume.nii.gz"), vols[0], spacing, origin)


def checkpoint_meta(state: TrainState, config, stage: str) -> dict:
    return {"capacity": state.capacity, "step": int(state.step), "stage": stage, "config": config.to_json()}


class PhaseTimer:
    """Wall seconds per phase of the loop (data_generation (once, cached), setup, trace_and_lower and xla_compile of each new step function,
    steps, densify, eval, checkpoint, export): written to metrics.jsonl as one `timing` record, so a slow run
    says why."""

    def __init__(self):
        self.seconds = {}
        self._t0 = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)

    def since(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.add(phase, now - t0)
        return now

    def report(self) -> dict:
        out = {f"{k}_s": v for k, v in self.seconds.items()}
        out["total_s"] = time.perf_counter() - self._t0
        return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) training as configured; returns the final evaluation report (without volumes)."""
    timer = PhaseTimer()
    t_phase = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    # One-time data preparation (the embedded phantom, our FDK initialisation; both cached) is timed apart from
    # the setup, so a run's timing compares with the reference, which reads a prepared case.
    case_path = resolve_case_path(config)
    t_phase = timer.since("data_generation", t_phase)
    case = load_case(case_path)
    model = make_model(config, case)
    t_init = time.perf_counter()
    writes_init = not os.path.exists(init_path(case_path))
    points = initial_points(case_path, case, config)
    if writes_init:
        timer.add("data_generation", time.perf_counter() - t_init)
        t_phase += time.perf_counter() - t_init  # not part of the setup phase
    data = TrainData(case)
    sc = case.scanner
    atomic_write_bytes(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2).encode())

    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep)
    resume_dir = config.resume
    template = lambda meta: template_state(config, case, points, model, meta)
    if resume_dir:
        src = ckpt if os.path.abspath(resume_dir) == os.path.abspath(workdir) else Checkpointer(resume_dir)
        state, meta = src.restore(template)
        print(f"resumed from {src.directory} at step {int(state.step)}")
    else:
        state = init_state(config, case, points, model)
    logger = RunLogger(workdir, tensorboard=config.log.tensorboard)
    timer.since("setup", t_phase)

    total = int(config.train.iterations)
    coarse_end = min(int(config.train.coarse_iterations), total)
    # Pair buffer of the rasterizer: None = the backend's default (exact and dynamic for the reference
    # backend); grown from count_pairs whenever a step reports overflow.
    max_pairs = int(config.render.max_pairs) or None
    steps = {}
    eval_fns = {}  # compiled evaluation functions, reused by every evaluation (see evaluate)
    last_report = {}
    report = {}
    bar = tqdm(total=total, initial=int(state.step), desc="train", dynamic_ncols=True)
    try:
        while int(state.step) < total:
            it0 = int(state.step) + 1
            stage = "coarse" if it0 <= coarse_end else "fine"
            if stage == "fine" and it0 == coarse_end + 1:
                # Stage switch (x2gaussian.md §9): fresh optimiser and accumulators, global LR schedule kept.
                state = state.replace(opt_state=build_optimizer(config, state.params).init(state.params),
                                      stats=DensifyStats.zeros(state.capacity))
            stage_start = 1 if stage == "coarse" else coarse_end + 1
            end = chunk_end(it0, config, total, coarse_end)
            its = np.arange(it0, end + 1)
            # Calls are padded to a few fixed lengths (masked iterations are no-ops): one compilation serves
            # every chunk of a stage, capacity and pair buffer.
            n_scan = padded_length(len(its), config.train.steps_per_call)
            its_padded = np.concatenate([its, np.full(n_scan - len(its), its[-1])])
            fn_key = (stage, state.capacity, max_pairs, n_scan)
            V = int(config.train.views_per_step)
            views = np.array([[view_index((it - 1) * V + j + 1, stage_start, data.n_train, config.seed)
                               for j in range(V)] for it in its_padded])
            keys = jax.vmap(lambda i: jax.random.fold_in(state.key, i))(jnp.asarray(its_padded, jnp.int32))
            args = (state, data.batch(views), keys, jnp.int32(len(its)))
            if fn_key not in steps:
                # Compiled ahead of the call, timed in two parts: tracing + lowering (the Triton kernels are
                # compiled here, by jax-triton) and XLA's compilation.
                t_start = time.perf_counter()
                settings = step_settings(config, sc, stage, max_pairs)
                opt = build_optimizer(config, state.params)
                lowered = jax.jit(make_multi_step(make_train_step(model, settings, opt)), donate_argnums=0).lower(*args)
                t_lowered = timer.since("trace_and_lower", t_start)
                steps[fn_key] = lowered.compile()
                t_compiled = timer.since("xla_compile", t_lowered)
                # One `compile` record per step function: which stage, capacity and pair buffer cost how much.
                logger.write(it0, {"fine_stage": stage == "fine", "capacity": state.capacity,
                                   "max_pairs": max_pairs or 0, "scan_length": n_scan,
                                   "trace_and_lower_s": t_lowered - t_start,
                                   "xla_compile_s": t_compiled - t_lowered}, prefix="compile")
            t0 = time.perf_counter()
            state, metrics = steps[fn_key](*args)
            del args  # the state was donated
            metrics = jax.device_get(metrics)  # one host transfer per call
            dt = (time.perf_counter() - t0) / len(its)
            timer.since("steps", t0)
            for k, it in enumerate(its):
                if not metrics["done"][k]:
                    break
                m = {name: v[k] for name, v in metrics.items()}
                check_iteration(m, it, config, ckpt)
                if it % config.log.every == 0 or it == 1:
                    rec = {name: float(v) for name, v in m.items() if name not in ("overflow", "finite", "done")}
                    rec["step_time_s"] = dt
                    logger.write(it, rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", n=int(rec["num_gaussians"]), **last_report)
                bar.update(1)
            if int(state.step) < end:
                # The rasterizer needed more (Gaussian, tile) pairs than its static buffer holds: the state stopped
                # before that iteration, so size the buffer from the current Gaussians and redo from there.
                max_pairs = grown_pair_capacity(state, data, max_pairs)
                continue
            it = end
            t_phase = time.perf_counter()
            if is_densify_iteration(it, step_settings(config, sc, stage, max_pairs)):
                state, info = densify_step(state, config, sc, it)
                jax.block_until_ready(state.active)
                t_phase = timer.since("densify", t_phase)
                if bool(info.get("overflow", False)):
                    raise RuntimeError(f"densification overflow at iteration {it}: {info}")
                if int(info["num_active"]) == 0:
                    raise RuntimeError(f"no Gaussians left after densify/prune at iteration {it}")
            if it in tuple(config.eval.iterations) or it == total:
                report = evaluate(state, model, case, config, stage, eval_fns)
                vols = report.pop("volumes")
                logger.write(it, report, prefix="eval")
                last_report = {"psnr3d": f"{report['psnr_3d_mean']:.2f}"}
                if it == total:
                    save_outputs(workdir, {**report, "volumes": vols}, case)
                t_phase = timer.since("eval", t_phase)
            if it % config.checkpoint.every == 0 or it == total or it == coarse_end:
                ckpt.save(it, state, checkpoint_meta(state, config, stage))
                timer.since("checkpoint", t_phase)
        t_phase = time.perf_counter()
        export_inference(workdir, state, config, case)
        timer.since("export", t_phase)
        timing = timer.report()
        logger.write(int(state.step), timing, prefix="timing")
        print("time per phase: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timing.items()))
    finally:
        bar.close()
        logger.close()
    return report


def chunk_end(it0: int, config, total: int, coarse_end: int) -> int:
    """Last iteration of the jitted call that starts at it0: the nearest of the stage end, the next densify,
    evaluation or checkpoint iteration, and the next multiple of train.steps_per_call (host work happens
    between calls)."""
    per_call = max(1, int(config.train.steps_per_call))
    ends = [total, -(-it0 // per_call) * per_call]  # calls end on multiples of steps_per_call (aligned chunks)
    if it0 <= coarse_end:
        ends.append(coarse_end)
    d = config.densify
    if d.enabled:
        n = -(-max(it0, d.from_iter + 1) // d.interval) * d.interval  # first multiple of interval > from, >= it0
        if n < d.until_iter:
            ends.append(n)
    ends += [e for e in config.eval.iterations if e >= it0]
    ends.append(-(-it0 // config.checkpoint.every) * config.checkpoint.every)
    return min(ends)


def check_iteration(m: dict, it: int, config, ckpt) -> None:
    """Stop loudly on a non-finite loss term or an impossible periodic shift (nothing bad is checkpointed)."""
    if not bool(m["finite"]):
        bad = [k for k, v in m.items() if k.startswith("loss") and not np.isfinite(float(v))]
        raise NonFiniteLossError(f"non-finite loss at iteration {it}: terms {bad}; the last good checkpoint "
                                 f"is kept in {ckpt.directory}")
    if "period_shift_valid" in m and not bool(m["period_shift_valid"]):
        raise ValueError(f"iteration {it}: the learned period {float(m['period_s']):.3f} s leaves no "
                         f"periodic shift inside the {config.data.scan_s} s scan (T must be < scan/2)")


def template_state(config, case, points, model, meta) -> TrainState:
    state = init_state(config, case, points, model)
    if meta["capacity"] != state.capacity:
        state = grow_state(state, int(meta["capacity"])) if meta["capacity"] > state.capacity else \
            _shrink_template(state, int(meta["capacity"]))
    return state


def _shrink_template(state: TrainState, capacity: int) -> TrainState:
    cut = lambda x: x[:capacity] if getattr(x, "ndim", 0) >= 1 and x.shape[0] == state.capacity else x
    return jax.tree.map(cut, state)


def export_inference(workdir: str, state: TrainState, config, case: Case) -> None:
    """A small inference export: raw Gaussian parameters + active mask, field params, config, scanner."""
    out = os.path.join(workdir, "export")
    os.makedirs(out, exist_ok=True)
    flat = {"active": np.asarray(state.active)}
    for k in GAUSSIAN_KEYS:
        flat[k] = np.asarray(state.params[k])
    if "period" in state.params:
        flat["period"] = np.asarray(state.params["period"])
    import io

    buf = io.BytesIO()
    np.savez(buf, **flat)
    atomic_write_bytes(os.path.join(out, "gaussians.npz"), buf.getvalue())
    if "field" in state.params:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:  # context: waits for the async write to finish
            ckptr.save(os.path.abspath(os.path.join(out, "field")), state.params["field"], force=True)
    meta = {"config": json.loads(config.to_json_best_effort()), "scanner": {k: (v.tolist() if hasattr(v, "tolist") else v)
            for k, v in case.scanner.to_naf().items()}, "scene_scale": case.scanner.scene_scale,
            "step": int(state.step), "scale_bound": state.scale_bound}
    atomic_write_bytes(os.path.join(out, "meta.json"), json.dumps(meta, indent=2).encode())
