"""Building, growing and restoring the `TrainState` (shared by the trainer, densification and the evaluator).

The state holds the Gaussians in fixed-capacity buffers; `grow_state` re-allocates every per-Gaussian buffer
(parameters, Adam moments, densification statistics) and lets the model rebuild its per-Gaussian state
(`DeformationModel.rebind`). `densify_step` runs densify-and-prune between steps, growing first when needed,
and rebinds the model's state to the new Gaussians.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax.data.naf import Case
from x2gs_jax.densify import DensifyStats, densify_and_prune, required_capacity
from x2gs_jax.gaussians import Gaussians, grow, next_capacity
from x2gs_jax.optim import group_specs_from_config, make_optimizer
from x2gs_jax.train_state import GAUSSIAN_KEYS, TrainState, param_labels, params_from_gaussians


def scale_bound_from_config(config, scanner) -> Optional[tuple]:
    V = max(scanner.s_voxel)
    if config.model.scale_min > 0 and config.model.scale_max > 0:
        return (config.model.scale_min * V, config.model.scale_max * V)
    return None


# ------------------------------------------------------------------------------------ the state
def init_opt_state(optimizer, params):
    """optimizer.init(params) as one compiled program: eagerly, every zeros_like of a new shape compiled its own
    (dozens of small compiles in a run's setup and again at the fine stage's switch)."""
    return jax.jit(optimizer.init)(params)


def initial_capacity(n_points: int, factor: float, multiple: int = 1) -> int:
    """Slots of the first Gaussian buffers: factor x n_points rounded up to a multiple of `multiple` (growth by
    doubling keeps it; config.model.capacity_multiple says why)."""
    cap = int(np.ceil(int(n_points) * float(factor)))
    m = max(int(multiple), 1)
    return -(-cap // m) * m


def init_state(config, case: Case, points: np.ndarray, model) -> TrainState:
    """The state before iteration 1: Gaussians from the points, the model's parameters (key fold 1) and state
    (key fold 2), fresh optimiser and statistics; every random choice from config.seed."""
    scale_bound = scale_bound_from_config(config, case.scanner)
    capacity = initial_capacity(len(points), config.model.initial_capacity_factor, config.model.capacity_multiple)
    g = Gaussians.from_point_cloud(points, capacity=capacity, scale_bound=scale_bound)
    params = params_from_gaussians(g)
    key = jax.random.PRNGKey(config.seed)
    params.update(model.init_params(jax.random.fold_in(key, 1), case))
    model_state = model.init_model_state(jax.random.fold_in(key, 2), g)
    return fresh_state(config, params, g.active, model_state, scale_bound, model)


def fresh_state(config, params: dict, active, model_state: dict, scale_bound, model) -> TrainState:
    """A state at step 0 around given parameters, active mask [capacity] and model state: fresh optimiser state,
    zero densification statistics, the run's key (config.seed). `init_state` and a finished run's export
    (`bench/train_speed.py --trained`) both start from here."""
    optimizer = build_optimizer(config, params, model)
    active = jnp.asarray(active)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, active=active,
                      opt_state=init_opt_state(optimizer, params), stats=DensifyStats.zeros(active.shape[0]),
                      model_state=model_state, key=jax.random.PRNGKey(config.seed), scale_bound=scale_bound)


def build_optimizer(config, params, model):
    """One gated Adam per parameter group (config.optim.lr.<group>), groups labelled by `param_labels`."""
    specs = group_specs_from_config(config.optim.lr.to_dict(), config.optim.controls.to_dict(),
                                    model.group_specs())
    return make_optimizer(specs, param_labels(params, model))


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


# One compiled program per growth (eagerly, every leaf's pad compiled its own).
_grow_jit = jax.jit(grow, static_argnums=(1, 2))


def grow_state(state: TrainState, new_capacity: int, model) -> TrainState:
    """Re-allocate every per-Gaussian buffer to `new_capacity` (between steps), carrying Adam moments; the model
    rebinds its per-Gaussian state to the new buffers."""
    old, new = state.capacity, int(new_capacity)
    g, rows, stats = _grow_jit((state.gaussians(), per_gaussian_opt_rows(state.opt_state), state.stats), new, old)
    params = dict(state.params)
    params.update(params_from_gaussians(g))
    opt_state = with_per_gaussian_opt_rows(state.opt_state, rows)
    return state.replace(params=params, active=g.active, opt_state=opt_state, stats=stats,
                         model_state=model.rebind(state.model_state, g))


def grown_capacity(needed: int, capacity: int, headroom: float, max_gaussians: int) -> int:
    """New buffer capacity when `needed` slots exceed `capacity`: doubling until it holds headroom x needed
    (but not more than needed when that would pass max_gaussians)."""
    if headroom < 1.0:
        raise ValueError(f"config.model.capacity_headroom must be >= 1, got {headroom}")
    target = max(int(needed), min(int(np.ceil(needed * headroom)), int(max_gaussians)))
    return next_capacity(target, capacity)


def densify_step(state: TrainState, config, scanner, it: int, model) -> tuple[TrainState, dict]:
    """Densify and prune between steps (gaussians.md §6), growing buffers first when needed; then the model
    rebinds its per-Gaussian state (PhysX: the KNN binding) to the new Gaussians, as the reference does after
    every clone/split/prune (the result equals one rebind on the final positions, physx.md §1.3)."""
    d = config.densify
    V = max(scanner.s_voxel)
    lo, hi = scanner.bbox
    kwargs = dict(grad_threshold=d.grad_threshold, scale_threshold=d.scale_threshold * V,
                  max_num_gaussians=d.max_num_gaussians)
    needed = int(_required_capacity_jit(state.gaussians(), state.stats, **kwargs))
    if needed > state.capacity:
        state = grow_state(state, grown_capacity(needed, state.capacity, config.model.capacity_headroom,
                                                 d.max_num_gaussians), model)
    key = jax.random.fold_in(jax.random.fold_in(state.key, 0x5EED), it)
    g, stats, rows, info = _densify_jit(state.gaussians(), state.stats, key, per_gaussian_opt_rows(state.opt_state),
                                        tuple(lo), tuple(hi), d.density_min, tuple(sorted(kwargs.items())))
    params = dict(state.params)
    params.update(params_from_gaussians(g))
    state = state.replace(params=params, active=g.active, stats=stats,
                          opt_state=with_per_gaussian_opt_rows(state.opt_state, rows),
                          model_state=model.rebind(state.model_state, g))
    return state, {k: (int(v) if np.ndim(v) == 0 else v) for k, v in info.items()}


# One compiled program (eagerly, its ~20 ops were dispatched one by one at every densification).
_required_capacity_jit = jax.jit(required_capacity,
                                 static_argnames=("grad_threshold", "scale_threshold", "max_num_gaussians"))


def _densify_impl(g, stats, key, rows, lo, hi, density_min, kw):
    return densify_and_prune(g, stats, key, density_min=density_min, bbox_min=jnp.asarray(lo),
                             bbox_max=jnp.asarray(hi), per_gaussian=rows, **dict(kw))


_densify_jit = jax.jit(_densify_impl, static_argnums=(4, 5, 6, 7))


def template_state(config, case, points, model, meta) -> TrainState:
    """A state of the structure and shapes of a checkpoint whose meta records `capacity` (restore target)."""
    state = init_state(config, case, points, model)
    if meta["capacity"] != state.capacity:
        state = grow_state(state, int(meta["capacity"]), model) if meta["capacity"] > state.capacity else \
            _shrink_template(state, int(meta["capacity"]), model)
    return state


def _shrink_template(state: TrainState, capacity: int, model) -> TrainState:
    cut = lambda x: x[:capacity] if getattr(x, "ndim", 0) >= 1 and x.shape[0] == state.capacity else x
    small = jax.tree.map(cut, state.replace(model_state={}))
    return small.replace(model_state=model.rebind(state.model_state, small.gaussians()))
