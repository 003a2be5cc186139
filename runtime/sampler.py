"""Noise schedules and update rules for flow matching: x_t = (1 - t) x0 + t noise, v = noise - x0.

Euler integrates the ODE (many-step teachers). The consistency rule predicts x0 from the
velocity and re-noises to the next level with fresh noise (few-step students, as in DMD and
Self-Forcing). Either way a chunk is a list of levels from 1 down to 0; the first chunk may
take more steps than the rest.
"""

from __future__ import annotations

import torch

from runtime.config import SamplerConfig


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3/Wan warp t' = s t / (1 + (s - 1) t): s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def chunk_levels(cfg: SamplerConfig, chunk: int, steps: int | None = None) -> list[float]:
    """Noise levels for one chunk, from the first level down to a final 0.0 (``steps + 1`` values)."""
    if cfg.timesteps is not None and steps is None:
        levels = torch.tensor(sorted(cfg.timesteps, reverse=True), dtype=torch.float64)
    else:
        n = steps or (cfg.first_chunk_steps if chunk == 0 and cfg.first_chunk_steps else cfg.steps)
        levels = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
    levels = shift_timesteps(levels, cfg.shift) if cfg.shift != 1.0 else levels
    return [float(t) for t in levels] + [0.0]


def gaussian_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device and moved to ``x``'s: a run
    seeded by a CPU generator draws the same stream whether its model sits on a CPU or a GPU."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    return x_t - t * velocity


def step(kind: str, x_t: torch.Tensor, velocity: torch.Tensor, t: float, t_next: float,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One update from level ``t`` to ``t_next``."""
    if kind == "euler":
        return x_t + (t_next - t) * velocity
    if kind == "consistency":
        x0 = predict_x0(x_t, velocity, t)
        if t_next <= 0:
            return x0
        return (1 - t_next) * x0 + t_next * gaussian_like(x0, generator)
    raise ValueError(f"unknown sampler kind {kind!r}")
