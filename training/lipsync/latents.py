"""Lip-sync latent clips: each recorded frame through the codec, with the conditions a session builds.

Per frame t of a clip (alignment: ``actions[t]`` belongs to ``frames[t]``, see record.py):
  latents  codec(frames[t])                                    the target
  audio    actions[t], the log-mel window around t             the model's ``audio`` input
  video    codec(frames[t] with the spec's mask box filled)     + the reference's latent, on the
           channel axis (`LatentClips.reference`: the clip's first frame, spoken in the lead silence,
           so its mouth is at rest; a session uses the first frame it sees)

With the spec's ``crop_box`` the frames are cut to the crop first (`LipsyncSpec.model_inputs`).
The mask box is one box for every frame, the same in training and at inference
(`runtime.lipsync.LipsyncSpec`): `union_mouth_box` takes the union of the recorded per-frame
``mouth_box`` over the training data, grown by a margin, so it covers the mouth wherever the head
moves it; a live loop with a fixed centre crop masks exactly what training masked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from runtime.codec import Codec
from runtime.lipsync import LipsyncSpec, mouth_features
from training.conditions import FrameConditions
from training.data import ClipDataset
from training.data.shards import open_shard
from training.latents import LatentClips


def union_mouth_box(data: str, margin: int = 2, max_episodes: int = 0) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the union of the recorded mouth boxes of ``data``, grown by ``margin``, in the frame."""
    ds = ClipDataset(data, clip_frames=1)
    h, w = ds.meta["resolution"]
    rows = ds.episode_rows[:max_episodes] if max_episodes else ds.episode_rows
    boxes = []
    for si in sorted({r[0] for r in rows}):
        box = open_shard(ds.paths[si], ("mouth_box",))["mouth_box"]
        boxes.extend(box[row:row + length] for s, row, length, _ in rows if s == si)
    b = np.concatenate(boxes)
    return (max(0, int(b[:, 0].min()) - margin), max(0, int(b[:, 1].min()) - margin),
            min(h, int(b[:, 2].max()) + margin), min(w, int(b[:, 3].max()) + margin))


def _encode(codec: Codec, frames: np.ndarray, batch: int) -> torch.Tensor:
    return torch.cat([codec.encode(torch.from_numpy(np.ascontiguousarray(frames[i:i + batch])))
                      for i in range(0, len(frames), batch)])


def encode_lipsync_latents(data: str, codec: Codec, spec: LipsyncSpec, max_episodes: int = 0, batch: int = 256,
                           cache_dir: str | Path | None = None, progress: bool = True) -> LatentClips:
    """Encode a lip-sync recording (the first ``max_episodes`` clips, 0 = all) as `LatentClips` with
    `FrameConditions` (audio, masked video) and reference rows; cached in ``cache_dir``. A spec whose
    ``condition`` is ``mouth`` gets the true mouth parameters in the audio slot (`mouth_features`)."""
    from tqdm import tqdm

    ds = ClipDataset(data, clip_frames=1)
    spec.check_frame(*ds.meta["resolution"])
    rows = ds.episode_rows[:max_episodes] if max_episodes else ds.episode_rows
    key = hashlib.sha256(json.dumps([codec.config(), str(Path(data).resolve()), rows, spec.to_dict()]
                                    ).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"lipsync-latents-{key}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        d = torch.load(cache, weights_only=True)  # tensors and tuples of ints only
        return LatentClips(d["latents"], FrameConditions(audio=d["audio"], video=d["video"]), d["episodes"],
                           d["reference"])
    lat, vid, aud, ref, episodes, row = [], [], [], [], [], 0
    told_mouth = spec.condition == "mouth"
    codec.eval()
    shards: dict[int, dict[str, np.ndarray]] = {}
    with torch.no_grad():
        for si, start, length, seed in tqdm(rows, desc="encode lip-sync latents", disable=not progress):
            if si not in shards:
                shards.clear()   # one shard at a time: episodes are stored in shard order
                shards[si] = open_shard(ds.paths[si], ("frames", "actions") + (("mouth",) if told_mouth else ()))
            shard = shards[si]
            frames, masked = spec.model_inputs(shard["frames"][start:start + length])
            lat.append(_encode(codec, frames, batch).half())
            vid.append(_encode(codec, masked, batch).half())
            audio = shard["actions"][start:start + length]
            if told_mouth:
                audio = mouth_features(shard["mouth"][start:start + length], audio.shape[1])
            aud.append(torch.from_numpy(np.ascontiguousarray(audio)).float())
            ref.append(torch.full((length,), row, dtype=torch.long))   # the clip's first frame
            episodes.append((row, length, seed))
            row += length
    reference = torch.cat(ref) if spec.reference == "first" else None
    out = LatentClips(torch.cat(lat), FrameConditions(audio=torch.cat(aud), video=torch.cat(vid)), episodes,
                      reference)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        torch.save({"latents": out.latents, "audio": out.cond.audio, "video": out.cond.video,
                    "episodes": out.episodes, "reference": reference}, tmp)
        tmp.replace(cache)
    return out


def synthetic_lipsync_latents(episodes: int, length: int, shape: tuple[int, int, int], audio_dim: int,
                              reference: bool = True, seed: int = 0) -> LatentClips:
    """Latents whose 'mouth' (the bottom latent row) is set by the frame's audio, the rest a fixed face per
    clip; the video condition is the frame with that row zeroed (tiny tests of the training mechanics)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    lat, vid, aud, ref = [], [], [], []
    for e in range(episodes):
        face = torch.randn(c, h, w, generator=g)
        audio = torch.rand(length, audio_dim, generator=g)
        frames = face.expand(length, c, h, w).clone()
        frames[:, :, -1] = audio[:, :1, None, None].expand(length, c, 1, w)[:, :, 0] * 2 - 1
        masked = frames.clone()
        masked[:, :, -1] = 0
        lat.append(frames.half())
        vid.append(masked.half())
        aud.append(audio)
        ref.append(torch.full((length,), e * length, dtype=torch.long))
    return LatentClips(torch.cat(lat), FrameConditions(audio=torch.cat(aud), video=torch.cat(vid)),
                       [(i * length, length, i) for i in range(episodes)], torch.cat(ref) if reference else None)
