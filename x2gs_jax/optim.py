"""Optimiser: optax `partition` with one labelled Adam group per parameter kind.

Reference semantics reproduced here (gaussians.md §3-4, x2gaussian.md §9):
  * Adam(b1=0.9, b2=0.999, eps=1e-15), one group per parameter kind, log-linear learning-rate schedule
    lr(i) = exp((1-u) ln lr_init + u ln lr_final), u = clip(i / max_steps, 0, 1), evaluated with the
    *global* 1-based iteration i.
  * Per-group step counts: PyTorch's Adam skips a parameter that has no gradient, so a group's bias
    correction starts counting when it first receives gradient (the period at iteration 7001, the
    deformation field at the start of the fine stage). Here every group is *gated*: on a step where
    its gate is closed, its parameters do not move and its Adam state (count, mu, nu) does not
    advance. Gates come from the training schedule (stage, densify iterations, periodic-loss start) and
    from the config's generic per-group freeze windows.
  * Generic per-group controls from the config: `freeze_until` (gate closed for steps < value),
    `freeze_from` (closed for steps >= value), `lr_scale` (multiplies the schedule).

The step and the gates are passed to `update` as extra arguments (`step=`, `gates=`), which
`optax.partition` forwards to every group.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-15


def log_linear_lr(step, lr_init: float, lr_final: float, max_steps: int):
    """The reference `get_expon_lr_func` with no delay: exp((1-u) ln lr_init + u ln lr_final), u = clip(step/max_steps)."""
    u = jnp.clip(jnp.asarray(step, jnp.float32) / float(max_steps), 0.0, 1.0)
    return jnp.exp((1.0 - u) * jnp.log(lr_init) + u * jnp.log(lr_final))


class GroupSpec(NamedTuple):
    """Learning-rate schedule and freeze window of one parameter group (steps are global, 1-based)."""

    lr_init: float
    lr_final: float
    max_steps: int
    lr_scale: float = 1.0
    freeze_until: int = 0  # gate closed while step < freeze_until
    freeze_from: int = 2**31 - 1  # gate closed while step >= freeze_from

    def lr(self, step):
        return self.lr_scale * log_linear_lr(step, self.lr_init, self.lr_final, self.max_steps)

    def open(self, step):
        return (step >= self.freeze_until) & (step < self.freeze_from)


class GatedAdamState(NamedTuple):
    count: jax.Array  # [] int32, steps this group has actually taken
    mu: Any
    nu: Any


def gated_adam(name: str, spec: GroupSpec) -> optax.GradientTransformationExtraArgs:
    """Adam for one group whose updates (and state) advance only while its gate is open.

    `update(grads, state, params, *, step, gates)`: `step` is the global 1-based iteration used for the
    learning rate, `gates[name]` a boolean scalar from the schedule (missing = open).
    """

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return GatedAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, *, step=None, gates=None, apply=None, **_):
        if step is None:
            raise ValueError(f"optimizer group '{name}': update() needs the global step (step=...)")
        gate = spec.open(step)
        if gates is not None and name in gates:
            gate = gate & gates[name]
        if apply is not None:  # the caller's "this iteration counts" flag (train_step: no overflow, not padding)
            gate = gate & apply
        count = state.count + 1
        keep = lambda new, old: jnp.where(gate, new, old)  # noqa: E731
        mu = jax.tree.map(lambda m, g: keep(ADAM_B1 * m + (1 - ADAM_B1) * g, m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: keep(ADAM_B2 * v + (1 - ADAM_B2) * g * g, v), state.nu, updates)
        # The barrier keeps XLA from fusing the moment update into the parameter update as well (the old moments
        # would then have two readers besides the in-place writer, which makes copy insertion copy them at every
        # scanned iteration): the moments are written once and the parameter update reads the new ones. Part of
        # the change measured in BENCHMARKS.md (Training, item 4; on the CPU the copies went with or without it).
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        bc1 = 1 - ADAM_B1 ** count.astype(jnp.float32)
        bc2 = 1 - ADAM_B2 ** count.astype(jnp.float32)
        lr = spec.lr(step)
        new_updates = jax.tree.map(
            lambda m, v: jnp.where(gate, -lr * (m / bc1) / (jnp.sqrt(v / bc2) + ADAM_EPS), 0.0).astype(m.dtype),
            mu, nu)
        new_state = GatedAdamState(count=jnp.where(gate, count, state.count), mu=mu, nu=nu)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def group_specs_from_config(lr_cfg: Mapping[str, Any], controls: Mapping[str, Any] | None = None,
                            model_specs: Mapping[str, GroupSpec] | None = None) -> dict:
    """Build {group: GroupSpec} from config dicts.

    lr_cfg: {group: {"init": float, "final": float, "max_steps": int}}.
    controls: optional {group: {"lr_scale", "freeze_until", "freeze_from"}}; unknown groups or keys fail loudly.
    model_specs: groups whose schedule the model's settings decide (replace lr_cfg's; controls apply on top).
    """
    specs = {}
    for name, c in lr_cfg.items():
        specs[name] = GroupSpec(float(c["init"]), float(c["final"]), int(c["max_steps"]))
    specs.update(model_specs or {})
    for name, c in (controls or {}).items():
        if name not in specs:
            raise KeyError(f"optim.controls: unknown parameter group '{name}' (groups: {sorted(specs)})")
        allowed = {"lr_scale", "freeze_until", "freeze_from"}
        bad = set(c) - allowed
        if bad:
            raise KeyError(f"optim.controls.{name}: unknown keys {sorted(bad)} (allowed: {sorted(allowed)})")
        specs[name] = specs[name]._replace(**{k: type(getattr(specs[name], k))(v) for k, v in c.items()})
    return specs


def make_optimizer(specs: Mapping[str, GroupSpec], labels) -> optax.GradientTransformationExtraArgs:
    """optax.partition of one gated Adam per group; `labels` is a pytree (prefix) of group names."""
    used = set(jax.tree.leaves(labels))
    missing = used - set(specs)
    if missing:
        raise KeyError(f"parameters labelled {sorted(missing)} have no learning-rate config (groups: {sorted(specs)})")
    # Groups in sorted order: iterating the set would follow Python's per-process string hashing, so the traced step
    # (and its persistent-compilation-cache key) would differ from one process to the next.
    return optax.partition({name: gated_adam(name, specs[name]) for name in sorted(used)}, labels)


def group_state(opt_state, name: str) -> GatedAdamState:
    """The GatedAdamState of one group inside a partition state (masked leaves are optax.MaskedNode)."""
    return opt_state.inner_states[name].inner_state
