"""3D rotary position embedding (frame, row, column), computed on the fly.

The head dimension splits as in Wan: ``h = w = 2 * (D // 6)`` channels for rows and columns
and the rest for frames; each pair of channels ``(2i, 2i+1)`` turns by ``position * freq_i``.
Angles are computed in float64 from integer positions, so frame 1,000,000 is as exact as
frame 0: no table, nothing to run out during a long rollout.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _inv_freq(dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device)[: dim // 2] / dim))


def rope_angles(frame_positions: torch.Tensor, height: int, width: int, head_dim: int,
                theta: float = 10000.0) -> torch.Tensor:
    """float64 ``[F * height * width, head_dim // 2]`` rotation angles, frame-major token order."""
    device = frame_positions.device
    dt, dh, dw = axis_dims(head_dim)
    nf = frame_positions.numel()
    f = frame_positions.to(torch.float64)[:, None] * _inv_freq(dt, theta, device)
    h = torch.arange(height, dtype=torch.float64, device=device)[:, None] * _inv_freq(dh, theta, device)
    w = torch.arange(width, dtype=torch.float64, device=device)[:, None] * _inv_freq(dw, theta, device)
    grid = torch.cat([
        f[:, None, None, :].expand(nf, height, width, -1),
        h[None, :, None, :].expand(nf, height, width, -1),
        w[None, None, :, :].expand(nf, height, width, -1),
    ], dim=-1)
    return grid.reshape(nf * height * width, -1)


def rope_cos_sin(angles: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, N, H, D]`` by per-token angles (``cos``/``sin`` ``[N, D // 2]``)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)
