"""The fused decoder kernels (kernels/decoder.py) equal `DeformationDecoder`, values and gradients.

CPU: the kernels run in Triton's interpreter (small sizes, float32 "ieee" dots): outputs and the gradients of every
parameter and of the features against the module's autodiff, under jax.vmap over two times (the X2 step's layout),
with the trunk output "hidden" read or not, rows not a multiple of the block, one and several blocks per persistent
program, N = 0; the backend switch X2GS_DECODER in `deformation_offsets`. GPU (marked): the X2 default decoder at
2 x 250 880 rows against the module at float32 HIGHEST precision (the kernels' dots are TF32).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import decoder as kd
from x2gs_jax.fields import deformation
from x2gs_jax.fields.decoder import HEADS, DeformationDecoder


def _setup(n, times=2, f=128, w=64, seed=0):
    mod = DeformationDecoder(in_features=f, width=w, depth=1)
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], (times, n, f))
    params = mod.init(k[1], x[0, :1])["params"]
    # Larger biases than the init's, so that the ReLUs cut at varied places (both masks matter).
    params = jax.tree.map(lambda p: p * 3.0 if p.ndim == 1 else p, params)
    cot = {key: jax.random.normal(jax.random.fold_in(k[2], i), (times, n, c)) for i, (_, key, c) in enumerate(HEADS)}
    cot["hidden"] = jax.random.normal(k[3], (times, n, w))
    return mod, params, x, cot


def _value_and_grads(decode, params, x, cot):
    def loss(p, x):
        out = jax.vmap(lambda xi: decode(p, xi))(x)
        return sum(jnp.sum(out[key] * c) for key, c in cot.items()), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, grads


def _assert_close(a_tree, b_tree, rel):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(a_tree)[0], jax.tree.leaves(b_tree)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        assert np.linalg.norm(a - b) <= rel * max(np.linalg.norm(b), 1e-30), jax.tree_util.keystr(path)


# n: ragged last block (77, 100), exactly one block (32); programs: one block each, or several (the persistent loop).
@pytest.mark.parametrize("n,programs", [(77, 264), (100, 2), (32, 1)])
@pytest.mark.parametrize("hidden", [True, False])
def test_fused_decoder_equals_the_module(n, programs, hidden, monkeypatch):
    monkeypatch.setattr(kd, "PROGRAMS", programs)
    mod, params, x, cot = _setup(n)
    if not hidden:
        cot.pop("hidden")
    out_k, g_k = _value_and_grads(lambda p, xi: kd.decode(p, xi, HEADS), params, x, cot)
    out_m, g_m = _value_and_grads(lambda p, xi: mod.apply({"params": p}, xi), params, x, cot)
    _assert_close(out_k, out_m, 1e-6)
    _assert_close(g_k, g_m, 1e-5)
    assert float(jnp.abs(g_k[0]["feature_out_0"]["kernel"]).sum()) > 0  # the gradient reaches the trunk


def test_fused_decoder_of_no_rows_and_its_limits():
    mod, params, x, cot = _setup(0, times=1)
    out = kd.decode(params, x[0], HEADS)
    assert {k: v.shape for k, v in out.items()} == {"hidden": (0, 64), "dx": (0, 3), "ds": (0, 3), "dr": (0, 4)}
    g = jax.grad(lambda p: kd.decode(p, x[0], HEADS)["dx"].sum())(params)
    assert all(float(jnp.abs(v).sum()) == 0 for v in jax.tree.leaves(g))
    assert kd.supported(params, HEADS, 1) and not kd.supported(params, HEADS, 2)
    with pytest.raises(ValueError, match="features must be"):
        kd.decode(params, x, HEADS)
    too_many = HEADS + (("extra_deform", "de", 7),)
    assert not kd.supported(params, too_many, 1)


def test_deformation_offsets_switch(monkeypatch):
    """X2GS_DECODER picks the decoder's backend in `deformation_offsets`; every backend gives the module's outputs
    (an unknown value: tests/test_deformation.py)."""
    cfg = deformation.DeformationConfig(resolution=(8, 8, 8, 6), multires=(1, 2))
    params = deformation.init_deformation_params(jax.random.PRNGKey(1), cfg)
    xyz = jax.random.uniform(jax.random.PRNGKey(2), (50, 3), minval=-1.0, maxval=1.0)
    out = {}
    for mode in ("split", "fused", "triton", "auto"):
        monkeypatch.setenv("X2GS_DECODER", mode)
        chosen = deformation._decoder_mode(params["deformation"], cfg)
        assert chosen == {"auto": "triton" if jax.default_backend() == "gpu" else "split"}.get(mode, mode)
        out[mode] = jax.jit(lambda p, x: deformation.deformation_offsets(p, x, jnp.float32(0.3), cfg))(params, xyz)
    for mode in ("fused", "triton", "auto"):
        _assert_close(out[mode], out["split"], 1e-5 if jax.default_backend() == "cpu" else 5e-3)
    deep = deformation.DeformationConfig(resolution=(8, 8, 8, 6), multires=(1, 2), defor_depth=2)
    monkeypatch.setenv("X2GS_DECODER", "triton")
    assert deformation._decoder_mode(deformation.init_deformation_params(jax.random.PRNGKey(1), deep)["deformation"],
                                     deep) == "split"  # the kernels take depth 1 only


@pytest.mark.gpu
def test_fused_decoder_equals_the_module_gpu():
    """The X2 default decoder (128 features, width 64) at the fine step's size: 2 times x 250 880 rows."""
    mod, params, x, cot = _setup(250_880, seed=3)
    cot.pop("hidden")
    out_k, g_k = _value_and_grads(lambda p, xi: kd.decode(p, xi, HEADS), params, x, cot)
    with jax.default_matmul_precision("highest"):
        out_m, g_m = _value_and_grads(lambda p, xi: mod.apply({"params": p}, xi), params, x, cot)
    # TF32 dots (10-bit mantissa) against float32 ones: ~1e-3 relative per product, sums of 64-128 of them.
    _assert_close(out_k, out_m, 5e-3)
    _assert_close(g_k, g_m, 5e-3)


def test_a_launch_naming_a_parameter_the_kernel_lacks_fails_on_any_backend():
    """kernels._launch checks the call against the kernel's parameters (jax-triton only would, at GPU compile)."""
    from kernels import decoder_kernels as dk
    from kernels._launch import launch

    x = jnp.zeros((1, 4, 16), jnp.float32)
    w = jnp.zeros((16, 16), jnp.float32)
    out = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, 4, 16), (1, 1, 16, 16), (1, 1, 16))]
    meta = dict(F=16, FP=16, W=16, BM=32, ITERS=1, PREC="ieee")
    with pytest.raises(TypeError, match=r"\['H'\] are not parameters"):
        launch(dk.decoder_bwd_trunk_kernel, (1, 1), out, x, w, x, scalars=(4, 1), H=16, **meta)
    with pytest.raises(TypeError, match="constexprs for the kernel's"):
        launch(dk.decoder_bwd_trunk_kernel, (1, 1), out, x, w, scalars=(4, 1), **meta)
