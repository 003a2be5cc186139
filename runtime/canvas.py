"""The frames a stream has shown, kept on a canvas wider than the view, so texture that a turn
carries out of the view comes back when the view turns back.

A detail-carrying stream (`ConvAEConfig.refine_detail_sigma`) draws each new frame's fine texture
from the frame shown before, moved by the camera. Without a margin, whatever a turn pushes past the
edge is gone, and turning back shows the decode's smooth average where the real texture was. The
canvas keeps ``margin`` pixels on every side: the whole canvas moves with the camera, what leaves the
view stays on the margin, and ``known`` marks the canvas pixels that hold something shown (0 where
nothing ever was).

A game's view is a pinhole camera's, and a pinhole camera that turns does not translate its image:
the columns at the edges of a 90-degree view move about twice as far as the centre's, and a point
nearing the centre drifts toward the horizon (`forcekit eval camera` measures this on recorded turns).
Given the view's horizontal field of view (``fov``), the canvas is a cylinder around the camera
(`CylinderMap`), on which a turn is a shift of whole columns; the view is read off it and painted onto
it through fixed maps, fine enough that a still view is read back exactly as it was painted. With
``fov`` 0 the canvas is flat and a turn moves the view as a translation.

Nothing on the canvas is resampled with blur: a turn moves whole columns (its sub-pixel remainder
carried to the next frame, ``carry``), and the rest of a motion (a vertical translation, in whole
pixels with its own remainder, a zoom and a walking flow) moves the view read off the canvas, each
pixel from the nearest one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from runtime.warp import CameraMotion, warp_frames


@dataclass(frozen=True)
class CylinderMap:
    """Where a ``height`` x ``width`` view (horizontal field of view ``fov`` degrees, the centre on the optical
    axis) lies on a canvas around the camera, ``margin`` view pixels wider on every side at the centre.

    Canvas column ``a`` and row ``b`` (from the centre) of a view pixel ``u, v`` (from the centre) are
    ``a = f atan(u / f)`` and ``b = v cos(atan(u / f))`` for the focal length ``f`` in pixels, so a turn by
    ``d`` radians adds ``f d`` to every column; ``fov`` 0 is the flat limit (``a = u``, ``b = v``). The canvas
    holds ``scale`` pixels per unit of ``a`` and ``b``: enough that the view read off it is the view painted
    onto it."""

    height: int
    width: int
    margin: int
    fov: float

    @property
    def focal(self) -> float:
        """Focal length in view pixels (inf for a flat canvas)."""
        return math.inf if self.fov == 0 else (self.width / 2) / math.tan(math.radians(self.fov) / 2)

    @property
    def scale(self) -> int:
        """Canvas pixels per view pixel at the centre: the view's edge columns are ``1 + (width / 2f)^2`` times
        narrower on the cylinder than at the centre, and each needs a canvas pixel of its own."""
        return 1 if self.fov == 0 else math.ceil(1 + (self.width / (2 * self.focal)) ** 2)

    @property
    def half_extent(self) -> tuple[float, float]:
        """Half the canvas's width and height in canvas units (a, b)."""
        half_width = self.width / 2 if self.fov == 0 else self.focal * math.atan(self.width / (2 * self.focal))
        return math.ceil((half_width + self.margin) * self.scale) / self.scale, self.height / 2 + self.margin

    @property
    def size(self) -> tuple[int, int]:
        """Canvas height and width in pixels."""
        half_a, half_b = self.half_extent
        return round(2 * half_b * self.scale), round(2 * half_a * self.scale)

    def to_canvas(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas units (a, b) of view coordinates (pixels from the centre)."""
        if self.fov == 0:
            return u, v
        f = self.focal
        return f * torch.atan(u / f), v * f / torch.sqrt(u * u + f * f)

    def to_view(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """View coordinates (pixels from the centre) of canvas units (a, b)."""
        if self.fov == 0:
            return a, b
        angle = (a / self.focal).clamp(-1.5, 1.5)   # short of the sides, where a ray is parallel to the view
        return self.focal * torch.tan(angle), b / torch.cos(angle)

    def turn_columns(self, centre_shift: torch.Tensor) -> torch.Tensor:
        """Canvas pixels a turn moves every column by, for the turn that moves the view's centre column by
        ``centre_shift`` view pixels (right)."""
        if self.fov == 0:
            return centre_shift
        return self.focal * torch.atan(centre_shift / self.focal) * self.scale

    def canvas_index(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Flat index of the canvas pixel under each view coordinate (pixels from the centre); -1 off the canvas."""
        a, b = self.to_canvas(u, v)
        (half_a, half_b), (rows, cols) = self.half_extent, self.size
        col, row = ((a + half_a) * self.scale).floor().long(), ((b + half_b) * self.scale).floor().long()
        inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
        return torch.where(inside, row * cols + col, torch.full_like(col, -1))

    def pixel_centres(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """View coordinates (pixels from the centre) of every view pixel's centre, ``[height, width]`` each."""
        v, u = torch.meshgrid(torch.arange(self.height, device=device) + 0.5 - self.height / 2,
                              torch.arange(self.width, device=device) + 0.5 - self.width / 2, indexing="ij")
        return u, v

    def maps(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``read`` (per view pixel, the flat canvas index it is read from, ``[height * width]``) and ``painted``
        / ``painter`` (the flat canvas pixels inside the view and the flat view pixel each is painted from)."""
        return _maps(self, str(device))


@lru_cache(maxsize=16)
def _maps(grid: CylinderMap, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    read = grid.canvas_index(*grid.pixel_centres(device)).flatten()
    rows, cols = grid.size
    (half_a, half_b), s = grid.half_extent, grid.scale
    row, col = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    u, v = grid.to_view((col + 0.5) / s - half_a, (row + 0.5) / s - half_b)
    x, y = (u + grid.width / 2).floor().long(), (v + grid.height / 2).floor().long()
    inside = (x >= 0) & (x < grid.width) & (y >= 0) & (y < grid.height)
    painted, painter = (row * cols + col)[inside], (y * grid.width + x)[inside]
    source = torch.full((rows * cols,), -1, dtype=torch.long, device=device)
    source[painted] = painter                      # per canvas pixel, the view pixel painted there (-1: none)
    if not torch.equal(source[read.clamp(min=0)], torch.arange(read.numel(), device=device)):
        raise ValueError(f"a {grid.height}x{grid.width} view with a {grid.fov}-degree field of view does not read back "
                         f"off a canvas of {grid.scale} pixels per view pixel what was painted on it")
    return read, painted, painter


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, C, N]`` at ``index`` (``[M]`` or ``[n, M]``, -1: nothing there, 0) -> ``[n, C, M]``."""
    if index.dim() == 1:
        index = index[None].expand(x.shape[0], -1)
    picked = torch.gather(x, 2, index.clamp(min=0)[:, None].expand(-1, x.shape[1], -1))
    return picked * (index >= 0)[:, None].to(x.dtype)


def _shift_columns(x: torch.Tensor, columns: list[int], size: tuple[int, int]) -> torch.Tensor:
    """Canvases ``x`` ``[n, C, rows * cols]`` with each one's content ``columns[i]`` columns further right (0 where
    nothing moved in)."""
    rows, cols = size
    grid, out = x.view(*x.shape[:2], rows, cols), torch.zeros_like(x).view(*x.shape[:2], rows, cols)
    for i, k in enumerate(columns):
        if abs(k) >= cols:
            continue                                     # everything moved off the canvas
        if k >= 0:
            out[i, :, :, k:] = grid[i, :, :, :cols - k]
        else:
            out[i, :, :, :k] = grid[i, :, :, -k:]
    return out.flatten(2)


class ViewCanvas:
    """Shown frames ``[n, C, H, W]`` on a canvas ``margin`` pixels wider on every side, flat or, given the view's
    horizontal field of view ``fov`` in degrees, a cylinder around the camera (see the module doc)."""

    def __init__(self, view: torch.Tensor, margin: int, fov: float = 0.0) -> None:
        if margin < 0:
            raise ValueError(f"canvas margin must be >= 0 pixels, got {margin}")
        if not 0 <= fov < 180:
            raise ValueError(f"the view's field of view must be in [0, 180) degrees (0: flat), got {fov}")
        n, c, self.height, self.width = view.shape
        self.map = CylinderMap(self.height, self.width, margin, float(fov))
        self.read, self.painted, self.painter = self.map.maps(view.device)
        # the shown pixels and, as the last channel, where the canvas holds something shown (1) or nothing (0)
        self.layers = torch.zeros(n, c + 1, self.map.size[0] * self.map.size[1], device=view.device, dtype=view.dtype)
        # the turn's remainder not yet moved (canvas pixels) and the vertical translation's (view pixels)
        self.carry = torch.zeros(n, 2, device=view.device)
        self.paint(view)

    def move(self, motion: CameraMotion) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the canvas by one frame's ``motion`` (of the view). Returns what now lies in the view and where
        it holds something shown (``[n, 1, H, W]``, 0 where it is new)."""
        h, w = self.height, self.width
        shift = motion.shift.float()
        travelled = self.carry + torch.stack([self.map.turn_columns(shift[:, 0] * w / 2), shift[:, 1] * h / 2], 1)
        whole = travelled.round()
        self.carry = travelled - whole
        self.layers = _shift_columns(self.layers, whole[:, 0].long().tolist(), self.map.size)
        both = self._read()
        rest = torch.cat([torch.zeros_like(shift[:, :1]), whole[:, 1:] / (h / 2), shift[:, 2:]], 1)
        if motion.flow is not None or bool(rest.ne(0).any()):
            # one nearest move of pixels and mask; past the view's edge it brings nothing shown in (zeros)
            flow = None if motion.flow is None else motion.flow[:, None]
            both = warp_frames(both[:, None], rest[:, None], flow, "nearest", padding="zeros")[:, 0]
        return both[:, :-1], both[:, -1:]

    def paint(self, view: torch.Tensor) -> None:
        """Put the frame just shown into the view (what `move` and `view` returned are copies and stay as they were)."""
        self.layers[:, :-1, self.painted] = view.flatten(2)[:, :, self.painter].to(self.layers.dtype)
        self.layers[:, -1, self.painted] = 1

    def _read(self) -> torch.Tensor:
        """The view's pixels and mask ``[n, C + 1, H, W]`` read off the canvas."""
        return _gather(self.layers, self.read).view(-1, self.layers.shape[1], self.height, self.width)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What lies in the view now and where it holds something shown, without moving."""
        both = self._read()
        return both[:, :-1], both[:, -1:]

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.layers, self.carry))
