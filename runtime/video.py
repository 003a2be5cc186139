"""Writing frames to a video file; PyAV or OpenCV are imported only when a video is written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

# Containers that hold H.264 (PyAV) and mp4v (OpenCV) alike; the file name's suffix picks one.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")


def check_video_path(path: str | Path) -> Path:
    """Refuse a file name whose suffix is no video container we write (before any frame is generated)."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{path}: unknown video file type {path.suffix or '(none)'!r}; use one of "
                         f"{', '.join(VIDEO_SUFFIXES)}")
    return path


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write uint8 ``[n, H, W, 3]`` RGB frames to ``path`` (H.264 via PyAV, else mp4v via OpenCV)."""
    path = check_video_path(path)
    if not fps > 0:
        raise ValueError(f"video fps must be > 0, got {fps}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be non-empty uint8 [n, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("av") is not None:
        _write_av(path, frames, fps)
    elif importlib.util.find_spec("cv2") is not None:
        _write_cv2(path, frames, fps)
    else:
        raise RuntimeError("writing video needs PyAV or OpenCV: pip install 'forcekit[apps]'")
    return path


def _write_av(path: Path, frames: np.ndarray, fps: float) -> None:
    from fractions import Fraction

    import av

    h, w = frames.shape[1:3]
    # H.264 wants even sizes; pad by edge replication rather than resample.
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_cv2(path: Path, frames: np.ndarray, fps: float) -> None:
    import cv2

    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    try:
        for frame in frames:
            writer.write(frame[:, :, ::-1].copy())
    finally:
        writer.release()


def read_video(path: str | Path) -> np.ndarray:
    """Read all frames of a video as uint8 ``[n, H, W, 3]`` RGB (PyAV)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
