"""`ChunkPattern`: the single source of truth for chunk boundaries (DESIGN.md section 3).

Frame-wise generation is ``frames_per_chunk=1``; chunk-wise is e.g. 3. The first chunk may be
longer (``first_chunk_frames``), as in models whose first latent frame stands alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kernels import masks as interval_masks
from kernels.masks import KeyIntervals


@functools.lru_cache(maxsize=512)
def cached_mask(builder: str, *args, **kwargs) -> KeyIntervals:
    """``kernels.masks.<builder>(*args, **kwargs)``, memoised: the same few masks recur every chunk,
    and backends memoise their lowered forms by the description's identity."""
    return getattr(interval_masks, builder)(*args, **kwargs)


@dataclass(frozen=True)
class ChunkPattern:
    frames_per_chunk: int
    first_chunk_frames: int | None = None
    tokens_per_frame: int = 1

    def __post_init__(self) -> None:
        if self.frames_per_chunk < 1 or self.first_frames < 1 or self.tokens_per_frame < 1:
            raise ValueError(f"chunk pattern sizes must be >= 1: {self}")

    @property
    def first_frames(self) -> int:
        return self.frames_per_chunk if self.first_chunk_frames is None else self.first_chunk_frames

    @property
    def max_chunk_frames(self) -> int:
        return max(self.first_frames, self.frames_per_chunk)

    def chunk_frames(self, chunk: int) -> int:
        """Frames in chunk number ``chunk``."""
        return self.first_frames if chunk == 0 else self.frames_per_chunk

    def chunk_start(self, chunk: int) -> int:
        """First frame of chunk number ``chunk``."""
        return 0 if chunk == 0 else self.first_frames + (chunk - 1) * self.frames_per_chunk

    def num_chunks(self, frames: int) -> int:
        """Chunks needed to cover ``frames`` frames (the last may be partial)."""
        if frames <= 0:
            return 0
        if frames <= self.first_frames:
            return 1
        return 1 + -(-(frames - self.first_frames) // self.frames_per_chunk)

    def is_whole(self, frames: int) -> bool:
        """True when ``frames`` ends exactly at a chunk boundary."""
        n = self.num_chunks(frames)
        return frames == 0 or self.chunk_start(n - 1) + self.chunk_frames(n - 1) == frames

    def chunk_index(self, frames: int) -> torch.Tensor:
        """int64 ``[frames]``: the chunk each frame belongs to (per-chunk noise levels use this)."""
        f = torch.arange(frames)
        later = 1 + (f - self.first_frames).clamp(min=0) // self.frames_per_chunk
        return torch.where(f < self.first_frames, torch.zeros_like(f), later)

    # Mask descriptions: two key intervals per query row, lowered per backend in runtime.masks.
    def block_causal(self, frames: int) -> KeyIntervals:
        return cached_mask("block_causal", frames, self.tokens_per_frame, self.frames_per_chunk, self.first_frames)

    def teacher_forcing(self, frames: int) -> KeyIntervals:
        return cached_mask("teacher_forcing", frames, self.tokens_per_frame, self.frames_per_chunk,
                           self.first_frames)

    def window_sink(self, frames: int, window: int, sink: int) -> KeyIntervals:
        return cached_mask("window_sink", frames, self.tokens_per_frame, self.frames_per_chunk, self.first_frames,
                           window=window, sink=sink)
