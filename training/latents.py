"""Recorded episodes encoded once by a codec: latent clips with their conditioning actions.

Encoding every frame on every step would cost more than the DiT step itself on a CPU, so a
run encodes its data once and caches the result (`latents.pt`, keyed by the codec config and
the data). Conditioning follows the recording convention (actions[t] produced frames[t+1]):
the model conditions frame t on `cond[t] = actions[t-1]`, and the first frame of an episode
on the no-op (zeros) — exactly what a session does, where `step(action)` generates the frame
that `action` produces.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.codec import Codec
from training.data import ClipDataset


def conditioning_actions(actions: torch.Tensor) -> torch.Tensor:
    """Episode actions [T, D] (actions[t] produced frame t+1) -> per-frame condition [T, D]."""
    return torch.cat([torch.zeros_like(actions[:1]), actions[:-1]])


@dataclass
class LatentClips:
    latents: torch.Tensor        # float16 [N, C, h, w], episodes concatenated
    cond: torch.Tensor           # float32 [N, D], the action that produced each frame
    episodes: list[tuple[int, int, int]]   # (start row, length, seed)

    def starts(self, clip_frames: int) -> torch.Tensor:
        s = [r + i for r, n, _ in self.episodes for i in range(n - clip_frames + 1)]
        if not s:
            raise ValueError(f"no episode has {clip_frames} frames")
        return torch.tensor(s)

    def sample(self, batch: int, clip_frames: int, generator: torch.Generator,
               starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random clips: latents float32 [B, F, C, h, w], conditioning actions [B, F, D]."""
        starts = self.starts(clip_frames) if starts is None else starts
        pick = starts[torch.randint(len(starts), (batch,), generator=generator)]
        rows = pick[:, None] + torch.arange(clip_frames)
        return self.latents[rows].float(), self.cond[rows]


def encode_latents(data: str, codec: Codec, max_episodes: int = 0, batch: int = 256,
                   cache_dir: str | Path | None = None, progress: bool = True) -> LatentClips:
    """Encode the episodes of a data dir (the first `max_episodes`, 0 = all), cached in cache_dir."""
    from tqdm import tqdm

    ds = ClipDataset(data, clip_frames=1)
    rows = ds.episode_rows[:max_episodes] if max_episodes else ds.episode_rows
    key = hashlib.sha256(json.dumps([codec.config(), str(Path(data).resolve()), rows]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"latents-{key}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        d = torch.load(cache, weights_only=True)  # tensors and tuples of ints only
        return LatentClips(d["latents"], d["cond"], d["episodes"])
    lat, cond, episodes, row = [], [], [], 0
    codec.eval()
    with torch.no_grad():
        for si, start, length, seed in tqdm(rows, desc="encode latents", disable=not progress):
            shard = ds.load_shard(si)
            frames = torch.from_numpy(shard["frames"][start:start + length])
            lat.append(torch.cat([codec.encode(frames[i:i + batch]) for i in range(0, length, batch)]).half())
            cond.append(conditioning_actions(torch.from_numpy(shard["actions"][start:start + length])))
            episodes.append((row, length, seed))
            row += length
    out = LatentClips(torch.cat(lat), torch.cat(cond).float(), episodes)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")   # ranks may encode at once
        torch.save({"latents": out.latents, "cond": out.cond, "episodes": out.episodes}, tmp)
        tmp.replace(cache)
    return out


def synthetic_latents(episodes: int, length: int, shape: tuple[int, int, int], action_dim: int,
                      seed: int = 0) -> LatentClips:
    """Latents where each frame moves by its action (tiny tests, DDP checks)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    lat, cond = [], []
    for _ in range(episodes):
        x = torch.randn(c, h, w, generator=g)
        acts = (torch.rand(length, action_dim, generator=g) > 0.5).float()
        frames = []
        for t in range(length):
            frames.append(x)
            x = torch.roll(x, shifts=int(acts[t, 0]) - int(acts[t, -1]), dims=-1)
        lat.append(torch.stack(frames).half())
        cond.append(conditioning_actions(acts))
    return LatentClips(torch.cat(lat), torch.cat(cond), [(i * length, length, i) for i in range(episodes)])
