"""Shared test setup: GPU-marked tests skip unless a CUDA device is present."""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The runs of the suite (and the train.py / eval.py processes it starts) share one persistent compilation cache of
# their own, removed at the end: nothing is written to the user's ~/.cache, and a function compiled by one test
# process is loaded by the next.
if not os.environ.get("X2GS_COMPILE_CACHE"):
    os.environ["X2GS_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="x2gs-test-xla-")
    atexit.register(shutil.rmtree, os.environ["X2GS_COMPILE_CACHE"], ignore_errors=True)

import jax  # noqa: E402


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


SHARED_REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "upstream_cases.npz")


@pytest.fixture(scope="session")
def upstream_cases():
    """The upstream CUDA rasterizer/voxelizer outputs (../shared/reference), or skip if absent."""
    import numpy as np

    path = os.environ.get("X2GS_UPSTREAM_CASES", SHARED_REFERENCE)
    if not os.path.exists(path):
        if os.environ.get("CI"):  # CI always has shared/ beside the clone: a missing file is a failure there
            pytest.fail(f"upstream reference cases not found at {path}")
        pytest.skip(f"upstream reference cases not found at {path}")
    return dict(np.load(path))


@pytest.fixture(scope="session")
def tiny_static_runs(tmp_path_factory):
    """Two finished 4-iteration `r2_static:tiny` runs (checkpoints at 2 and 4, evaluated at 4) that differ only in the
    rasterizer's initial pair buffer: "mp64" (64 pairs, grown on overflow) and "mp0" (the backend's exact default).
    "mp0" is written with config.overwrite=True into a directory that held an earlier run ("earlier": its files,
    name -> bytes; "aside": where that run was moved). Tests that change a run work on a copy."""
    from configs import r2_static
    from x2gs_jax import train_lib

    root = tmp_path_factory.mktemp("static_runs")
    out = {"cache": str(root / "cache"), "runs": {}}
    for max_pairs in (64, 0):
        config = r2_static.get_config("tiny")
        config.data.cache_dir = out["cache"]
        config.train.iterations = 4
        config.eval.iterations = (4,)
        config.checkpoint.every = 2
        config.render.max_pairs = max_pairs
        workdir = root / f"mp{max_pairs}"
        if max_pairs == 0:
            workdir.mkdir()
            out["earlier"] = {"config.json": b'{"earlier": true}\n', "metrics.jsonl": b'{"step": 1, "kind": "x"}\n',
                              "notes.txt": b"the user's own notes\n"}
            for name, data in out["earlier"].items():
                (workdir / name).write_bytes(data)
            config.overwrite = True
        train_lib.train_and_evaluate(config, str(workdir))
        out["runs"][f"mp{max_pairs}"] = workdir
        out["config"] = config
    out["aside"] = [p for p in root.iterdir() if p.name.startswith("mp0.replaced-")]
    return out
