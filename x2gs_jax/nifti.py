"""NIfTI-1 volumes (3D, and 4D with time as the fourth axis) written and read through nibabel.

Orientation convention. A volume is an array `vol[i, j, k]` whose axes are our world axes (x, y, z)
(data_format.md §5: x, y horizontal, z = the gantry rotation axis, row 0 of a projection = largest z). It is
written with NIfTI voxel axes (i, j, k) = (x, y, z), x varying fastest on disk, and with both qform and sform
(code 1, scanner-based) equal to

    [[dx, 0, 0, ox], [0, dy, 0, oy], [0, 0, dz, oz], [0, 0, 0, 1]]   (millimetres)

where (dx, dy, dz) is the voxel size and (ox, oy, oz) the world position of the *centre* of voxel (0, 0, 0).
NIfTI names its world axes RAS (+x right, +y anterior, +z superior); we make no anatomical claim, so a viewer
shows our world x, y, z on its R, A, S axes (ITK-based readers, which work in LPS, report the origin as
(-ox, -oy, oz) and the direction diag(-1, -1, 1): the same points). `nifti_frame_mm(scanner)` gives the
spacing and origin of a scanner's reconstruction grid in this convention.

4D files hold volumes at equally spaced times: dim[4] = number of times, pixdim[4] = the time step in seconds,
toffset = the first time in seconds, xyzt_units = mm + s.

Every file gets cal_min / cal_max = the finite minimum / maximum of its data (so viewers open it with the full
range) and a `descrip` naming the value units (e.g. "x2gs-jax mu" or "x2gs-jax HU (mu_water 0.5)").
Writes are atomic (`fileio.atomic_write_bytes`); `.gz` files are gzip streams with mtime 0, so equal inputs
give equal bytes.
"""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

from x2gs_jax.fileio import atomic_write_bytes

_XFORM_SCANNER_ANAT = 1
_MAX_DIM = 32767  # dim[] is int16 in NIfTI-1
_GZIP_LEVEL = 6  # ~ the size of level 9 on CT volumes at a fraction of the time


class NiftiError(ValueError):
    """A NIfTI file is unreadable or unsupported, or arguments to the writer are invalid (the message names the
    file and the field)."""


