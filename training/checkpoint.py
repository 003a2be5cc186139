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
from collections.abc import Callable
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


def _resume(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
    ckpt = load_checkpoint(out / "ckpt.pt")
    if ckpt is None:
        return 0
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    gen.set_state(ckpt["gen"])
    return int(ckpt["step"])


def train_resumable(out: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                    batch_loss: Callable[[], torch.Tensor], steps: int, desc: str, tag: str,
                    ckpt_every_s: float, progress: bool) -> dict:
    """Continue from `out`/ckpt.pt and step `opt` on `batch_loss()` until `steps`.

    The small probes all train this way, so a kill or a rerun behaves the same for each: the
    model, optimiser and `gen` (which `batch_loss` draws its batches from) are checkpointed
    every `ckpt_every_s` seconds and at the end. `desc` labels the progress bar, `tag` the
    tensorboard scalar. Returns step, steps_this_run, seconds_this_run and the last loss.
    """
    from tqdm import tqdm

    step = start = _resume(out, model, opt, gen)
    writer = tensorboard_writer(out / "tb")
    every, t0, loss_val = Every(ckpt_every_s), time.time(), float("nan")
    bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress)

    def checkpoint() -> None:
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "opt": opt.state_dict(),
                                          "gen": gen.get_state(), "step": step})

    model.train()
    while step < steps:
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_val = float(loss.detach())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_val:.4f}")
            if writer:
                writer.add_scalar(tag, loss_val, step)
        if every():
            checkpoint()
    bar.close()
    checkpoint()
    if writer:
        writer.close()
    return {"step": step, "steps_this_run": step - start, "seconds_this_run": round(time.time() - t0, 1),
            "loss": loss_val}
