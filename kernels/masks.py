"""Attention masks described, not materialised: two key intervals per query row.

Query row i may attend to keys in ``[a_lo, a_hi) ∪ [b_lo, b_hi)``; an empty interval has
``lo >= hi``. This covers every mask forcekit needs (DESIGN.md section 3): block-causal,
teacher-forcing ``[clean | noisy]``, window + sink, and KV-cache decode. Backends lower the
description: ``to_dense()`` for the reference, block masks for FlexAttention, tile schedules
for the Triton kernels.

Chunk geometry, in frames: chunk 0 holds ``first_chunk_frames`` frames, every later chunk
``frames_per_chunk``; every frame holds ``tokens_per_frame`` tokens, laid out frame-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyIntervals:
    """``intervals``: int32 ``[Nq, 4]`` rows of ``(a_lo, a_hi, b_lo, b_hi)``; ``num_keys``: Nk."""

    intervals: torch.Tensor
    num_keys: int

    def __post_init__(self) -> None:
        iv = self.intervals
        if iv.ndim != 2 or iv.shape[1] != 4:
            raise ValueError(f"intervals must have shape [Nq, 4], got {tuple(iv.shape)}")
        if iv.dtype != torch.int32:
            raise ValueError(f"intervals must be int32, got {iv.dtype}")

    @property
    def num_queries(self) -> int:
        return int(self.intervals.shape[0])

    def to(self, device: torch.device | str) -> KeyIntervals:
        return KeyIntervals(self.intervals.to(device), self.num_keys)

    def to_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean ``[Nq, Nk]``: True where the query may attend to the key."""
        iv = self.intervals.to(device) if device is not None else self.intervals
        keys = torch.arange(self.num_keys, device=iv.device, dtype=torch.int32)[None, :]
        in_a = (keys >= iv[:, 0:1]) & (keys < iv[:, 1:2])
        in_b = (keys >= iv[:, 2:3]) & (keys < iv[:, 3:4])
        return in_a | in_b

    def is_full(self) -> bool:
        """True when every query sees every key (the mask can be dropped)."""
        iv = self.intervals
        a_all = (iv[:, 0] <= 0) & (iv[:, 1] >= self.num_keys)
        b_all = (iv[:, 2] <= 0) & (iv[:, 3] >= self.num_keys)
        return bool((a_all | b_all).all())


def chunk_bounds(frames: int, frames_per_chunk: int, first_chunk_frames: int | None = None) -> torch.Tensor:
    """int64 ``[frames, 2]``: for each frame, the ``[start, end)`` frames of its chunk."""
    first = frames_per_chunk if first_chunk_frames is None else first_chunk_frames
    if frames_per_chunk < 1 or first < 1:
        raise ValueError(f"chunk sizes must be >= 1, got frames_per_chunk={frames_per_chunk}, first={first}")
    f = torch.arange(frames)
    later = (f - first).clamp(min=0) // frames_per_chunk
    start = torch.where(f < first, torch.zeros_like(f), first + later * frames_per_chunk)
    end = torch.where(f < first, torch.full_like(f, first), start + frames_per_chunk)
    return torch.stack([start, end.clamp(max=frames)], dim=1)


