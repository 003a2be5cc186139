"""A lazy dataset of fixed-length clips (frames + actions) over a shard directory.

Only the small per-shard arrays (episode lengths, seeds) are read up front; a shard's frames
are decompressed the first time a clip from it is asked for and then kept (a recording of a
few hundred episodes at 64x64 fits easily in memory). Clips never cross episode boundaries.
See training/data/__init__.py for the alignment convention: actions[t] produced frames[t+1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from training.data.shards import ShardStore, action_dim, open_shard


class ClipDataset(torch.utils.data.Dataset):
    """Clips of `clip_frames` consecutive frames with their actions.

    Item i -> {"frames": uint8 [F, H, W, 3], "actions": float32 [F, D], "seed": episode seed,
    "start": frame index of the clip inside its episode}. `seeds` keeps only those episodes
    (e.g. to split held-out seeds).
    """

    def __init__(self, root: str | os.PathLike, clip_frames: int, stride: int = 1,
                 seeds: set[int] | None = None) -> None:
        if clip_frames < 1 or stride < 1:
            raise ValueError(f"clip_frames and stride must be >= 1, got {clip_frames}, {stride}")
        self.store = ShardStore(root)
        self.meta = self.store.read_meta()
        self.clip_frames = clip_frames
        self.paths: list[Path] = self.store.shard_paths()
        if not self.paths:
            raise FileNotFoundError(f"{self.store.root}: no shards")
        self._cache: dict[int, dict[str, np.ndarray]] = {}
        starts = []   # (shard index, absolute start row in shard, start inside episode, seed)
        self.episode_rows: list[tuple[int, int, int, int]] = []   # (shard, row, length, seed)
        for si, path in enumerate(self.paths):
            small = open_shard(path, ("episode_lengths", "episode_seeds"))
            offset = 0
            for length, seed in zip(small["episode_lengths"].tolist(), small["episode_seeds"].tolist()):
                if seeds is None or seed in seeds:
                    self.episode_rows.append((si, offset, length, seed))
                    for s in range(0, length - clip_frames + 1, stride):
                        starts.append((si, offset + s, s, seed))
                offset += length
        self.index = np.array(starts, dtype=np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.index)

    def load_shard(self, si: int) -> dict[str, np.ndarray]:
        """Frames and actions of shard number `si` (decompressed once, then cached)."""
        if si not in self._cache:
            self._cache[si] = open_shard(self.paths[si], ("frames", "actions"))
        return self._cache[si]

    def __getitem__(self, i: int) -> dict:
        si, row, start, seed = (int(x) for x in self.index[i])
        shard = self.load_shard(si)
        sl = slice(row, row + self.clip_frames)
        return {"frames": torch.from_numpy(shard["frames"][sl]), "actions": torch.from_numpy(shard["actions"][sl]),
                "seed": seed, "start": start}

    def sample(self, batch: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A random batch: frames uint8 [B, F, H, W, 3], actions float32 [B, F, D]."""
        if len(self) == 0:
            raise ValueError(f"{self.store.root}: no episode is {self.clip_frames} frames long")
        idx = torch.randint(len(self), (batch,), generator=generator).tolist()
        items = [self[i] for i in idx]
        return {"frames": torch.stack([it["frames"] for it in items]),
                "actions": torch.stack([it["actions"] for it in items])}

    @property
    def episodes(self) -> int:
        return len(self.episode_rows)

    @property
    def frames_total(self) -> int:
        return sum(r[2] for r in self.episode_rows)

    def all_frames(self) -> np.ndarray:
        """Every frame of the kept episodes, uint8 [N, H, W, 3] (for per-frame training: the codec)."""
        h, w = self.meta["resolution"]
        out = [self.load_shard(si)["frames"][row: row + length] for si, row, length, _ in self.episode_rows]
        return np.concatenate(out) if out else np.zeros((0, h, w, 3), np.uint8)

    def all_actions(self) -> np.ndarray:
        """Every recorded action of the kept episodes, float32 [N, D], row for row with `all_frames` (row t
        produced frame t + 1 of its episode)."""
        out = [self.load_shard(si)["actions"][row: row + length] for si, row, length, _ in self.episode_rows]
        return np.concatenate(out) if out else np.zeros((0, action_dim(self.meta)), np.float32)
