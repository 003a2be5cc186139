"""Measure how each key moves the view: the camera motion a `camera_warp` model applies to its stacked frames.

For every key, the frames where it alone was held are compared with the frame before them,
shifted by whole latent pixels (so no resampling blur favours any shift); the shift with the
lowest error in the part of the frame every shift covers, refined by a parabola through its
neighbours, is the key's translation per frame (sideways first, then up or down on the view
already moved sideways). Zoom (walking forward) is left at 0: a zoom
must be resampled, and its blur would decide the fit. The transformer learns the rest.
"""

from __future__ import annotations

import torch

from training.latents import LatentClips


def _shift_errors(prev: torch.Tensor, cur: torch.Tensor, dim: int, max_shift: int) -> torch.Tensor:
    """Mean squared error of ``cur`` against ``prev`` rolled by -max..max along ``dim``, on the interior."""
    n = cur.shape[dim]
    interior = slice(max_shift, n - max_shift)
    index = [slice(None)] * cur.ndim
    index[dim] = interior
    return torch.stack([(torch.roll(prev, s, dim)[tuple(index)] - cur[tuple(index)]).pow(2).mean()
                        for s in range(-max_shift, max_shift + 1)])


def _argmin_subpixel(err: torch.Tensor, max_shift: int) -> float:
    i = int(err.argmin())
    if 0 < i < len(err) - 1:
        left, mid, right = (float(v) for v in err[i - 1:i + 2])
        curvature = left - 2 * mid + right
        delta = 0.5 * (left - right) / curvature if curvature > 0 else 0.0
        return i - max_shift + max(-0.5, min(0.5, delta))
    return float(i - max_shift)


def calibrate_camera_motion(clips: LatentClips, action_dim: int, max_shift: int = 3, frames: int = 1024,
                            min_frames: int = 32, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Per-key motion ``[action_dim, 3]`` (`runtime.model.warp_frames` units) and a report per key:
    the frames used, the translation in latent pixels, and the error of copy and of the shifted copy."""
    if not isinstance(clips.cond, torch.Tensor):
        raise ValueError("camera calibration needs action-conditioned clips")
    actions = clips.cond[:, :action_dim]   # the held keys (not an action_momentum average after them)
    rows = torch.tensor([r + i for r, n, _ in clips.episodes for i in range(1, n)], dtype=torch.long)
    held = actions[rows]
    gen = torch.Generator().manual_seed(seed)
    motion = torch.zeros(action_dim, 3)
    report = {}
    h, w = clips.latents.shape[-2:]
    for a in range(action_dim):
        alone = rows[(held[:, a] > 0.5) & ((held > 0.5).sum(1) == 1)]
        if len(alone) < min_frames:
            report[a] = {"frames": int(len(alone))}
            continue
        pick = alone[torch.randperm(len(alone), generator=gen)[:frames]]
        cur, prev = clips.latents[pick].float(), clips.latents[pick - 1].float()
        ex = _shift_errors(prev, cur, -1, max_shift)
        dx = _argmin_subpixel(ex, max_shift)
        inner = slice(max_shift, w - max_shift)   # the vertical fit, on the view already moved sideways
        ey = _shift_errors(torch.roll(prev, round(dx), -1)[..., inner], cur[..., inner], -2, max_shift)
        dy = _argmin_subpixel(ey, max_shift)
        motion[a, 0], motion[a, 1] = 2 * dx / w, 2 * dy / h
        report[a] = {"frames": int(len(pick)), "right_px": round(dx, 3), "down_px": round(dy, 3),
                     "copy_mse": round(float(ex[max_shift]), 4), "shifted_mse": round(float(ex.min()), 4)}
    return motion, report
