"""Frame stacking: the clean latents of the previous frames on each frame's channel axis.

A world model that sees the last frame next to the one it denoises can make "copy it, moved
by the key" a local operation for every token (DIAMOND and GameNGen stack their context this
way) instead of something attention must learn to route. ``ModelConfig.stack_frames = k``
gives every frame the clean latents of k earlier frames, newest first, after its own channels.

Which frames are "previous" follows the causal rule of the runtime, so that training and a
session agree: a committed (clean) frame f sees frames f-1 .. f-k; a frame being denoised in
a chunk that starts at frame s sees s-1 .. s-k, the newest frames the context holds. For
frame-wise chunks the two coincide. Frames before the first are zeros: a session's first
frame has no past.
"""

from __future__ import annotations

import torch

from runtime.chunks import ChunkPattern
from runtime.sampler import gaussian_like


def previous_frames(clean: torch.Tensor, k: int, before: torch.Tensor | None = None) -> torch.Tensor:
    """Clean latents ``[B, F, C, H, W]`` -> ``[B, F, k*C, H, W]``: frame f gets frames f-1, ..., f-k.

    ``before`` ``[B, j, C, H, W]`` holds the frames just before ``clean`` (oldest first); what it
    does not cover is zeros.
    """
    b, f = clean.shape[:2]
    pad = clean.new_zeros((b, k, *clean.shape[2:]))
    if before is not None and before.shape[1]:
        pad = torch.cat([pad, before], 1)[:, -k:]
    seq = torch.cat([pad, clean], 1)  # seq[:, j] is frame j - k
    return torch.cat([seq[:, k - i:k - i + f] for i in range(1, k + 1)], dim=2)


def next_previous(recent: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, 1, k*C, H, W]``: the previous frames of the frame right after ``recent`` ``[B, >=k, C, H, W]``
    (oldest first), i.e. what a chunk that starts there sees while it is denoised."""
    return recent[:, -k:].flip(1).flatten(1, 2).unsqueeze(1)


def chunk_previous(previous: torch.Tensor, pattern: ChunkPattern) -> torch.Tensor:
    """Each frame's own previous frames ``[B, F, k*C, H, W]`` (`previous_frames`) -> what the frames see
    while they are denoised: frame f in the chunk starting at s gets those of frame s."""
    chunk = pattern.chunk_index(previous.shape[1])
    starts = torch.tensor([pattern.chunk_start(int(c)) for c in chunk], device=previous.device)
    return previous[:, starts]


def with_noise(previous: torch.Tensor, level: float | torch.Tensor, noise: torch.Tensor, form: str = "mix"
               ) -> torch.Tensor:
    """``previous`` with ``noise`` at ``level`` (`ModelConfig.stack_noise_form`): "mix" ``(1 - l) x + l n``,
    "add" ``x + l n``, whose mean is the frame itself, so nothing is learnt that scales the frame up."""
    if form == "add":
        return previous + level * noise
    if form == "mix":
        return (1 - level) * previous + level * noise
    raise ValueError(f"unknown stack noise form {form!r}")


def noised_at(previous: torch.Tensor, level: float, generator: torch.Generator | None, form: str = "mix"
              ) -> torch.Tensor:
    """Inference-time noise on the stacked frames at one fixed ``level`` (GameNGen): a model fed
    back its own frames amplifies its small errors frame after frame; a little noise on what it
    copies from (which training taught it to see through) keeps a long rollout from running away."""
    if level <= 0:
        return previous
    return with_noise(previous, level, gaussian_like(previous, generator), form)


def noised(previous: torch.Tensor, max_level: float, generator: torch.Generator, form: str = "mix"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time noise augmentation of the stacked frames (GameNGen): each clip's previous
    frames mixed with noise at a random level in [0, max_level], so copying the past is not
    enough and the model must read the action; at inference the previous frames are the
    model's own, imperfect outputs, which this also prepares it for.

    Returns the noised frames and each clip's level ``[B]`` (what a ``stack_noise_condition`` model is told).
    """
    b = previous.shape[0]
    level = (max(max_level, 0.0) * torch.rand(b, generator=generator)).to(previous)
    noise = torch.randn(previous.shape, generator=generator).to(previous)
    return with_noise(previous, level.view(b, *[1] * (previous.ndim - 1)), noise, form), level
