"""PhysX-Gaussian (pure anchor mode): FPS, KNN skinning and the anchor neighbour table against brute-force twins;
the spacetime transformer against a NumPy twin of PyTorch's post-norm encoder layer and its initial statistics;
masking, the L_phys teacher, warmup gates; rebinding after densify/grow; the registry; exact continuation of a
`physx:tiny` run across processes; `physx:demo` through train.py and eval.py."""
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from configs import physx as physx_config
from x2gs_jax import train_lib
from x2gs_jax.data.naf import load_case
from x2gs_jax.densify import DensifyStats
from x2gs_jax.gaussians import Gaussians
from x2gs_jax.models import ConfigError, make_model, model_kinds
from x2gs_jax.models import anchors as A
from x2gs_jax.models.physx import PhysXModel, PhysXSettings
from x2gs_jax.models.transformer import (EncoderLayer, TransformerConfig, anchor_displacements, init_transformer,
                                         transformer_labels)
from x2gs_jax.train_state import gaussians_from_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = TransformerConfig(dim=16, heads=2, layers=2, pos_embed_dim=8, time_embed_dim=4)


# ------------------------------------------------------------------------------------------- anchors
def _fps_twin(points, m, start):
    dmin = np.full(len(points), np.inf)
    out, cur = [], start
    for _ in range(m):
        out.append(cur)
        dmin = np.minimum(dmin, ((points - points[cur]) ** 2).sum(-1))
        cur = int(np.argmax(dmin))
    return out


def test_fps_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(200, 3)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    idx = np.asarray(A.farthest_point_sampling(pts, 17, key))
    start = int(jax.random.randint(key, (), 0, 200))
    assert idx.tolist() == _fps_twin(pts.astype(np.float64), 17, start)
    assert len(set(idx.tolist())) == 17
    # Invalid rows are never chosen; the start is random among the valid ones.
    valid = rng.uniform(size=200) < 0.5
    idx = np.asarray(A.farthest_point_sampling(pts, 30, key, valid))
    assert valid[idx].all() and len(set(idx.tolist())) == 30
    rank = int(jax.random.randint(key, (), 0, valid.sum()))
    sub = np.flatnonzero(valid)
    assert idx.tolist() == [int(sub[i]) for i in _fps_twin(pts[valid].astype(np.float64), 30, rank)]


def _dense_binding(xyz, anchors, k, tau):
    d2 = ((xyz[:, None, :].astype(np.float64) - anchors[None].astype(np.float64)) ** 2).sum(-1)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    d = np.take_along_axis(d2, idx, 1)
    w = np.exp(-(d - d[:, :1]) / tau)
    return idx, w / w.sum(1, keepdims=True)


@pytest.mark.parametrize("chunk", [None, 7])
def test_knn_binding_matches_a_dense_computation(chunk):
    rng = np.random.default_rng(1)
    xyz = rng.uniform(-1, 1, (103, 3)).astype(np.float32)
    anchors = rng.uniform(-1, 1, (40, 3)).astype(np.float32)
    active = rng.uniform(size=103) < 0.8
    idx, w = A.knn_bind(xyz, anchors, 6, 0.01, active, chunk=chunk)
    ti, tw = _dense_binding(xyz, anchors, 6, 0.01)
    np.testing.assert_array_equal(np.asarray(idx)[active], ti[active])
    np.testing.assert_allclose(np.asarray(w)[active], tw[active], rtol=2e-5, atol=1e-6)
    assert np.all(np.asarray(w)[~active] == 0)
    np.testing.assert_allclose(np.asarray(w)[active].sum(1), 1.0, rtol=1e-6)
    # k is clamped to the number of anchors.
    assert A.knn_bind(xyz, anchors[:3], 10)[0].shape == (103, 3)


