"""Atomic writes (NIfTI volumes: tests/test_nifti.py)."""
import os
import stat

import numpy as np
import pytest

from x2gs_jax import fileio
from x2gs_jax.fileio import atomic_save_npy, atomic_write_bytes


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_bytes_creates_and_replaces(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"first")
    assert p.read_bytes() == b"first"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    os.chmod(p, 0o640)
    atomic_write_bytes(str(p), bytearray(b"second"))
    assert p.read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640  # permissions of the replaced file kept
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_writer_failure_keeps_old_file_and_cleans_up(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.atomic_writer(p) as f:
            f.write(b"new partial")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["f.bin"]
    # A failure on a fresh path leaves nothing at all.
    with pytest.raises(RuntimeError):
        with fileio.atomic_writer(tmp_path / "g.bin") as f:
            f.write(b"x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_save_npy(tmp_path):
    a = np.random.default_rng(0).normal(size=(50, 4))
    p = tmp_path / "init_case.npy"
    atomic_save_npy(p, a)
    b = np.load(p)
    assert b.dtype == a.dtype and np.array_equal(a, b)
    q = tmp_path / "no_suffix"
    atomic_save_npy(q, a[:3])
    assert q.exists() and np.array_equal(np.load(q), a[:3])  # written exactly where asked
    with pytest.raises(ValueError, match="object array"):
        atomic_save_npy(tmp_path / "obj.npy", np.array([{}, 1], dtype=object))
    assert not (tmp_path / "obj.npy").exists()
    assert sorted(os.listdir(tmp_path)) == ["init_case.npy", "no_suffix"]
