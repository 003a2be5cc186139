"""`KVCache`: a preallocated sink + window ring per layer, so a rollout never ends.

Buffer layout per layer, in frames: ``[sink | window ring | current region]``. The first
``sink_frames`` frames ever committed stay in the sink; later frames go round the ring, the
oldest evicted first. The current chunk's keys sit in their own region while it is denoised; the region holds two
chunks so that one pass can commit a finished chunk and start denoising the next
(``commit_frames``, below).
Keys are stored with their rotary positions already applied and positions are computed on the
fly from an ever-growing frame counter, so there is no table to run out and memory is flat
from the first call: nothing is allocated after construction. Once the window has moved past
the sink, the sink's keys are read re-rotated by `runtime.context.sink_shift` (as if the sink sat
just before the window), so query-to-sink distances stay inside what training shows. The shift is
computed on the device from the pass's frame positions, not from the Python frame counter: a
captured pass replayed at a later frame with new positions then reads the new shift. Whether the
sink is shifted at all (a choice made in Python) is `sink_phase`, which a capture key must hold.

Modes, per forward pass:
  transient  write the chunk's keys into the current region and attend; commit nothing
             (every denoising step but the one that writes the cache)
  append     the same, then commit the chunk into sink/ring (the step that writes the cache)
  readonly   attend over the detached cache plus the chunk's own keys without writing
             anything: training replays a chunk with gradients against a frozen cache

A ``transient`` pass may carry a finished chunk in front of the current one
(``commit_frames``): the finished chunk attends as its own append pass would (to the cache
as it was) and is committed, the current chunk attends to the cache as it is after that
commit. One pass instead of two per generated chunk; the result is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.masks import KeyIntervals
from runtime.chunks import cached_mask
from runtime.context import sink_shift
from runtime.rope import apply_rope, rope_angles, rope_cos_sin

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
    rope_theta: float = 10000.0  # to re-rotate the sink's keys (`runtime.context.sink_shift`)

    @property
    def slots(self) -> int:
        """Frames per layer: sink, window ring, and a current region of two chunks."""
        return self.sink_frames + self.window_frames + 2 * self.max_chunk_frames


class KVCache:
    def __init__(self, geometry: CacheGeometry, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.geometry = g = geometry
        shape = (g.num_layers, 2, g.batch, g.slots * g.tokens_per_frame, g.heads, g.head_dim)
        self._buf = torch.zeros(shape, device=device, dtype=dtype)
        self._fused_layouts: dict[tuple, tuple[torch.Tensor, KeyIntervals]] = {}
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

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor, mode: str, positions: torch.Tensor,
                    commit_frames: int = 0) -> tuple[torch.Tensor, torch.Tensor, KeyIntervals | None]:
        """Keys and values the chunk's queries attend to, and the mask over them.

        ``k``, ``v``: the chunk's own ``[B, n*T, H, D]`` keys and values (positions applied).
        ``positions``: their frames' RoPE positions (one per frame, consecutive from ``next_frame``),
        from which the sink's shift is read.
        ``commit_frames`` (``transient`` only): the first that many frames are a finished chunk to
        commit in this same pass (see the module docstring); the mask then covers both.
        """
        g, t = self.geometry, self.geometry.tokens_per_frame
        n = k.shape[1] // t - commit_frames
        if n > g.max_chunk_frames or commit_frames > g.max_chunk_frames or (n + commit_frames) * t != k.shape[1]:
            raise ValueError(f"chunk of {k.shape[1]} tokens does not fit the cache "
                             f"({g.max_chunk_frames} frames of {t} tokens, {commit_frames} to commit)")
        if mode == "readonly":
            held = self._held(layer, positions)
            return torch.cat([held[0], k], dim=1), torch.cat([held[1], v], dim=1), None
        if mode not in MODES:
            raise ValueError(f"unknown cache mode {mode!r}; choose one of {list(MODES)}")
        if commit_frames and mode != "transient":
            raise ValueError(f"commit_frames needs cache mode 'transient', got {mode!r}")
        cur = (g.sink_frames + g.window_frames) * t
        buf = self._buf[layer]
        buf[0, :, cur:cur + k.shape[1]] = k.detach()
        buf[1, :, cur:cur + k.shape[1]] = v.detach()
        if commit_frames:
            index, mask, sinks = self._fused_layout(commit_frames, n)
            kv = buf.index_select(2, index)
            self._pending = commit_frames
            keys = kv[0]
            for at, first in sinks:  # the committed chunk's sink, and the current chunk's when it shifts
                keys = self._shifted_sink(keys, at, positions, first)
            return keys, kv[1], mask
        mask = cached_mask("cache_decode", n, t, g.sink_frames, g.window_frames, self.sink_valid, self.window_valid)
        if mode == "append":
            self._pending = n
        return self._shifted_sink(buf[0, :, :cur + n * t], 0, positions, 0), buf[1, :, :cur + n * t], mask

    def sink_phase(self, commit_frames: int = 0) -> tuple[bool, bool]:
        """Whether the sink is read shifted by the pass's first chunk, and by the chunk after its first
        ``commit_frames`` frames (a fused commit, `keys_values`): all a pass's Python decides from the
        frame counter. The shifts themselves come from the positions, on the device."""
        return self._sink_moved(0), self._sink_moved(commit_frames)

    def _sink_moved(self, first: int) -> bool:
        """Whether the chunk starting ``first`` frames into the pass reads the sink shifted."""
        g = self.geometry
        return self.sink_valid > 0 and sink_shift(self.next_frame + first, g.window_frames, g.sink_frames) > 0

    def _shifted_sink(self, keys: torch.Tensor, at: int, positions: torch.Tensor, first: int) -> torch.Tensor:
        """``keys`` with the valid sink frames found at frame ``at`` re-rotated for the chunk starting at
        ``positions[first]`` (a new tensor when they move; ``keys`` itself while the shift is 0)."""
        g, t = self.geometry, self.geometry.tokens_per_frame
        if not self._sink_moved(first):
            return keys
        shift = sink_shift(positions[first:first + 1], g.window_frames, g.sink_frames)
        angles = rope_angles(shift, 1, 1, g.head_dim, g.rope_theta)
        lo, hi = at * t, (at + self.sink_valid) * t
        sink = apply_rope(keys[:, lo:hi], *rope_cos_sin(angles))  # frame axis only: rows/columns turn by 0
        return torch.cat([keys[:, :lo], sink, keys[:, hi:]], dim=1)

    def _fused_layout(self, commit: int, n: int) -> tuple[torch.Tensor, KeyIntervals, list[tuple[int, int]]]:
        """Token gather index ``[evicted | kept | committed | current]``, its `commit_decode` mask, and
        where sink frames sit in it with the first frame (in the pass) of the chunk each is read for
        (`_shifted_sink`).

        When the two chunks see the sink at different shifts, the sink is gathered a second time
        after the current chunk, for the current chunk's queries only (still one interval per row).
        The shifts differ exactly when the current chunk's sink has moved (the committed chunk's is
        then 0 or ``commit`` frames less), so this is `sink_phase`'s choice too.
        """
        g = self.geometry
        twice = self._sink_moved(commit)
        key = (self.sink_valid, self.window_valid, self.ring_next, commit, n, twice)
        if key not in self._fused_layouts:
            t = g.tokens_per_frame
            to_ring = commit - min(commit, g.sink_frames - self.sink_valid)
            if to_ring > g.window_frames:
                raise ValueError(f"a window of {g.window_frames} frames cannot keep a committed chunk of "
                                 f"{commit}: commit it with its own append pass")
            evicted = max(0, self.window_valid + to_ring - g.window_frames)
            oldest = (self.ring_next - self.window_valid) % g.window_frames if g.window_frames else 0
            ring = [g.sink_frames + (oldest + i) % g.window_frames for i in range(self.window_valid)]
            current = g.sink_frames + g.window_frames
            sink = list(range(self.sink_valid))
            frames = ring[:evicted] + sink + ring[evicted:] + list(range(current, current + commit + n))
            mask = cached_mask("commit_decode", commit, n, t, self.frames_held, evicted)
            if twice:
                frames += sink
                iv = mask.intervals.clone()
                iv[commit * t:, 0] += self.sink_valid * t  # the current chunk skips the first sink copy ...
                iv[commit * t:, 1] += self.sink_valid * t  # ... and reads the one after it instead
                mask = KeyIntervals(iv, mask.num_keys + self.sink_valid * t)
            index = (torch.tensor(frames)[:, None] * t + torch.arange(t)).flatten().to(self._buf.device)
            self._fused_layouts[key] = (index, mask, evicted, len(frames) - self.sink_valid)
        index, mask, evicted, second = self._fused_layouts[key]
        sinks = [(evicted, 0)] + ([(second, commit)] if twice else [])
        return index, mask, sinks

    def _held(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, t = self.geometry, self.geometry.tokens_per_frame
        buf = self._buf[layer].detach()
        sink = buf[:, :, : self.sink_valid * t]
        ring = buf[:, :, g.sink_frames * t: (g.sink_frames + self.window_valid) * t]
        both = torch.cat([sink, ring], dim=2)
        return self._shifted_sink(both[0], 0, positions, 0), both[1]

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
