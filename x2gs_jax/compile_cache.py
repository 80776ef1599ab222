"""JAX's persistent compilation cache, on by default: a run that repeats (or resumes, or evaluates the same model
again) loads its compiled step and evaluation functions from disk instead of compiling them again.

Where: `config.compile_cache_dir` -- "auto" (default) = $X2GS_COMPILE_CACHE, else `<$X2GS_CACHE or
~/.cache/x2gs_jax>/xla`; "" = off; any other value = that directory. The directory is created private to the user
(mode 0700): JAX treats the cache as trusted code, so it must not be writable by others.

A cache entry is keyed by the lowered program, so a step function only hits the cache when tracing produces the
same program in every process (no iteration over sets of strings, whose order follows Python's per-process hash
seed; see optim.make_optimizer).
"""
from __future__ import annotations

import os
from typing import Optional

import jax

ENV = "X2GS_COMPILE_CACHE"


def resolve(setting: str) -> Optional[str]:
    """The cache directory for a `compile_cache_dir` setting, or None when the cache is off ("")."""
    setting = str(setting)
    if setting == "":
        return None
    if setting != "auto":
        return os.path.abspath(os.path.expanduser(setting))
    if os.environ.get(ENV):
        return os.path.abspath(os.path.expanduser(os.environ[ENV]))
    return os.path.join(os.path.abspath(user_cache_root()), "xla")


def user_cache_root() -> str:
    """The project's cache directory: $X2GS_CACHE, else ~/.cache/x2gs_jax (the embedded phantom, compiled programs)."""
    return os.environ.get("X2GS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "x2gs_jax")


def enable(setting: str) -> Optional[str]:
    """Point JAX's persistent compilation cache at `resolve(setting)` (or switch it off); returns the directory.

    JAX initialises the cache once per process, at the first compilation; a later change of directory (another run
    in the same process with another setting) resets it so that the new one is used."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = resolve(setting)
    if path is None:
        if jax.config.jax_enable_compilation_cache:
            jax.config.update("jax_enable_compilation_cache", False)
            cc.reset_cache()
        return None
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not jax.config.jax_enable_compilation_cache or jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()
    return path
