"""Movies from RGB frames: animated GIF (Pillow) and H.264 MP4 (the ffmpeg binary shipped by imageio-ffmpeg).

Frames are uint8 [F, H, W, 3]. Both writers go through a temporary file in the destination directory that is
renamed over the destination at the end, so a reader never sees a half-written movie.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings

import numpy as np

# H.264 in yuv420p (the pixel format every player reads) needs even sizes; ffmpeg's encoders work on 16x16 macro
# blocks, so frames are padded (white) to multiples of 16 instead of letting imageio-ffmpeg rescale them.
MACRO_BLOCK = 16


def _check_frames(frames) -> np.ndarray:
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or f.shape[0] < 1 or f.dtype != np.uint8:
        raise ValueError(f"movie frames must be uint8 [F, H, W, 3], got {f.dtype} {f.shape}")
    return f


@contextlib.contextmanager
def _temporary_beside(path: str, suffix: str):
    """A temporary path in `path`'s directory, renamed to `path` when the body succeeds (removed otherwise)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def pad_to_block(frames: np.ndarray, block: int = MACRO_BLOCK) -> np.ndarray:
    """Frames padded at the bottom/right with white to sizes that are multiples of `block`."""
    f = _check_frames(frames)
    ph, pw = (-f.shape[1]) % block, (-f.shape[2]) % block
    return np.pad(f, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=255) if ph or pw else f


def write_gif(path: str, frames, fps: float) -> None:
    """Animated GIF, looping, `fps` frames per second."""
    from PIL import Image

    f = _check_frames(frames)
    images = [Image.fromarray(x) for x in f]
    with _temporary_beside(path, ".gif") as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(round(1000 / fps)),
                       loop=0)


class MovieUnavailable(RuntimeError):
    """The MP4 writer cannot run here: imageio-ffmpeg is not installed or its ffmpeg binary does not start."""


def write_mp4(path: str, frames, fps: float) -> None:
    """H.264 (libx264, yuv420p) MP4 at `fps`; frames padded to multiples of 16 pixels.

    Raises MovieUnavailable when imageio-ffmpeg or its ffmpeg binary is missing (nothing is written then)."""
    f = pad_to_block(frames)
    with warnings.catch_warnings():
        # Starting ffmpeg forks the process, and JAX warns on every fork that its threads could deadlock the child;
        # subprocess's child only execs ffmpeg (no JAX runs there), so that warning does not apply.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        try:
            import imageio_ffmpeg

            imageio_ffmpeg.get_ffmpeg_exe()  # finds (and may probe) the binary before anything is written
        except (ImportError, RuntimeError, OSError) as err:
            raise MovieUnavailable(f"imageio-ffmpeg is not usable: {err}; `pip install imageio-ffmpeg` provides "
                                   "ffmpeg") from err
        with _temporary_beside(path, ".mp4") as tmp:
            writer = imageio_ffmpeg.write_frames(tmp, (f.shape[2], f.shape[1]), fps=fps, codec="libx264",
                                                 pix_fmt_out="yuv420p", macro_block_size=MACRO_BLOCK)
            writer.send(None)  # start ffmpeg
            for frame in f:
                writer.send(np.ascontiguousarray(frame))
            writer.close()


__all__ = ["MACRO_BLOCK", "MovieUnavailable", "pad_to_block", "write_gif", "write_mp4"]
