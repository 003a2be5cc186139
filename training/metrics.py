"""Image metrics for codec and world-model evaluation: PSNR and SSIM on uint8 frames.

Both take frames `[..., H, W, 3]` (uint8 or float in [0, 255]) and return one value per
frame. Identical frames have infinite PSNR; aggregates clamp per-frame PSNR at `PSNR_CAP`
so one perfect frame does not make a mean infinite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0


def _float(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.shape[-1] != 3:
        raise ValueError(f"expected frames [..., H, W, 3], got {tuple(x.shape)}")
    return x.float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB over [0, 255] frames; inf where the frames are identical."""
    a, b = _float(a), _float(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(-3).mean(-1)
    return 10 * torch.log10(255.0**2 / mse)   # mse == 0 -> inf


def mean_psnr(values: torch.Tensor) -> float:
    return float(values.clamp(max=PSNR_CAP).mean())


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-frame SSIM (Gaussian window, per channel, averaged), in [-1, 1]; 1 for identical frames."""
    return ssim_map(a, b, window, sigma).flatten(-2).mean(-1)


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per window position, channel-averaged: [..., H - window + 1, W - window + 1] (for masked means)."""
    a, b = _float(a), _float(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    lead = a.shape[:-3]
    h, w = a.shape[-3:-1]
    x = a.reshape(-1, h, w, 3).permute(0, 3, 1, 2)
    y = b.reshape(-1, h, w, 3).permute(0, 3, 1, 2)
    g = _gaussian(window, sigma)
    k = (g[:, None] * g[None, :]).expand(3, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(1).reshape(*lead, *s.shape[-2:])


def horizons(max_horizon: int) -> list[int]:
    """1, 2, 4, ... up to max_horizon (inclusive when it is a power of two)."""
    return [2**i for i in range(int(math.log2(max_horizon)) + 1)] if max_horizon >= 1 else []


def laplacian_variance(frames: torch.Tensor) -> torch.Tensor:
    """Per-frame variance of the 3x3 Laplacian of the grey image: high for sharp edges and texture,
    low for a blurred average (the sharpness the world-model goals compare, generated over real)."""
    x = _float(frames)
    lead, (h, w) = x.shape[:-3], x.shape[-3:-1]
    grey = x.reshape(-1, h, w, 3).mean(-1, keepdim=True).permute(0, 3, 1, 2)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(grey, kernel).flatten(1).var(1).reshape(lead)


def horizontal_pan(before: torch.Tensor, after: torch.Tensor, max_shift: int = 8) -> torch.Tensor:
    """Per frame pair, the horizontal shift in pixels (positive: the content moved right) that best maps
    ``before`` onto ``after`` (mean absolute difference of the grey images over their overlap, integer
    shifts in [-max_shift, max_shift]). Turning left in a first-person view moves the content right."""
    a, b = _float(before), _float(after)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    w = a.shape[-2]
    if not 0 < max_shift < w:
        raise ValueError(f"max_shift must be in [1, {w - 1}] for frames {w} wide, got {max_shift}")
    a, b = a.mean(-1), b.mean(-1)   # [..., H, W]
    errors = []
    for s in range(-max_shift, max_shift + 1):
        # content moved right by s: after[:, x] == before[:, x - s]
        if s >= 0:
            errors.append((b[..., s:] - a[..., :w - s]).abs().mean((-2, -1)))
        else:
            errors.append((b[..., :w + s] - a[..., -s:]).abs().mean((-2, -1)))
    return torch.stack(errors, -1).argmin(-1) - max_shift


def floor_stream(before: torch.Tensor, after: torch.Tensor, max_shift: int = 4) -> torch.Tensor:
    """Per frame pair, how far the bottom third of the view moved down minus how far its top third did, in
    pixels (integer shifts, `horizontal_pan` along the rows). Walking forward streams the floor down and the
    ceiling up (positive), walking backward the other way (negative); a still view gives 0."""
    a, b = _float(before), _float(after)
    third = a.shape[-3] // 3
    if not 0 < max_shift < third:
        raise ValueError(f"max_shift must be in [1, {third - 1}] for frames {a.shape[-3]} high, got {max_shift}")

    def down(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:   # rows become the axis horizontal_pan reads
        return horizontal_pan(x.transpose(-3, -2), y.transpose(-3, -2), max_shift)

    return down(a[..., -third:, :, :], b[..., -third:, :, :]) - down(a[..., :third, :, :], b[..., :third, :, :])
