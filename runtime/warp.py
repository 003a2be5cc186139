"""Moving frames by a camera motion: the one resampling the world model's camera warp and the
refining decoder (`runtime.autoencoder.RefiningDecoder`) share.

A motion is what `CausalDiT.camera_move` reads off the keys: per frame a translation right and down
and a log zoom (``[.., 3]``), and optionally a per-pixel flow (``[.., 2, h, w]``). Both are in
``grid_sample`` units (2 = the whole width or height), so one motion moves a 16x16 latent and the
64x64 frame decoded from it alike.

Given the view's horizontal field of view, the sideways part is a pinhole camera's turn (yaw) rather
than a translation: the turn that moves the view's centre column by the translation, under which the
view's edge columns move further than its centre and a point nearing the centre drifts toward the
horizon, as a game's view does (`forcekit eval camera` measures it on recorded turns).
"""

from __future__ import annotations

import math
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
                mode: str = "bilinear", padding: str = "border", fov: float = 0.0) -> torch.Tensor:
    """Move frames ``[B, F, C, H, W]`` by per-frame ``motion`` ``[B, F, 3]``: translation right and
    down (in grid units, 2 = the whole width or height) and log zoom about the centre, and by a per-pixel
    ``flow`` ``[B, F, 2, h, w]`` (right and down, grid units; resized to ``H x W`` where it differs) on top.
    With a horizontal field of view ``fov`` (degrees; 0: none) the move right is a pinhole camera's turn that
    moves the centre column that far (`yaw_grid`). Resampled by ``mode`` (grid_sample's bilinear, bicubic or
    nearest), edges repeated where the move uncovers them (``padding`` "border"; "zeros" leaves them 0); zero
    motion is the identity."""
    b, f, c, h, w = frames.shape
    grid = motion_grid(motion.flatten(0, 1), h, w, fov)
    if flow is not None:   # content moves by +flow: each pixel samples from where it came from
        flow = flow.float().flatten(0, 1)
        if flow.shape[-2:] != (h, w):
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        grid = grid - flow.permute(0, 2, 3, 1)
    out = F.grid_sample(frames.flatten(0, 1).float(), grid, mode=mode, padding_mode=padding, align_corners=False)
    return out.view(b, f, c, h, w).to(frames.dtype)


def motion_grid(motion: torch.Tensor, height: int, width: int, fov: float = 0.0) -> torch.Tensor:
    """Where each pixel of ``height`` x ``width`` frames moved by ``motion`` ``[n, 3]`` (as `warp_frames` reads it,
    turned as a pinhole camera of field of view ``fov`` where that is not 0) samples its frame: ``[n, H, W, 2]``,
    grid units."""
    tx, ty, log_zoom = motion.float().unbind(-1)
    inv, zero = torch.exp(-log_zoom), torch.zeros_like(tx)
    turn = tx if fov == 0 else zero   # a pinhole turn is applied after the zoom and the vertical move
    theta = torch.stack([torch.stack([inv, zero, -turn], -1), torch.stack([zero, inv, -ty], -1)], 1)
    grid = F.affine_grid(theta, [len(motion), 1, height, width], align_corners=False)
    return grid if fov == 0 else yaw_grid(grid, tx, fov)


def yaw_grid(grid: torch.Tensor, centre_shift: torch.Tensor, fov: float) -> torch.Tensor:
    """Sampling ``grid`` ``[n, H, W, 2]`` (grid units) followed by a pinhole camera's turn, for a view with a
    horizontal field of view ``fov`` degrees in (0, 180), that moves the content of the centre column right by
    ``centre_shift`` ``[n]`` grid units.

    A view column at ``x`` (grid units) looks along the ray at angle ``atan(x tan(fov / 2))``; the turn adds
    ``atan(centre_shift tan(fov / 2))`` to every ray's angle, and a ray turned toward the centre meets the view
    nearer the horizon by ``cos`` of the ray's angle over ``cos`` of the angle it came from. Each target pixel
    samples the source pixel its ray came from."""
    if not 0 < fov < 180:
        raise ValueError(f"a pinhole turn needs a field of view in (0, 180) degrees, got {fov}")
    t = math.tan(math.radians(fov) / 2)
    x, y = grid.unbind(-1)
    turn = torch.atan(centre_shift * t)[:, None, None]
    a = x * t
    source_x = torch.tan(torch.atan(a) - turn) / t
    source_y = y / (torch.cos(turn) + a * torch.sin(turn))
    return torch.stack([source_x, source_y], -1)


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

