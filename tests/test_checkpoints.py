"""Training checkpoints: plain data only (nothing runs code when loaded), and a run killed with
SIGKILL resumes from its last checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.data.shards import Episode, ShardStore

ROOT = Path(__file__).resolve().parents[1]
RAN: list[str] = []


def _record(tag: str) -> str:
    RAN.append(tag)
    return tag


class Payload:
    """Unpickling this calls `_record`: any code a pickle names would run the same way."""

    def __reduce__(self):
        return (_record, ("payload ran",))


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 3, "model": {"w": torch.ones(2)}, "extra": Payload()}, path)
    with pytest.raises(RuntimeError, match="ckpt.pt: refused, the checkpoint holds Python objects"):
        load_checkpoint(path)
    assert RAN == []
    torch.load(path, weights_only=False)  # the old way: the payload runs
    assert RAN == ["payload ran"]
    RAN.clear()


def test_rng_state_and_generators_round_trip_through_a_plain_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    gen = torch.Generator().manual_seed(4)
    save_checkpoint(tmp_path / "ckpt.pt", {"rng": rng_state(), "gen": gen.get_state(), "cfg": {"size": (8, 8)}})
    want = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    set_rng_state(ckpt["rng"])
    gen.set_state(ckpt["gen"])
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    assert torch.equal(got[3], want[3]) and ckpt["cfg"] == {"size": (8, 8)}


def _tiny_data(root: Path) -> None:
    store = ShardStore(root)
    store.write_meta({"engine": "x", "resolution": [8, 8], "action_space": {"keys": list("ab")}})
    rng = np.random.default_rng(0)
    store.append([Episode(rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8),
                          (rng.random((12, 2)) > 0.5).astype(np.float32), s) for s in range(2)])


def test_training_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path, capsys):
    """`forcekit train codec` checkpointing every 0.3 s is killed with SIGKILL mid-run; the rerun starts
    at the step of the checkpoint on disk (no older than one interval at the kill) and finishes."""
    _tiny_data(tmp_path / "data")
    out, interval, steps = tmp_path / "run", 0.3, 100000
    cmd = [sys.executable, "-m", "forcekit", "train", "codec", "--data", str(tmp_path / "data"), "--out", str(out),
           "--batch", "2", "--crop", "8", "--latent-channels", "2", "--ckpt-every-s", str(interval),
           "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--steps", str(steps)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt, deadline = out / "ckpt.pt", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and (load_checkpoint(ckpt) or {}).get("step", 0) > 0:
                time.sleep(3 * interval)
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(ckpt)["step"]
    assert saved > 0
    assert killed_at - ckpt.stat().st_mtime < interval + 2.0  # lost at most about one interval of work
    from forcekit.cli import main

    capsys.readouterr()
    assert main([*cmd[3:], "--steps", str(saved + 3)]) == 0  # the same command again, in this process
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == saved + 3 and summary["steps_this_run"] == 3
    assert load_checkpoint(ckpt)["step"] == saved + 3 and (out / "codec.json").exists()
