"""Tile schedules: which key tiles each query tile must visit, lowered from `KeyIntervals`.

The Triton kernels never look at a dense mask. For every query tile (``block_m`` rows) the
schedule lists the key tiles (``block_n`` keys) that hold at least one visible key, split in
two lists: *full* tiles, where every row of the query tile sees every key of the key tile (no
element mask needed), and *partial* tiles, where the kernel applies the per-row intervals
element by element. Tiles no row can see are absent: the kernels skip them for free.
The backward pass over keys needs the transpose (for each key tile, the query tiles that
visit it), built from the same two tables.

Everything is computed from the intervals in O(Nq + query_tiles * key_tiles) with difference
arrays, never from an ``[Nq, Nk]`` matrix, so it stays cheap at video lengths (65k tokens).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from kernels.masks import KeyIntervals


@dataclass(frozen=True)
class TileList:
    """CSR list: tiles of row ``i`` are ``idx[ptr[i]:ptr[i+1]]`` (int32, ascending)."""

    ptr: torch.Tensor
    idx: torch.Tensor


@dataclass(frozen=True)
class TileSchedule:
    """Everything a kernel needs to walk a masked attention problem tile by tile."""

    block_m: int
    block_n: int
    num_queries: int
    num_keys: int
    intervals: torch.Tensor  # int32 [Nq, 4], contiguous, on the kernel's device
    q_full: TileList  # per query tile: fully visible key tiles
    q_partial: TileList  # per query tile: partly visible key tiles
    k_full: TileList  # per key tile: query tiles that see all of it
    k_partial: TileList  # per key tile: query tiles that see part of it

    @property
    def visited_tiles(self) -> int:
        return int(self.q_full.idx.numel() + self.q_partial.idx.numel())


def _merge(intervals: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip both intervals to ``[0, Nk)`` and merge them when they touch: two disjoint ranges per row."""
    iv = intervals.to(torch.int64).clamp(0, num_keys)
    a_lo, a_hi, b_lo, b_hi = iv.unbind(1)
    a_hi = torch.maximum(a_hi, a_lo)  # empty interval -> lo == hi
    b_hi = torch.maximum(b_hi, b_lo)
    a_empty, b_empty = a_lo == a_hi, b_lo == b_hi
    touch = ~a_empty & ~b_empty & (a_lo <= b_hi) & (b_lo <= a_hi)
    lo1 = torch.where(touch, torch.minimum(a_lo, b_lo), a_lo)
    hi1 = torch.where(touch, torch.maximum(a_hi, b_hi), a_hi)
    lo2 = torch.where(touch, torch.zeros_like(b_lo), b_lo)
    hi2 = torch.where(touch, torch.zeros_like(b_hi), b_hi)
    return torch.stack([lo1, lo2], 1), torch.stack([hi1, hi2], 1)


def _tile_counts(lo: torch.Tensor, hi: torch.Tensor, tile_of_row: torch.Tensor,
                 num_q_tiles: int, num_k_tiles: int) -> torch.Tensor:
    """For each (query tile, key tile): how many rows' key-tile ranges ``[lo, hi)`` contain it."""
    diff = torch.zeros(num_q_tiles, num_k_tiles + 1, dtype=torch.int64, device=lo.device)
    keep = hi > lo
    rows = tile_of_row[:, None].expand_as(lo)[keep]
    ones = torch.ones_like(rows)
    diff.index_put_((rows, lo[keep]), ones, accumulate=True)
    diff.index_put_((rows, hi[keep]), -ones, accumulate=True)
    return diff.cumsum(1)[:, :num_k_tiles]


def _csr(table: torch.Tensor) -> TileList:
    counts = table.sum(1)
    ptr = torch.zeros(table.shape[0] + 1, dtype=torch.int32, device=table.device)
    ptr[1:] = counts.cumsum(0)
    return TileList(ptr, table.nonzero()[:, 1].to(torch.int32).contiguous())


def build_schedule(mask: KeyIntervals, block_m: int, block_n: int,
                   device: torch.device | str | None = None) -> TileSchedule:
    """Lower a mask description to the tile lists of a ``block_m x block_n`` tiling."""
    if block_m < 1 or block_n < 1:
        raise ValueError(f"tile sizes must be positive, got {block_m}x{block_n}")
    iv = mask.intervals.to(device) if device is not None else mask.intervals
    nq, nk = mask.num_queries, mask.num_keys
    n_qt, n_kt = -(-nq // block_m), -(-nk // block_n)
    lo, hi = _merge(iv, nk)
    tile_of_row = torch.arange(nq, device=iv.device) // block_m
    # Tiles touched by a non-empty [lo, hi): [lo // bn, ceil(hi / bn)).
    t_lo = lo // block_n
    t_hi = torch.where(hi > lo, -(-hi // block_n), t_lo)
    touched = _tile_counts(t_lo, t_hi, tile_of_row, n_qt, n_kt) > 0
    # Tiles wholly inside [lo, hi): [ceil(lo / bn), hi // bn). A short last key tile is never
    # "full": its out-of-range keys need the element mask.
    full_lo, full_hi = -(-lo // block_n), hi // block_n
    covered = _tile_counts(full_lo, torch.maximum(full_hi, full_lo), tile_of_row, n_qt, n_kt)
    rows_in_tile = (nq - torch.arange(n_qt, device=iv.device) * block_m).clamp(max=block_m)
    full = covered == rows_in_tile[:, None]
    partial = touched & ~full
    return TileSchedule(
        block_m=block_m, block_n=block_n, num_queries=nq, num_keys=nk,
        intervals=iv.to(torch.int32).contiguous(),
        q_full=_csr(full), q_partial=_csr(partial),
        k_full=_csr(full.T), k_partial=_csr(partial.T),
    )


@functools.lru_cache(maxsize=16)
def full_mask(num_queries: int, num_keys: int) -> KeyIntervals:
    """Every query sees every key: the description of ``mask=None``."""
    row = torch.tensor([[0, num_keys, 0, 0]], dtype=torch.int32)
    return KeyIntervals(row.expand(num_queries, 4).contiguous(), num_keys)


# Schedules are rebuilt only when the interval tensor changes: a model calls attention once per
# layer with the same mask object. Keyed by tensor identity and version, held weakly.
_CACHE: dict[tuple, tuple[weakref.ref, TileSchedule]] = {}
_CACHE_LIMIT = 64


def cached_schedule(mask: KeyIntervals, block_m: int, block_n: int, device: torch.device) -> TileSchedule:
    t = mask.intervals
    key = (id(t), t._version, mask.num_keys, block_m, block_n, str(device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is t:
        return hit[1]
    sched = build_schedule(mask, block_m, block_n, device)
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (weakref.ref(t), sched)
    return sched
