"""Learnable period and the periodic-consistency shift rule (x2gaussian.md §7)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.fields.period import init_tau, period_seconds, require_valid, shifted_time

SHIFT = jax.jit(shifted_time, static_argnums=(2, 3))


def rule(t, T, scan=60.0, m=1):
    """The reference rule written out in plain Python floats: (t', k) or None when no shift fits."""
    t_s = scan * t
    n_cyc, c = math.floor(scan / T), math.floor(t_s / T)
    if c + m <= n_cyc - 1:
        k = m
    elif c - m >= 0:
        k = -m
    else:
        return None
    return (t_s + k * T) / scan, k


def test_init_and_period():
    tau = init_tau()
    assert tau.shape == () and tau.dtype == jnp.float32
    assert abs(float(tau) - math.log(2.8)) < 1e-7
    assert abs(float(period_seconds(tau)) - 2.8) < 1e-6
    assert abs(float(init_tau(3.5)) - math.log(3.5)) < 1e-7
    with pytest.raises(ValueError, match="period"):
        init_tau(0.0)


@pytest.mark.parametrize("t_s, T, k_expected", [
    (0.0, 2.8, +1),      # start of the scan
    (30.0, 2.8, +1),     # middle: c = 10, the next cycle exists
    (55.9, 2.8, +1),     # c = 19 = n_cyc - 2: c + 1 = 20 = n_cyc - 1 still inside
    (56.5, 2.8, -1),     # c = 20 = n_cyc - 1: no full cycle after it, go back
    (59.9, 2.8, -1),     # end of the scan (c = 21, the incomplete last cycle)
    (10.0, 29.9, +1),    # T just below scan/2: n_cyc = 2
    (40.0, 29.9, -1),
    (59.99, 29.9, -1),   # c = 2 (beyond the last full cycle): back one period
    (45.0, 30.5, -1),    # T above scan/2: n_cyc = 1, only a backward shift from the second half works
])
def test_shift_rule_hand_cases(t_s, T, k_expected):
    t = t_s / 60.0
    out = SHIFT(jnp.float32(t), jnp.float32(math.log(T)), 60.0, 1)
    assert int(out.k) == k_expected and bool(out.valid)
    np.testing.assert_allclose(float(out.t_shifted), (t_s + k_expected * T) / 60.0, rtol=1e-6, atol=1e-7)
    assert rule(t, T)[1] == k_expected


def test_no_valid_shift_is_flagged_not_garbage():
    tau = jnp.float32(math.log(30.5))
    out = SHIFT(jnp.float32(10.0 / 60.0), tau, 60.0, 1)  # n_cyc = 1, c = 0: neither rule holds
    assert not bool(out.valid) and int(out.k) == 0
    assert float(out.t_shifted) == pytest.approx(10.0 / 60.0)  # finite and harmless
    with pytest.raises(ValueError, match=r"T = 30\.5 s .* 60 s scan"):
        require_valid(out, tau)
    require_valid(SHIFT(jnp.float32(0.5), init_tau(), 60.0, 1), init_tau())  # valid: no error
    with pytest.raises(ValueError, match="shift_cycles"):
        shifted_time(0.1, init_tau(), shift_cycles=0)


def test_vectorised_matches_plain_python_rule_and_stays_inside_the_scan():
    rng = np.random.default_rng(0)
    t = rng.uniform(0.0, 1.0, 400).astype(np.float32)
    for T in (1.3, 2.8, 3.7, 7.0, 19.0):
        for scan, m in ((60.0, 1), (60.0, 2), (45.0, 1)):
            out = jax.tree.map(np.asarray, SHIFT(jnp.asarray(t), jnp.float32(math.log(T)), scan, m))
            T32 = float(np.exp(np.float32(math.log(T))))  # the float32 period the function sees
            for i in range(len(t)):
                ref = rule(float(t[i]), T32, scan, m)
                if ref is None:
                    assert not out.valid[i] and out.k[i] == 0
                    continue
                assert int(out.k[i]) == ref[1], (T, scan, m, float(t[i]))
                np.testing.assert_allclose(float(out.t_shifted[i]), ref[0], rtol=1e-5, atol=1e-6)
                assert 0.0 <= float(out.t_shifted[i]) < 1.0 + 1e-6  # the shifted view lies inside the scan


def test_gradient_wrt_tau_flows_only_through_the_shift():
    def t_shift(tau, t):
        return shifted_time(t, tau).t_shifted

    grad = jax.jit(jax.vmap(jax.grad(t_shift), in_axes=(None, 0)))
    tau = jnp.float32(math.log(3.1))
    times = jnp.array([0.0, 0.5, 0.99], jnp.float32)  # k = +1, +1, -1
    g = np.asarray(grad(tau, times))
    ks = np.asarray(SHIFT(times, tau, 60.0, 1).k)
    assert list(ks) == [1, 1, -1]
    np.testing.assert_allclose(g, ks * 3.1 / 60.0, rtol=1e-5)
    # the shape-[1] parameter of the reference works too, and d t'/d t = 1 (the floors carry no gradient)
    g1 = jax.grad(lambda tt: shifted_time(tt, jnp.array([math.log(3.1)], jnp.float32)).t_shifted)(jnp.float32(0.5))
    assert float(g1) == pytest.approx(1.0)
