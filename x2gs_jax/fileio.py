"""Small file utilities: atomic writes (NIfTI volumes: `x2gs_jax.nifti`).

Atomic writes. Every writer here goes through `atomic_writer`: the bytes are written to a temporary file
in the destination directory, flushed and fsync'ed, then moved over the destination with `os.replace`
(atomic on POSIX and Windows within one file system). A reader therefore sees either the old file or the
complete new one; if writing fails, the old file is left untouched and the temporary file is removed.
A destination that is a symbolic link is replaced by a regular file (the link target is not written).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

import numpy as np


# ------------------------------------------------------------------------------------- atomic writes
def _default_file_mode() -> int:
    """0o666 masked by the process umask, read without changing it (Linux); 0o644 elsewhere."""
    try:
        with open("/proc/self/status", "r", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _fsync_dir(directory: str) -> None:
    """Persist the directory entry of a replaced file; silently skipped where unsupported (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Context manager yielding a binary file whose contents replace `path` atomically on success.

    The temporary file lives in the destination directory (so `os.replace` stays on one file system) and
    is named `.<basename>.<random>.tmp`. If the body raises, the destination is left as it was, the
    temporary file is deleted and the exception propagates. The new file keeps the permission bits of the
    file it replaces, or gets 0o666 & ~umask when new.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = _default_file_mode()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(memoryview(data))


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """Save one array in .npy format to exactly `path` (no suffix is appended), atomically.

    Object arrays are refused (`allow_pickle=False`) so the file can be loaded without unpickling.
    """
    array = np.asanyarray(array)
    if array.dtype.hasobject:
        raise ValueError(f"{os.fspath(path)}: refusing to save an object array (dtype {array.dtype}) as .npy")
    with atomic_writer(path) as f:
        np.save(f, array, allow_pickle=False)
