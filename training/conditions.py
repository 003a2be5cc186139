"""What a latent clip is conditioned on, frame by frame: actions, audio features, conditioning video.

A world model's clips carry one tensor of actions ``[..., F, A]``, and every training stage was
written for that. A lip-sync model's clips carry per-frame audio features ``[..., F, audio_dim]``
and channel-concatenated video latents ``[..., F, Cv, h, w]`` (the masked input frame and a
reference frame), and no actions. `FrameConditions` holds any of the three; the functions below
take either it or a bare action tensor, so the stages treat both alike and the world-model path
runs exactly the tensor operations it ran before.

"Unconditional" (classifier-free guidance, condition dropout) zeroes the actions and the audio
and keeps the video: the masked input frame is what is being edited, not a condition to drop,
as the input image of an inpainting model is not. Zero audio features are exactly silence
(`runtime.audio_features`), so the unconditional lip-sync model is "the face with its
mouth at rest", the analogue of the world model's "no key held".
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from runtime.rollout import ChunkCondition

FIELDS = ("action", "audio", "video")


@dataclass
class FrameConditions:
    """Per-frame conditions sharing their leading (row, or batch and frame) axes; absent ones are None."""

    action: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    video: torch.Tensor | None = None

    def __post_init__(self) -> None:
        present = [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None]
        if not present:
            raise ValueError("FrameConditions needs at least one of action, audio, video")

    def _map(self, fn) -> FrameConditions:
        return FrameConditions(*(None if v is None else fn(v) for v in (self.action, self.audio, self.video)))

    def __getitem__(self, index) -> FrameConditions:
        """The same rows / frames of every field (``cond[rows]``, ``cond[:, s:e]``)."""
        return self._map(lambda v: v[index])

    def float(self) -> FrameConditions:
        return self._map(lambda v: v.float())

    def to(self, *args, **kwargs) -> FrameConditions:
        return self._map(lambda v: v.to(*args, **kwargs))

    def __len__(self) -> int:
        return len(next(v for v in (self.action, self.audio, self.video) if v is not None))


Conditions = torch.Tensor | FrameConditions


def model_inputs(cond: Conditions | None) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of `CausalDiT.forward` for these conditions (a bare tensor: the actions)."""
    if cond is None or isinstance(cond, torch.Tensor):
        return {"action": cond}
    return {"action": cond.action, "audio": cond.audio, "video": cond.video}


def chunk_condition(cond: Conditions) -> ChunkCondition:
    """The runtime's per-chunk condition (`runtime.rollout.ChunkCondition`) holding the same tensors."""
    return ChunkCondition(**model_inputs(cond))


def null(cond: Conditions) -> Conditions:
    """The unconditional version: actions and audio zeroed, video kept (see the module docstring)."""
    if isinstance(cond, torch.Tensor):
        return torch.zeros_like(cond)
    return FrameConditions(_zeros(cond.action), _zeros(cond.audio), cond.video)


def _zeros(v: torch.Tensor | None) -> torch.Tensor | None:
    return None if v is None else torch.zeros_like(v)


def dropped(cond: Conditions, drop: torch.Tensor) -> Conditions:
    """Condition dropout: clip ``b`` becomes unconditional where ``drop`` (bool, ``B`` elements) is set."""
    unc = null(cond)
    if isinstance(cond, torch.Tensor):
        return torch.where(drop.view(-1, *[1] * (cond.ndim - 1)), unc, cond)
    def pick(c: torch.Tensor | None, u: torch.Tensor | None) -> torch.Tensor | None:
        return None if c is None else torch.where(drop.view(-1, *[1] * (c.ndim - 1)), u, c)

    return FrameConditions(pick(cond.action, unc.action), pick(cond.audio, unc.audio), cond.video)


def cat(parts: list[Conditions], dim: int) -> Conditions:
    """Concatenate conditions along ``dim`` (0: batch, 1: frames)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, dim)
    joined = [None if getattr(parts[0], n) is None else torch.cat([getattr(p, n) for p in parts], dim)
              for n in FIELDS]
    return FrameConditions(*joined)


def frame_count(cond: Conditions) -> int:
    """Frames of batched conditions ``[B, F, ...]``."""
    if isinstance(cond, torch.Tensor):
        return cond.shape[1]
    return next(v for v in (cond.action, cond.audio, cond.video) if v is not None).shape[1]
