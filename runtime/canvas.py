"""The frames a stream has shown, kept on a canvas wider than the view, so texture that a turn
carries out of the view comes back when the view turns back.

A detail-carrying stream (`ConvAEConfig.refine_detail_sigma`) draws each new frame's fine texture
from the frame shown before, moved by the camera. Without a margin, whatever a turn pushes past the
edge is gone, and turning back shows the decode's smooth average where the real texture was. The
canvas keeps ``margin`` pixels on every side: the whole canvas moves with the camera, what leaves the
view stays on the margin, and ``known`` marks the canvas pixels that hold something shown (0 where
nothing ever was).

The canvas moves without resampling blur (`runtime.warp.whole_pixel_move`): whole pixels, the translation's
sub-pixel remainder carried to the next frame (``carry``), a walking flow at the nearest pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.warp import CameraMotion, warp_frames, whole_pixel_move


def widen_motion(motion: CameraMotion, view: tuple[int, int], margin: int) -> CameraMotion:
    """``motion`` of a ``view`` (height, width) restated for the canvas ``margin`` pixels wider on each side:
    the same pixels a frame. Grid units scale with the size (2 = the whole width), the zoom is about the same
    centre, and a flow is resized to the view and extended over the margin by its edge values."""
    h, w = view
    scale = torch.tensor([w / (w + 2 * margin), h / (h + 2 * margin)], device=motion.shift.device)
    shift = torch.cat([motion.shift[:, :2].float() * scale, motion.shift[:, 2:].float()], 1)
    flow = motion.flow
    if flow is not None:
        flow = F.interpolate(flow.float(), size=(h, w), mode="bilinear", align_corners=False)
        flow = F.pad(flow, (margin, margin, margin, margin), mode="replicate") * scale.view(1, 2, 1, 1)
    return CameraMotion(shift, flow)


class ViewCanvas:
    """Shown frames ``[n, C, H, W]`` on a canvas ``margin`` pixels wider on every side (see the module doc)."""

    def __init__(self, view: torch.Tensor, margin: int) -> None:
        if margin < 0:
            raise ValueError(f"canvas margin must be >= 0 pixels, got {margin}")
        n, _, self.height, self.width = view.shape
        self.margin = margin
        self.pixels = F.pad(view, (margin,) * 4)
        self.known = F.pad(torch.ones_like(view[:, :1]), (margin,) * 4)
        self.carry = torch.zeros(n, 2, device=view.device)   # the sub-pixel part of the motion not yet moved

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        return x[..., m:m + self.height, m:m + self.width]

    def move(self, motion: CameraMotion) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the canvas by one frame's ``motion`` (of the view). Returns what now lies in the view and where
        it holds something shown (``[n, 1, H, W]``, 0 where it is new)."""
        wide = widen_motion(motion, (self.height, self.width), self.margin)
        shift, flow, self.carry = whole_pixel_move(wide, self.carry, self.pixels.shape[-2:])
        both = torch.cat([self.pixels, self.known.to(self.pixels.dtype)], 1)
        # one nearest move of pixels and mask: past the canvas's edge both are 0, nothing shown
        moved = warp_frames(both[:, None], shift, flow, "nearest", padding="zeros")[:, 0]
        self.pixels, self.known = moved[:, :-1], moved[:, -1:]
        return self._view(self.pixels), self._view(self.known)

    def paint(self, view: torch.Tensor) -> None:
        """Put the frame just shown into the view (on new tensors: what `move` returned stays as it was)."""
        self.pixels, self.known = self.pixels.clone(), self.known.clone()
        self._view(self.pixels).copy_(view)
        self._view(self.known).fill_(1)

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pixels, self.known, self.carry))
