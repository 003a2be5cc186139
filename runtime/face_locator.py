"""Where the faces are in a camera frame: a small CenterNet-style locator for the lip-sync apps.

The lip-sync student re-syncs one face crop framed like its training renders; a camera frame may
hold no face, two faces, or a face half out of the picture. The locator answers "how many faces,
where, how big" so the apps can act on each case (apps/lipsync.py, `FaceCropper`) instead of
re-syncing whatever lies in a fixed centre crop.

The frame is resized to ``size`` x ``size`` (aspect ignored: training stretches its composites the
same way); a conv tower of stride ``stride`` gives, per cell, a face-centre logit and the box of a
face centred there: the offset of the centre inside the cell and the log of the face crop's side
as a fraction of the frame's height (the crop framed as the renderer frames a face). Faces are the
cells that are the maximum of their 3x3 neighbourhood with a score above ``threshold``.

Trained here on synthetic composites of rendered faces (training/lipsync/face_locator.py); the
weights ship in ``models/face_locator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.small_nets import load_net_file


@dataclass
class FaceLocatorConfig:
    size: int = 64                          # the frame is resized to size x size
    channels: tuple[int, ...] = (16, 32, 48, 64)   # one stride-2 conv per entry until `stride` is reached
    stride: int = 4                         # cells of the output grid, in input pixels
    threshold: float = 0.4                  # a cell's face score above which it is a face

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.stride < 1 or self.stride & (self.stride - 1) or self.size % self.stride:
            raise ValueError(f"stride must be a power of two dividing size, got {self.stride} and {self.size}")
        if 2 ** len(self.channels) < self.stride:
            raise ValueError(f"{len(self.channels)} conv stages cannot reach stride {self.stride}")

    @property
    def grid(self) -> int:
        return self.size // self.stride


@dataclass
class FaceBox:
    """A face: centre (cx, cy) as fractions of the frame's width and height, side = the face crop's side
    as a fraction of the frame's height, and the locator's score."""

    cx: float
    cy: float
    side: float
    score: float

    def pixels(self, height: int, width: int) -> tuple[float, float, float]:
        """(centre x, centre y, side) in pixels of a height x width frame."""
        return self.cx * width, self.cy * height, self.side * height


class FaceLocator(nn.Module):
    def __init__(self, cfg: FaceLocatorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FaceLocatorConfig()
        layers, cin, stride = [], 3, 1
        for c in cfg.channels:
            s = 2 if stride < cfg.stride else 1
            stride *= s
            layers += [nn.Conv2d(cin, c, 3, s, 1), nn.GroupNorm(4, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(4, c), nn.SiLU()]
            cin = c
        self.tower = nn.Sequential(*layers)
        # The grid is coarse next to a face; two dilated convs let each cell see the whole face.
        self.context = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 2, dilation=2), nn.SiLU(),
                                     nn.Conv2d(cin, cin, 3, 1, 4, dilation=4), nn.SiLU())
        self.head = nn.Conv2d(cin, 4, 1)   # score logit, dx, dy (in cells), log side
        nn.init.constant_(self.head.bias[0], -4.0)   # most cells hold no face centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x float [B, 3, size, size] in [0, 1] -> [B, 4, grid, grid] (score logit, dx, dy, log side)."""
        h = self.tower(x * 2 - 1)
        return self.head(h + self.context(h))


def frame_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] (or one [H, W, 3]) -> float [B, 3, size, size] in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames[..., :3]))
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


def decode_faces(out: torch.Tensor, cfg: FaceLocatorConfig, max_faces: int = 8) -> list[list[FaceBox]]:
    """The faces of each frame from the locator's output [B, 4, g, g], best first."""
    score = torch.sigmoid(out[:, 0])
    peaks = score == F.max_pool2d(score[:, None], 3, 1, 1)[:, 0]
    g = cfg.grid
    result = []
    for b in range(out.shape[0]):
        ys, xs = torch.nonzero(peaks[b] & (score[b] > cfg.threshold), as_tuple=True)
        boxes = [FaceBox(cx=(float(x) + 0.5 + float(out[b, 1, y, x])) / g,
                         cy=(float(y) + 0.5 + float(out[b, 2, y, x])) / g,
                         side=math.exp(float(out[b, 3, y, x])), score=float(score[b, y, x]))
                 for y, x in zip(ys.tolist(), xs.tolist())]
        result.append(sorted(boxes, key=lambda f: -f.score)[:max_faces])
    return result


@torch.no_grad()
def find_faces(model: FaceLocator, frame: np.ndarray) -> list[FaceBox]:
    """The faces in one RGB uint8 frame [H, W, 3], best first."""
    return decode_faces(model(frame_tensor(frame, model.cfg.size)), model.cfg)[0]


def load_face_locator(path: str | Path) -> FaceLocator:
    """A trained locator: a run dir or bundle dir holding locator.pt, or the file itself."""
    d = load_net_file(path, "locator.pt", "face-locator", "face locator", "face-locator")
    model = FaceLocator(FaceLocatorConfig(**d["cfg"]))
    model.load_state_dict(d["model"])
    return model.eval()
