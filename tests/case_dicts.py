"""Small reference-layout case dicts (data_format.md §2): the scanner keys every NAF-style pickle carries, shared by
the loader and robustness tests so both exercise the same layout."""
import numpy as np

H, W = 6, 5          # detector rows, cols
NV = (7, 4, 3)       # nx, ny, nz


def scanner_keys(n_train: int, n_val: int) -> dict:
    """The geometry and generator keys of a case: cone beam, anisotropic detector and voxel pitches, an off-centre
    origin (so tests see axis mix-ups), and the generator's bookkeeping keys."""
    return {
        "DSD": 1536.0, "DSO": 1000.0,
        "nDetector": np.array([H, W]), "dDetector": np.array([0.8, 0.9]),
        "nVoxel": np.array(NV), "dVoxel": np.array([1.0, 1.5, 2.0]),
        "offOrigin": np.array([1.0, -2.0, 0.5]), "offDetector": np.array([0.0, 0.0]),
        "accuracy": 0.5, "mode": "cone", "filter": None, "totalAngle": 360.0, "startAngle": 0.0,
        "randomAngle": False, "convert": False, "rescale_slope": 1.0, "rescale_intercept": 0.0,
        "normalize": True, "noise": 0,
        "numTrain": n_train, "numVal": n_val,
    }
