"""Atomic checkpoints shared by every training stage: kill a run, restart it, it continues.

A checkpoint is one `torch.save` dict written to a temp file, fsynced and renamed over
`ckpt.pt`, so a run killed mid-write still has its previous complete checkpoint.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint); names the file."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to start "
                              f"over") from e


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


class Every:
    """True once every `seconds` of wall time (checkpoint cadence that does not depend on step speed)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.last = seconds, time.monotonic()

    def __call__(self) -> bool:
        if time.monotonic() - self.last >= self.seconds:
            self.last = time.monotonic()
            return True
        return False


def tensorboard_writer(logdir: str | os.PathLike | None):
    """A SummaryWriter, or None when no logdir is given or tensorboard is not installed."""
    if logdir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir))
