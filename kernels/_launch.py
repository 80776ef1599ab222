"""One launcher for every Triton kernel of this package: jax-triton on a GPU, the Triton interpreter on a CPU.

`launch(kernel, grid, out_shapes, *inputs, scalars=..., zeroed=..., num_warps=..., **meta)` calls
`kernel(*inputs, *scalars, *outputs, **meta)` on a grid of programs. Block sizes and the view/grid geometry are
`tl.constexpr` keyword arguments (`meta`); sizes that change during a run (Gaussian capacity C, pair capacity P,
split factor, point count) are runtime int32 `scalars`, so a capacity change re-uses the compiled Triton binaries
(jax-triton caches them per kernel, signature and constexpr values; only a scalar equal to 1 is specialised).

* GPU (`jax.default_backend() == "gpu"`): `jax_triton.triton_call`. Outputs listed in `zeroed` are memset to 0
  before the launch; the others start uninitialised, so a kernel must write every element it owns.
* CPU: the kernel's Python source runs in Triton's interpreter through `jax.pure_callback` on numpy buffers
  (slow: small test problems only). Non-zeroed outputs start filled with NaN (int outputs with -1) so the
  CPU tests catch any element a kernel forgets to write. This path exists to test the kernels' logic, the
  binning and the custom VJP/vmap wiring on machines without a GPU (CI).

jax-triton is imported lazily: it cannot be imported on a machine without a GPU.
"""
from __future__ import annotations

from typing import Callable, Sequence

import threading

import jax
import jax.numpy as jnp
import numpy as np

# Triton's interpreter is not thread-safe, and XLA's CPU runtime may run independent host callbacks at once (seen:
# `InterpreterError` with two fused-field launches in flight): one interpreted launch at a time.
_INTERPRETER_LOCK = threading.Lock()


def on_gpu() -> bool:
    """True when JAX's default backend is a CUDA GPU (the jax-triton path)."""
    return jax.default_backend() == "gpu"


