"""Atomic writes and the minimal NIfTI-1 writer/reader (header checked byte-wise at spec offsets)."""
import gzip
import math
import os
import stat
import struct

import numpy as np
import pytest

from x2gs_jax import fileio
from x2gs_jax.fileio import NiftiError, atomic_save_npy, atomic_write_bytes, read_nifti, write_nifti
from x2gs_jax.geometry import Scanner


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


# ------------------------------------------------------------------------------------------ NIfTI
def _volume(shape=(5, 4, 3)):
    return np.random.default_rng(1).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_round_trip(tmp_path, name):
    vol = _volume()
    spacing, origin = (0.8, 1.25, 2.5), (-10.5, 3.0, 7.25)
    p = tmp_path / name
    write_nifti(p, vol, spacing, origin)
    got, affine = read_nifti(p)
    assert got.dtype == np.float32 and got.shape == vol.shape and np.array_equal(got, vol)
    expected = np.array([[0.8, 0, 0, -10.5], [0, 1.25, 0, 3.0], [0, 0, 2.5, 7.25], [0, 0, 0, 1]])
    # The header stores float32: the affine is the float32 rounding of the request, nothing more.
    np.testing.assert_array_equal(affine, expected.astype(np.float32).astype(np.float64))
    # Voxel (i, j, k) centre maps to origin + (i, j, k) * spacing.
    np.testing.assert_allclose(affine @ [4, 3, 2, 1], [-10.5 + 3.2, 3.0 + 3.75, 7.25 + 5.0, 1.0])
    if name.endswith(".gz"):
        raw = p.read_bytes()
        assert raw[:2] == b"\x1f\x8b"
        write_nifti(tmp_path / "again.nii.gz", vol, spacing, origin)
        assert (tmp_path / "again.nii.gz").read_bytes() == raw  # deterministic (gzip mtime 0)


def test_nifti_header_bytes(tmp_path):
    vol = _volume((5, 4, 3))
    p = tmp_path / "h.nii"
    write_nifti(p, vol, (0.5, 0.75, 2.0), (1.0, -2.0, 3.5))
    raw = p.read_bytes()
    u = lambda fmt, off: struct.unpack_from("<" + fmt, raw, off)  # noqa: E731 - offsets from the NIfTI-1 spec
    assert len(raw) == 352 + 4 * vol.size
    assert u("i", 0) == (348,)                                  # sizeof_hdr
    assert u("8h", 40) == (3, 5, 4, 3, 1, 1, 1, 1)               # dim
    assert u("h", 70) == (16,)                                  # datatype FLOAT32
    assert u("h", 72) == (32,)                                  # bitpix
    assert u("8f", 76)[:4] == (1.0, 0.5, 0.75, 2.0)             # pixdim (qfac, dx, dy, dz)
    assert u("f", 108) == (352.0,)                              # vox_offset
    assert raw[123] == 2                                        # xyzt_units = mm
    assert u("2h", 252) == (1, 1)                               # qform_code, sform_code
    assert u("3f", 256) == (0.0, 0.0, 0.0)                      # quatern b, c, d (identity)
    assert u("3f", 268) == (1.0, -2.0, 3.5)                     # qoffset
    assert u("4f", 280) == (0.5, 0.0, 0.0, 1.0)                 # srow_x
    assert u("4f", 296) == (0.0, 0.75, 0.0, -2.0)               # srow_y
    assert u("4f", 312) == (0.0, 0.0, 2.0, 3.5)                 # srow_z
    assert raw[344:348] == b"n+1\x00"                           # magic
    assert raw[348:352] == b"\x00\x00\x00\x00"                  # no extensions
    data = np.frombuffer(raw, "<f4", offset=352)
    np.testing.assert_array_equal(data, vol.ravel(order="F"))  # x fastest on disk
    assert data[1] == vol[1, 0, 0] and data[5] == vol[0, 1, 0] and data[20] == vol[0, 0, 1]


def test_nifti_frame_of_scanner_matches_voxel_centres(tmp_path):
    d = {"DSD": 1500.0, "DSO": 1000.0, "nDetector": [8, 8], "dDetector": [1.0, 1.0], "nVoxel": [6, 5, 4],
         "dVoxel": [1.0, 2.0, 2.5], "offOrigin": [3.0, -1.0, 2.0]}
    sc = Scanner.from_naf(d)
    spacing, origin = fileio.nifti_frame_mm(sc)
    np.testing.assert_allclose(spacing, [1.0, 2.0, 2.5], rtol=1e-12)
    centres_mm = sc.voxel_centers() * 1000.0 / sc.scene_scale
    np.testing.assert_allclose(origin, centres_mm[0, 0, 0], rtol=1e-12, atol=1e-12)
    write_nifti(tmp_path / "s.nii", np.zeros(sc.n_voxel), spacing, origin)
    _, affine = read_nifti(tmp_path / "s.nii")
    ijk = np.array([5, 4, 3, 1.0])
    np.testing.assert_allclose((affine @ ijk)[:3], centres_mm[5, 4, 3], rtol=1e-6)


