"""The training loop behind `train.py`: data, initialisation, stages, densification, evaluation,
logging and checkpoints. The per-iteration math is the jitted step of `train_step.py`.

Run directory layout (README "Run directories and recovery"):
  config.json          the resolved config (config.before_resume_<step>.json: the one a resumed run replaced)
  metrics.jsonl        one JSON record per logged iteration / evaluation (a `resume` record where a run continued;
                       each step once: a resume drops what the interrupted run logged past its checkpoint)
  tb/                  TensorBoard events (tensorboardX): every metrics record's scalars, slice and projection
                       images at evaluation iterations
  checkpoints/<step>/  orbax full-state checkpoints (exact continuation), verified when written and read
  damaged_checkpoints/ checkpoints that failed to restore, moved out of the way by a resume (never deleted)
  export/              inference export (Gaussians, field, period, config, scanner)
  volume.npy, volume.nii.gz (static) or volumes/ (4D: per phase, and vol_pred_4d.nii.gz with time as 4th axis)
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from x2gs_jax import compile_cache
from x2gs_jax import evaluation as E
from x2gs_jax import parallel
from x2gs_jax.checkpoint import Checkpointer
from x2gs_jax.config_check import check_config, check_parallel, check_stages
from x2gs_jax.data.naf import Case, init_path, load_case
from x2gs_jax.data.prepare import initial_points, resolve_case_path
from x2gs_jax.densify import DensifyStats
from x2gs_jax.export import export_inference, save_outputs
from x2gs_jax.fileio import atomic_write_bytes
from x2gs_jax.models import ConfigError, make_model
from x2gs_jax.models.static import StaticModel
from x2gs_jax.run_dir import move_aside, plan_run_dir
from x2gs_jax.run_log import NullLogger, PhaseTimer, RunLogger, eval_images
from x2gs_jax.run_state import (build_optimizer, densify_step, grow_state, grown_capacity, init_opt_state, init_state,
                                scale_bound_from_config, template_state)
from x2gs_jax.step_functions import StepFunctions, abstract, compile_record, next_switch, phase_change
from x2gs_jax.train_data import TrainData, grown_pair_capacity, iteration_keys, view_index
from x2gs_jax.train_state import GAUSSIAN_KEYS, TrainState, gaussians_from_params
from x2gs_jax.train_step import (NONFINITE_PREFIX, StepSettings, call_length, is_densify_iteration,
                                 make_multi_step, make_train_step)

__all__ = ["NonFiniteError", "StaticModel", "TrainData", "build_optimizer", "check_iteration", "chunk_end",
           "densify_step", "evaluate", "grow_state", "grown_capacity", "grown_pair_capacity", "init_opt_state",
           "init_state", "initial_points", "make_model", "resolve_case_path", "step_settings", "template_state",
           "train_and_evaluate", "view_index"]


class NonFiniteError(FloatingPointError):
    """A loss term or an updated parameter became NaN/inf (the message names the iteration, terms and groups)."""


# --------------------------------------------------------------------------------- orchestration
def step_settings(config, scanner, stage: str, max_pairs, stage_end: Optional[int] = None,
                  phase: Optional[int] = None) -> StepSettings:
    """The static settings of a stage's step function; stage_end: its last iteration (default from the config:
    coarse_iterations or iterations; the loop passes `iterations` for the one stage of a static model); phase: the
    model's static phase (train.static_phases) or None."""
    lo, hi = scanner.bbox
    d = config.densify
    if stage_end is None:
        stage_end = config.train.coarse_iterations if stage == "coarse" else config.train.iterations
    return StepSettings(
        stage=stage, stage_end=int(stage_end), backend=config.render.backend, max_pairs=max_pairs,
        lambda_dssim=config.loss.lambda_dssim, lambda_tv=config.loss.lambda_tv, tv_n=config.loss.tv_vol_size,
        tv_size=tuple(float(config.loss.tv_vol_size * h) for h in scanner.d_voxel),
        tv_culling=config.loss.tv_culling, tv_mean_grad=config.loss.tv_mean_grad,
        bbox_min=tuple(float(x) for x in lo), bbox_max=tuple(float(x) for x in hi),
        densify_interval=d.interval, densify_from=d.from_iter, densify_until=d.until_iter,
        densify_enabled=bool(d.enabled), scale_bound=scale_bound_from_config(config, scanner), phase=phase)