def prepare_triton() -> None:
    """Call before the first `import triton` of a kernel module.

    On a CPU, switch Triton to its interpreter (TRITON_INTERPRET=1). Triton reads that flag when
    `triton.language` is imported (its reductions are themselves @triton.jit functions), so it must be set
    before; if Triton was already imported in compiled mode the interpreter cannot work and we say so.
    """
    if on_gpu():
        return
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") != "1" and "triton.language" in sys.modules:
        raise RuntimeError("kernels: on a CPU the Triton kernels run in Triton's interpreter, which must be "
                           "enabled before triton is imported: set TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"


# ---------------------------------------------------------------------------------- interpreter shim
class _Storage:
    """The slice of torch's untyped storage that Triton's interpreter touches."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def data_ptr(self) -> int:
        return self.arr.ctypes.data

    def cpu(self):
        return self  # already host memory

    def copy_(self, other):  # the interpreter works in place on our host buffer
        return self


class _HostTensor:
    """A numpy array dressed as the torch tensor the Triton interpreter expects (pointer, dtype, storage)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.dtype = arr.dtype

    def data_ptr(self) -> int:
        return self.arr.ctypes.data

    def untyped_storage(self) -> _Storage:
        return _Storage(self.arr)

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return self.arr.shape

    def stride(self):
        return tuple(s // self.arr.itemsize for s in self.arr.strides)

    def new_empty(self, *args, **kwargs):
        return _HostTensor(np.empty(0, self.arr.dtype))

    def set_(self, storage: _Storage, offset, size, stride):
        self.arr = storage.arr
        self.dtype = self.arr.dtype
        return self


def _poison(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    fill = np.nan if np.issubdtype(dtype, np.floating) else -1
    return np.full(shape, fill, dtype)


def _interpret(kernel, grid, out_shapes, inputs, scalars, zeroed, aliases, meta):
    from triton.runtime.interpreter import InterpretedFunction  # lazy: optional dependency

    fn = InterpretedFunction(getattr(kernel, "fn", kernel))
    alias_of = {o: i for i, o in aliases.items()}

    def host(*arrays):
        ins = [_HostTensor(np.array(a, copy=True)) for a in arrays]
        outs = []
        for k, s in enumerate(out_shapes):
            if k in alias_of:  # in-place output: the kernel sees the input's contents in the output buffer
                outs.append(ins[alias_of[k]].arr)
            elif k in zeroed:
                outs.append(np.zeros(s.shape, s.dtype))
            else:
                outs.append(_poison(s.shape, s.dtype))
        with _INTERPRETER_LOCK:
            fn[grid](*ins, *scalars, *[_HostTensor(o) for o in outs], **meta)
        return tuple(np.array(o, copy=True) for o in outs)

    return jax.pure_callback(host, tuple(out_shapes), *inputs)


def _check_signature(kernel, n_positional: int, meta: dict) -> None:
    """The launch matches the kernel's parameters: every meta key names one of them and the positional arguments
    fill the rest. Why here: jax-triton rejects an unknown constexpr only when it compiles (on a GPU), while the
    interpreter ignores it; checked on both, a wrong call fails on a CPU too."""
    names = list(getattr(kernel, "arg_names", None) or getattr(getattr(kernel, "fn", None), "arg_names", []) or [])
    if not names:
        return
    name = getattr(kernel, "__name__", kernel)
    unknown = [k for k in meta if k not in names]
    if unknown:
        raise TypeError(f"launch of {name}: {unknown} are not parameters of the kernel ({names})")
    if n_positional + len(meta) != len(names):
        raise TypeError(f"launch of {name}: {n_positional} arrays/scalars/outputs and {len(meta)} constexprs for "
                        f"the kernel's {len(names)} parameters {names}")


# ---------------------------------------------------------------------------------- public
def launch(kernel, grid: tuple, out_shapes: Sequence[jax.ShapeDtypeStruct], *inputs: jax.Array,
           scalars: Sequence[int] = (), zeroed: Sequence[int] = (), aliases: dict | None = None,
           num_warps: int = 4, num_stages: int | None = None, **meta):
    """Run `kernel` on `grid` (tuple of ≤ 3 ints); returns a tuple of outputs shaped like `out_shapes`.

    Args:
      kernel: a `@triton.jit` function taking (*inputs, *outputs, **meta).
      grid: static launch grid.
      out_shapes: output shapes/dtypes.
      inputs: device arrays (every one is passed as a pointer).
      scalars: Python ints passed by value after the inputs (int32 kernel arguments, not specialised).
      zeroed: indices of outputs that must start at zero (accumulated with atomics).
      aliases: {input index: output index}: that output reuses (starts with the contents of) that input.
      num_warps, num_stages: GPU compilation options (ignored by the interpreter).
      meta: `tl.constexpr` parameters (Python ints/floats).
    """
    out_shapes = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shapes)
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        # An empty launch writes nothing: zero-size outputs are the only consistent answer.
        if any(int(np.prod(s.shape)) for s in out_shapes):
            raise ValueError(f"launch of {getattr(kernel, '__name__', kernel)}: empty grid {grid} with "
                             f"non-empty outputs")
        return tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes)
    scalars = tuple(int(v) for v in scalars)
    if any(not -2**31 <= v < 2**31 for v in scalars):
        raise ValueError(f"launch of {getattr(kernel, '__name__', kernel)}: scalar arguments {scalars} must fit "
                         f"in int32")
    _check_signature(kernel, len(inputs) + len(scalars) + len(out_shapes), meta)
    if not on_gpu():
        return _interpret(kernel, grid, out_shapes, inputs, scalars, set(zeroed), dict(aliases or {}), meta)
    import jax_triton as jt  # lazy: fails to import without a GPU

    outs = jt.triton_call(*inputs, *scalars, kernel=kernel, out_shape=list(out_shapes), grid=grid,
                          num_warps=num_warps, num_stages=num_stages, zeroed_outputs=tuple(zeroed),
                          input_output_aliases=dict(aliases or {}), **meta)
    return tuple(outs)


# Programs a launch should have to fill an H200 (132 SMs, several resident programs each).
TARGET_PROGRAMS = 1024


def split_factor(n_programs: int, slots_per_program: int, block: int, max_split: int = 64) -> int:
    """Parts to split each program's slot range into (static): enough programs to fill the GPU when there are few
    tiles, but no part shorter than ~4 chunks of `block` slots (the range is sized by the buffer's capacity)."""
    want = -(-TARGET_PROGRAMS // max(1, int(n_programs)))
    have = max(1, int(slots_per_program) // (4 * int(block)))
    return int(max(1, min(want, have, int(max_split))))


def debug_init(out: jax.ShapeDtypeStruct, poison: bool, index: int) -> tuple:
    """(init, aliases) for a kernel whose input `index` is an `init` buffer it never reads.

    Debug mode (poison): init is NaN and aliases the output, so any element the kernel forgets to write shows.
    Otherwise the output starts uninitialised (no memset) and a 1-element placeholder fills the argument slot."""
    if poison:
        return jnp.full(out.shape, jnp.nan, out.dtype), {index: 0}
    return jnp.zeros((1,), out.dtype), {}


def merge_batch(fn: Callable) -> Callable:
    """Make `fn(*arrays) -> arrays`, whose every input and output has a leading batch axis B, vmappable.

    jax-triton calls have no batching rule. Under `jax.vmap` the extra (outer) axis of size b is folded into
    B (inputs [b, B, ...] → [b·B, ...], unbatched inputs are broadcast), `fn` runs once on the merged batch,
    and the outputs are unfolded. Nested vmaps fold repeatedly. All inputs must be arrays (close over statics).
    """

    @jax.custom_batching.custom_vmap
    def op(*args):
        return fn(*args)

    @op.def_vmap
    def _rule(axis_size, in_batched, *args):
        merged = []
        for a, batched in zip(args, in_batched):
            if not batched:
                a = jnp.broadcast_to(a, (axis_size,) + a.shape)
            merged.append(a.reshape((axis_size * a.shape[1],) + a.shape[2:]))
        outs = op(*merged)
        outs = jax.tree_util.tree_map(lambda o: o.reshape((axis_size, o.shape[0] // axis_size) + o.shape[1:]),
                                      outs)
        return outs, jax.tree_util.tree_map(lambda _: True, outs)

    return op