class SkinningTest(chex.TestCase):
    """Skinning, the neighbour table and L_smooth against loops, each with and without jit (chex variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_skinning_neighbours_and_smoothness_match_loops(self):
        rng = np.random.default_rng(2)
        anchors = rng.normal(size=(12, 3)).astype(np.float32)
        da = rng.normal(size=(12, 3)).astype(np.float32)
        idx = rng.integers(0, 12, (9, 4))
        w = rng.uniform(size=(9, 4)).astype(np.float32)
        skin = np.asarray(self.variant(A.skin)(jnp.asarray(da), jnp.asarray(idx), jnp.asarray(w)))
        np.testing.assert_allclose(skin, [sum(w[c, j] * da[idx[c, j]] for j in range(4)) for c in range(9)],
                                   rtol=1e-5)
        nb = np.asarray(self.variant(A.anchor_neighbours, static_argnums=1)(jnp.asarray(anchors), 8))
        d2 = ((anchors[:, None] - anchors[None]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        np.testing.assert_array_equal(np.sort(nb, 1), np.sort(np.argsort(d2, 1)[:, :8], 1))
        loss = float(self.variant(A.smoothness_loss)(jnp.asarray(da), jnp.asarray(nb)))
        twin = np.mean([((da[j] - da[n]) ** 2).sum() for j in range(12) for n in nb[j]])
        assert loss == pytest.approx(twin, rel=1e-5)
        assert A.anchor_neighbours(anchors[:4], 8).shape == (4, 3)  # min(8, M - 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_transformer_forward_is_the_same_under_jit(self):
        p = init_transformer(jax.random.PRNGKey(0), SMALL)
        anchors = jnp.asarray(np.random.default_rng(0).normal(size=(7, 3)), jnp.float32)
        out = self.variant(lambda a, t: anchor_displacements(p, SMALL, a, t))(anchors, 0.4)
        chex.assert_shape(out, (7, 3))
        chex.assert_tree_all_finite(out)
        chex.assert_trees_all_close(out, anchor_displacements(p, SMALL, anchors, 0.4), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- transformer
def _np_layer(p, x, heads):
    """PyTorch TransformerEncoderLayer (post-norm, exact GELU, no dropout) in NumPy float64."""
    x = x.astype(np.float64)
    m, d = x.shape
    hd = d // heads
    qkv = x @ p["in_proj_kernel"] + p["in_proj_bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    out = np.zeros_like(x)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        a = q[:, s] @ k[:, s].T / np.sqrt(hd)
        a = np.exp(a - a.max(1, keepdims=True))
        out[:, s] = (a / a.sum(1, keepdims=True)) @ v[:, s]
    att = out @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]

    def ln(y, q):
        mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        return (y - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

    h1 = ln(x + att, p["norm1"])
    f = h1 @ p["linear1"]["kernel"] + p["linear1"]["bias"]
    f = 0.5 * f * (1 + erf(f / np.sqrt(2)))
    f = f @ p["linear2"]["kernel"] + p["linear2"]["bias"]
    return ln(h1 + f, p["norm2"])


def test_encoder_layer_matches_a_numpy_twin():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(11, 16)).astype(np.float32)
    layer = EncoderLayer(16, 4, 0.1)
    p = layer.init(jax.random.PRNGKey(0), x, True)["params"]
    p = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), p)  # off the init
    out = np.asarray(layer.apply({"params": p}, x, True))
    np.testing.assert_allclose(out, _np_layer(jax.tree.map(np.asarray, p), x, 4), rtol=1e-4, atol=1e-5)


def test_transformer_initial_statistics():
    cfg = TransformerConfig(dim=256, heads=4, layers=3)
    p = init_transformer(jax.random.PRNGKey(1), cfg)
    # All encoder layers start identical (PyTorch deep-copies one layer).
    chex.assert_trees_all_equal(p["layer_0"], p["layer_1"], p["layer_2"])
    np.testing.assert_allclose(np.asarray(p["time_freqs"]), np.pi * np.arange(1, 9), rtol=1e-7)
    # PyTorch Linear: weight and bias U(+-1/sqrt(fan_in)) (variance bound^2 / 3).
    for name, fan_in in (("pos_embed_0", 3), ("pos_embed_2", 32), ("time_proj", 16), ("input_proj", 48),
                         ("head_0", 256), ("head_2", 256)):
        bound = 1 / np.sqrt(fan_in)
        for leaf in (p[name]["kernel"], p[name]["bias"]):
            a = np.asarray(leaf)
            assert np.abs(a).max() <= bound
        k = np.asarray(p[name]["kernel"])
        if k.size >= 1000:
            assert np.var(k) == pytest.approx(bound ** 2 / 3, rel=0.15), name
    lay = jax.tree.map(np.asarray, p["layer_0"])
    xb = np.sqrt(6 / (256 + 3 * 256))  # xavier over the packed [3d, d] q/k/v matrix
    assert np.abs(lay["in_proj_kernel"]).max() <= xb and np.var(lay["in_proj_kernel"]) == pytest.approx(xb ** 2 / 3, rel=0.05)
    assert not lay["in_proj_bias"].any() and not lay["out_proj"]["bias"].any()
    assert np.var(lay["out_proj"]["kernel"]) == pytest.approx(1 / 256 / 3, rel=0.05)
    assert np.var(lay["linear1"]["kernel"]) == pytest.approx(1 / 256 / 3, rel=0.05)
    assert np.var(lay["linear2"]["kernel"]) == pytest.approx(1 / 1024 / 3, rel=0.05)
    for norm in ("norm1", "norm2"):
        assert (lay[norm]["scale"] == 1).all() and (lay[norm]["bias"] == 0).all()
    assert np.std(np.asarray(p["mask_token"])) == pytest.approx(0.02, rel=0.25)
    # The head is not zero-initialised: random, non-zero displacements at the start of the fine stage.
    da = anchor_displacements(p, cfg, jnp.asarray(np.random.default_rng(0).normal(size=(20, 3)), jnp.float32), 0.3)
    assert da.shape == (20, 3) and float(jnp.abs(da).mean()) > 1e-3
    labels = set(jax.tree.leaves(transformer_labels(p)))
    assert labels == {"anchor_deformation", "anchor_transformer"}
    assert set(jax.tree.leaves(transformer_labels(p)["layer_1"])) == {"anchor_transformer"}


def test_masked_anchors_carry_no_position_or_time():
    p = init_transformer(jax.random.PRNGKey(2), SMALL)
    rng = np.random.default_rng(4)
    anchors = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    mask = jnp.asarray([True, False] * 5)
    moved = anchors.at[0].add(1.0).at[4].add(-2.0)  # two masked anchors move
    f = jax.jit(lambda a, t, m: anchor_displacements(p, SMALL, a, t, mask=m))
    chex.assert_trees_all_close(f(anchors, 0.3, mask), f(moved, 0.3, mask), atol=1e-6)
    assert float(jnp.abs(f(anchors.at[1].add(1.0), 0.3, mask) - f(anchors, 0.3, mask)).max()) > 1e-4
    # All masked anchors output the same displacement; with every token masked, time and position are gone.
    out = np.asarray(f(anchors, 0.3, mask))
    np.testing.assert_allclose(out[0::2], np.broadcast_to(out[0], (5, 3)), atol=1e-5)
    full = jnp.ones(10, bool)
    chex.assert_trees_all_close(f(anchors, 0.1, full), f(moved, 0.9, full), atol=1e-6)
    # Dropout only with a key: deterministic without, a different sample per key.
    d1 = anchor_displacements(p, SMALL, anchors, 0.3, dropout_key=jax.random.PRNGKey(0))
    d2 = anchor_displacements(p, SMALL, anchors, 0.3, dropout_key=jax.random.PRNGKey(1))
    assert float(jnp.abs(d1 - d2).max()) > 1e-5
    chex.assert_trees_all_close(anchor_displacements(p, SMALL, anchors, 0.3),
                                anchor_displacements(p, SMALL, anchors, 0.3))


# ------------------------------------------------------------------------------------------ the model
class _Settings:
    def __init__(self, stage):
        self.stage = stage
        self.scale_bound = None


def _model_and_state(n=80, mask_ratio=0.25, warmup=10):
    rng = np.random.default_rng(5)
    g = Gaussians.from_activated(rng.uniform(-0.6, 0.6, (n, 3)).astype(np.float32), np.full((n, 3), 0.05, np.float32),
                                 np.tile(np.array([[1.0, 0, 0, 0]], np.float32), (n, 1)),
                                 rng.uniform(0.2, 1.0, n).astype(np.float32), capacity=n + 8)
    model = PhysXModel(PhysXSettings(transformer=SMALL, num_anchors=16, anchor_k=4, mask_ratio=mask_ratio,
                                     phys_warmup_steps=warmup))
    params = {"xyz": g.xyz, "scaling": g.scaling, "rotation": g.rotation, "density": g.density}
    params.update(model.init_params(jax.random.PRNGKey(0), None))
    return model, params, model.init_model_state(jax.random.PRNGKey(1), g), g


def test_model_state_and_pure_mode_deformation():
    model, params, ms, g = _model_and_state()
    assert ms["anchors"].shape == (16, 3) and ms["knn_idx"].shape == (g.capacity, 4)
    # Anchors are initial Gaussians (FPS) and every active Gaussian is bound to its nearest ones.
    d = np.abs(np.asarray(ms["anchors"])[:, None] - np.asarray(g.xyz)[None]).sum(-1)
    assert (d.min(1) == 0).all()
    ti, tw = _dense_binding(np.asarray(g.xyz), np.asarray(ms["anchors"]), 4, 0.01)
    act = np.asarray(g.active)
    np.testing.assert_array_equal(np.asarray(ms["knn_idx"])[act], ti[act])
    # Coarse: canonical; fine: positions move by the skinned anchor displacement, scale/rotation/density do not.
    assert model.gaussians_at(params, ms, g, 0.5, None, "coarse") is g
    out = model.gaussians_at(params, ms, g, 0.5, None, "fine")
    da = anchor_displacements(params["anchor_net"], SMALL, ms["anchors"], 0.5)
    want = np.asarray(g.xyz) + np.where(act[:, None], np.asarray(A.skin(da, ms["knn_idx"], ms["knn_w"])), 0)
    np.testing.assert_allclose(np.asarray(out.xyz), want, rtol=1e-5, atol=1e-6)
    for k in ("scaling", "rotation", "density", "active"):
        np.testing.assert_array_equal(np.asarray(getattr(out, k)), np.asarray(getattr(g, k)))


def _extra(model, params, ms, g, it, stage="fine"):
    batch = {"time": jnp.asarray([0.2, 0.7], jnp.float32)}
    canonical = gaussians_from_params(params, g.active, None)
    key = jax.random.PRNGKey(9)
    _, cache = model.view_gaussians(params, ms, canonical, batch["time"], key, it, _Settings(stage))
    return model.extra_losses(params, ms, g.active, batch, key, it, _Settings(stage), None, cache)


def test_phys_loss_teacher_gets_no_gradient_and_warmup_gates():
    model, params, ms, g = _model_and_state(warmup=10)
    times = jnp.asarray([0.2, 0.7], jnp.float32)
    canonical = gaussians_from_params(params, g.active, None)
    _, cache = model.view_gaussians(params, ms, canonical, times, jax.random.PRNGKey(3), 20, _Settings("fine"))
    assert cache["masked"].shape == (2, 4)  # floor(16 * 0.25) per view
    frozen = jax.tree.map(jax.lax.stop_gradient, cache)
    # Student held constant: the only path left is the teacher, which must give no gradient.
    g_teacher = jax.grad(lambda p: jnp.sum(model.phys_loss(p, ms, times, frozen, jax.random.PRNGKey(4))))(params)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g_teacher["anchor_net"]))

    def total(p, it):
        return _extra(model, p, ms, g, jnp.int32(it))[0]

    grad = jax.jit(jax.grad(total))
    before, after = grad(params, 5), grad(params, 10)
    _, m5 = _extra(model, params, ms, g, jnp.int32(5))
    _, m10 = _extra(model, params, ms, g, jnp.int32(10))
    assert float(m5["loss_phys"]) == 0.0 and float(m10["loss_phys"]) > 0
    assert float(m5["loss_anchor_smooth"]) > 0
    # Before the warmup only L_smooth acts: the gradient differs once L_phys switches on.
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert diff > 0
    # The mask token gets gradient only through the masked render pass (L_phys / L_smooth here).
    assert float(jnp.abs(after["anchor_net"]["mask_token"]).max()) > 0
    # Coarse stage: no extra loss, canonical Gaussians; the anchor groups are gated shut.
    tot, m = _extra(model, params, ms, g, jnp.int32(12), "coarse")
    assert float(tot) == 0.0 and m == {}
    assert {k: bool(v) for k, v in model.gates(3, _Settings("coarse")).items()} == {
        "anchor_deformation": False, "anchor_transformer": False}
    assert all(bool(v) for v in model.gates(3, _Settings("fine")).values())
    # No mask: no L_phys term at all (the reference's cache is empty).
    model0, params0, ms0, g0 = _model_and_state(mask_ratio=0.0)
    assert "loss_phys" not in _extra(model0, params0, ms0, g0, jnp.int32(20))[1]


# ------------------------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    config = physx_config.get_config("tiny")
    config.data.cache_dir = cache
    path = train_lib.resolve_case_path(config)
    case = load_case(path)
    return config, case, train_lib.initial_points(path, case, config), cache


def test_registry_fails_loudly_on_an_unknown_kind(tiny):
    config, case, _, _ = tiny
    assert {"static", "x2", "physx"} <= set(model_kinds())
    config = config.copy_and_resolve_references()
    config.model.kind = "hexplane_v2"
    with pytest.raises(ConfigError, match="hexplane_v2.*known kinds"):
        make_model(config, case)
    config.model.kind = "physx"
    config.physx.mask_ratio = 1.5
    with pytest.raises(ConfigError, match="physx.mask_ratio"):
        make_model(config, case)


def test_every_reference_flag_is_a_config_key():
    flags = {"num_anchors", "anchor_k", "mask_ratio", "transformer_dim", "transformer_heads", "transformer_layers",
             "anchor_pos_embed_dim", "anchor_time_embed_dim", "lambda_phys", "lambda_anchor_smooth",
             "phys_warmup_steps", "dropout_at_eval"}
    for variant in (None, "demo", "tiny", "ref64"):
        c = physx_config.get_config(variant)
        assert flags <= set(c.physx.keys()) and c.model.kind == "physx"
    c = physx_config.get_config()
    assert (c.physx.num_anchors, c.physx.anchor_k, c.physx.mask_ratio, c.physx.lambda_phys,
            c.physx.lambda_anchor_smooth, c.physx.phys_warmup_steps) == (1024, 10, 0.25, 0.1, 0.01, 2000)


def test_rebinding_after_densify_and_growth_matches_binding_from_scratch(tiny):
    config, case, points, _ = tiny
    model = train_lib.make_model(config, case)
    state = train_lib.init_state(config, case, points, model)
    # Large accumulated gradients: every Gaussian clones or splits, so the buffers grow and slots move.
    c = state.capacity
    stats = DensifyStats(grad_accum=jnp.where(state.active, 1.0, 0.0), count=state.active.astype(jnp.int32),
                         max_radii=jnp.zeros(c))
    params = dict(state.params)
    params["xyz"] = params["xyz"] + 0.01  # the Gaussians moved since the last binding
    state = state.replace(stats=stats, params=params)
    old_anchors = np.asarray(state.model_state["anchors"])
    new, info = train_lib.densify_step(state, config, case.scanner, 4, model)
    assert new.capacity > c and info["cloned"] + info["split"] > 0
    g = new.gaussians()
    idx, w = A.knn_bind(g.xyz, new.model_state["anchors"], config.physx.anchor_k, config.physx.knn_tau, g.active)
    chex.assert_trees_all_equal(new.model_state["knn_idx"], idx)
    chex.assert_trees_all_close(new.model_state["knn_w"], w)
    np.testing.assert_array_equal(np.asarray(new.model_state["anchors"]), old_anchors)  # anchors never move
    assert new.model_state["knn_idx"].shape == (new.capacity, config.physx.anchor_k)


def _cmd(workdir, cache, *extra, config="configs/physx.py:tiny"):
    # A small cap on the Gaussian count: densify/prune/rebind still run at every densify iteration, but the buffers
    # grow once; calls of two iterations (fewer step compilations: CI time).
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, config),
            f"--workdir={workdir}", f"--config.data.cache_dir={cache}", "--config.densify.max_num_gaussians=2000",
            "--config.train.steps_per_call=2", *extra]


@pytest.mark.slow
def test_exact_continuation_of_a_physx_tiny_run(tiny, tmp_path):
    """Uninterrupted `physx:tiny` (16 iterations, densify at 4, 8, 12, fine stage from 7, L_phys from 8) ==
    a run killed after its first checkpoint + restore in a fresh process: identical losses, parameters, anchors
    and binding."""
    from tests.test_train import _losses, _run_killed_after_first_checkpoint

    _, _, _, cache = tiny
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(_cmd(straight, cache), check=True, env=env, cwd=ROOT, capture_output=True)
    steps = _run_killed_after_first_checkpoint(_cmd(broken, cache, "--config.train.iterations=400"), broken, env)
    assert steps and steps[-1] < 12, f"the run was not interrupted before the last densification ({steps})"
    subprocess.run(_cmd(broken, cache, f"--config.resume={broken}"), check=True, env=env, cwd=ROOT,
                   capture_output=True)
    for name in ("gaussians.npz", "model_state.npz"):
        a, b = np.load(straight / "export" / name), np.load(broken / "export" / name)
        assert a.files == b.files
        chex.assert_trees_all_equal(dict(a), dict(b))
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        na = ck.restore(os.path.abspath(straight / "export" / "anchor_net"))
        nb = ck.restore(os.path.abspath(broken / "export" / "anchor_net"))
    chex.assert_trees_all_equal(na, nb)
    la, lb = _losses(straight), _losses(broken)
    for s in range(steps[-1] + 1, 17):
        assert la[s] == lb[s], (s, la[s], lb[s])
    recs = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    fine = [r for r in recs if r["kind"] == "train" and r["step"] >= 8]
    assert fine and all(r["loss_phys"] > 0 and r["loss_anchor_smooth"] > 0 for r in fine)


@pytest.mark.slow
def test_physx_demo_through_train_py_and_eval_py(tmp_path):
    """`physx:demo` (shortened) through train.py, then eval.py: phase metrics, baselines, tidal curve, no period."""
    cache, run = str(tmp_path / "cache"), tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run(_cmd(run, cache, "--config.train.iterations=40", "--config.train.coarse_iterations=20",
                        "--config.physx.phys_warmup_steps=25", "--config.densify.from_iter=10",
                        "--config.densify.interval=10", "--config.densify.until_iter=35", "--config.eval.iterations=(40,)",
                        "--config.checkpoint.every=20", "--config.log.every=5", "--config.densify.max_num_gaussians=7000",
                        config="configs/physx.py:demo"),
                   check=True, env=env, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--workdir={run}", "--tidal_points=16",
                    "--gif_frames=3"], check=True, env=env, cwd=ROOT, capture_output=True)
    m = json.load(open(run / "eval" / "metrics.json"))
    assert m["source"] == "export" and m["stage"] == "fine" and m["is_4d"]
    assert len(m["psnr_3d"]) == 10 and m["psnr_3d_mean"] > 10 and "fdk4d_psnr_3d_mean" in m
    assert "period_learned_s" not in m and m["tidal_points"] == 16
    for f in ("tidal.csv", "breathing.gif", "slices_T0.png", "projections.png"):
        assert (run / "eval" / f).exists(), f
    train_eval = [json.loads(line) for line in open(run / "metrics.jsonl")]
    final = [r for r in train_eval if r["kind"] == "eval" and r["step"] == 40][0]
    assert m["psnr_3d_mean"] == pytest.approx(final["psnr_3d_mean"], abs=1e-3)  # eval.py == in-training evaluation
