"""The training loop's compiled step functions: compiled on first use, or ahead of it in a background thread.

A step function is keyed by (stage, capacity, max_pairs, phase, scan length): everything that changes its program.
`StepFunctions.get` returns the compiled function of a key, compiling it in the loop's thread when it is neither
compiled nor being compiled (timed in two parts: tracing + lowering, where jax-triton compiles the Triton kernels,
and XLA's compilation). With `train.background_compile`, `prefetch` starts the compilation of a function the loop
will need later (the next static phase of a stage, the fine stage's first function) in a worker thread while the
current one trains: `jax.jit(...).lower(*abstract_args).compile()` needs only the arguments' shapes, dtypes and
shardings, and the loop's thread mostly waits on the device meanwhile. When the loop reaches that key it waits for
the worker (the wait, not the worker's own seconds, is loop time). A prefetch whose key went stale (the capacity
or the pair buffer grew in between) is dropped and the key compiled again in the loop's thread, as without it.

Records: one `compile` record per function the loop uses (`background` 1 when the worker compiled it, its
`trace_and_lower_s` / `xla_compile_s` measured in the worker, `waited_s` the loop's wait for it), so a run's
compilation cost reads `trace_and_lower + xla_compile + compile_wait` in the `timing` record (the loop's waits)
and the records' sums (the work done, hidden or not).
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Callable, Hashable, Optional

import jax


def abstract(tree):
    """ShapeDtypeStructs (shape, dtype, sharding, weak type) of a pytree of arrays: what `lower` needs; a compiled
    function accepts exactly the arrays these describe."""
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None),
                                    weak_type=bool(getattr(x, "weak_type", False)))
    return jax.tree.map(one, tree)


def compile_record(key, n_devices: int) -> dict:
    """The fields of a step function's `compile` record, from its key (stage, capacity, max_pairs, phase, scan)."""
    stage, capacity, max_pairs, phase, n_scan = key
    return {"fine_stage": stage == "fine", "phase": -1 if phase is None else phase, "capacity": capacity,
            "max_pairs": max_pairs or 0, "scan_length": n_scan, "devices": n_devices}


def _compile(make: Callable[[], Callable], args) -> tuple:
    """(compiled, trace + lower seconds, XLA seconds) of the jitted function `make()` for `args` (arrays or
    ShapeDtypeStructs)."""
    t0 = time.perf_counter()
    lowered = make().lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


class StepFunctions:
    """{key: compiled step function} of one run, with optional background compilation (module docstring).

    timer: run_log.PhaseTimer (the loop's phases: trace_and_lower, xla_compile, compile_wait); log(it, record):
    writes a `compile` record; background: start a worker thread for `prefetch` (else prefetch does nothing)."""

    def __init__(self, timer, log: Callable[[int, dict], None], background: bool = False):
        self.timer = timer
        self._log = log
        self._done = {}
        self._pending = {}  # key -> Future of `_compile`
        # Two workers: a prefetch gone stale while it compiles (a capacity growth) does not hold up its successor.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="x2gs-compile") \
            if background else None

    def __contains__(self, key) -> bool:
        return key in self._done

    def __getitem__(self, key):
        return self._done[key]

    @property
    def background(self) -> bool:
        """Whether `prefetch` compiles anything (a worker exists)."""
        return self._pool is not None

    def keys(self) -> list:
        """Keys compiled or being compiled (the scan lengths `call_length` may reuse)."""
        return list(self._done) + list(self._pending)

    def get(self, key: Hashable, make: Callable[[], Callable], args, it: int, record: dict):
        """The compiled function of `key`: compiled already, awaited from the worker, or compiled now from `make()`
        (a jitted function) for `args`. record: the fields of its `compile` record (stage, capacity, ...)."""
        if key in self._done:
            return self._done[key]
        job = self._pending.pop(key, None)
        if job is not None:
            t0 = time.perf_counter()
            try:
                compiled, t_lower, t_xla = job.result()
                waited = self.timer.since("compile_wait", t0) - t0
                self._log(it, {**record, "trace_and_lower_s": t_lower, "xla_compile_s": t_xla, "background": 1,
                               "waited_s": waited})
                self._done[key] = compiled
                return compiled
            except Exception as err:  # noqa: BLE001 - the worker's failure is reproduced (and raised) below
                self.timer.since("compile_wait", t0)
                print(f"background compilation of the step function failed ({type(err).__name__}: {err}); "
                      "compiling it again in the loop", flush=True)
        compiled, t_lower, t_xla = _compile(make, args)
        self.timer.add("trace_and_lower", t_lower)
        self.timer.add("xla_compile", t_xla)
        self._log(it, {**record, "trace_and_lower_s": t_lower, "xla_compile_s": t_xla, "background": 0,
                       "waited_s": t_lower + t_xla})
        self._done[key] = compiled
        return compiled

    def prefetch(self, key: Hashable, make: Callable[[], Callable], abstract_args, stale: Callable[[Hashable], bool]
                 ) -> bool:
        """Start compiling `key` in the worker (if there is one and the key is neither compiled nor pending);
        first drop pending keys for which stale(key) is true (not yet started: cancelled; running: their result
        is never used). Returns whether a compilation was started."""
        if self._pool is None or key in self._done or key in self._pending:
            return False
        for k in [k for k in self._pending if stale(k)]:
            self._pending.pop(k).cancel()
        self._pending[key] = self._pool.submit(_compile, make, abstract_args)
        return True

    def pending(self) -> list:
        return list(self._pending)

    def close(self) -> None:
        """Stop the worker: queued compilations are cancelled; a running one ends in the background (its result
        is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._pending.clear()


def phase_change(model, it: int, stage: str, last: int) -> Optional[int]:
    """The first iteration in (it, last] whose static phase (`model.phase`) differs from iteration it's; None if
    none does (or the stage has no phases)."""
    phase = model.phase(it, stage)
    if phase is None:
        return None
    return next((i for i in range(it + 1, last + 1) if model.phase(i, stage) != phase), None)


def next_switch(model, it: int, stage: str, stage_end: int, coarse_end: int, total: int, static_phases: bool
                ) -> Optional[tuple]:
    """(iteration, stage, phase) of the next step-function change after iteration `it` that the loop can foresee:
    the next static phase of this stage (`static_phases`), else the fine stage's start for a 4D model in its
    coarse stage; None when neither comes."""
    i = phase_change(model, it, stage, stage_end) if static_phases else None
    if i is not None:
        return i, stage, model.phase(i, stage)
    if stage == "coarse" and model.is_4d and coarse_end < total:
        i = coarse_end + 1
        return i, "fine", (model.phase(i, "fine") if static_phases else None)
    return None
