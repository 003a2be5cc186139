"""Recorded episodes encoded once by a codec: latent clips with their per-frame conditions.

Encoding every frame on every step would cost more than the DiT step itself on a CPU, so a
run encodes its data once and caches the result (`latents.pt`, keyed by the codec config and
the data). Conditioning follows the recording convention (actions[t] produced frames[t+1]):
the model conditions frame t on `cond[t] = actions[t-1]`, and the first frame of an episode
on the no-op (zeros) — exactly what a session does, where `step(action)` generates the frame
that `action` produces.

A lip-sync recording is conditioned on audio and video instead (`training.lipsync.latents`):
its clips carry `training.conditions.FrameConditions`, and each frame may have a reference row
whose latent is appended to its video condition at sampling time (the identity frame, kept once).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from runtime.actions import key_momentum
from runtime.codec import Codec
from runtime.config import ModelConfig
from training.conditions import Conditions
from training.data import ClipDataset


def conditioning_actions(actions: torch.Tensor) -> torch.Tensor:
    """Episode actions [T, D] (actions[t] produced frame t+1) -> per-frame condition [T, D]."""
    return torch.cat([torch.zeros_like(actions[:1]), actions[:-1]])


@dataclass
class LatentClips:
    latents: torch.Tensor        # float16 [N, C, h, w], episodes concatenated
    cond: Conditions             # per row: the action that produced the frame (float32 [N, D]), or FrameConditions
    episodes: list[tuple[int, int, int]]   # (start row, length, seed)
    reference: torch.Tensor | None = None  # long [N]: the row whose latent joins the frame's video condition

    def with_momentum(self, decay: float) -> LatentClips:
        """These clips with each action row followed by the episode's running average of the actions
        (`runtime.actions.key_momentum`, from 0 at each episode's first frame): the condition a model
        with ``ModelConfig.action_momentum = decay`` reads. ``decay`` 0: the clips unchanged."""
        if not decay:
            return self
        if not isinstance(self.cond, torch.Tensor):
            raise ValueError("action momentum needs action-conditioned clips")
        rows = [key_momentum(self.cond[r:r + n], decay)[0] for r, n, _ in self.episodes]
        return replace(self, cond=torch.cat(rows))

    def for_model(self, model_cfg: ModelConfig) -> LatentClips:
        """These clips with the action condition ``model_cfg`` reads (`with_momentum`; clips that hold it
        already are returned as they are); refuses clips whose actions fit neither."""
        if not isinstance(self.cond, torch.Tensor) or self.cond.shape[-1] == model_cfg.action_condition_dim:
            return self
        if self.cond.shape[-1] != model_cfg.actions.dim:
            raise ValueError(f"the clips hold {self.cond.shape[-1]} action channels; the model reads "
                             f"{model_cfg.actions.dim} actions ({model_cfg.action_condition_dim} with momentum)")
        return self.with_momentum(model_cfg.action_momentum)

    def to(self, device: torch.device | str) -> LatentClips:
        """These clips with their latents, conditions and reference rows on ``device`` (a GPU run samples its
        batches there; the episode index stays a Python list)."""
        ref = None if self.reference is None else self.reference.to(device)
        return replace(self, latents=self.latents.to(device), cond=self.cond.to(device), reference=ref)

    def starts(self, clip_frames: int) -> torch.Tensor:
        s = [r + i for r, n, _ in self.episodes for i in range(n - clip_frames + 1)]
        if not s:
            raise ValueError(f"no episode has {clip_frames} frames")
        return torch.tensor(s)

    def sample(self, batch: int, clip_frames: int, generator: torch.Generator,
               starts: torch.Tensor | None = None) -> tuple[torch.Tensor, Conditions]:
        """Random clips: latents float32 [B, F, C, h, w] and their conditions (actions [B, F, D], or
        FrameConditions with the reference latents appended to the video on the channel axis)."""
        starts = self.starts(clip_frames) if starts is None else starts
        pick = starts[torch.randint(len(starts), (batch,), generator=generator)]
        rows = (pick[:, None] + torch.arange(clip_frames)).to(self.latents.device)
        cond = self.cond[rows].float()
        if self.reference is not None:
            ref = self.latents[self.reference[rows]].float()
            cond = replace(cond, video=ref if cond.video is None else torch.cat([cond.video, ref], 2))
        return self.latents[rows].float(), cond

    def rest_rows(self, threshold: float = 0.05) -> torch.Tensor:
        """Rows of a world recording where no key is held and the keys' running average (when the condition
        holds it, `with_momentum`) is below ``threshold``: the engine's view at rest, which does not change
        (Doom's health_gathering: 0.05 of 255 a frame, docs/world_controls.md, sixth sitting)."""
        if not isinstance(self.cond, torch.Tensor):
            raise ValueError("rest rows need action-conditioned clips")
        return torch.nonzero(self.cond.float().abs().amax(-1) < threshold).flatten()

    def sample_still(self, batch: int, clip_frames: int, generator: torch.Generator, rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Still clips: a frame at rest (one of ``rows``, `rest_rows`) held for ``clip_frames`` frames with no
        key, what the engine shows when nothing is pressed: latents [B, F, C, h, w], conditions [B, F, D]."""
        if len(rows) == 0:
            raise ValueError("no frame at rest in these clips (record with --idle-prob)")
        pick = rows[torch.randint(len(rows), (batch,), generator=generator)].to(self.latents.device)
        latents = self.latents[pick].float()[:, None].expand(-1, clip_frames, *self.latents.shape[1:])
        return latents.contiguous(), self.cond[pick].float()[:, None].expand(-1, clip_frames, -1).contiguous()


def encode_latents(data: str, codec: Codec, max_episodes: int = 0, batch: int = 256,
                   cache_dir: str | Path | None = None, progress: bool = True,
                   lipsync: dict | None = None) -> LatentClips:
    """Encode the episodes of a data dir (the first `max_episodes`, 0 = all), cached in cache_dir.

    A lip-sync recording needs the bundle's lip-sync spec (``extra["lipsync"]``: mask box, reference)."""
    from tqdm import tqdm

    ds = ClipDataset(data, clip_frames=1)
    if ds.meta.get("engine") == "lipsync":
        from runtime.lipsync import LipsyncSpec
        from training.lipsync.latents import encode_lipsync_latents

        if lipsync is None:
            raise ValueError(f"{data} is a lip-sync recording: encoding it needs a lip-sync bundle's spec "
                             "(extra['lipsync']; train the teacher with `forcekit train lipsync-teacher`)")
        return encode_lipsync_latents(data, codec, LipsyncSpec.from_dict(lipsync), max_episodes, batch, cache_dir,
                                      progress)
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
