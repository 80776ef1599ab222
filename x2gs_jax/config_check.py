"""Config values checked before a run does any work.

ml_collections already refuses unknown keys and values of the wrong type; these checks refuse values of the right
type that cannot make sense (a negative iteration count, a 4D run without a fine stage, a zero learning rate, an
evaluation iteration the schedule never reaches). Every problem is reported at once, each naming the key, the
value and what is allowed, as one `ConfigError` (train.py turns it into a usage error, without a traceback).
"""
from __future__ import annotations

import math
from typing import Any

from x2gs_jax.models import ConfigError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get(config, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_config(config) -> None:
    """The model-independent checks (module docstring); raises ConfigError listing every problem."""
    problems = []

    def need(key: str, ok, allowed: str, value=None):
        v = _get(config, key) if value is None else value
        if not ok(v):
            problems.append(f"config.{key}={v!r}: {allowed}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    int_at_least = lambda lo: (lambda v: _is_int(v) and v >= lo)  # noqa: E731
    positive = lambda v: number(v) and v > 0  # noqa: E731
    non_negative = lambda v: number(v) and v >= 0  # noqa: E731

    need("train.iterations", int_at_least(1), "must be an integer >= 1")
    need("train.coarse_iterations", int_at_least(0), "must be an integer >= 0")
    need("train.views_per_step", int_at_least(1), "must be an integer >= 1")
    need("train.steps_per_call", int_at_least(1), "must be an integer >= 1")
    need("parallel.devices", lambda v: _is_int(v) and (v == -1 or v >= 1), "must be -1 (all local devices) or an "
         "integer >= 1 (devices of each process)")
    if config.parallel.distributed:
        need("parallel.num_processes", int_at_least(0), "must be an integer >= 0 (0 = from the environment)")
        need("parallel.process_id", int_at_least(-1), "must be an integer >= -1 (-1 = from the environment)")
    need("checkpoint.every", int_at_least(1), "must be an integer >= 1 (iterations between checkpoints)")
    need("checkpoint.keep", int_at_least(1), "must be an integer >= 1 (checkpoints kept)")
    need("log.every", int_at_least(1), "must be an integer >= 1")
    need("eval.max_val_views", int_at_least(0), "must be an integer >= 0")
    need("render.max_pairs", int_at_least(0), "must be an integer >= 0 (0 = the backend's default)")
    need("model.initial_capacity_factor", lambda v: positive(v) and v >= 1, "must be >= 1 (the buffers hold the "
         "initial points)")
    need("model.capacity_headroom", lambda v: positive(v) and v >= 1, "must be >= 1")
    need("model.capacity_multiple", int_at_least(1), "must be an integer >= 1 (1 = no rounding)")
    need("data.init.n_points", int_at_least(1), "must be an integer >= 1")
    need("loss.tv_vol_size", int_at_least(1), "must be an integer >= 1 (voxels per side of the TV patch)")
    d = config.densify
    if d.enabled:
        need("densify.interval", int_at_least(1), "must be an integer >= 1")
        need("densify.from_iter", int_at_least(0), "must be an integer >= 0")
        need("densify.until_iter", int_at_least(0), "must be an integer >= 0")
        need("densify.max_num_gaussians", int_at_least(1), "must be an integer >= 1")
        need("densify.scale_threshold", positive, "must be > 0 (a fraction of the volume size)")
        need("densify.grad_threshold", positive, "must be > 0")
        need("densify.density_min", non_negative, "must be >= 0")
    if not config.data.path:  # the embedded phantom is generated from these
        for k in ("size", "detector", "views"):
            need(f"data.phantom.{k}", int_at_least(1), "must be an integer >= 1")
        need("data.phantom.val_views", int_at_least(0), "must be an integer >= 0")
        need("data.phantom.period_s", positive, "must be > 0 (seconds)")
        need("data.phantom.box_mm", positive, "must be > 0 (mm)")
    if "scan_s" in config.data:
        need("data.scan_s", positive, "must be > 0 (seconds)")
    for name, group in config.optim.lr.items():
        for k in ("init", "final"):
            need(f"optim.lr.{name}.{k}", positive, "must be > 0 (the schedule is log-linear)")
        need(f"optim.lr.{name}.max_steps", int_at_least(1), "must be an integer >= 1")
    for name, controls in config.optim.controls.items():
        if "lr_scale" in controls:
            need(f"optim.controls.{name}.lr_scale", non_negative, "must be >= 0")
        for k in ("freeze_until", "freeze_from"):
            if k in controls:
                need(f"optim.controls.{name}.{k}", int_at_least(0), "must be an integer >= 0 (an iteration)")

    total = config.train.iterations
    if _is_int(total) and total >= 1:
        evals = tuple(config.eval.iterations)
        outside = [e for e in evals if not (_is_int(e) and 1 <= e <= total)]
        if outside:
            problems.append(f"config.eval.iterations={evals!r}: {outside} outside the schedule; allowed: iterations "
                            f"in 1..train.iterations={total} (the last one is always evaluated)")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def check_stages(config, is_4d: bool) -> None:
    """A 4D model needs a fine stage: 0 <= coarse_iterations < iterations (static models train in one stage)."""
    total, coarse = config.train.iterations, config.train.coarse_iterations
    if is_4d and not coarse < total:
        raise ConfigError(f"invalid config:\n  config.train.coarse_iterations={coarse!r}: a 4D model "
                          f"({config.model.kind}) needs a fine stage; allowed: 0 <= coarse_iterations < "
                          f"train.iterations={total}")


def check_parallel(config, n_devices: int) -> None:
    """The global batch of views must split evenly over the run's `n_devices` devices (all processes together)."""
    v = config.train.views_per_step
    if _is_int(v) and v % n_devices != 0:
        raise ConfigError(f"invalid config:\n  config.train.views_per_step={v!r}: the views of a step are split evenly "
                          f"over the {n_devices} devices of the run (config.parallel.devices="
                          f"{config.parallel.devices!r}); allowed: a multiple of {n_devices}")
