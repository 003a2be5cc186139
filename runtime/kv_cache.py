"""`KVCache`: a preallocated sink + window ring per layer, so a rollout never ends.

Buffer layout per layer, in frames: ``[sink | window ring | current chunk]``. The first
``sink_frames`` frames ever committed stay in the sink; later frames go round the ring, the
oldest evicted first. The current chunk's keys sit in their own region while it is denoised.
Keys are stored with their rotary positions already applied and positions are computed on the
fly from an ever-growing frame counter, so there is no table to run out and memory is flat
from the first call: nothing is allocated after construction.

Modes, per forward pass:
  transient  write the chunk's keys into the current region and attend; commit nothing
             (every denoising step but the one that writes the cache)
  append     the same, then commit the chunk into sink/ring (the step that writes the cache)
  readonly   attend over the detached cache plus the chunk's own keys without writing
             anything: training replays a chunk with gradients against a frozen cache
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.masks import KeyIntervals
from runtime.chunks import cached_mask

MODES = ("transient", "append", "readonly")


@dataclass(frozen=True)
class CacheGeometry:
    num_layers: int
    batch: int
    heads: int
    head_dim: int
    tokens_per_frame: int
    sink_frames: int
    window_frames: int
    max_chunk_frames: int

    @property
    def slots(self) -> int:
        return self.sink_frames + self.window_frames + self.max_chunk_frames


class KVCache:
    def __init__(self, geometry: CacheGeometry, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.geometry = g = geometry
        shape = (g.num_layers, 2, g.batch, g.slots * g.tokens_per_frame, g.heads, g.head_dim)
        self._buf = torch.zeros(shape, device=device, dtype=dtype)
        self.reset()

    def reset(self) -> None:
        self.sink_valid = 0  # frames held in the sink
        self.window_valid = 0  # frames held in the ring
        self.ring_next = 0  # ring slot the next frame goes to
        self.next_frame = 0  # absolute index of the next frame to generate (its RoPE position)
        self._pending = 0  # frames of the current chunk written by `append` passes

    @property
    def nbytes(self) -> int:
        return self._buf.numel() * self._buf.element_size()

    @property
    def frames_held(self) -> int:
        return self.sink_valid + self.window_valid

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor, mode: str
                    ) -> tuple[torch.Tensor, torch.Tensor, KeyIntervals | None]:
        """Keys and values the chunk's queries attend to, and the mask over them.

        ``k``, ``v``: the chunk's own ``[B, n*T, H, D]`` keys and values (positions applied).
        """
        g, t = self.geometry, self.geometry.tokens_per_frame
        n = k.shape[1] // t
        if n > g.max_chunk_frames or n * t != k.shape[1]:
            raise ValueError(f"chunk of {k.shape[1]} tokens does not fit the cache "
                             f"({g.max_chunk_frames} frames of {t} tokens)")
        if mode == "readonly":
            held = self._held(layer)
            return torch.cat([held[0], k], dim=1), torch.cat([held[1], v], dim=1), None
        if mode not in MODES:
            raise ValueError(f"unknown cache mode {mode!r}; choose one of {list(MODES)}")
        cur = (g.sink_frames + g.window_frames) * t
        buf = self._buf[layer]
        buf[0, :, cur:cur + n * t] = k.detach()
        buf[1, :, cur:cur + n * t] = v.detach()
        mask = cached_mask("cache_decode", n, t, g.sink_frames, g.window_frames, self.sink_valid, self.window_valid)
        if mode == "append":
            self._pending = n
        return buf[0, :, :cur + n * t], buf[1, :, :cur + n * t], mask

    def _held(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, t = self.geometry, self.geometry.tokens_per_frame
        buf = self._buf[layer].detach()
        sink = buf[:, :, : self.sink_valid * t]
        ring = buf[:, :, g.sink_frames * t: (g.sink_frames + self.window_valid) * t]
        both = torch.cat([sink, ring], dim=2)
        return both[0], both[1]

    def commit(self) -> None:
        """Move the chunk written by the last `append` pass from the current region into sink/ring."""
        n, self._pending = self._pending, 0
        g, t = self.geometry, self.geometry.tokens_per_frame
        cur = (g.sink_frames + g.window_frames) * t
        for i in range(n):
            src = slice(cur + i * t, cur + (i + 1) * t)
            if self.sink_valid < g.sink_frames:
                dst_frame = self.sink_valid
                self.sink_valid += 1
            elif g.window_frames > 0:
                dst_frame = g.sink_frames + self.ring_next
                self.ring_next = (self.ring_next + 1) % g.window_frames
                self.window_valid = min(self.window_valid + 1, g.window_frames)
            else:
                continue  # no window: only the sink is ever kept
            self._buf[:, :, :, dst_frame * t:(dst_frame + 1) * t] = self._buf[:, :, :, src]
        self.next_frame += n

    # -- training support: self-forcing replays a chunk against the cache as it was before it ---------
    def snapshot(self) -> dict:
        """A copy of the buffers and bookkeeping, for `restore`."""
        return {"buf": self._buf.clone(), "state": (self.sink_valid, self.window_valid, self.ring_next,
                                                    self.next_frame, self._pending)}

    def restore(self, snap: dict) -> None:
        """Put back a `snapshot` (in place: no allocation)."""
        self._buf.copy_(snap["buf"])
        self.sink_valid, self.window_valid, self.ring_next, self.next_frame, self._pending = snap["state"]