def evaluate(state: TrainState, model, case: Case, config, stage: str, jit_cache: Optional[dict] = None) -> dict:
    """Volume metrics (per phase for 4D) and 2D metrics on the val projections, with the predicted volumes
    (`volumes` [P, nx, ny, nz]) and the first val rendering (`val_pred0` [H, W], scene-scaled) the caller pops.

    The state enters the compiled functions as arguments (never as closure constants) and `jit_cache` (owned
    by the training loop) keeps them (per stage) and the val cameras, so every evaluation of a stage at the same
    capacity reuses one compile and a later one compiles nothing."""
    sc = case.scanner
    inputs = (state.params, state.active, state.model_state)

    def gaussians_at(inputs, t):
        params, active, model_state = inputs
        canonical = gaussians_from_params(params, active, state.scale_bound)
        return model.gaussians_at(params, model_state, canonical, t, jax.random.PRNGKey(0), stage)

    # One traced function per stage (the model's behaviour differs) in the caller's cache.
    stage_cache = None if jit_cache is None else jit_cache.setdefault(stage, {})
    grid = E.full_grid(sc)
    times = model.eval_times(case) if case.is_4d else [0.0]
    vols = E.query_volumes(gaussians_at, times, grid, backend=config.render.backend, params=inputs,
                           jit_cache=stage_cache)
    report = E.volume_report(case.volumes, vols if case.is_4d else vols[0])
    n_val = min(len(case.val), config.eval.max_val_views)
    if n_val > 0:
        cams = None if jit_cache is None else jit_cache.get("val_cameras")
        if cams is None:  # once per run: a new jax.jit(...) here compiled again at every evaluation
            cams = jax.jit(jax.vmap(sc.camera))(jnp.asarray(case.val.angles[:n_val], jnp.float32))
            if jit_cache is not None:
                jit_cache["val_cameras"] = cams
        vt = case.val.times[:n_val] if case.val.times is not None else np.zeros(n_val)
        pred = E.render_views(gaussians_at, cams, vt, backend=config.render.backend, params=inputs,
                              jit_cache=stage_cache)
        report.update(E.projection_report(case.val.projections[:n_val] * sc.scene_scale, pred))
        report["val_pred0"] = np.asarray(pred[0])  # [H, W] the first val rendering, scene-scaled (TensorBoard)
    report["volumes"] = vols
    return report


