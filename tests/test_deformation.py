"""Deformation decoder init and the application of the offsets to the canonical Gaussians."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from x2gs_jax.fields import decoder as dec
from x2gs_jax.fields import hexplane
from x2gs_jax.fields.deformation import (DeformationConfig, deform, deformation_offsets, init_deformation_params,
                                         make_deform)
from x2gs_jax.gaussians import Gaussians, softplus

# Default decoder sizes (feature dim 128, width 64) on tiny planes; one level keeps compiles short.
SMALL = DeformationConfig(resolution=(4, 5, 6, 7), multires=(1,), features=128)
DEFORM = jax.jit(make_deform(SMALL))  # shared by the tests: one compile for all calls of this shape
KEY = jax.random.key(0)
T03 = jnp.float32(0.3)


# ------------------------------------------------------------------------------- decoder init
def test_decoder_init_xavier_weights_and_torch_default_biases(small):
    params = small[0]["deformation"]  # from init_deformation_params with the default decoder sizes
    expected = {"feature_out_0": (128, 64)}
    for name, _, k in dec.HEADS:
        expected[f"{name}_1"] = (64, 64)
        expected[f"{name}_3"] = (64, k)
    assert set(params) == set(expected)
    w_pool, b_pool = [], []
    for name, (fan_in, fan_out) in expected.items():
        w = np.asarray(params[name]["kernel"], np.float64)
        b = np.asarray(params[name]["bias"], np.float64)
        assert w.shape == (fan_in, fan_out) and b.shape == (fan_out,)
        w_bound, b_bound = np.sqrt(6.0 / (fan_in + fan_out)), 1.0 / np.sqrt(fan_in)
        assert np.abs(w).max() <= w_bound and np.abs(b).max() <= b_bound
        w_pool.append((w / w_bound).ravel())
        b_pool.append((b / b_bound).ravel())
    # Normalised by their bounds, weights and biases are U(-1, 1): mean 0, second moment 1/3, checked
    # within 5 standard errors (sd of x^2 for U(-1, 1) is sqrt(4/45)). Zero biases or Flax's default
    # lecun_normal kernels would fail these.
    for x in (np.concatenate(w_pool), np.concatenate(b_pool)):
        n = x.size
        assert abs(x.mean()) < 5 * np.sqrt(1 / 3 / n)
        assert abs(np.mean(x**2) - 1 / 3) < 5 * np.sqrt(4 / 45 / n)
        assert np.abs(x).max() > 0.9  # the full range is used
    big = (params["feature_out_0"]["kernel"] / np.sqrt(6.0 / 192)).ravel()  # 8192 weights on their own
    assert abs(float(np.mean(np.asarray(big) ** 2)) - 1 / 3) < 5 * np.sqrt(4 / 45 / big.size)


def test_decoder_structure_matches_the_reference_heads(small):
    """D=1: h = Linear(f) (no activation); head = Linear(relu(Linear(relu(h))))."""
    params = small[0]["deformation"]
    f = np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32)
    out = dec.DeformationDecoder().apply({"params": params}, jnp.asarray(f))
    lin = lambda name, x: x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"])
    relu = lambda x: np.maximum(x, 0.0)
    h = lin("feature_out_0", f.astype(np.float64))
    np.testing.assert_allclose(out["hidden"], h, rtol=1e-5, atol=1e-5)
    for name, key, k in dec.HEADS:
        ref = lin(f"{name}_3", relu(lin(f"{name}_1", relu(h))))
        assert ref.shape == (5, k)
        np.testing.assert_allclose(out[key], ref, rtol=1e-5, atol=1e-5)
    assert dec.num_decoder_params() == sum(x.size for x in jax.tree.leaves(params)) == 21386
    # deeper trunks: torch Sequential indices 0, 2, 4 (ReLU in between), counted by the closed form
    deep = jax.eval_shape(dec.DeformationDecoder(in_features=8, width=16, depth=3).init, KEY, jnp.zeros((1, 8)))
    names = sorted(k for k in deep["params"] if k.startswith("feature_out"))
    assert names == ["feature_out_0", "feature_out_2", "feature_out_4"]
    assert dec.num_decoder_params(8, 16, 3) == sum(x.size for x in jax.tree.leaves(deep))


# ------------------------------------------------------------------------------- application
def _canonical(n_active=20, capacity=24, seed=0):
    rng = np.random.default_rng(seed)
    g = Gaussians.from_activated(rng.uniform(-1, 1, (n_active, 3)), rng.uniform(0.01, 0.1, (n_active, 3)),
                                 rng.normal(size=(n_active, 4)), rng.uniform(0.1, 1.0, n_active), capacity=capacity)
    # stale garbage in inactive slots (e.g. left behind by pruning) must stay harmless
    bad = jnp.array([jnp.nan, jnp.inf, 1e30])
    return g.replace(xyz=g.xyz.at[n_active:].set(bad), scaling=g.scaling.at[n_active + 1:].set(50.0))


@pytest.fixture(scope="module")
def small():
    params = init_deformation_params(jax.random.key(2), SMALL)
    # make the time planes non-constant so that the field depends on t
    rng = np.random.default_rng(3)
    bump = lambda p: p + jnp.asarray(0.3 * rng.normal(size=p.shape), jnp.float32)
    params["grid"] = [[bump(p) if i in hexplane.TIME_PLANES else p for i, p in enumerate(level)]
                      for level in params["grid"]]
    return params, _canonical()


def test_offsets_are_added_in_pre_activation_space(small):
    params, g = small
    deformed, aux = DEFORM(params, g, T03, KEY)
    n = 20
    ref = jax.jit(lambda p, x: deformation_offsets(p, x, T03, SMALL))(params, g.xyz[:n])
    for name in ("dx", "ds", "dr"):
        np.testing.assert_allclose(aux[name][:n], ref[name], rtol=1e-6, atol=1e-7)
        assert np.all(np.asarray(aux[name][n:]) == 0.0)  # inactive: no offset
        assert np.abs(np.asarray(ref[name])).max() > 1e-3  # heads are not zero-initialised
    np.testing.assert_allclose(deformed.xyz[:n], g.xyz[:n] + ref["dx"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(deformed.scaling[:n], g.scaling[:n] + ref["ds"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(deformed.rotation[:n], g.rotation[:n] + ref["dr"], rtol=1e-6, atol=1e-7)
    # activated views: exp of the shifted log-scale, normalised shifted raw quaternion
    np.testing.assert_allclose(deformed.get_scale()[:n], np.exp(np.asarray(g.scaling[:n] + ref["ds"])), rtol=1e-5)
    q = np.asarray(g.rotation[:n] + ref["dr"], np.float64)
    np.testing.assert_allclose(deformed.get_rotation()[:n], q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)
    # density, active mask and the inactive slots are untouched
    assert np.array_equal(deformed.density, g.density) and np.array_equal(deformed.active, g.active)
    np.testing.assert_array_equal(deformed.get_density(), jnp.where(g.active, softplus(g.density), 0.0))
    for a, b in ((deformed.xyz, g.xyz), (deformed.scaling, g.scaling), (deformed.rotation, g.rotation)):
        np.testing.assert_array_equal(np.asarray(a[n:]), np.asarray(b[n:]))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in aux.values())
    assert np.all(np.isfinite(deformed.get_density())) and np.all(np.isfinite(deformed.xyz[:n]))


def test_field_depends_only_on_position_and_time(small):
    params, g = small
    other = g.replace(scaling=g.scaling + 1.0, rotation=g.rotation * 2.0, density=g.density - 1.0)
    _, a = DEFORM(params, g, T03, KEY)
    _, b = DEFORM(params, other, T03, jax.random.key(1))  # the key is unused by X2
    _, c = DEFORM(params, g, jnp.float32(0.6), KEY)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert np.abs(np.asarray(a["dx"] - c["dx"])).max() > 1e-4


def test_vmap_over_times_and_gradients_are_finite(small):
    params, g = small
    times = jnp.array([0.0, 0.25, 0.7])
    batched = jax.jit(jax.vmap(make_deform(SMALL), in_axes=(None, None, 0, None)))(params, g, times, KEY)
    for i, t in enumerate(times):
        d, _ = DEFORM(params, g, t, KEY)
        np.testing.assert_allclose(batched[0].xyz[i], d.xyz, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(batched[0].rotation[i], d.rotation, rtol=1e-6, atol=1e-6)

    def loss(p, xyz, t):
        d, _ = deform(p, g.replace(xyz=xyz), t, None, SMALL)
        act = d.active[:, None]
        return (jnp.sum(jnp.where(act, d.xyz, 0.0) ** 2) + jnp.sum(jnp.where(act, d.get_scale(), 0.0))
                + jnp.sum(jnp.where(act, d.get_rotation(), 0.0)))

    gp, gx, gt = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, g.xyz, jnp.float32(0.42))
    leaves = jax.tree.leaves(gp)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert np.all(np.isfinite(np.asarray(gx))) and np.isfinite(float(gt))
    assert np.all(np.asarray(gx[20:]) == 0.0)  # inactive slots receive no gradient
    assert float(gt) != 0.0  # time planes are non-constant: the period can learn through t
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(gp["deformation"]))
    assert all(float(jnp.abs(p).max()) > 0 for p in gp["grid"][0])


def test_disabled_offsets_and_config_parsing(small):
    params, g = small
    cfg = DeformationConfig.from_config(ml_collections.ConfigDict(dict(
        resolution=[4, 5, 6, 7], multires=[1], features=128, no_dx=True, no_dr=True)))
    assert cfg.resolution == (4, 5, 6, 7) and hash(cfg) == hash(cfg)
    d, aux = jax.jit(make_deform(cfg))(params, g, T03, None)
    np.testing.assert_array_equal(d.xyz, g.xyz)
    np.testing.assert_array_equal(d.rotation, g.rotation)
    assert np.all(np.asarray(aux["dx"]) == 0.0) and np.all(np.asarray(aux["dr"]) == 0.0)
    assert np.abs(np.asarray(d.scaling[:20] - g.scaling[:20])).max() > 1e-4
    assert DeformationConfig.from_config(None) == DeformationConfig()
    d = DeformationConfig()
    assert (d.resolution, d.multires, d.features, d.bounds, d.net_width, d.defor_depth, d.time_mapping) == (
        (64, 64, 64, 150), (1, 2, 4, 8), 32, 1.6, 64, 1, "reference")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['net_widht'\]"):
        DeformationConfig.from_config({"net_widht": 32})
    with pytest.raises(ValueError, match="time_mapping"):
        DeformationConfig(time_mapping="half")
    with pytest.raises(ValueError, match="bounds"):
        DeformationConfig(bounds=0.0)


@pytest.mark.parametrize("depth", [1, 2])
def test_fused_decoder_equals_the_module_values_and_gradients(depth):
    """X2GS_DECODER=fused (`decode_fused`: the heads' products merged, output layers block-diagonal) gives the
    module's outputs and the same gradients for every parameter (the zero blocks get none)."""
    from x2gs_jax.fields.decoder import DeformationDecoder, decode_fused

    module = DeformationDecoder(in_features=24, width=16, depth=depth)
    rng = np.random.default_rng(depth)
    f = jnp.asarray(rng.normal(size=(37, 24)), jnp.float32)
    params = module.init(jax.random.PRNGKey(depth), f)["params"]
    w = {k: jnp.asarray(rng.normal(size=(37, n)), jnp.float32) for k, n in (("hidden", 16), ("dx", 3), ("ds", 3),
                                                                          ("dr", 4))}
    split = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    fused = lambda p, x: decode_fused(p, x, depth)  # noqa: E731
    a, b = split(params, f), fused(params, f)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    loss = lambda fn: lambda p, x: sum(jnp.sum(fn(p, x)[k] * w[k]) for k in w)  # noqa: E731
    ga = jax.grad(loss(split), argnums=(0, 1))(params, f)
    gb = jax.grad(loss(fused), argnums=(0, 1))(params, f)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(gb)[0], jax.tree.leaves(ga)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_decoder_switch_reads_the_environment(small, monkeypatch):
    """deformation_offsets follows X2GS_DECODER (trace time); an unknown value fails naming the variable."""
    params, _ = small
    cfg = SMALL
    xyz = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (20, 3)), jnp.float32)
    monkeypatch.setenv("X2GS_DECODER", "split")
    a = deformation_offsets(params, xyz, 0.3, cfg)
    monkeypatch.setenv("X2GS_DECODER", "fused")
    b = deformation_offsets(params, xyz, 0.3, cfg)
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    monkeypatch.setenv("X2GS_DECODER", "merged")
    with pytest.raises(ValueError, match="X2GS_DECODER='merged': expected split or fused"):
        deformation_offsets(params, xyz, 0.3, cfg)


