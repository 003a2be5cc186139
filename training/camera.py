"""Measure how each key moves the view: the camera motion a `camera_warp` model applies to its stacked frames.

For every key, the frames where it alone was held are compared with the frame before them,
shifted by whole latent pixels (so no resampling blur favours any shift); the shift with the
lowest error in the part of the frame every shift covers, refined by a parabola through its
neighbours, is the key's translation per frame (sideways first, then up or down on the view
already moved sideways). Zoom (walking forward) is left at 0: a zoom
must be resampled, and its blur would decide the fit. The transformer learns the rest.

`measure_turns` (`forcekit eval camera`) asks what a turn is, on the recorded frames: a translation, or
a pinhole camera's yaw (the view's edges moving faster than its centre) and for which field of view,
the geometry a detail-carrying stream turns its canvas by (`ConvAEConfig.refine_detail_fov`).
"""

from __future__ import annotations

import torch

from runtime.warp import motion_grid, warp_frames
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
    """Per-key motion ``[action_dim, 3]`` (`runtime.warp.warp_frames` units) and a report per key:
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


def _pixel_flow(prev: torch.Tensor, cur: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Per-pixel move ``[2, H, W]`` (right, down; pixels) from frames ``[N, H, W, 3]``: for each pixel, the
    whole-pixel shift of ``prev`` (edges repeated, no wrap-around) with the lowest squared error over all frames."""
    x, y = prev.permute(0, 3, 1, 2).float(), cur.permute(0, 3, 1, 2).float()
    h, w = y.shape[-2:]
    m = max_shift
    padded = torch.nn.functional.pad(x, (m, m, m, m), mode="replicate")
    shifts = [(dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)]
    err = torch.stack([(padded[..., m - dy:m - dy + h, m - dx:m - dx + w] - y).pow(2).sum((0, 1))
                       for dy, dx in shifts])
    size = torch.tensor([abs(dy) + abs(dx) for dy, dx in shifts], dtype=torch.float32)[:, None, None]
    err = err * (1 + 1e-6 * size)   # ties (an edge, where repeated pixels match a shift too) go to the smaller move
    best = torch.tensor(shifts, dtype=torch.float32)[err.argmin(0)]    # [H, W, 2] (down, right)
    return best.permute(2, 0, 1).flip(0)


