"""NIfTI volumes (3D and 4D) and value units: headers checked byte-wise at the NIfTI-1 spec offsets, read back by
nibabel and by SimpleITK (ITK's reader, independent of nibabel), orientation pinned against the scanner geometry,
clear errors on bad files."""
import gzip
import struct

import numpy as np
import pytest

from x2gs_jax import nifti, units
from x2gs_jax.geometry import Scanner
from x2gs_jax.nifti import NiftiError, read_nifti, read_nifti_4d, write_nifti, write_nifti_4d

SPACING, ORIGIN = (0.8, 1.25, 2.5), (-10.5, 3.0, 7.25)


def _volume(shape=(5, 4, 3)):
    return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def _u(raw, fmt, off):
    return struct.unpack_from("<" + fmt, raw, off)


def _raw(path):
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


# ------------------------------------------------------------------------------------------ 3D
@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_round_trip_through_nibabel(tmp_path, name):
    import nibabel as nib

    vol = _volume()
    p = tmp_path / name
    write_nifti(p, vol, SPACING, ORIGIN)
    got, affine = read_nifti(p)
    assert got.dtype == np.float32 and got.shape == vol.shape and np.array_equal(got, vol)
    expected = np.array([[0.8, 0, 0, -10.5], [0, 1.25, 0, 3.0], [0, 0, 2.5, 7.25], [0, 0, 0, 1]])
    # The header stores float32: the affine is the float32 rounding of the request, nothing more.
    np.testing.assert_array_equal(affine, expected.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(affine @ [4, 3, 2, 1], [-10.5 + 3.2, 3.0 + 3.75, 7.25 + 5.0, 1.0])
    img = nib.load(p)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")  # world x, y, z on the viewer's R, A, S
    np.testing.assert_array_equal(img.get_qform(), img.get_sform())
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    if name.endswith(".gz"):
        raw = p.read_bytes()
        assert raw[:2] == b"\x1f\x8b"
        write_nifti(tmp_path / "again.nii.gz", vol, SPACING, ORIGIN)
        assert (tmp_path / "again.nii.gz").read_bytes() == raw  # deterministic (gzip mtime 0)


def test_header_bytes_at_spec_offsets(tmp_path):
    vol = _volume((5, 4, 3))
    vol[1, 2, 0] = np.nan  # cal_min/cal_max ignore non-finite values
    p = tmp_path / "h.nii.gz"
    write_nifti(p, vol, (0.5, 0.75, 2.0), (1.0, -2.0, 3.5), descrip="x2gs-jax HU (mu_water 0.5)")
    raw = _raw(p)
    assert len(raw) == 352 + 4 * vol.size
    assert _u(raw, "i", 0) == (348,)                                  # sizeof_hdr
    assert _u(raw, "8h", 40) == (3, 5, 4, 3, 1, 1, 1, 1)               # dim
    assert _u(raw, "h", 70) == (16,) and _u(raw, "h", 72) == (32,)    # datatype FLOAT32, bitpix
    assert _u(raw, "8f", 76)[:4] == (1.0, 0.5, 0.75, 2.0)             # pixdim (qfac, dx, dy, dz)
    assert _u(raw, "f", 108) == (352.0,)                              # vox_offset
    assert raw[123] == 2                                              # xyzt_units = mm
    finite = vol[np.isfinite(vol)]
    assert _u(raw, "f", 124) == (np.float32(finite.max()),)           # cal_max
    assert _u(raw, "f", 128) == (np.float32(finite.min()),)           # cal_min
    assert raw[148:148 + 26] == b"x2gs-jax HU (mu_water 0.5)"        # descrip
    assert _u(raw, "2h", 252) == (1, 1)                               # qform_code, sform_code
    assert _u(raw, "3f", 256) == (0.0, 0.0, 0.0)                      # quatern b, c, d (identity)
    assert _u(raw, "3f", 268) == (1.0, -2.0, 3.5)                     # qoffset
    assert _u(raw, "4f", 280) == (0.5, 0.0, 0.0, 1.0)                 # srow_x
    assert _u(raw, "4f", 296) == (0.0, 0.75, 0.0, -2.0)               # srow_y
    assert _u(raw, "4f", 312) == (0.0, 0.0, 2.0, 3.5)                 # srow_z
    assert raw[344:348] == b"n+1\x00"                                 # magic
    data = np.frombuffer(raw, "<f4", offset=352)
    np.testing.assert_array_equal(data, vol.ravel(order="F"))  # x fastest on disk
    assert data[1] == vol[1, 0, 0] and data[5] == vol[0, 1, 0] and data[20] == vol[0, 0, 1]


# ------------------------------------------------------------------------------------------ 4D
def test_4d_time_axis_header_and_round_trip(tmp_path):
    vols = np.random.default_rng(2).normal(size=(6, 5, 4, 3)).astype(np.float32)  # [T, nx, ny, nz]
    p = tmp_path / "phases.nii.gz"
    write_nifti_4d(p, vols, SPACING, ORIGIN, time_step_s=0.3, time_offset_s=0.15)
    raw = _raw(p)
    assert _u(raw, "8h", 40) == (4, 5, 4, 3, 6, 1, 1, 1)               # dim: time = 4th axis
    assert _u(raw, "8f", 76)[:5] == tuple(np.float32([1.0, *SPACING, 0.3]))  # pixdim[4] = time step
    assert raw[123] == 2 | 8                                          # xyzt_units = mm + s
    assert _u(raw, "f", 136) == (np.float32(0.15),)                   # toffset
    assert _u(raw, "f", 124) == (vols.max(),) and _u(raw, "f", 128) == (vols.min(),)
    data = np.frombuffer(raw, "<f4", offset=352).reshape((5, 4, 3, 6), order="F")
    np.testing.assert_array_equal(np.moveaxis(data, -1, 0), vols)
    back, affine, dt, t0 = read_nifti_4d(p)
    np.testing.assert_array_equal(back, vols)
    assert dt == pytest.approx(0.3) and t0 == pytest.approx(0.15)
    np.testing.assert_allclose(affine[:3, :3], np.diag(SPACING), rtol=1e-6)
    with pytest.raises(NiftiError, match=r"phases\.nii\.gz: expected a 3D image, got shape \(5, 4, 3, 6\)"):
        read_nifti(p)
    with pytest.raises(NiftiError, match="time_step_s must be positive"):
        write_nifti_4d(tmp_path / "bad.nii", vols, SPACING, ORIGIN, time_step_s=0.0)


# ------------------------------------------------------------------------------------------ SimpleITK
def test_simpleitk_reads_3d_and_4d_with_our_frame(tmp_path):
    """ITK works in LPS: our RAS frame reads as origin (-ox, -oy, oz) and direction diag(-1, -1, 1); the same points."""
    sitk = pytest.importorskip("SimpleITK")
    vol = _volume((5, 4, 3))
    write_nifti(tmp_path / "v.nii.gz", vol, SPACING, ORIGIN)
    img = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    assert img.GetSize() == (5, 4, 3)
    np.testing.assert_allclose(img.GetSpacing(), SPACING, rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), (10.5, -3.0, 7.25), rtol=1e-6)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), np.diag([-1.0, -1.0, 1.0]), atol=1e-7)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), vol)  # ITK arrays are [z, y, x]
    lps = img.TransformIndexToPhysicalPoint((4, 3, 2))
    np.testing.assert_allclose(lps, (-(-10.5 + 3.2), -(3.0 + 3.75), 7.25 + 5.0), rtol=1e-6)

    vols = np.random.default_rng(3).normal(size=(4, 5, 4, 3)).astype(np.float32)
    write_nifti_4d(tmp_path / "p.nii.gz", vols, SPACING, ORIGIN, time_step_s=0.3, time_offset_s=0.15)
    img4 = sitk.ReadImage(str(tmp_path / "p.nii.gz"))
    assert img4.GetSize() == (5, 4, 3, 4)
    np.testing.assert_allclose(img4.GetSpacing(), (*SPACING, 0.3), rtol=1e-6)
    np.testing.assert_allclose(img4.GetOrigin(), (10.5, -3.0, 7.25, 0.15), rtol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img4).transpose(3, 2, 1, 0), np.moveaxis(vols, 0, -1))


