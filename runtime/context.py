"""What a chunk's context is, in frames and RoPE positions: shared by the KV cache and the no-cache reference.

A chunk starting at frame ``start`` sees the sink (the first ``sink`` frames), the last
``window`` frames before it and itself (`ChunkPattern.window_sink`). Window and chunk keep
their absolute frame positions: RoPE only sees differences, and those stay below
``window + chunk``. The sink would drift away without bound (a query at frame 10,000 would be
10,000 positions from it, while training clips never exceed sink + window + one chunk), so once
the window has moved past the sink the sink is seen *as if it sat just before the window*: its
positions shift by `sink_shift`. Every chunk then sees its context at the positions of a
training clip (sink, window, chunk in a row), however long the stream.

The no-cache reference (`recompute_plan`) recomputes a chunk from the latents alone, exactly:
a key of layer ``l`` depends on the frames its own window saw at layer ``l - 1``, so a model of
``L`` layers needs the last ``L`` windows (`receptive_start`), plus the sink's chunks. Frames of
different chunks see the sink at different shifts, so the sink's chunks appear once per shift,
each copy attended only by the chunks that use that shift. Its size is bounded per chunk.
"""

from __future__ import annotations

import functools

import torch

from kernels.masks import KeyIntervals
from runtime.chunks import ChunkPattern


def sink_shift(start: int | torch.Tensor, window: int, sink: int) -> int | torch.Tensor:
    """Frames the sink's positions move forward for a chunk starting at ``start``: the gap between the
    sink and the window's first frame (0 while the window still touches the sink).

    ``start`` may be a tensor of frame positions; the shift is then computed on its device, so a
    captured pass (`runtime.cuda_step`) that is replayed with new positions reads the new shift."""
    gap = start - window - sink if sink > 0 else start * 0
    return gap.clamp(min=0) if isinstance(gap, torch.Tensor) else max(0, gap)


def chunk_of(pattern: ChunkPattern, frame: int) -> int:
    """The chunk holding ``frame``."""
    first = pattern.first_frames
    return 0 if frame < first else 1 + (frame - first) // pattern.frames_per_chunk


def chunk_end(pattern: ChunkPattern, frame: int) -> int:
    """One past the last frame of the chunk holding ``frame``."""
    c = chunk_of(pattern, frame)
    return pattern.chunk_start(c) + pattern.chunk_frames(c)


def receptive_start(pattern: ChunkPattern, start: int, window: int, layers: int) -> int:
    """The first frame (apart from the sink's chunks) whose latents the output of the chunk at ``start`` depends on.

    Each layer reaches one window further back, from the start of the chunk it reaches.
    """
    lo = start
    for _ in range(layers):
        lo = max(0, pattern.chunk_start(chunk_of(pattern, lo)) - window)
    return lo


def sink_chunks_end(pattern: ChunkPattern, sink: int) -> int:
    """One past the last frame of the chunks that hold the sink (0 without a sink): the sink frames'
    own keys depend on their whole chunks."""
    return chunk_end(pattern, sink - 1) if sink > 0 else 0


def recompute_plan(pattern: ChunkPattern, start: int, frames: int, window: int, sink: int, layers: int
                   ) -> tuple[list[int], list[int], KeyIntervals]:
    """The frames to run (absolute indices, in order), their RoPE positions, and the mask, so that the
    last ``frames`` of the run are the chunk at ``start`` exactly as a KV cache computes it.

    Layout ``[sink-chunk copy per shift | frames receptive_start .. start + frames)``.
    """
    end = start + frames
    lo = receptive_start(pattern, start, window, layers)
    rows, tail = [], list(range(lo, end))  # rows: frame-level (a_lo, a_hi, b_lo, b_hi) in layout frames

    def bounds(f: int) -> tuple[int, int, int, int]:
        s = pattern.chunk_start(chunk_of(pattern, f))
        e = min(chunk_end(pattern, f), end)
        sink_hi = min(s, sink)
        return s, e, sink_hi, max(sink_hi, s - window)

    # one copy of the sink's chunks per shift in use, long enough for the sink frames its users see
    need: dict[int, int] = {}
    for f in tail:
        s, _, sink_hi, _ = bounds(f)
        if sink_hi:
            d = sink_shift(s, window, sink)
            need[d] = max(need.get(d, 0), chunk_end(pattern, sink_hi - 1))
    order, positions, offset = [], [], {}
    for d, n in need.items():
        offset[d] = len(order)
        for f in range(n):
            _, e, sink_hi, win_lo = bounds(f)
            o = offset[d]
            rows.append((o, o + sink_hi, o + win_lo, o + e))
            order.append(f)
            positions.append(f + d)
    base = len(order)
    for f in tail:
        s, e, sink_hi, win_lo = bounds(f)
        o = offset.get(sink_shift(s, window, sink), 0)
        rows.append((o, o + sink_hi, base + max(win_lo, lo) - lo, base + e - lo))
        order.append(f)
        positions.append(f)
    return order, positions, _token_mask(tuple(rows), pattern.tokens_per_frame)


@functools.lru_cache(maxsize=64)
def _token_mask(rows: tuple[tuple[int, int, int, int], ...], tokens_per_frame: int) -> KeyIntervals:
    """Frame-level rows -> the token-level mask, memoised: once the window is full every chunk has the
    same layout, so it is one object and the backends' lowered forms (dense masks) are reused too."""
    t = tokens_per_frame
    iv = (torch.tensor(rows, dtype=torch.int64) * t).repeat_interleave(t, dim=0).to(torch.int32)
    return KeyIntervals(iv, len(rows) * t)