def calibrate_camera_flow(clips: LatentClips, codec, action_dim: int, motion: torch.Tensor, max_shift: int = 4,
                          frames: int = 512, min_frames: int = 32, min_speed: float = 0.7, seed: int = 0,
                          gains: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5)
                          ) -> tuple[torch.Tensor, dict]:
    """Per-key flow ``[action_dim, 2, h, w]`` (`runtime.warp.warp_frames` units per unit of the key's running
    average) for a `camera_flow` model, and a report per key.

    ``clips`` hold the keys and their running averages (`LatentClips.with_momentum`). For each key whose
    held-key translation (``motion``, `calibrate_camera_motion`) is nothing, the frames where its average is
    at least ``min_speed`` and every other key's is below 0.1 are decoded, and each pixel's whole-pixel move
    is found by block matching in the frames themselves: at a latent pixel of 4x4 pixels, walking moves most
    of the view by less than one latent pixel, so shifts of whole latent pixels see almost none of it, and a
    resampled latent would blur. The pixel moves, averaged over each latent pixel and divided by the mean
    average of the frames used, give the flow's shape. Its gain is the one of ``gains`` under which the
    latents warped as the model warps them (bilinear), decoded, move as the real frames do, by the same
    block matching: not the gain that brings the warped latents closest to the next ones, because a
    bilinear move blurs, a blur lowers that error too, and the closest warp moved the decoded view forward
    by nothing at all (docs/world_controls.md, fourth sitting)."""
    if not isinstance(clips.cond, torch.Tensor) or clips.cond.shape[-1] != 2 * action_dim:
        raise ValueError("flow calibration needs clips with the keys' running averages (LatentClips.with_momentum)")
    speeds = clips.cond[:, action_dim:]
    rows = torch.tensor([r + i for r, n, _ in clips.episodes for i in range(1, n)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    h, w = clips.latents.shape[-2:]
    flow = torch.zeros(action_dim, 2, h, w)
    report = {}
    for a in range(action_dim):
        if bool(motion[a, :2].abs().gt(0.25 * 2 / min(h, w)).any()):   # the key's translation moves the view
            report[a] = {"frames": 0, "note": "moved by its translation"}
            continue
        others = torch.cat([speeds[rows, :a], speeds[rows, a + 1:]], 1)
        fast = rows[(speeds[rows, a] >= min_speed) & (others < 0.1).all(1)]
        if len(fast) < min_frames:
            report[a] = {"frames": int(len(fast))}
            continue
        pick = fast[torch.randperm(len(fast), generator=gen)[:frames]]
        with torch.no_grad():
            prev, cur = (torch.cat([codec.decode(clips.latents[p].float()) for p in part.split(128)])
                         for part in (pick - 1, pick))
        pixels = _pixel_flow(prev, cur, max_shift)                         # [2, H, W] pixels
        stride_y, stride_x = prev.shape[1] // h, prev.shape[2] // w
        strides = torch.tensor([stride_x, stride_y], dtype=torch.float32)[:, None, None]
        latent = torch.nn.functional.avg_pool2d(pixels[None], (stride_y, stride_x))[0] / strides
        speed = float(speeds[pick, a].mean())
        shape = torch.stack([latent[0] * 2 / w, latent[1] * 2 / h]) / speed
        before, after = clips.latents[pick - 1].float()[:, None], clips.latents[pick].float()[:, None]
        unit = speeds[pick, a][:, None, None, None, None] * shape   # [N, 1, 2, h, w]
        mismatch, latent_mse = [], []
        for g in gains:
            warped = warp_frames(before, torch.zeros(len(pick), 1, 3), g * unit)[:, 0]
            with torch.no_grad():
                decoded = torch.cat([codec.decode(x) for x in warped.split(128)])
            moved = torch.nn.functional.avg_pool2d(_pixel_flow(prev, decoded, max_shift)[None], (stride_y, stride_x))[0]
            mismatch.append(float((moved / strides - latent).pow(2).mean()))
            latent_mse.append(float((warped - after[:, 0]).pow(2).mean()))
        best = min(range(len(gains)), key=mismatch.__getitem__)
        flow[a] = gains[best] * shape
        rows_down = gains[best] * latent[1].mean(1)   # latent pixels per frame, per row: floor and ceiling
        report[a] = {"frames": int(len(pick)), "mean_speed": round(speed, 3), "gain": gains[best],
                     "copy_mse": round(float((before - after).pow(2).mean()), 4),
                     "warped_mse": round(latent_mse[best], 4), "move_mismatch": round(mismatch[best], 4),
                     "down_px_top_row": round(float(rows_down[0]), 2),
                     "down_px_bottom_row": round(float(rows_down[-1]), 2)}
    return flow, report


def _moved_error(prev: torch.Tensor, cur: torch.Tensor, fov: float, centre_shift: float) -> float:
    """Mean squared error (pixel values 0-255) of ``cur`` ``[N, 3, H, W]`` against ``prev`` turned as a camera of
    horizontal field of view ``fov`` (0: a translation) turns when its centre column moves ``centre_shift`` pixels
    right (`runtime.warp.motion_grid`, the camera warp's own geometry; bilinear: a fit, not a stream), where the turn
    brings ``prev``'s pixels."""
    h, w = prev.shape[-2:]
    sample = motion_grid(torch.tensor([[2 * centre_shift / w, 0.0, 0.0]]), h, w, fov)[0]
    inside = sample.abs().le(1 - 1 / min(h, w)).all(-1)
    moved = torch.nn.functional.grid_sample(prev, sample[None].expand(len(prev), -1, -1, -1), align_corners=False)
    return float((moved - cur).pow(2).mean(1)[:, inside].mean())


def measure_turns(frames: torch.Tensor, actions: torch.Tensor, lengths: list[int], keys: list[str],
                  fovs: tuple[float, ...] = (0.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0), max_shift: float = 8.0,
                  pairs: int = 400, min_pairs: int = 32, seed: int = 0) -> dict:
    """How a held key turns the recorded view (`forcekit eval camera`): for each key, the frame pairs where it alone
    was held into the frame and the frame before (a steady turn), and for each horizontal field of view in ``fovs``
    (0: the view translates) the centre column's shift per frame that best maps one frame onto the next and its
    error (the smallest of ``fovs``, 0 for a translation, decides which keys turn: its best shift must move the view
    a pixel a frame).
    ``frames`` uint8 ``[N, H, W, 3]``, ``actions`` ``[N, D]`` (row t produced frame t + 1 of its episode, as
    `training.data.ClipDataset.all_actions` gives them), ``lengths`` the episodes' in order. ``fov`` is the field of
    view with the lowest error summed over the keys that turn."""
    held = actions[:, :len(keys)] > 0.5
    firsts, row = [], 0
    for n in lengths:
        firsts.extend(range(row + 1, row + n - 1))      # t with frames t - 1, t, t + 1 in one episode
        row += n
    rows = torch.tensor(firsts, dtype=torch.long)
    alone = held.sum(1) == 1
    gen = torch.Generator().manual_seed(seed)
    steps = torch.arange(-max_shift, max_shift + 1e-6, 0.25).tolist()
    report, turning = {}, []
    for k, name in enumerate(keys):
        steady = rows[(held[rows, k] & alone[rows] & held[rows - 1, k] & alone[rows - 1])]
        if len(steady) < min_pairs:
            report[name] = {"pairs": int(len(steady))}
            continue
        pick = steady[torch.randperm(len(steady), generator=gen)[:pairs]]
        prev = frames[pick].permute(0, 3, 1, 2).float()
        cur = frames[pick + 1].permute(0, 3, 1, 2).float()
        fits = {}
        for fov in fovs:
            errors = [_moved_error(prev, cur, fov, s) for s in steps]
            best = min(range(len(steps)), key=errors.__getitem__)
            fits[fov] = {"centre_shift_px": steps[best], "mse": round(errors[best], 2)}
        report[name] = {"pairs": int(len(pick)), "copy_mse": round(float((prev - cur).pow(2).mean()), 2),
                        "fits": {str(f): v for f, v in fits.items()},
                        "best_fov": min(fovs, key=lambda f: fits[f]["mse"])}
        if abs(fits[min(fovs)]["centre_shift_px"]) >= 1:
            turning.append(fits)
    fov = min(fovs, key=lambda f: sum(fits[f]["mse"] for fits in turning)) if turning else None
    return {"keys": report, "fov": fov, "turning_keys": len(turning)}
