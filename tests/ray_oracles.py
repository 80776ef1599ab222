"""Float64 ray oracle shared by the projector and FDK tests (data_format.md §5, independent of Scanner.rays)."""
import numpy as np

from x2gs_jax.geometry import Scanner


def rays64(scanner: Scanner, angle: float):
    """Per-pixel rays [H, W, 3] in float64 from data_format.md §5 (independent of Scanner.rays)."""
    H, W = scanner.n_detector
    c, s = np.cos(angle), np.sin(angle)
    src = np.array([scanner.DSO * c, scanner.DSO * s, 0.0])
    r, d, f = np.array([-s, c, 0.0]), np.array([0.0, 0.0, -1.0]), np.array([-c, -s, 0.0])
    if scanner.mode == "cone":
        u = (np.arange(W) + 0.5 - W / 2) * scanner.d_detector[1] + scanner.off_detector[0]
        v = (np.arange(H) + 0.5 - H / 2) * scanner.d_detector[0] + scanner.off_detector[1]
        dirs = scanner.DSD * f + u[None, :, None] * r + v[:, None, None] * d
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        return np.broadcast_to(src, dirs.shape), dirs
    u = (2 * np.arange(W) + 1) / W - 1 + scanner.off_detector[0]
    v = (2 * np.arange(H) + 1) / H - 1 + scanner.off_detector[1]
    o = src + u[None, :, None] * r + v[:, None, None] * d
    return o, np.broadcast_to(f, o.shape)
