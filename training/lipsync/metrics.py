"""Lip-sync metrics: mouth-parameter agreement and offset, SyncNet-style LSE-C / LSE-D, identity kept.

- `mouth_agreement`: Pearson correlation and mean absolute error of predicted mouth parameters
  (a probe reading generated frames) against the truth the driving audio implies, and the
  audio-visual offset: the lag in frames that maximises the correlation. Lag +k means the
  mouth shows at frame t what the truth had at frame t - k (the video is k frames late).
- `sync_scores`: Chung & Zisserman's SyncNet evaluation on our own embedding: for each offset
  in [-max_shift, max_shift] the mean over frames of the distance between the video window at
  t and the audio window at t + offset; LSE-D is the smallest mean distance, LSE-C the median
  minus the smallest (how clearly one offset wins), and the offset is where the minimum is,
  with the same sign as above (+k: the video is k frames late, its frame t matches audio t - k).
- `identity_scores`: PSNR and SSIM outside the mouth box against the input frames (a lip-sync
  model must keep the rest of the face and the background).
"""

from __future__ import annotations

import numpy as np
import torch

from training.metrics import PSNR_CAP, ssim_map


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two 1-D series; NaN when either is constant (correlation is undefined then)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson needs two equal 1-D series, got {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-12 else float("nan")


def _lagged(preds: list[np.ndarray], truths: list[np.ndarray], lag: int) -> tuple[np.ndarray, np.ndarray]:
    """All (pred[t], truth[t - lag]) pairs over the clips, stacked."""
    p, q = [], []
    for pr, tr in zip(preds, truths):
        n = min(len(pr), len(tr))
        if lag >= 0:
            p.append(pr[lag:n]), q.append(tr[: n - lag])
        else:
            p.append(pr[: n + lag]), q.append(tr[-lag:n])
    return np.concatenate(p), np.concatenate(q)


def mouth_agreement(preds: list[np.ndarray], truths: list[np.ndarray], names: tuple[str, ...] = ("open", "width",
                    "round"), max_lag: int = 5) -> dict:
    """Correlation / MAE per mouth parameter at lag 0 and the best lag (see module docstring).

    preds, truths: per clip, [T, P] arrays. The offset uses the mean correlation over the
    parameters that vary in the truth.
    """
    if len(preds) != len(truths) or not preds:
        raise ValueError(f"need the same non-zero number of predicted and true tracks, got {len(preds)}, "
                         f"{len(truths)}")
    p0, q0 = _lagged(preds, truths, 0)
    if p0.ndim != 2 or p0.shape[1] != len(names) or q0.shape != p0.shape:
        raise ValueError(f"tracks must be [T, {len(names)}], got {p0.shape} and {q0.shape}")
    corr = {n: pearson(p0[:, i], q0[:, i]) for i, n in enumerate(names)}
    varying = [i for i in range(len(names)) if q0[:, i].std() > 1e-6]
    by_lag = {}
    for lag in range(-max_lag, max_lag + 1):
        p, q = _lagged(preds, truths, lag)
        if len(p) > 2:
            by_lag[lag] = float(np.nanmean([pearson(p[:, i], q[:, i]) for i in varying])) if varying else float("nan")
    finite = {k: v for k, v in by_lag.items() if np.isfinite(v)}
    offset = max(finite, key=lambda k: (finite[k], -abs(k))) if finite else None
    return {
        "corr": {k: round(v, 4) for k, v in corr.items()},
        "corr_mean": round(float(np.nanmean([corr[names[i]] for i in varying])), 4) if varying else None,
        "mae": {n: round(float(np.abs(p0[:, i] - q0[:, i]).mean()), 4) for i, n in enumerate(names)},
        "offset_frames": offset,
        "corr_by_lag": {str(k): round(v, 4) for k, v in by_lag.items()},
        "frames": int(len(p0)),
    }


def sync_scores(video: torch.Tensor, audio: torch.Tensor, max_shift: int = 10) -> dict:
    """LSE-D, LSE-C and the offset of one clip from its window embeddings [T, D] (video and audio)."""
    if video.ndim != 2 or video.shape != audio.shape:
        raise ValueError(f"embeddings must both be [T, D], got {tuple(video.shape)} and {tuple(audio.shape)}")
    n = len(video)
    if n < 2:
        raise ValueError(f"a clip needs at least 2 windows for sync scores, got {n}")
    dist = torch.cdist(video.float(), audio.float())            # [t, t'] = |v_t - a_t'|
    shifts, means = [], []
    for off in range(-max_shift, max_shift + 1):
        d = torch.diagonal(dist, offset=off)                    # pairs (t, t + off)
        if len(d) >= max(2, n // 2):                            # enough overlap to be a fair mean
            shifts.append(off)
            means.append(float(d.mean()))
    m = np.array(means)
    best = int(np.argmin(m))
    return {"lse_d": float(m[best]), "lse_c": float(np.median(m) - m[best]), "offset": -shifts[best]}


def summarise_sync(per_clip: list[dict]) -> dict:
    """Means over clips, and the share of clips whose offset is within one frame of 0."""
    if not per_clip:
        raise ValueError("no clips to summarise")
    return {"lse_c": round(float(np.mean([c["lse_c"] for c in per_clip])), 4),
            "lse_d": round(float(np.mean([c["lse_d"] for c in per_clip])), 4),
            "offset_within_1": round(float(np.mean([abs(c["offset"]) <= 1 for c in per_clip])), 4),
            "clips": len(per_clip)}


def outside_box_mask(boxes: np.ndarray, size: tuple[int, int], margin: int = 0) -> torch.Tensor:
    """bool [T, H, W]: True outside each frame's box (y0, x0, y1, x1) grown by `margin`."""
    h, w = size
    boxes = np.asarray(boxes)
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    b = torch.as_tensor(boxes, dtype=torch.long)
    y0, x0, y1, x1 = (b[:, i, None, None] for i in range(4))
    inside = (ys >= y0 - margin) & (ys < y1 + margin) & (xs >= x0 - margin) & (xs < x1 + margin)
    return ~inside


def identity_scores(generated: np.ndarray, reference: np.ndarray, boxes: np.ndarray, window: int = 7) -> dict:
    """PSNR / SSIM outside the mouth box: generated vs reference uint8 [T, H, W, 3], boxes [T, 4]."""
    g, r = torch.as_tensor(np.asarray(generated)).float(), torch.as_tensor(np.asarray(reference)).float()
    if g.shape != r.shape or g.ndim != 4:
        raise ValueError(f"generated and reference frames must both be [T, H, W, 3], got {tuple(g.shape)}, "
                         f"{tuple(r.shape)}")
    if len(boxes) != len(g):
        raise ValueError(f"{len(boxes)} mouth boxes for {len(g)} frames")
    size = tuple(g.shape[1:3])
    mask = outside_box_mask(boxes, size)
    mse = ((g - r) ** 2).mean(-1)[mask].mean()
    psnr = float(min(PSNR_CAP, 10 * np.log10(255.0**2 / max(float(mse), 1e-12))))
    # An SSIM window counts only when it does not overlap the mouth box: position (i, j) of the
    # map is the window whose top-left pixel is (i, j).
    half = window // 2
    smap = ssim_map(g, r, window)
    smask = outside_box_mask(boxes, size, margin=half)[:, half:size[0] - half, half:size[1] - half]
    return {"psnr": round(psnr, 3), "ssim": round(float(smap[smask].mean()), 4),
            "masked_fraction": round(float(1 - mask.float().mean()), 4)}
