"""Start scenes: short runs of real frames a world-model bundle starts its streams from.

A world model reset to pure noise has to invent its first frame, and the students were
trained to continue real context, not to invent it. A bundle may therefore carry
``start_scenes.npz``: ``frames`` uint8 ``[S, n, H, W, 3]`` recorded from the engine and
``actions`` float32 ``[S, n, D]``, the action that produced each frame (the condition of frame
``t``, as in ``training.latents.conditioning_actions``). A session reset without explicit
context starts from scene ``seed % S``, so a new seed also gives a new scene.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

START_SCENES_FILE = "start_scenes.npz"


class StartScenesError(ValueError):
    """A start-scenes file is unreadable or does not fit the bundle."""


@dataclass
class StartScenes:
    frames: np.ndarray    # uint8 [S, n, H, W, 3]
    actions: np.ndarray   # float32 [S, n, D]

    def __post_init__(self) -> None:
        f, a = self.frames, self.actions
        if f.dtype != np.uint8 or f.ndim != 5 or f.shape[-1] != 3 or f.shape[0] < 1 or f.shape[1] < 1:
            raise StartScenesError(f"start scene frames must be uint8 [S, n, H, W, 3] with S, n >= 1, "
                                   f"got {f.dtype} {list(f.shape)}")
        if a.ndim != 3 or a.shape[:2] != f.shape[:2]:
            raise StartScenesError(f"start scene actions must be [S, n, D] = [{f.shape[0]}, {f.shape[1]}, D], "
                                   f"got {list(a.shape)}")
        self.actions = a.astype(np.float32)

    def __len__(self) -> int:
        return self.frames.shape[0]

    def scene(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Frames ``[n, H, W, 3]`` and conditioning actions ``[n, D]`` of scene ``seed % S``."""
        i = seed % len(self)
        return self.frames[i], self.actions[i]

    def check_fits(self, frame_size: tuple[int, int], action_dim: int, where: str = "start scenes") -> None:
        """Raise naming ``where`` unless the frames and actions match a bundle's geometry."""
        if tuple(self.frames.shape[2:4]) != tuple(frame_size):
            raise StartScenesError(f"{where}: frames are {self.frames.shape[2]}x{self.frames.shape[3]}, "
                                   f"the bundle makes {frame_size[0]}x{frame_size[1]}")
        if self.actions.shape[2] != action_dim:
            raise StartScenesError(f"{where}: actions have {self.actions.shape[2]} entries, "
                                   f"the bundle's action space has {action_dim}")

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename): an interrupted save leaves the old file whole."""
        path = Path(path)
        buf = io.BytesIO()
        np.savez_compressed(buf, frames=self.frames, actions=self.actions)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> StartScenes:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                frames, actions = z["frames"], z["actions"]
        except KeyError as e:
            raise StartScenesError(f"{path}: missing array {e}; expected 'frames' and 'actions'") from e
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise StartScenesError(f"{path}: unreadable or truncated start-scenes file ({e})") from e
        try:
            return cls(frames, actions)
        except StartScenesError as e:
            raise StartScenesError(f"{path}: {e}") from e
