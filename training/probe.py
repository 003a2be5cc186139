"""Inverse-dynamics probe: which action turned frame t into frame t+1?

A small CNN over the channel-stacked (f_t, f_{t+1}, f_{t+1} - f_t) predicts the held keys of
a_t (multi-label, one logit per key). The difference image and a head that keeps the spatial
layout (flatten, not global pooling) matter: with global pooling the probe stayed near chance
on ViZDoom, where a turn is a few-pixel horizontal shift over a busy texture. Trained on real
pairs; `forcekit eval world` then applies it to generated pairs: if the world model obeys the
controls, the probe reads the actions back from its frames about as well as from the engine's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.checkpoint import load_checkpoint, save_checkpoint, train_resumable


@dataclass
class ProbeConfig:
    keys: list[str]
    size: tuple[int, int] = (64, 64)
    channels: tuple[int, ...] = (32, 64, 128, 128)   # stride-2 convs; the first is 5x5
    hidden: int = 256


class InverseDynamicsProbe(nn.Module):
    def __init__(self, cfg: ProbeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers, cin = [], 9
        for i, c in enumerate(cfg.channels):
            k = 5 if i == 0 else 3
            layers += [nn.Conv2d(cin, c, k, stride=2, padding=k // 2), nn.SiLU()]
            cin = c
        self.features = nn.Sequential(*layers)
        down = 2 ** len(cfg.channels)
        h, w = cfg.size
        if h % down or w % down:
            raise ValueError(f"probe input {h}x{w} must be divisible by {down} ({len(cfg.channels)} stride-2 convs)")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * (h // down) * (w // down), cfg.hidden), nn.SiLU(),
                                  nn.Linear(cfg.hidden, len(cfg.keys)))

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """uint8 frames [n, H, W, 3] (each) -> key logits [n, K]."""
        b = before.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        a = after.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return self.head(self.features(torch.cat([b, a, a - b], 1)))

    @torch.no_grad()
    def predict(self, before: torch.Tensor, after: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Held keys as a bool [n, K] tensor."""
        self.eval()
        return torch.cat([self(before[i:i + batch], after[i:i + batch]) > 0 for i in range(0, len(before), batch)])


def accuracy(pred: torch.Tensor, actions: torch.Tensor) -> dict:
    """Exact-match accuracy over all keys, and per-key accuracy, against multi-hot actions."""
    truth = actions > 0.5
    return {"exact": round(float((pred == truth).all(1).float().mean()), 4),
            "per_key": round(float((pred == truth).float().mean()), 4)}


def pairs(data: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All real (f_t, f_{t+1}, a_t) of a data dir, as index-aligned tensors."""
    from training.data import ClipDataset

    ds = ClipDataset(data, clip_frames=2)
    frames, every = torch.from_numpy(ds.all_frames()), torch.from_numpy(ds.all_actions())
    actions, before, row = [], [], 0
    for _, _, length, _ in ds.episode_rows:
        before.append(torch.arange(row, row + length - 1))
        actions.append(every[row:row + length - 1])
        row += length
    idx = torch.cat(before)
    return frames, idx, torch.cat(actions)


def save_probe(model: InverseDynamicsProbe, out: Path) -> None:
    save_checkpoint(out / "probe.pt", {"cfg": asdict(model.cfg), "model": model.state_dict()})


def load_probe(path: str | Path) -> InverseDynamicsProbe:
    path = Path(path)
    d = load_checkpoint(path / "probe.pt" if path.is_dir() else path)
    if d is None:
        raise FileNotFoundError(f"{path}: no probe.pt (train one with `forcekit train probe`)")
    cfg = ProbeConfig(**{**d["cfg"], "size": tuple(d["cfg"]["size"]), "channels": tuple(d["cfg"]["channels"])})
    model = InverseDynamicsProbe(cfg)
    model.load_state_dict(d["model"])
    return model.eval()


def train_probe(data: str, heldout: str | None, out: str, steps: int = 2000, batch: int = 64, lr: float = 1e-3,
                seed: int = 0, ckpt_every_s: float = 120.0, progress: bool = True,
                channels: tuple[int, ...] = (32, 64, 128, 128)) -> dict:
    from training.data.shards import ShardStore

    meta = ShardStore(data).read_meta()
    outp = Path(out)
    frames, idx, actions = pairs(data)
    keys = meta["action_space"]["keys"]
    model = InverseDynamicsProbe(ProbeConfig(keys=list(keys), size=tuple(meta["resolution"]), channels=channels))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        pick = idx[torch.randint(len(idx), (batch,), generator=gen)]
        a = actions[torch.searchsorted(idx, pick)]
        return F.binary_cross_entropy_with_logits(model(frames[pick], frames[pick + 1]), a)

    run = train_resumable(outp, model, opt, gen, batch_loss, steps, "train probe", "probe/loss", ckpt_every_s, progress)
    save_probe(model, outp)
    result = {**run, "train": accuracy(model.predict(frames[idx[:4096]], frames[idx[:4096] + 1]), actions[:4096])}
    if heldout:
        hf, hi, ha = pairs(heldout)
        result["heldout"] = accuracy(model.predict(hf[hi], hf[hi + 1]), ha)
    (outp / "probe.json").write_text(json.dumps(result, indent=2))
    return result