def test_relu_masks_by_its_output_same_values_and_gradients(capsys):
    """decoder.relu: nn.relu's values and gradients (0 at exactly 0), but autodiff saves no input mask: through a
    2-layer MLP the only residuals are float arrays (nn.relu's form also keeps a bool [N, W] mask per ReLU)."""
    from jax.ad_checkpoint import print_saved_residuals

    import flax.linen as nn

    x = jnp.asarray([-2.0, -0.0, 0.0, 1e-30, 3.0, -1e-30], jnp.float32)
    np.testing.assert_array_equal(dec.relu(x), nn.relu(x))
    w = jnp.arange(1.0, 7.0)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(dec.relu(v) * w))(x),
                                  jax.grad(lambda v: jnp.sum(nn.relu(v) * w))(x))
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    w1, w2 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((16, 16), (16, 4)))
    mlp = lambda act: lambda p: jnp.sum(act(act(a @ p[0]) @ p[1]))  # noqa: E731
    for act in (dec.relu, nn.relu):
        np.testing.assert_array_equal(jax.grad(mlp(dec.relu))((w1, w2))[0], jax.grad(mlp(nn.relu))((w1, w2))[0])
    saved = {}
    for name, act in (("ours", dec.relu), ("flax", nn.relu)):
        capsys.readouterr()
        print_saved_residuals(mlp(act), (w1, w2))
        saved[name] = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert not [s for s in saved["ours"] if s.startswith("bool")], saved["ours"]
    assert [s for s in saved["flax"] if s.startswith("bool")], saved["flax"]  # the test sees the difference