# ------------------------------------------------------------------------------------------ scanner frame
def _scanner():
    d = {"DSD": 1500.0, "DSO": 1000.0, "nDetector": [8, 8], "dDetector": [1.0, 1.0], "nVoxel": [6, 5, 4],
         "dVoxel": [1.0, 2.0, 2.5], "offOrigin": [3.0, -1.0, 2.0]}
    return Scanner.from_naf(d)


def test_frame_pinned_to_the_scanner_geometry(tmp_path):
    """Spacing = dVoxel, voxel (0, 0, 0) at its centre, and a voxel's world point = the scanner's voxel centre (mm)
    along every axis, through nibabel's affine and ITK's index -> point; world z is the rotation axis (the source
    circles it: its z stays 0 while x, y turn), so NIfTI's third (S) axis is the gantry axis."""
    sitk = pytest.importorskip("SimpleITK")
    sc = _scanner()
    spacing, origin = nifti.nifti_frame_mm(sc)
    np.testing.assert_allclose(spacing, [1.0, 2.0, 2.5], rtol=1e-12)
    centres_mm = sc.voxel_centers() * 1000.0 / sc.scene_scale
    np.testing.assert_allclose(origin, centres_mm[0, 0, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(origin, [3.0 - 3.0 + 0.5, -1.0 - 5.0 + 1.0, 2.0 - 5.0 + 1.25], atol=1e-12)
    vol = np.zeros(sc.n_voxel, np.float32)
    vol[5, 1, 3] = 1.0  # a marker voxel off every axis' centre
    write_nifti(tmp_path / "s.nii.gz", vol, spacing, origin)
    back, affine = read_nifti(tmp_path / "s.nii.gz")
    idx = np.argwhere(back == 1.0)[0]
    np.testing.assert_allclose((affine @ [*idx, 1.0])[:3], centres_mm[5, 1, 3], rtol=1e-6)
    img = sitk.ReadImage(str(tmp_path / "s.nii.gz"))
    lps = np.array(img.TransformIndexToPhysicalPoint([int(i) for i in idx]))
    np.testing.assert_allclose(lps * [-1, -1, 1], centres_mm[5, 1, 3], rtol=1e-6)
    source, _, _, _ = sc.frame(np.array([0.0, 1.0, 2.0]))
    assert np.allclose(np.asarray(source)[:, 2], 0.0) and np.ptp(np.asarray(source)[:, 0]) > 0


# ------------------------------------------------------------------------------------------ errors
def test_bad_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.nii"
    write_nifti(good, _volume(), (1, 1, 1), (0, 0, 0))
    raw = good.read_bytes()
    complex_hdr = bytearray(raw[:352])
    struct.pack_into("<2h", complex_hdr, 70, 32, 64)  # datatype COMPLEX64
    cases = {
        "short.nii": (raw[:-7], r"short\.nii: truncated or corrupt NIfTI data .*Expected 240 bytes, got 233"),
        "tiny.nii": (raw[:100], r"tiny\.nii: not a readable NIfTI file"),
        "garbage.nii": (b"this is not a medical image" * 20, r"garbage\.nii: not a readable NIfTI file"),
        "bad.nii.gz": (b"\x1f\x8b" + b"junk" * 10, r"bad\.nii\.gz: not a readable NIfTI file"),
        "cut.nii.gz": (gzip.compress(raw)[:-30], r"cut\.nii\.gz: not a readable NIfTI file"),
        "complex.nii": (bytes(complex_hdr) + bytes(8 * 60), r"complex\.nii: unsupported data type complex64"),
    }
    for name, (blob, pattern) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(NiftiError, match=pattern):
            read_nifti(tmp_path / name)
    with pytest.raises(NiftiError, match=r"missing\.nii: cannot read NIfTI file \(no such file\)"):
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


# ------------------------------------------------------------------------------------------ units
def test_hounsfield_units():
    from configs.common import base_config
    from x2gs_jax.data.phantom import MU_LUNG, MU_SOFT

    mu_w = units.default_mu_water()
    assert mu_w == MU_SOFT == base_config().eval.mu_water  # the phantom's water-equivalent soft tissue
    mu = np.array([0.0, MU_SOFT, MU_LUNG, 2 * MU_SOFT], np.float32)
    hu = units.mu_to_hu(mu, mu_w)
    np.testing.assert_allclose(hu, [-1000.0, 0.0, 1000.0 * (MU_LUNG - MU_SOFT) / MU_SOFT, 1000.0], atol=1e-3)
    np.testing.assert_allclose(units.hu_to_mu(hu, mu_w), mu, atol=1e-6)
    np.testing.assert_array_equal(units.convert(mu, "mu", mu_w), mu)
    with pytest.raises(ValueError, match="units must be one of"):
        units.convert(mu, "kelvin", mu_w)
    # The flag wins over the run config's value, which wins over the phantom's.
    cfg = base_config()
    cfg.eval.mu_water = 0.25
    assert units.resolve_mu_water(0.3, cfg) == 0.3 and units.resolve_mu_water(None, cfg) == 0.25
    assert units.resolve_mu_water(None, None) == MU_SOFT
    with pytest.raises(ValueError, match="mu_water must be a positive"):
        units.resolve_mu_water(-1.0, cfg)
