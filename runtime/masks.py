"""Lowering of interval mask descriptions (`kernels.masks.KeyIntervals`) per attention backend.

The description is small and exact; the lowered forms are memoised per (description, device)
because the same few masks recur every chunk.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from kernels.masks import KeyIntervals

_CACHE_SIZE = 64
_dense_cache: OrderedDict = OrderedDict()
_bias_cache: OrderedDict = OrderedDict()
_block_cache: OrderedDict = OrderedDict()
_full_cache: OrderedDict = OrderedDict()


def _key(mask: KeyIntervals, device: torch.device) -> tuple:
    # By identity: the builders are memoised (runtime.chunks.cached_mask), so a recurring mask
    # is the same object. Reading the tensor's bytes instead would fail under torch.func transforms.
    return (id(mask), str(device))


def _memo(cache: OrderedDict, key: tuple, mask: KeyIntervals, build):
    if key in cache and cache[key][0] is mask:
        cache.move_to_end(key)
        return cache[key][1]
    value = build()
    cache[key] = (mask, value)  # holding the mask keeps its id from being reused
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def covers_all_keys(mask: KeyIntervals) -> bool:
    """True when every row's two intervals together cover every key, so the mask can be dropped."""

    def build() -> bool:
        a_lo, a_hi, b_lo, b_hi = mask.intervals.to(torch.int64).unbind(1)
        nk = mask.num_keys
        a_alone = (a_lo <= 0) & (a_hi >= nk)
        b_alone = (b_lo <= 0) & (b_hi >= nk)
        a_then_b = (a_lo <= 0) & (a_hi > a_lo) & (b_lo <= a_hi) & (b_hi >= nk)
        b_then_a = (b_lo <= 0) & (b_hi > b_lo) & (a_lo <= b_hi) & (a_hi >= nk)
        return bool((a_alone | b_alone | a_then_b | b_then_a).all())

    return _memo(_full_cache, _key(mask, torch.device("cpu")), mask, build)


def dense_mask(mask: KeyIntervals, device: torch.device | str) -> torch.Tensor:
    """Boolean ``[Nq, Nk]`` (True = attend), for the reference and SDPA backends."""
    device = torch.device(device)
    return _memo(_dense_cache, _key(mask, device), mask, lambda: mask.to_dense(device))


def dense_bias(mask: KeyIntervals, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[Nq, Nk]`` mask (0 where allowed, -inf elsewhere), what SDPA turns a boolean mask
    into on every call; memoised here so the conversion runs once per mask, not per layer and step."""
    device = torch.device(device)

    def build() -> torch.Tensor:
        allowed = dense_mask(mask, device)
        return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))

    return _memo(_bias_cache, _key(mask, device) + (dtype,), mask, build)


def flex_block_mask(mask: KeyIntervals, device: torch.device | str):
    """A FlexAttention ``BlockMask`` whose ``mask_mod`` reads the two intervals of each row."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)

    def build():
        iv = mask.intervals.to(device=device, dtype=torch.int32)
        a_lo, a_hi, b_lo, b_hi = iv.unbind(1)

        def mask_mod(b, h, q_idx, kv_idx):
            return ((kv_idx >= a_lo[q_idx]) & (kv_idx < a_hi[q_idx])) | (
                (kv_idx >= b_lo[q_idx]) & (kv_idx < b_hi[q_idx]))

        return create_block_mask(mask_mod, None, None, mask.num_queries, mask.num_keys, device=device)

    return _memo(_block_cache, _key(mask, device), mask, build)


def memoised_tensors() -> list:
    """Every lowered mask held in the memo right now. A captured CUDA graph reads these by address,
    so it keeps them alive (`runtime.cuda_step`): an evicted entry must not free memory a graph uses."""
    return [value for cache in (_dense_cache, _bias_cache, _block_cache) for _, value in cache.values()]
