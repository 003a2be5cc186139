"""Moving frames by a camera motion: the one resampling the world model's camera warp and the
refining decoder (`runtime.autoencoder.RefiningDecoder`) share.

A motion is what `CausalDiT.camera_move` reads off the keys: per frame a translation right and down
and a log zoom (``[.., 3]``), and optionally a per-pixel flow (``[.., 2, h, w]``). Both are in
``grid_sample`` units (2 = the whole width or height), so one motion moves a 16x16 latent and the
64x64 frame decoded from it alike.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class CameraMotion(NamedTuple):
    """Per-frame motion of ``n`` frames: ``shift`` ``[n, 3]``, ``flow`` ``[n, 2, h, w]`` or None."""

    shift: torch.Tensor
    flow: torch.Tensor | None = None

    def at(self, index) -> CameraMotion:
        """The motion of the frames ``index`` picks (an int, a slice, a tensor of indices, or a tuple of
        those, as on the leading axes of ``shift``), the flow alike."""
        return CameraMotion(self.shift[index], None if self.flow is None else self.flow[index])


def warp_frames(frames: torch.Tensor, motion: torch.Tensor, flow: torch.Tensor | None = None,
                mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """Move frames ``[B, F, C, H, W]`` by per-frame ``motion`` ``[B, F, 3]``: translation right and
    down (in grid units, 2 = the whole width or height) and log zoom about the centre, and by a per-pixel
    ``flow`` ``[B, F, 2, h, w]`` (right and down, grid units; resized to ``H x W`` where it differs) on top.
    Resampled by ``mode`` (grid_sample's bilinear, bicubic or nearest), edges repeated where the move uncovers
    them (``padding`` "border"; "zeros" leaves them 0); zero motion is the identity."""
    b, f, c, h, w = frames.shape
    tx, ty, log_zoom = motion.float().flatten(0, 1).unbind(-1)
    inv, zero = torch.exp(-log_zoom), torch.zeros_like(tx)
    theta = torch.stack([torch.stack([inv, zero, -tx], -1), torch.stack([zero, inv, -ty], -1)], 1)
    grid = F.affine_grid(theta, [b * f, c, h, w], align_corners=False)
    if flow is not None:   # content moves by +flow: each pixel samples from where it came from
        flow = flow.float().flatten(0, 1)
        if flow.shape[-2:] != (h, w):
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        grid = grid - flow.permute(0, 2, 3, 1)
    out = F.grid_sample(frames.flatten(0, 1).float(), grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.view(b, f, c, h, w).to(frames.dtype)


def gaussian_blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[n, C, H, W]`` (radius 2.5 sigma, edges repeated)."""
    radius = max(1, round(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=frames.device)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(frames.dtype)
    c = frames.shape[1]
    out = F.pad(frames, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

