"""The one small interface every game engine adapter implements.

A world model only needs three things from an engine: a first frame for a seed, the next
frame for an action, and a description of the actions a human can take. Keeping the
interface this small is what lets `record`, the dataset and `eval world` treat ViZDoom and
Atari the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ActionSpec:
    """Plain description of an action space, convertible to `runtime.actions.ActionSpace`.

    keys: multi-hot action names; values: continuous action names (none for these engines);
    bindings: lowercase keyboard key name -> action key name. The encoded action vector is
    `[keys multi-hot..., values...]`, the layout `ActionSpace.encode` uses.
    """

    keys: list[str]
    values: list[str] = field(default_factory=list)
    bindings: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return len(self.keys) + len(self.values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ActionSpec:
        return cls(keys=list(d["keys"]), values=list(d.get("values", [])),
                   bindings=dict(d.get("bindings", {})))

    def vector(self, held: list[str] | tuple[str, ...]) -> np.ndarray:
        """Multi-hot float32 vector for a set of held key names (unknown names raise)."""
        v = np.zeros(self.dim, np.float32)
        for k in held:
            if k not in self.keys:
                raise ValueError(f"unknown action key {k!r}; expected one of {self.keys}")
            v[self.keys.index(k)] = 1.0
        return v

    def to_runtime(self):
        """The runtime's ActionSpace (imported lazily: it may not be available everywhere)."""
        from runtime.actions import ActionSpace

        return ActionSpace(keys=list(self.keys), values=list(self.values), bindings=dict(self.bindings))


class Env(Protocol):
    """reset(seed) -> frame uint8 [H, W, 3]; step(action vector) -> (frame, done)."""

    action_spec: ActionSpec
    fps: float
    size: tuple[int, int]

    def reset(self, seed: int) -> np.ndarray: ...

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]: ...

    def metadata(self) -> dict: ...

    def close(self) -> None: ...


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average resize of one uint8 [h, w, 3] frame to `size` (H, W), uint8 out.

    Done in torch (antialiased bilinear) so the data path needs no OpenCV.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [h, w, 3] frame, got {frame.dtype} {frame.shape}")
    if tuple(frame.shape[:2]) == tuple(size):
        return np.ascontiguousarray(frame)
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