def _per_token(frame_rows: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Frame-level key intervals (in frames) -> token-level intervals (in tokens), int32."""
    return (frame_rows * tokens_per_frame).repeat_interleave(tokens_per_frame, dim=0).to(torch.int32)


def _empty(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


def block_causal(frames: int, tokens_per_frame: int, frames_per_chunk: int,
                 first_chunk_frames: int | None = None) -> KeyIntervals:
    """A token sees every token of its own chunk and of all earlier chunks."""
    bounds = chunk_bounds(frames, frames_per_chunk, first_chunk_frames)
    rows = torch.stack([_empty(frames), bounds[:, 1], _empty(frames), _empty(frames)], dim=1)
    return KeyIntervals(_per_token(rows, tokens_per_frame), frames * tokens_per_frame)


def teacher_forcing(frames: int, tokens_per_frame: int, frames_per_chunk: int,
                    first_chunk_frames: int | None = None) -> KeyIntervals:
    """The ``[clean | noisy]`` sequence of teacher forcing, ``2 * frames`` frames long.

    Clean tokens are block-causal among the clean half. A noisy token of chunk c sees the clean
    chunks before c and its own noisy chunk, never its own clean chunk: exactly what it would see
    at inference with a KV cache written from clean frames.
    """
    bounds = chunk_bounds(frames, frames_per_chunk, first_chunk_frames)
    z = _empty(frames)
    clean = torch.stack([z, bounds[:, 1], z, z], dim=1)
    noisy = torch.stack([z, bounds[:, 0], frames + bounds[:, 0], frames + bounds[:, 1]], dim=1)
    rows = torch.cat([clean, noisy], dim=0)
    return KeyIntervals(_per_token(rows, tokens_per_frame), 2 * frames * tokens_per_frame)


def window_sink(frames: int, tokens_per_frame: int, frames_per_chunk: int,
                first_chunk_frames: int | None = None, window: int = 0, sink: int = 0) -> KeyIntervals:
    """Block-causal, limited to the first ``sink`` frames plus the last ``window`` frames before the chunk.

    The query's own chunk is always visible. This is what a KV cache with ``sink`` sink slots
    and ``window`` ring slots (in frames) holds when the chunk is generated.
    """
    if window < 0 or sink < 0:
        raise ValueError(f"window and sink must be >= 0, got window={window}, sink={sink}")
    bounds = chunk_bounds(frames, frames_per_chunk, first_chunk_frames)
    start, end = bounds[:, 0], bounds[:, 1]
    sink_hi = start.clamp(max=sink)
    win_lo = torch.maximum(sink_hi, start - window)
    rows = torch.stack([_empty(frames), sink_hi, win_lo, end], dim=1)
    return KeyIntervals(_per_token(rows, tokens_per_frame), frames * tokens_per_frame)


def cache_decode(chunk_frames: int, tokens_per_frame: int, sink_slots: int, window_slots: int,
                 sink_valid: int, window_valid: int) -> KeyIntervals:
    """Queries of one chunk against a KV-cache buffer laid out ``[sink | window ring | current chunk]``.

    All sizes in frames. Valid sink slots are a prefix of the sink region, valid ring slots a
    prefix of the ring (the ring only fills after the sink is full, so the sink is then whole);
    the current chunk is always visible. Order inside the buffer does not matter to attention:
    keys carry their rotary positions.
    """
    if not (0 <= sink_valid <= sink_slots and 0 <= window_valid <= window_slots):
        raise ValueError(f"valid slots out of range: sink {sink_valid}/{sink_slots}, "
                         f"window {window_valid}/{window_slots}")
    if window_valid > 0 and sink_valid < sink_slots:
        raise ValueError("the ring fills only after the sink is full")
    t = tokens_per_frame
    current = (sink_slots + window_slots) * t
    if window_valid == window_slots:  # ring full: ring and current chunk are contiguous
        row = [0, sink_valid * t, sink_slots * t, current + chunk_frames * t]
    else:
        row = [0, (sink_valid + window_valid) * t, current, current + chunk_frames * t]
    rows = torch.tensor([row], dtype=torch.int32).expand(chunk_frames * t, 4).contiguous()
    return KeyIntervals(rows, current + chunk_frames * t)


def commit_decode(commit_frames: int, chunk_frames: int, tokens_per_frame: int, held_frames: int,
                  evicted_frames: int) -> KeyIntervals:
    """One pass that commits a finished chunk and starts denoising the next (fused cache decode).

    Keys are gathered as ``[evicted | kept | committed chunk | current chunk]`` (in frames):
    ``held_frames`` cached frames, the oldest ``evicted_frames`` of them first because
    committing the finished chunk pushes them out of the window. Queries are the committed
    chunk's tokens, then the current chunk's. The committed chunk sees what the cache held
    before it (all ``held_frames``) and itself, as its own append pass would; the current chunk
    sees the cache as it stands after the commit (kept + committed) and itself. Both are one
    interval per row.
    """
    if not 0 <= evicted_frames <= held_frames or min(commit_frames, chunk_frames) < 1:
        raise ValueError(f"bad fused decode geometry: commit {commit_frames}, chunk {chunk_frames}, "
                         f"held {held_frames}, evicted {evicted_frames}")
    t = tokens_per_frame
    committed_end = (held_frames + commit_frames) * t
    total = committed_end + chunk_frames * t
    committed = torch.tensor([[0, committed_end, 0, 0]], dtype=torch.int32).expand(commit_frames * t, 4)
    current = torch.tensor([[evicted_frames * t, total, 0, 0]], dtype=torch.int32).expand(chunk_frames * t, 4)
    return KeyIntervals(torch.cat([committed, current]).contiguous(), total)
