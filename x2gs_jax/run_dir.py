"""The run directory: what counts as a run, when `train.py` may write into a directory, and moving an old run aside.

A directory that already holds a run is never written into by a fresh run: the files of two runs would mix
(config and volumes of one, export and checkpoints of the other). `train.py` continues it only with
`--config.resume=<that dir>`, or starts over with `--config.overwrite=true`, which renames the whole old directory
(nothing is deleted) before the new run creates a fresh one.
"""
from __future__ import annotations

import os
import time
from typing import Optional

# Entries that only a training run writes (run directory layout: train_lib's module docstring).
RUN_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "export", "volume.npy", "volume.nii.gz", "volumes",
               "tb")


class RunDirError(ValueError):
    """The run directory cannot be used as asked (the message names it and the ways on)."""


def run_entries(workdir: str) -> list[str]:
    """The run artefacts present in `workdir` (empty when it does not exist or holds no run)."""
    if not os.path.isdir(workdir):
        return []
    return [name for name in RUN_ENTRIES if os.path.lexists(os.path.join(workdir, name))]


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def plan_run_dir(workdir: str, resume: Optional[str], overwrite: bool) -> str:
    """How this run may use `workdir`, decided before any work starts (nothing is touched here):

      "new"       nothing of a run there yet;
      "continue"  it holds a run and config.resume names it (the run continues in place);
      "replace"   it holds a run and config.overwrite is set (`move_aside` before writing).

    Raises RunDirError when it holds a run and neither is asked for, or when both are.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunDirError(f"--workdir={workdir}: exists and is not a directory")
    same = bool(resume) and _same_dir(resume, workdir)
    if overwrite and same:
        raise RunDirError(f"config.overwrite=True and config.resume={resume!r} contradict each other: resuming "
                          f"continues the run in {workdir}, overwriting moves it aside; pass one of them")
    present = run_entries(workdir)
    if not present:
        return "new"
    if same:
        return "continue"
    if overwrite:
        return "replace"
    raise RunDirError(
        f"--workdir={workdir} already holds a run ({', '.join(present)}); nothing was changed. To continue it: "
        f"--config.resume={workdir}; to keep it and start another run: a new --workdir; to start over in this "
        f"directory: --config.overwrite=true (the old run is moved aside to {workdir.rstrip(os.sep)}.replaced-<time>, "
        f"not deleted)")


def move_aside(workdir: str) -> str:
    """Rename the whole `workdir` to a unique sibling `<workdir>.replaced-<time>[~n]`; returns the new path."""
    base = f"{os.path.abspath(workdir).rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, n = base, 1
    while os.path.lexists(dest):
        dest, n = f"{base}~{n}", n + 1
    os.rename(workdir, dest)
    return dest
