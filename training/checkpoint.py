"""Atomic checkpoints shared by every training stage: kill a run, restart it, it continues.

A checkpoint is one `torch.save` dict written to a temp file, fsynced and renamed over
`ckpt.pt`, so a run killed mid-write still has its previous complete checkpoint. Checkpoints
hold tensors and plain types only and load with ``weights_only=True``: nothing runs code.
"""

from __future__ import annotations

import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint file that cannot or must not be read (truncated, corrupt, holding code); names the file.

    A ValueError, the CLI's bad-input error (reported as one line), and a RuntimeError, as it was."""


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
        # Tensors and plain containers only: a downloaded or tampered file must not run code when loaded.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, the checkpoint holds Python objects other than tensors and "
                              f"plain containers (loading it could run code): {str(e).splitlines()[0]}") from e
    except Exception as e:  # noqa: BLE001 - any other reading failure means the same thing here
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to start "
                              f"over") from e


def rng_state() -> dict:
    """Every global RNG as tensors and plain types (numpy's key array as a tensor): loadable with
    ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
