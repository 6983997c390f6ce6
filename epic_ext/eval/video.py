"""Video files for the evaluation harnesses: decoded with PyAV (installed with lmms-eval), frames
sampled uniformly over the whole video.

Sampling (lmms-eval's built-in Qwen2.5-VL model, ``max_num_frames``): ``max_frames`` indices
``linspace(0, n - 1, max_frames)`` rounded down, duplicates dropped (a video shorter than
``max_frames`` gives every frame). The clip's rate is the sampled frames per second of the source
(``len(indices) / (n / source_fps)``), so Qwen-VL's temporal positions span the video's real
duration. One pass over the stream; only the sampled frames are kept in memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass
class Video:
    """Sampled frames of one video ([T, H, W, 3] uint8 RGB) and their rate in frames per second."""
    frames: np.ndarray
    fps: float

    def __post_init__(self):
        if not isinstance(self.frames, np.ndarray) or self.frames.ndim != 4 or self.frames.shape[-1] != 3 \
                or len(self.frames) == 0:
            raise ValueError(f"frames: expected a [T, H, W, 3] array with T >= 1, got "
                             f"{getattr(self.frames, 'shape', type(self.frames).__name__)}")
        if not self.fps > 0:
            raise ValueError(f"fps: must be > 0, got {self.fps}")


def is_video_path(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).lower().endswith(VIDEO_SUFFIXES)


def sample_indices(n: int, max_frames: int) -> np.ndarray:
    if max_frames < 1:
        raise ValueError(f"max_frames: must be >= 1, got {max_frames}")
    return np.unique(np.linspace(0, n - 1, min(max_frames, n)).astype(int))


def read_video(path, max_frames: int = 32) -> Video:
    """``max_frames`` frames of the video file ``path`` sampled uniformly (see the module)."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: reading a video file needs PyAV (pip install av; lmms-eval installs it)") from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            n = stream.frames
            if n <= 0:                    # no count in the container: one pass to count
                n = sum(1 for _ in container.decode(stream))
                container.seek(0)
            if n <= 0 or rate <= 0:
                raise ValueError(f"{path}: no frames or no frame rate")
            wanted = set(sample_indices(n, max_frames).tolist())
            frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream)) if i in wanted]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return Video(np.stack(frames), fps=len(frames) / (n / rate))
