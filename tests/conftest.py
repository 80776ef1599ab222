"""Shared test setup: GPU-marked tests skip unless a CUDA device is present."""
import os

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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
