"""Pixel helpers shared by the front ends (pure numpy)."""

from __future__ import annotations

import math

import numpy as np


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour integer upscale of uint8 [H, W, 3] so the shorter side is >= min_side.

    Sizes come out even (edge-padded when needed), as 4:2:0 video encoders require.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] frame, got {image.dtype} {tuple(image.shape)}")
    h, w = image.shape[:2]
    k = max(1, math.ceil(min_side / min(h, w)))
    if k > 1:
        image = image.repeat(k, axis=0).repeat(k, axis=1)
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(image)
