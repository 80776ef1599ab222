"""Optimiser groups: log-linear schedules, gated Adam (= optax.adam while open), freeze windows, gates, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from x2gs_jax.optim import (ADAM_EPS, GroupSpec, group_specs_from_config, group_state, log_linear_lr,
                            make_optimizer)


def test_log_linear_schedule_closed_forms():
    assert float(log_linear_lr(0, 1e-2, 1e-4, 100)) == pytest.approx(1e-2, rel=1e-6)
    assert float(log_linear_lr(50, 1e-2, 1e-4, 100)) == pytest.approx(1e-3, rel=1e-5)  # geometric midpoint
    assert float(log_linear_lr(100, 1e-2, 1e-4, 100)) == pytest.approx(1e-4, rel=1e-5)
    assert float(log_linear_lr(250, 1e-2, 1e-4, 100)) == pytest.approx(1e-4, rel=1e-5)  # held after max_steps


def _params(rng):
    return {"a": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}


def test_open_gated_adam_equals_optax_adam_with_the_schedule():
    rng = np.random.default_rng(0)
    params = _params(rng)
    spec = GroupSpec(1e-2, 1e-3, 10)
    opt = make_optimizer({"g": spec}, {"a": "g", "b": "g"})
    ref = optax.adam(lambda count: log_linear_lr(count + 1, 1e-2, 1e-3, 10), b1=0.9, b2=0.999, eps=ADAM_EPS)
    s, r = opt.init(params), ref.init(params)
    p_ours, p_ref = params, params
    for step in range(1, 8):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, s = opt.update(grads, s, p_ours, step=step)
        v, r = ref.update(grads, r, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u), optax.apply_updates(p_ref, v)
        for k in params:
            np.testing.assert_allclose(np.asarray(p_ours[k]), np.asarray(p_ref[k]), rtol=1e-6, atol=1e-7)
    assert int(group_state(s, "g").count) == 7


def test_frozen_group_does_not_move_and_its_adam_state_does_not_advance():
    rng = np.random.default_rng(1)
    params = _params(rng)
    specs = group_specs_from_config({"a": {"init": 1e-2, "final": 1e-2, "max_steps": 100},
                                     "b": {"init": 1e-3, "final": 1e-3, "max_steps": 100}},
                                    {"a": {"freeze_until": 3}, "b": {"lr_scale": 2.0}})
    opt = make_optimizer(specs, {"a": "a", "b": "b"})
    state = opt.init(params)
    p = params
    grads = jax.tree.map(jnp.ones_like, params)
    for step in (1, 2):
        u, state = opt.update(grads, state, p, step=step)
        p = optax.apply_updates(p, u)
        np.testing.assert_array_equal(np.asarray(p["a"]), np.asarray(params["a"]))  # frozen: not moved
        st = group_state(state, "a")
        assert int(st.count) == 0 and not np.any(np.asarray(st.mu["a"])) and not np.any(np.asarray(st.nu["a"]))
        assert int(group_state(state, "b").count) == step  # the other group runs on its own schedule
    # Each group its own learning rate: Adam's first step moves every coordinate by lr (grad sign).
    np.testing.assert_allclose(np.asarray(params["b"] - p["b"]), 2 * 2.0 * 1e-3, atol=1e-6)  # f32 params ~1
    u, state = opt.update(grads, state, p, step=3)  # the window opens: a fresh first Adam step
    np.testing.assert_allclose(np.asarray(u["a"]), -1e-2, rtol=1e-5)
    assert int(group_state(state, "a").count) == 1


def test_freeze_from_closes_a_group_for_good():
    """optim.controls.<group>.freeze_from: the group steps while step < freeze_from, then neither its parameters nor
    its Adam state move again (the window is global-step based, like freeze_until)."""
    rng = np.random.default_rng(3)
    params = _params(rng)
    specs = group_specs_from_config({"a": {"init": 1e-2, "final": 1e-2, "max_steps": 100},
                                     "b": {"init": 1e-2, "final": 1e-2, "max_steps": 100}}, {"a": {"freeze_from": 3}})
    opt = make_optimizer(specs, {"a": "a", "b": "b"})
    state, p = opt.init(params), params
    grads = jax.tree.map(jnp.ones_like, params)
    for step in range(1, 6):
        before = p
        u, state = opt.update(grads, state, p, step=step)
        p = optax.apply_updates(p, u)
        moved = not np.array_equal(np.asarray(p["a"]), np.asarray(before["a"]))
        assert moved == (step < 3), step
        assert int(group_state(state, "a").count) == min(step, 2)
        assert int(group_state(state, "b").count) == step
    assert GroupSpec(1.0, 1.0, 10, freeze_until=2, freeze_from=4).open(jnp.arange(6)).tolist() == [
        False, False, True, True, False, False]


def test_gates_argument_closes_a_group_for_one_step():
    rng = np.random.default_rng(2)
    params = _params(rng)
    opt = make_optimizer({"a": GroupSpec(1e-2, 1e-2, 10), "b": GroupSpec(1e-2, 1e-2, 10)}, {"a": "a", "b": "b"})
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    u, state = jax.jit(lambda g, s, p, gate: opt.update(g, s, p, step=1, gates={"a": gate}))(
        grads, state, params, jnp.asarray(False))
    assert not np.any(np.asarray(u["a"])) and np.all(np.asarray(u["b"]) != 0)
    assert int(group_state(state, "a").count) == 0 and int(group_state(state, "b").count) == 1


def test_bad_config_fails_loudly():
    lr = {"xyz": {"init": 1e-3, "final": 1e-4, "max_steps": 10}}
    with pytest.raises(KeyError, match="unknown parameter group 'nope'"):
        group_specs_from_config(lr, {"nope": {"freeze_until": 3}})
    with pytest.raises(KeyError, match=r"optim.controls.xyz: unknown keys \['freeze'\]"):
        group_specs_from_config(lr, {"xyz": {"freeze": 3}})
    with pytest.raises(KeyError, match="have no learning-rate config"):
        make_optimizer(group_specs_from_config(lr), {"a": "xyz", "b": "density"})
    opt = make_optimizer(group_specs_from_config(lr), {"a": "xyz"})
    p = {"a": jnp.zeros(3)}
    with pytest.raises(ValueError, match="needs the global step"):
        opt.update(p, opt.init(p), p)


def test_apply_false_closes_every_group_and_leaves_the_state_bit_identical():
    """`apply=` (train_step: an overflowed or padding iteration) closes every group at once: zero updates, and the
    Adam state (count, mu, nu) is exactly the one passed in, also after some open steps."""
    rng = np.random.default_rng(3)
    params = _params(rng)
    opt = make_optimizer({"a": GroupSpec(1e-2, 1e-2, 10), "b": GroupSpec(1e-2, 1e-2, 10)}, {"a": "a", "b": "b"})
    update = jax.jit(lambda g, s, p, it, ok: opt.update(g, s, p, step=it, gates={"a": jnp.asarray(True)}, apply=ok))
    state = opt.init(params)
    for it in (1, 2):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u, state = update(grads, state, params, it, jnp.asarray(True))
        params = optax.apply_updates(params, u)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u, after = update(grads, state, params, 3, jnp.asarray(False))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(group_state(after, "a").count) == 2
