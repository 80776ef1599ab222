"""Small file utilities: atomic writes and a minimal NIfTI-1 volume writer/reader (NumPy only).

Atomic writes. Every writer here goes through `atomic_writer`: the bytes are written to a temporary file
in the destination directory, flushed and fsync'ed, then moved over the destination with `os.replace`
(atomic on POSIX and Windows within one file system). A reader therefore sees either the old file or the
complete new one; if writing fails, the old file is left untouched and the temporary file is removed.
A destination that is a symbolic link is replaced by a regular file (the link target is not written).

NIfTI orientation convention. A volume is an array `vol[i, j, k]` whose axes are our world axes (x, y, z)
(data_format.md §5: x, y horizontal, z = the gantry rotation axis). It is written with NIfTI voxel axes
(i, j, k) = (x, y, z), x varying fastest on disk (Fortran order of the [x, y, z] array), and with both
qform and sform equal to

    [[dx, 0, 0, ox], [0, dy, 0, oy], [0, 0, dz, oz], [0, 0, 0, 1]]   (millimetres)

where (dx, dy, dz) is the voxel size and (ox, oy, oz) the world position of the *centre* of voxel (0, 0, 0).
NIfTI names its world axes RAS (+x right, +y anterior, +z superior); we make no anatomical claim, so a
viewer shows our world x, y, z on its R, A, S axes. `nifti_frame_mm(scanner)` gives the spacing and origin
of a scanner's reconstruction grid in this convention.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import tempfile
from typing import IO, Iterator

import numpy as np


class NiftiError(ValueError):
    """A NIfTI file is unreadable or unsupported, or arguments to the writer are invalid."""


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


# ------------------------------------------------------------------------------------- NIfTI-1
_HEADER_SIZE = 348
_VOX_OFFSET = 352  # header + 4-byte extension flag (no extensions)
_NIFTI_XFORM_SCANNER_ANAT = 1
_NIFTI_UNITS_MM = 2
_DT_FLOAT32 = 16

# NIfTI datatype code -> NumPy dtype (without byte order), for the reader.
_READ_DTYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8",
}

# struct layout of the NIfTI-1 header (byte order prefix added at use). Field: (offset, format).
_FIELDS = {
    "sizeof_hdr": (0, "i"),
    "regular": (38, "c"),
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "xyzt_units": (123, "B"),
    "descrip": (148, "80s"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern": (256, "3f"),  # b, c, d
    "qoffset": (268, "3f"),  # x, y, z
    "srow_x": (280, "4f"),
    "srow_y": (296, "4f"),
    "srow_z": (312, "4f"),
    "magic": (344, "4s"),
}


def _vector3(value, name: str, positive: bool) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != 3 or not np.all(np.isfinite(arr)) or (positive and not np.all(arr > 0)):
        what = "3 positive finite values" if positive else "3 finite values"
        raise NiftiError(f"write_nifti: {name} must be {what}, got {value!r}")
    return arr


def nifti_header(shape: tuple[int, int, int], spacing_mm, origin_mm) -> bytes:
    """The 352 bytes preceding the data of a single-file float32 NIfTI-1 volume (little-endian).

    Args:
      shape: (nx, ny, nz) voxel counts.
      spacing_mm: (3,) voxel size in mm.
      origin_mm: (3,) world position in mm of the centre of voxel (0, 0, 0).
    """
    spacing = _vector3(spacing_mm, "spacing_mm", positive=True)
    origin = _vector3(origin_mm, "origin_mm", positive=False)
    if len(shape) != 3 or any(int(n) < 1 or int(n) > 32767 for n in shape):
        raise NiftiError(f"write_nifti: NIfTI-1 needs 3 sizes in [1, 32767], got {shape}")
    hdr = bytearray(_VOX_OFFSET)  # zero-filled: unused fields and the extension flag stay 0

    def put(name, *values):
        offset, fmt = _FIELDS[name]
        struct.pack_into("<" + fmt, hdr, offset, *values)

    put("sizeof_hdr", _HEADER_SIZE)
    put("regular", b"r")
    put("dim", 3, *(int(n) for n in shape), 1, 1, 1, 1)
    put("datatype", _DT_FLOAT32)
    put("bitpix", 32)
    # pixdim[0] is qfac = +1 (right-handed i, j, k with identity rotation).
    put("pixdim", 1.0, *spacing, 1.0, 1.0, 1.0, 1.0)
    put("vox_offset", float(_VOX_OFFSET))
    put("scl_slope", 1.0)
    put("scl_inter", 0.0)
    put("xyzt_units", _NIFTI_UNITS_MM)
    put("descrip", b"x2gs-jax")
    put("qform_code", _NIFTI_XFORM_SCANNER_ANAT)
    put("sform_code", _NIFTI_XFORM_SCANNER_ANAT)
    put("quatern", 0.0, 0.0, 0.0)  # identity rotation
    put("qoffset", *origin)
    put("srow_x", spacing[0], 0.0, 0.0, origin[0])
    put("srow_y", 0.0, spacing[1], 0.0, origin[1])
    put("srow_z", 0.0, 0.0, spacing[2], origin[2])
    put("magic", b"n+1\x00")
    return bytes(hdr)


def write_nifti(path: str | os.PathLike, volume, spacing_mm, origin_mm) -> None:
    """Write a 3D volume as single-file NIfTI-1 (`.nii`, or gzip-compressed when `path` ends in `.gz`).

    Args:
      path: destination; written atomically.
      volume: [nx, ny, nz] real array (world axes x, y, z); stored as float32, x fastest.
      spacing_mm: (3,) voxel size (dx, dy, dz) in mm.
      origin_mm: (3,) world position in mm of the centre of voxel (0, 0, 0).
    """
    path = os.fspath(path)
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.dtype.kind not in "biuf":
        raise NiftiError(f"{path}: write_nifti expects a real [nx, ny, nz] volume, got {vol.dtype} {vol.shape}")
    payload = nifti_header(vol.shape, spacing_mm, origin_mm) + vol.astype("<f4").tobytes(order="F")
    if path.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)  # mtime 0: identical inputs give identical files
    atomic_write_bytes(path, payload)


def _quaternion_affine(b: float, c: float, d: float, qfac: float, pixdim, offset) -> np.ndarray:
    """NIfTI-1 'method 2' affine from the quaternion (b, c, d), qfac, voxel sizes and offset."""
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rot = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])
    scale = np.array(pixdim, dtype=np.float64) * np.array([1.0, 1.0, -1.0 if qfac < 0 else 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rot * scale[None, :]
    affine[:3, 3] = offset
    return affine


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a single-file NIfTI-1 volume (`.nii` or gzip-compressed, detected from the content).

    Returns:
      volume: [nx, ny, nz] float32 (scl_slope / scl_inter applied when set).
      affine: [4, 4] float64 voxel-index -> world (mm): the sform if sform_code > 0, else the qform if
        qform_code > 0, else diag(pixdim).

    Raises:
      NiftiError: missing/truncated/garbage file, unsupported layout (two-file .hdr/.img, >3 dims,
        complex or RGB data); the message names the file and the offending field.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise NiftiError(f"{path}: cannot read NIfTI file ({e.strerror or e})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, ValueError) as e:  # BadGzipFile is an OSError
            raise NiftiError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < _HEADER_SIZE:
        raise NiftiError(f"{path}: truncated NIfTI header ({len(raw)} bytes, expected at least {_HEADER_SIZE})")
    for order in ("<", ">"):
        if struct.unpack_from(order + "i", raw, 0)[0] == _HEADER_SIZE:
            break
    else:
        raise NiftiError(f"{path}: not a NIfTI-1 file (sizeof_hdr = {struct.unpack_from('<i', raw, 0)[0]}, "
                         f"expected {_HEADER_SIZE})")

    def get(name):
        offset, fmt = _FIELDS[name]
        values = struct.unpack_from(order + fmt, raw, offset)
        return values if len(values) > 1 else values[0]

    magic = get("magic")
    if magic != b"n+1\x00":
        detail = " (two-file .hdr/.img pairs are not supported)" if magic == b"ni1\x00" else ""
        raise NiftiError(f"{path}: header field magic is {magic!r}, expected b'n+1\\x00'{detail}")
    dim = get("dim")
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(n < 1 for n in dim[1:ndim + 1]):
        raise NiftiError(f"{path}: invalid header field dim = {dim}")
    if ndim > 3 and any(n != 1 for n in dim[4:ndim + 1]):
        raise NiftiError(f"{path}: expected a 3D volume, header field dim = {dim}")
    shape = tuple(dim[1:4]) if ndim >= 3 else tuple(dim[1:ndim + 1]) + (1,) * (3 - ndim)
    datatype = get("datatype")
    if datatype not in _READ_DTYPES:
        raise NiftiError(f"{path}: unsupported header field datatype = {datatype} "
                         f"(supported: {sorted(_READ_DTYPES)})")
    dtype = np.dtype(_READ_DTYPES[datatype]).newbyteorder(order)
    if get("bitpix") != 8 * dtype.itemsize:
        raise NiftiError(f"{path}: header field bitpix = {get('bitpix')} does not match datatype {datatype}")
    vox_offset = get("vox_offset")
    if not (math.isfinite(vox_offset) and vox_offset >= _HEADER_SIZE):
        raise NiftiError(f"{path}: invalid header field vox_offset = {vox_offset}")
    start = int(vox_offset)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if len(raw) < start + nbytes:
        raise NiftiError(f"{path}: truncated NIfTI data (expected {nbytes} bytes at offset {start}, "
                         f"found {max(0, len(raw) - start)})")
    volume = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=start)
    volume = volume.reshape(shape, order="F").astype(np.float32)
    slope, inter = get("scl_slope"), get("scl_inter")
    if math.isfinite(slope) and slope != 0.0 and (slope, inter) != (1.0, 0.0):
        volume = (volume * np.float32(slope) + np.float32(inter)).astype(np.float32)

    pixdim = get("pixdim")
    if get("sform_code") > 0:
        affine = np.eye(4)
        affine[:3] = np.array([get("srow_x"), get("srow_y"), get("srow_z")], dtype=np.float64)
    elif get("qform_code") > 0:
        affine = _quaternion_affine(*get("quatern"), pixdim[0], pixdim[1:4], get("qoffset"))
    else:
        affine = np.diag([*pixdim[1:4], 1.0]).astype(np.float64)
    return volume, affine


def nifti_frame_mm(scanner) -> tuple[np.ndarray, np.ndarray]:
    """(spacing_mm (3,), origin_mm (3,)) of a `Scanner`'s reconstruction grid for `write_nifti`.

    origin = world position (mm) of voxel (0, 0, 0)'s centre = offOrigin - sVoxel/2 + dVoxel/2.
    """
    to_mm = 1000.0 / scanner.scene_scale
    spacing = np.array(scanner.d_voxel, dtype=np.float64) * to_mm
    lo, _ = scanner.bbox
    origin = (np.asarray(lo, dtype=np.float64) + np.array(scanner.d_voxel) / 2.0) * to_mm
    return spacing, origin