def checkpoint_meta(state: TrainState, config, stage: str) -> dict:
    return {"capacity": state.capacity, "step": int(state.step), "stage": stage, "config": config.to_json()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) training as configured; returns the final evaluation report (without volumes).

    Before any work: the config is checked (`config_check`) and so is the run directory (`run_dir.plan_run_dir`:
    a directory holding a run is refused unless config.resume names it or config.overwrite is set). Nothing is
    written before the data, the model and the checkpoint to resume from have been loaded, and nothing at all when
    the checkpoint already is at train.iterations (returns {})."""
    timer = PhaseTimer()
    t_phase = time.perf_counter()
    check_config(config)
    # The mesh (and jax.distributed, before any JAX computation): the state is replicated on every device, each
    # step's views are split over them. Every process runs this function; process 0 alone writes the run's files.
    par = parallel.setup(config)
    check_parallel(config, par.n_devices)
    writer = par.is_writer
    mode = plan_run_dir(workdir, config.resume, bool(config.overwrite))
    compile_cache.enable(config.get("compile_cache_dir", "auto"))
    # One-time data preparation (the embedded phantom, our FDK initialisation; both cached) is timed apart from
    # the setup, so a run's timing compares with the reference, which reads a prepared case. Process 0 prepares
    # first, the others then read its cache.
    case_path = _writer_first(par, "case", lambda: resolve_case_path(config))
    t_phase = timer.since("data_generation", t_phase)
    case = load_case(case_path)
    model = make_model(config, case)
    check_stages(config, model.is_4d)
    t_init = time.perf_counter()
    init_before = _mtime(init_path(case_path))
    points = _writer_first(par, "init", lambda: initial_points(case_path, case, config))
    if _mtime(init_path(case_path)) != init_before:  # the FDK initialisation ran
        timer.add("data_generation", time.perf_counter() - t_init)
        t_phase += time.perf_counter() - t_init  # not part of the setup phase

    total = int(config.train.iterations)
    own = Checkpointer(workdir, keep=config.checkpoint.keep, read_only=True) if mode == "continue" else None
    try:
        state, damaged = _start_state(config, case, points, model, own, par)
    finally:
        if own is not None:
            own.close()
    if int(state.step) == total:
        print(f"nothing to do: the checkpoint of {config.resume} is at step {total} = config.train.iterations; "
              f"nothing was run or written (pass a larger --config.train.iterations to continue training)")
        return {}

    # From here on the run directory is written (by process 0): the old run moved aside (overwrite), or continued
    # in place. Every process saves checkpoints and the export's orbax trees together (orbax writes them once).
    if writer:
        if mode == "replace":
            print(f"config.overwrite: moved the old run aside to {move_aside(workdir)}")
        os.makedirs(workdir, exist_ok=True)
        _write_config(workdir, config, int(state.step) if mode == "continue" else None)
    par.barrier("x2gs-run-dir")
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep,
                        verify_writes=config.checkpoint.get("verify_writes", True))
    if damaged:
        if writer:
            moved = ckpt.set_aside([s for s, _ in damaged])
            print(f"damaged checkpoints moved aside (kept, not used): {', '.join(moved)}", file=sys.stderr)
        par.barrier("x2gs-set-aside")
        ckpt.reload()
    data = TrainData(case, par)
    sc = case.scanner
    # A resumed run drops what the interrupted one logged past the restored step (it is logged again).
    logger = (RunLogger(workdir, tensorboard=config.log.tensorboard,
                        resume_step=int(state.step) if config.resume else None) if writer else NullLogger())
    if config.resume:
        logger.write(int(state.step), {"damaged_steps": [s for s, _ in damaged]}, prefix="resume")
    timer.since("setup", t_phase)

    # Static models train in one stage (the reference R2); 4D models have 0 <= coarse_end < total (check_stages).
    coarse_end = int(config.train.coarse_iterations) if model.is_4d else total
    # Pair buffer of the rasterizer: None = the backend's default (exact and dynamic for the reference
    # backend); grown from count_pairs whenever a step reports overflow.
    max_pairs = int(config.render.max_pairs) or None
    static_phases = bool(config.train.get("static_phases", False))
    steps = StepFunctions(timer, lambda it, rec: logger.write(it, rec, prefix="compile"),
                          background=bool(config.train.get("background_compile", False)))
    eval_fns = {}  # compiled evaluation functions, reused by every evaluation (see evaluate)
    last_report = {}
    report = {}
    bar = tqdm(total=total, initial=int(state.step), desc="train", dynamic_ncols=True, disable=not writer)
    try:
        while int(state.step) < total:
            t_host = time.perf_counter()  # the loop's own host work between calls ("host" in the timing record)
            it0 = int(state.step) + 1
            stage = "coarse" if it0 <= coarse_end else "fine"
            if stage == "fine" and it0 == coarse_end + 1:
                # Stage switch (x2gaussian.md §9): fresh optimiser and accumulators, global LR schedule kept.
                state = state.replace(opt_state=init_opt_state(build_optimizer(config, state.params, model),
                                                               state.params),
                                      stats=DensifyStats.zeros(state.capacity))
            stage_start = 1 if stage == "coarse" else coarse_end + 1
            stage_end = coarse_end if stage == "coarse" else total
            end = call_end(model, it0, stage, config, total, coarse_end, static_phases)
            phase = model.phase(it0, stage) if static_phases else None
            its = np.arange(it0, end + 1)
            # Calls are padded to a few fixed lengths (masked iterations are no-ops): one compilation serves
            # every chunk of a stage, capacity and pair buffer (short calls inside a stage included).
            n_scan = call_length(len(its), stage_end - it0 + 1, config.train.steps_per_call,
                                 [k[4] for k in steps.keys() if k[:4] == (stage, state.capacity, max_pairs, phase)],
                                 bool(config.train.get("pad_short_calls", True)))
            its_padded = np.concatenate([its, np.full(n_scan - len(its), its[-1])])
            fn_key = (stage, state.capacity, max_pairs, phase, n_scan)
            B = int(config.train.views_per_step)  # the global batch: view j of iteration it, split over the mesh
            views = np.array([[view_index((it - 1) * B + j + 1, stage_start, data.n_train, config.seed)
                               for j in range(B)] for it in its_padded])
            base_key = par.local(state.key)
            keys = iteration_keys(base_key, np.asarray(its_padded, np.int32))
            state = par.replicate(state)  # a no-op unless densification, growth or a stage switch made a new one
            args = (state, data.sharded_batch(views), par.replicate(keys), par.replicate(jnp.int32(len(its))))
            timer.since("host", t_host)
            if fn_key not in steps:
                # Compiled ahead of the call (step_functions.py): one `compile` record per step function, which
                # stage, capacity and pair buffer cost how much.
                step_fn = steps.get(fn_key, _step_maker(model, config, sc, state, par, stage, max_pairs, stage_end,
                                                        phase), args, it0, compile_record(fn_key, par.n_devices))
                # A new function started: the next one the loop can foresee compiles meanwhile (if enabled).
                t_host = time.perf_counter()
                _prefetch_next(steps, model, config, sc, state, par, args, max_pairs, it0, stage, stage_end,
                               coarse_end, total, static_phases)
                timer.since("host", t_host)
            else:
                step_fn = steps[fn_key]
            t0 = time.perf_counter()
            state, metrics = step_fn(*args)
            del args  # the state was donated
            metrics = jax.device_get(metrics)  # one host transfer per call
            ckpt.poll()  # a background checkpoint save that failed stops the run now, naming its step
            dt = (time.perf_counter() - t0) / len(its)
            t_host = timer.since("steps", t0)
            for k, it in enumerate(its):
                if not metrics["done"][k]:
                    break
                m = {name: v[k] for name, v in metrics.items()}
                check_iteration(m, it, config, ckpt)
                if it % config.log.every == 0 or it == 1:
                    rec = {name: float(v) for name, v in m.items()
                           if name not in ("overflow", "finite", "done") and not name.startswith(NONFINITE_PREFIX)}
                    rec["step_time_s"] = dt
                    logger.write(it, rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", n=int(rec["num_gaussians"]), refresh=False,
                                    **last_report)  # drawn by the bar's next timed refresh, not at every log
                bar.update(1)
            timer.since("host", t_host)
            if int(state.step) < end:
                # The rasterizer needed more (Gaussian, tile) pairs than its static buffer holds: the state stopped
                # before that iteration, so size the buffer from the current Gaussians and redo from there.
                t_host = time.perf_counter()
                max_pairs = grown_pair_capacity(par.local(state), data, max_pairs)
                timer.since("pair_sizing", t_host)
                continue
            it = end
            t_phase = time.perf_counter()
            if is_densify_iteration(it, step_settings(config, sc, stage, max_pairs, stage_end)):
                # On this process's first device (every process does the same), then replicated again.
                state, info = densify_step(par.local(state), config, sc, it, model)
                state = par.replicate(state)
                jax.block_until_ready(state.active)
                t_phase = timer.since("densify", t_phase)
                if bool(info.get("overflow", False)):
                    raise RuntimeError(f"densification overflow at iteration {it}: {info}")
                if int(info["num_active"]) == 0:
                    raise RuntimeError(f"no Gaussians left after densify/prune at iteration {it}")
            if it in tuple(config.eval.iterations) or it == total:
                report = evaluate(par.local(state), model, case, config, stage, eval_fns)
                vols = report.pop("volumes")
                val_pred0 = report.pop("val_pred0", None)
                logger.write(it, report, prefix="eval")
                gt0 = case.volumes[0] if case.is_4d else case.volumes
                logger.add_images(it, eval_images(gt0, vols[0], *(
                    (case.val.projections[0] * sc.scene_scale, val_pred0) if val_pred0 is not None else ())))
                last_report = {"psnr3d": f"{report['psnr_3d_mean']:.2f}"}
                if it == total and writer:
                    times_s = np.asarray(model.eval_times(case)) * float(config.data.scan_s) if model.is_4d else None
                    save_outputs(workdir, {**report, "volumes": vols}, case, times_s)
                t_phase = timer.since("eval", t_phase)
            if it % config.checkpoint.every == 0 or it == total or it == coarse_end:
                logger.sync()  # the logs up to this step are on disk before the checkpoint is (a resume starts here)
                # In the background by default: the write and its read-back overlap the next iterations.
                ckpt.save(it, state, checkpoint_meta(state, config, stage),
                          background=bool(config.checkpoint.get("background", True)))
                timer.since("checkpoint", t_phase)
        t_phase = time.perf_counter()
        ckpt.close()  # the last checkpoint is written and verified before the run reports success
        timer.since("checkpoint", t_phase)
        t_phase = time.perf_counter()
        export_inference(workdir, state, config, case, writer=writer)
        timer.since("export", t_phase)
        timing = timer.report()
        logger.write(int(state.step), timing, prefix="timing")
        if writer:
            print("time per phase: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in timing.items()))
    finally:
        steps.close()
        bar.close()
        logger.close()
        if sys.exc_info()[0] is not None:  # failing already: finish the background save without hiding the error
            try:
                ckpt.close()
            except Exception as err:  # noqa: BLE001 - reported beside the error that stopped the run
                print(f"also: {err}", file=sys.stderr)
    return report


def _step_maker(model, config, scanner, state, par, stage, max_pairs, stage_end, phase):
    """() -> the jitted multi-step function of a stage / pair buffer / phase (settings and optimiser built now,
    in the loop's thread; tracing happens where it is called)."""
    settings = step_settings(config, scanner, stage, max_pairs, stage_end, phase)
    opt = build_optimizer(config, state.params, model)
    multi = make_multi_step(make_train_step(model, settings, opt, axis_name=parallel.AXIS))
    return lambda: jax.jit(par.shard(multi), donate_argnums=0)


def _prefetch_next(steps, model, config, scanner, state, par, args, max_pairs, it0, stage, stage_end, coarse_end,
                   total, static_phases) -> None:
    """Start compiling (in the background, train.background_compile) the step function of the next stage or
    static phase, for today's capacity and pair buffer (a growth before then makes it stale: it is dropped)."""
    if not steps.background:
        return
    nxt = next_switch(model, it0, stage, stage_end, coarse_end, total, static_phases)
    if nxt is None:
        return
    it, stage_n, phase_n = nxt
    end_n = coarse_end if stage_n == "coarse" else total
    first = call_end(model, it, stage_n, config, total, coarse_end, static_phases) - it + 1
    n_scan = call_length(first, end_n - it + 1, config.train.steps_per_call, (),
                         bool(config.train.get("pad_short_calls", True)))
    if n_scan != len(args[2]):  # the batch and keys of another scan length: not foreseen from these arguments
        return
    key = (stage_n, state.capacity, max_pairs, phase_n, n_scan)
    steps.prefetch(key, _step_maker(model, config, scanner, state, par, stage_n, max_pairs, end_n, phase_n),
                   abstract(args), stale=lambda k: k[1:3] != (state.capacity, max_pairs))


def call_end(model, it0: int, stage: str, config, total: int, coarse_end: int, static_phases: bool) -> int:
    """Last iteration of the call that starts at it0: `chunk_end`, and with static phases before the phase changes
    (a call runs one phase)."""
    end = chunk_end(it0, config, total, coarse_end)
    change = phase_change(model, it0, stage, end) if static_phases else None
    return end if change is None else change - 1


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
    """Stop loudly on a non-finite loss term or parameter, or an impossible periodic shift. Runs before anything of
    the iteration's call is logged, evaluated or checkpointed, so the newest checkpoint (named when there is one)
    holds finite values."""
    if not bool(m["finite"]):
        parts = []
        bad_loss = [k for k, v in m.items() if k.startswith("loss") and not np.isfinite(float(v))]
        if bad_loss:
            parts.append(f"loss terms {bad_loss}")
        for k, v in m.items():
            if k.startswith(NONFINITE_PREFIX) and int(v) > 0:
                group = k[len(NONFINITE_PREFIX):]
                where = " of active Gaussians" if group in GAUSSIAN_KEYS else ""
                parts.append(f"parameter group '{group}': {int(v)} non-finite entries{where}")
        last = ckpt.latest_step()
        kept = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else
                f"no checkpoint had been written to {ckpt.directory}")
        raise NonFiniteError(f"non-finite values at iteration {it}: {'; '.join(parts)}. Training stopped; nothing of "
                             f"this iteration was saved; {kept}")
    if "period_shift_valid" in m and not bool(m["period_shift_valid"]):
        raise ValueError(f"iteration {it}: the learned period {float(m['period_s']):.3f} s leaves no "
                         f"periodic shift inside the {config.data.scan_s} s scan (T must be < scan/2)")