def _vector3(value, name: str, positive: bool, path: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != 3 or not np.all(np.isfinite(arr)) or (positive and not np.all(arr > 0)):
        what = "3 positive finite values" if positive else "3 finite values"
        raise NiftiError(f"{path}: write_nifti: {name} must be {what}, got {value!r}")
    return arr


def frame_affine(spacing_mm, origin_mm, path: str = "<affine>") -> np.ndarray:
    """[4, 4] voxel index -> world (mm) of the convention above: diag(spacing) and the centre of voxel 0."""
    spacing = _vector3(spacing_mm, "spacing_mm", True, path)
    origin = _vector3(origin_mm, "origin_mm", False, path)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _image(data: np.ndarray, affine: np.ndarray, descrip: str):
    """A nibabel Nifti1Image of float32 `data` with our header fields (qform = sform, cal range, description)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(affine, code=_XFORM_SCANNER_ANAT)
    hdr.set_sform(affine, code=_XFORM_SCANNER_ANAT)
    finite = data[np.isfinite(data)]
    if finite.size:
        hdr["cal_min"], hdr["cal_max"] = float(finite.min()), float(finite.max())
    hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    return img


def _write(path: str, img) -> None:
    payload = img.to_bytes()  # single-file .nii bytes
    if path.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=_GZIP_LEVEL, mtime=0)  # mtime 0: reproducible bytes
    atomic_write_bytes(path, payload)


def _checked_volume(volume, ndim: int, path: str, what: str) -> np.ndarray:
    vol = np.asarray(volume)
    if vol.ndim != ndim or vol.dtype.kind not in "biuf":
        raise NiftiError(f"{path}: write_nifti expects a real {what} array, got {vol.dtype} {vol.shape}")
    if any(n < 1 or n > _MAX_DIM for n in vol.shape):
        raise NiftiError(f"{path}: NIfTI-1 needs sizes in [1, {_MAX_DIM}], got {vol.shape}")
    return np.asarray(vol, np.float32)


def write_nifti(path: str | os.PathLike, volume, spacing_mm, origin_mm, descrip: str = "x2gs-jax") -> None:
    """Write a 3D volume as single-file NIfTI-1 (`.nii`, or gzip-compressed when `path` ends in `.gz`).

    Args:
      path: destination; written atomically.
      volume: [nx, ny, nz] real array (world axes x, y, z; values in the units `descrip` names); stored float32.
      spacing_mm: (3,) voxel size (dx, dy, dz) in mm.
      origin_mm: (3,) world position in mm of the centre of voxel (0, 0, 0).
      descrip: the header's description (at most 79 ASCII characters are kept).
    """
    path = os.fspath(path)
    vol = _checked_volume(volume, 3, path, "[nx, ny, nz]")
    img = _image(vol, frame_affine(spacing_mm, origin_mm, path), descrip)
    img.header.set_xyzt_units("mm")
    _write(path, img)


def write_nifti_4d(path: str | os.PathLike, volumes, spacing_mm, origin_mm, time_step_s: float,
                   time_offset_s: float = 0.0, descrip: str = "x2gs-jax") -> None:
    """Write volumes at equally spaced times as one 4D NIfTI-1 file (time = the fourth axis).

    Args:
      volumes: [T, nx, ny, nz] (time first, as the project stores phase stacks); written as [nx, ny, nz, T].
      spacing_mm, origin_mm: the spatial frame (see `write_nifti`).
      time_step_s: seconds between consecutive volumes (pixdim[4]); > 0.
      time_offset_s: the time of the first volume in seconds (toffset).
    """
    path = os.fspath(path)
    vols = _checked_volume(volumes, 4, path, "[T, nx, ny, nz]")
    if not (np.isfinite(time_step_s) and time_step_s > 0) or not np.isfinite(time_offset_s):
        raise NiftiError(f"{path}: write_nifti_4d: time_step_s must be positive and time_offset_s finite, got "
                         f"{time_step_s!r}, {time_offset_s!r}")
    data = np.ascontiguousarray(np.moveaxis(vols, 0, -1))
    affine = frame_affine(spacing_mm, origin_mm, path)
    img = _image(data, affine, descrip)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_zooms((*np.diag(affine)[:3], float(time_step_s)))
    hdr["toffset"] = float(time_offset_s)
    _write(path, img)


def _load(path: str, ndim: int):
    """(nibabel image, float32 data) of `path`, every failure as a NiftiError naming the file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not os.path.exists(path):
        raise NiftiError(f"{path}: cannot read NIfTI file (no such file)")
    try:
        img = nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError) as e:  # not NIfTI, truncated header, corrupt gzip
        raise NiftiError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if not isinstance(img, nib.Nifti1Image):
        raise NiftiError(f"{path}: expected a single-file NIfTI-1 image, got {type(img).__name__}")
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise NiftiError(f"{path}: unsupported data type {dtype} (expected real values)")
    shape = img.shape
    if len(shape) != ndim:
        raise NiftiError(f"{path}: expected a {ndim}D image, got shape {shape}")
    try:
        data = img.get_fdata(dtype=np.float32)  # applies scl_slope / scl_inter
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as e:  # truncated data or gzip stream
        raise NiftiError(f"{path}: truncated or corrupt NIfTI data ({type(e).__name__}: {e})") from e
    return img, data


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume (`.nii` or `.nii.gz`).

    Returns:
      volume: [nx, ny, nz] float32 (scaling applied).
      affine: [4, 4] float64 voxel index -> world (mm): nibabel's best affine (the sform when its code > 0, else the
        qform, else the voxel sizes).

    Raises:
      NiftiError: missing, truncated or non-NIfTI files, complex data, not 3D; the message names the file.
    """
    path = os.fspath(path)
    img, data = _load(path, 3)
    return data, np.asarray(img.affine, np.float64)


def read_nifti_4d(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Read a 4D NIfTI written by `write_nifti_4d`.

    Returns (volumes [T, nx, ny, nz] float32, affine [4, 4] (mm), time step (s), time of the first volume (s)).
    Raises NiftiError as `read_nifti`, and when the time unit is not seconds or milliseconds.
    """
    path = os.fspath(path)
    img, data = _load(path, 4)
    _, t_unit = img.header.get_xyzt_units()
    to_s = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(t_unit)
    if to_s is None:
        raise NiftiError(f"{path}: header field xyzt_units: time unit {t_unit!r}, expected sec (or msec, usec)")
    dt = float(img.header.get_zooms()[3]) * to_s
    t0 = float(img.header["toffset"]) * to_s
    return np.moveaxis(data, -1, 0), np.asarray(img.affine, np.float64), dt, t0


def nifti_frame_mm(scanner) -> tuple[np.ndarray, np.ndarray]:
    """(spacing_mm (3,), origin_mm (3,)) of a `Scanner`'s reconstruction grid for `write_nifti`.

    origin = world position (mm) of voxel (0, 0, 0)'s centre = offOrigin - sVoxel/2 + dVoxel/2.
    """
    to_mm = 1000.0 / scanner.scene_scale
    spacing = np.array(scanner.d_voxel, dtype=np.float64) * to_mm
    lo, _ = scanner.bbox
    origin = (np.asarray(lo, dtype=np.float64) + np.array(scanner.d_voxel) / 2.0) * to_mm
    return spacing, origin


def units_descrip(units: str, mu_water: Optional[float] = None) -> str:
    """The `descrip` text of a volume in `units` ("mu" or "hu")."""
    if units == "hu":
        return f"x2gs-jax HU (mu_water {mu_water:.6g})"
    return "x2gs-jax mu"


__all__ = ["NiftiError", "frame_affine", "write_nifti", "write_nifti_4d", "read_nifti", "read_nifti_4d",
           "nifti_frame_mm", "units_descrip"]
