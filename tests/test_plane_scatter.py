"""The Triton plane-gradient scatter (kernels/plane_scatter.py) equals XLA's scatter-add.

CPU: the kernel runs in Triton's interpreter (logic, layouts, masks, vmap folding). GPU (marked): the HexPlane
sampling gradient through the kernel equals the XLA-scatter path on a default-sized level.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from x2gs_jax.fields import hexplane


def _xla_rows(idx, w, g, n_rows):
    t = jnp.zeros((n_rows, g.shape[1]), jnp.float32)
    for k in range(4):
        t = t.at[idx[k]].add(g * w[k][:, None])
    return t


@pytest.mark.parametrize("n,c,n_rows", [(37, 3, 20), (130, 8, 9)])
def test_scatter_rows_interpreter_matches_xla(n, c, n_rows):
    from kernels.plane_scatter import scatter_rows

    rng = np.random.default_rng(n)
    idx = jnp.asarray(rng.integers(0, n_rows, (4, n)), jnp.int32)  # many repeated rows: contention
    w = jnp.asarray(rng.uniform(0, 1, (4, n)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(n, c)), jnp.float32)
    np.testing.assert_allclose(np.asarray(scatter_rows(idx, w, g, n_rows)), np.asarray(_xla_rows(idx, w, g, n_rows)),
                               rtol=1e-5, atol=1e-5)
    gb = jnp.stack([g, 2 * g, -g])
    out = jax.vmap(lambda gg: scatter_rows(idx, w, gg, n_rows))(gb)
    for k in range(3):
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(_xla_rows(idx, w, gb[k], n_rows)), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_plane_gradient_triton_equals_xla(monkeypatch):
    rng = np.random.default_rng()
    plane = jnp.asarray(rng.uniform(0.1, 0.5, (32, 128, 128)), jnp.float32)
    u = jnp.asarray(rng.uniform(-1.1, 1.1, 50000), jnp.float32)
    v = jnp.asarray(rng.normal(0, 0.3, 50000), jnp.float32)  # concentrated: contention on central cells
    cot = jnp.asarray(rng.normal(size=(50000, 32)), jnp.float32)
    loss = lambda p, a, b: jnp.sum(hexplane.sample_plane(p, a, b) * cot)
    grads = {}
    for mode in ("auto", "xla"):
        monkeypatch.setenv("X2GS_PLANE_SCATTER", mode)
        grads[mode] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(plane, u, v)  # traced anew: env read at trace
    for a, b in zip(grads["auto"], grads["xla"]):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