def _mtime(path: str) -> Optional[int]:
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def _writer_first(par: parallel.Parallel, name: str, fn):
    """fn() on process 0, then (after a barrier) on the others: files it caches are made once."""
    out = fn() if par.is_writer else None
    par.barrier(f"x2gs-{name}")
    return out if par.is_writer else fn()


def _start_state(config, case, points, model, own: Optional[Checkpointer],
                 par: parallel.Parallel) -> tuple[TrainState, list]:
    """(the state before the first iteration to run, replicated on the mesh; damaged checkpoint steps skipped (own
    run only)).

    Fresh (no config.resume) or restored from the newest intact checkpoint of config.resume (`own`: the run's own
    checkpoints, when it continues in place) straight onto this run's mesh (checkpoints are device-count
    independent). Raises ConfigError for a resume that cannot work."""
    total = int(config.train.iterations)
    if not config.resume:
        return par.replicate(init_state(config, case, points, model)), []
    src = own or Checkpointer(config.resume, read_only=True)
    try:
        state, _ = src.restore(lambda meta: template_state(config, case, points, model, meta),
                               sharding=par.replicated)
    except FileNotFoundError as err:
        raise ConfigError(f"config.resume={config.resume!r}: {err} (nothing to resume; start a new run without "
                          f"--config.resume)") from err
    finally:
        if src is not own:
            src.close()
    step = int(state.step)
    if step > total:
        raise ConfigError(f"config.train.iterations={total}: the checkpoint to resume ({src.directory}) is at step "
                          f"{step}; allowed: train.iterations >= {step} (a run does not go back)")
    if par.is_writer:
        print(f"resumed from {src.directory} at step {step}")
    return state, (list(src.damaged) if own is not None else [])


def _write_config(workdir: str, config, resumed_at: Optional[int]) -> None:
    """config.json of the run; when a run continues with other settings, the previous file is kept beside it as
    config.before_resume_<step>.json (resume/overwrite themselves do not count as a change)."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2)
    if resumed_at is not None and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        strip = lambda c: {k: v for k, v in c.items() if k not in ("resume", "overwrite")}  # noqa: E731
        if strip(old) != strip(json.loads(text)):
            keep, n = os.path.join(workdir, f"config.before_resume_{resumed_at}.json"), 1
            while os.path.exists(keep):
                keep, n = os.path.join(workdir, f"config.before_resume_{resumed_at}~{n}.json"), n + 1
            os.rename(path, keep)
            print(f"the resumed run's config differs from {path}: the previous one is kept as {keep}")
    atomic_write_bytes(path, text.encode())
