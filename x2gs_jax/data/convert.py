"""Convert a case between the two layouts the trainer reads (README "Data layouts").

  python -m x2gs_jax.data.convert --src data/chest_cone --out data/chest_cone.pickle     # R2-Gaussian folder -> pickle
  python -m x2gs_jax.data.convert --src data/case.pickle --out data/case_r2              # pickle -> R2-Gaussian folder

The direction follows --src (a folder holding meta_data.json, or a pickle file); `--from r2|pickle` states it
explicitly. Both files are read with the trainer's checks and the output is read back before the command ends, so
what it writes loads. An existing output is replaced only with --overwrite. A user-made initial point cloud
(`init_<case>.npy` without the trainer's `.json` record) is copied to where the output's loader looks for it: both
layouts use the same world units. Only static cases fit the R2-Gaussian layout.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from x2gs_jax.data.naf import DataError, init_path, load_case, save_case
from x2gs_jax.data.r2 import is_r2_case, load_r2_case, save_r2_case


def detect_layout(src: str) -> str:
    """'r2' for a folder holding meta_data.json, 'pickle' for a file; DataError otherwise."""
    if is_r2_case(src):
        return "r2"
    if os.path.isfile(src):
        return "pickle"
    if os.path.isdir(src):
        raise DataError(f"--src {src}: a folder without meta_data.json (not an R2-Gaussian case folder)")
    raise DataError(f"--src {src}: no such file or folder")


def convert(src: str, out: str, src_layout: str = "auto", overwrite: bool = False) -> str:
    """Convert `src` into the other layout at `out`; returns the output layout ('pickle' or 'r2')."""
    layout = detect_layout(src) if src_layout == "auto" else src_layout
    if layout == "r2":
        case = load_r2_case(src)
        if os.path.lexists(out) and not overwrite:
            raise DataError(f"--out {out}: already exists (pass --overwrite to replace it)")
        if os.path.isdir(out):
            raise DataError(f"--out {out}: is a folder (expected the path of the pickle to write)")
        save_case(out, case)
        load_case(out)
        target = "pickle"
    elif layout == "pickle":
        if not os.path.isfile(src):
            raise DataError(f"--src {src}: no such pickle file")
        case = load_case(src)
        save_r2_case(out, case, overwrite=overwrite)
        load_r2_case(out)
        target = "r2"
    else:
        raise DataError(f"--from {src_layout}: expected r2, pickle or auto")
    _copy_init(src, out)
    return target


def _copy_init(src: str, out: str) -> None:
    """Copy the source's user-made initial point cloud (no trainer record beside it) to the output's init path."""
    points, dest = init_path(src), init_path(out)
    record = os.path.splitext(points)[0] + ".json"
    if os.path.isfile(points) and not os.path.exists(record) and not os.path.exists(dest):
        shutil.copyfile(points, dest)
        print(f"copied the initial point cloud {points} -> {dest}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m x2gs_jax.data.convert",
                                description="Convert a case between an R2-Gaussian case folder (meta_data.json, "
                                            "proj_train/, proj_test/, vol_gt.npy) and a NAF/X2GS pickle.")
    p.add_argument("--src", required=True, help="an R2-Gaussian case folder or a case pickle")
    p.add_argument("--out", required=True, help="the pickle to write (from a folder) or the folder to write (from a "
                                                "pickle)")
    p.add_argument("--from", dest="src_layout", choices=("auto", "r2", "pickle"), default="auto",
                   help="layout of --src (auto: a folder with meta_data.json is r2, a file a pickle)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = convert(args.src, args.out, args.src_layout, args.overwrite)
    except DataError as err:
        print(f"convert: {err}", file=sys.stderr)  # a user error: the message names the file and key
        return 2
    print(f"wrote {args.out} ({'R2-Gaussian case folder' if target == 'r2' else 'case pickle'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
