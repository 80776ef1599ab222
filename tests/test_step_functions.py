"""The loop's step-function registry (x2gs_jax/step_functions.py): compile on first use, or ahead of use in a
background thread; stale prefetches dropped; a failed background compilation redone in the loop; the next foreseeable
switch of stage / static phase."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.run_log import PhaseTimer
from x2gs_jax.step_functions import StepFunctions, abstract, next_switch


def _registry(background):
    records = []
    return StepFunctions(PhaseTimer(), lambda it, rec: records.append((it, rec)), background=background), records


def _maker(scale, threads=None):
    def make():
        if threads is not None:
            threads.append(threading.current_thread().name)
        return jax.jit(lambda x, n: x * scale + n, donate_argnums=0)
    return make


def test_prefetched_function_is_compiled_in_the_worker_and_used():
    steps, records = _registry(background=True)
    x, n = jnp.arange(4.0), jnp.int32(1)
    threads = []
    assert steps.prefetch("b", _maker(3.0, threads), abstract((x, n)), stale=lambda k: False)
    assert not steps.prefetch("b", _maker(3.0), abstract((x, n)), stale=lambda k: False)  # pending already
    assert "b" not in steps and steps.keys() == ["b"]
    fn = steps.get("b", _maker(99.0), (x, n), 7, {"stage": 1})  # the loop's maker is not called
    np.testing.assert_array_equal(fn(jnp.arange(4.0), n), 3.0 * np.arange(4.0) + 1)
    assert threads and threads[0].startswith("x2gs-compile")
    (it, rec), = records
    assert it == 7 and rec["background"] == 1 and rec["stage"] == 1 and rec["waited_s"] >= 0
    assert rec["trace_and_lower_s"] > 0 and rec["xla_compile_s"] > 0
    assert "b" in steps and steps["b"] is fn and steps.get("b", None, None, 8, {}) is fn and len(records) == 1
    assert set(steps.timer.seconds) == {"compile_wait"}  # the loop only waited
    steps.close()


def test_without_background_prefetch_does_nothing_and_get_compiles_in_the_loop():
    steps, records = _registry(background=False)
    x, n = jnp.arange(4.0), jnp.int32(2)
    assert not steps.prefetch("a", _maker(2.0), abstract((x, n)), stale=lambda k: False)
    threads = []
    fn = steps.get("a", _maker(2.0, threads), (x, n), 1, {})
    np.testing.assert_array_equal(fn(x, n), 2.0 * np.arange(4.0) + 2)
    assert threads == [threading.current_thread().name]
    assert records[0][1]["background"] == 0
    assert set(steps.timer.seconds) == {"trace_and_lower", "xla_compile"}


def test_stale_prefetches_are_dropped():
    steps, _ = _registry(background=True)
    args = abstract((jnp.zeros(3), jnp.int32(0)))
    steps.prefetch(("fine", 100), _maker(1.0), args, stale=lambda k: False)
    steps.prefetch(("fine", 200), _maker(1.0), args, stale=lambda k: k[1] != 200)  # the capacity grew to 200
    assert steps.pending() == [("fine", 200)]
    steps.close()
    assert steps.pending() == []


def test_a_failed_background_compilation_is_redone_in_the_loop(capsys):
    steps, records = _registry(background=True)
    x, n = jnp.arange(4.0), jnp.int32(1)

    def broken():
        raise RuntimeError("boom")

    steps.prefetch("k", broken, abstract((x, n)), stale=lambda k: False)
    fn = steps.get("k", _maker(5.0), (x, n), 3, {})
    np.testing.assert_array_equal(fn(x, n), 5.0 * np.arange(4.0) + 1)
    assert "background compilation of the step function failed (RuntimeError: boom)" in capsys.readouterr().out
    assert records[-1][1]["background"] == 0


def test_abstract_arguments_keep_weak_types_and_shardings():
    x = jnp.asarray(1.0)  # weakly typed
    a = abstract({"x": x, "y": jnp.ones((2, 3), jnp.int32)})
    assert a["x"].weak_type and a["x"].sharding == x.sharding and a["y"].shape == (2, 3) and a["y"].dtype == jnp.int32


class _Model:
    is_4d = True

    def __init__(self, start):
        self.start = start

    def phase(self, it, stage):
        return int(it > self.start) if stage == "fine" else None


@pytest.mark.parametrize("it,stage,static,expect", [
    (1, "coarse", True, (11, "fine", 0)),  # the fine stage's first function, its first phase
    (1, "coarse", False, (11, "fine", None)),
    (11, "fine", True, (16, "fine", 1)),  # the periodic phase starts after iteration 15
    (16, "fine", True, None),  # nothing after the last phase
    (11, "fine", False, None),
])
def test_next_switch(it, stage, static, expect):
    assert next_switch(_Model(15), it, stage, stage_end=10 if stage == "coarse" else 30, coarse_end=10, total=30,
                       static_phases=static) == expect


def test_next_switch_of_a_static_model_is_none():
    m = _Model(0)
    m.is_4d = False
    assert next_switch(m, 1, "coarse", 30, 30, 30, True) is None