def _header(order="<", dim=(3, 2, 3, 4), datatype=16, bitpix=32, slope=0.0, inter=0.0,
            qform=0, sform=0, quatern=(0.0, 0.0, 0.0), qfac=1.0, pixdim=(1.0, 1.0, 1.0), magic=b"n+1\x00"):
    """An independently packed NIfTI-1 header (spec offsets) for reader tests."""
    h = bytearray(352)
    struct.pack_into(order + "i", h, 0, 348)
    struct.pack_into(order + "8h", h, 40, *dim, *([1] * (8 - len(dim))))
    struct.pack_into(order + "2h", h, 70, datatype, bitpix)
    struct.pack_into(order + "4f", h, 76, qfac, *pixdim)
    struct.pack_into(order + "3f", h, 108, 352.0, slope, inter)
    struct.pack_into(order + "2h", h, 252, qform, sform)
    struct.pack_into(order + "6f", h, 256, *quatern, 5.0, 6.0, 7.0)
    h[344:348] = magic
    return bytes(h)


def test_read_big_endian_int16_scaled(tmp_path):
    data = np.arange(24, dtype=">i2").reshape((2, 3, 4), order="F")
    p = tmp_path / "be.nii"
    p.write_bytes(_header(">", datatype=4, bitpix=16, slope=0.5, inter=-1.0) + data.tobytes(order="F"))
    vol, affine = read_nifti(p)
    np.testing.assert_array_equal(vol, data.astype(np.float32) * 0.5 - 1.0)
    np.testing.assert_array_equal(affine, np.eye(4))  # neither qform nor sform: diag(pixdim)


def test_read_qform_rotation(tmp_path):
    """qform only: 90 degrees about z (b = c = 0, d = sin 45deg), qfac = -1 flips k."""
    s = math.sin(math.pi / 4)
    p = tmp_path / "q.nii"
    vol = np.zeros((2, 3, 4), "<f4")
    p.write_bytes(_header(qform=1, quatern=(0.0, 0.0, s), qfac=-1.0, pixdim=(2.0, 3.0, 4.0)) + vol.tobytes())
    _, affine = read_nifti(p)
    expected = np.array([[0, -3, 0, 5], [2, 0, 0, 6], [0, 0, -4, 7], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(affine, expected, atol=1e-6)


def test_bad_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.nii"
    write_nifti(good, _volume(), (1, 1, 1), (0, 0, 0))
    raw = good.read_bytes()
    cases = {
        "short.nii": (raw[:-7], r"short\.nii: truncated NIfTI data \(expected 240 bytes at offset 352, found 233\)"),
        "tiny.nii": (raw[:100], r"tiny\.nii: truncated NIfTI header"),
        "garbage.nii": (b"this is not a medical image" * 20, r"garbage\.nii: not a NIfTI-1 file \(sizeof_hdr"),
        "pair.nii": (raw[:344] + b"ni1\x00" + raw[348:], r"pair\.nii: header field magic.*two-file"),
        "bad.nii.gz": (b"\x1f\x8b" + b"junk" * 10, r"bad\.nii\.gz: corrupt gzip"),
        "cut.nii.gz": (gzip.compress(raw)[:-30], r"cut\.nii\.gz: corrupt gzip"),
        "complex.nii": (_header(datatype=32, bitpix=64) + bytes(8 * 24), r"complex\.nii: unsupported header field datatype = 32"),
        "fourd.nii": (_header(dim=(4, 2, 3, 4, 2)) + bytes(4 * 48), r"fourd\.nii: expected a 3D volume"),
        "bitpix.nii": (_header(bitpix=16) + bytes(4 * 24), r"bitpix\.nii: header field bitpix"),
    }
    for name, (blob, pattern) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(NiftiError, match=pattern):
            read_nifti(tmp_path / name)
    with pytest.raises(NiftiError, match=r"missing\.nii: cannot read"):
        read_nifti(tmp_path / "missing.nii")


def test_write_nifti_rejects_bad_arguments(tmp_path):
    p = tmp_path / "x.nii"
    with pytest.raises(NiftiError, match=r"x\.nii: write_nifti expects a real \[nx, ny, nz\]"):
        write_nifti(p, np.zeros((2, 2)), (1, 1, 1), (0, 0, 0))
    with pytest.raises(NiftiError, match="spacing_mm must be 3 positive"):
        write_nifti(p, np.zeros((2, 2, 2)), (1, 0, 1), (0, 0, 0))
    with pytest.raises(NiftiError, match="origin_mm must be 3 finite"):
        write_nifti(p, np.zeros((2, 2, 2)), (1, 1, 1), (0, np.nan, 0))
    assert not p.exists()
