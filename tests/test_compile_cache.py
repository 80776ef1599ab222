"""The persistent compilation cache: where it lives (x2gs_jax/compile_cache.py), and that the programs we compile do
not depend on the process (a program traced differently in each process would never be found in the cache).

Before the fix, optim.make_optimizer iterated over a set of group names, so the order of the groups' updates in the
traced step -- and the cache key -- followed Python's per-process string hash seed."""
import hashlib
import os
import subprocess
import sys

import pytest

from x2gs_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowers one update of an optimiser over eight parameter groups (the X2 / PhysX-Boosted group names) and prints the
# hash of the program text.
_LOWER = r"""
import hashlib, jax, jax.numpy as jnp
from x2gs_jax.optim import GroupSpec, make_optimizer
names = ["xyz", "scaling", "rotation", "density", "grid", "deformation", "period", "balance"]
params = {n: jnp.ones((i + 2, 3)) for i, n in enumerate(names)}
labels = {n: n for n in names}
opt = make_optimizer({n: GroupSpec(1e-3 * (i + 1), 1e-5, 100) for i, n in enumerate(names)}, labels)
state = opt.init(params)
def step(g, s, p):
    return opt.update(g, s, p, step=jnp.int32(3), gates={})
text = jax.jit(step).lower(params, state, params).as_text()
print(hashlib.sha256(text.encode()).hexdigest())
"""


def test_the_optimiser_update_is_the_same_program_in_every_process():
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", _LOWER], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


def test_cache_directory_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("X2GS_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache.resolve("auto") == str(tmp_path / "env")
    assert compile_cache.resolve("") is None
    assert compile_cache.resolve(str(tmp_path / "x")) == str(tmp_path / "x")
    monkeypatch.delenv("X2GS_COMPILE_CACHE")
    monkeypatch.setenv("X2GS_CACHE", str(tmp_path / "data"))
    assert compile_cache.resolve("auto") == str(tmp_path / "data" / "xla")
    monkeypatch.delenv("X2GS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve("auto") == str(tmp_path / "home" / ".cache" / "x2gs_jax" / "xla")


def test_enable_points_jax_at_the_directory_and_off_switches_it_off(tmp_path):
    import jax

    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    try:
        path = compile_cache.enable(str(tmp_path / "c"))
        assert path == str(tmp_path / "c") and os.path.isdir(path)
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o700)  # JAX runs what it finds there: private
        assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == path
        assert compile_cache.enable("") is None and not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_enable_compilation_cache", before[0])
        jax.config.update("jax_compilation_cache_dir", before[1])
        from jax.experimental.compilation_cache import compilation_cache as cc
        cc.reset_cache()
