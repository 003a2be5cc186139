"""Training the face locator (runtime/face_locator.py) on composites of rendered faces.

No face dataset can be downloaded here, so the locator learns from the speaking faces the recorder
renders: each training image is a background (flat, gradient, smooth noise or stripes, with clutter
shapes and sensor noise) holding zero, one or two rendered faces at random sizes and places, some
of them half out of the picture, the whole image stretched to a random aspect as a camera frame
resized to a square would be. Each face is pasted through a soft ellipse so the locator learns
faces, not the square edges of the render. The truth of every composite is known, so the report
counts faces exactly (held-out identities, as the recorder's held-out split holds them).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.face_locator import FaceLocator, FaceLocatorConfig, decode_faces, frame_tensor
from training.checkpoint import save_checkpoint, train_resumable
from training.lipsync.record import load_clips


@dataclass
class CompositeConfig:
    size: int = 64                               # composite side, the locator's input size
    side_range: tuple[float, float] = (0.3, 0.95)   # a lone face's crop side, fraction of the height
    pair_side_range: tuple[float, float] = (0.25, 0.55)
    count_probs: tuple[float, float, float] = (0.25, 0.5, 0.25)   # P(0, 1, 2 faces)
    leaving: float = 0.2                         # P that a lone face is placed partly outside
    stretch: float = 0.3                         # aspect stretch, log-uniform in +-stretch


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s * 2 - 1
    kind = rng.integers(4)
    if kind == 0:
        mix = np.zeros((s, s), np.float32)
    elif kind == 1:
        a = rng.uniform(0, 2 * np.pi)
        mix = np.clip(0.5 + 0.5 * (np.cos(a) * x + np.sin(a) * y), 0, 1)
    elif kind == 2:
        coarse = torch.from_numpy(rng.uniform(0, 1, (1, 1, 4, 4)).astype(np.float32))
        mix = F.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False)[0, 0].clamp(0, 1).numpy()
    else:
        a, f = rng.uniform(0, np.pi), rng.uniform(2, 8)
        mix = 0.5 + 0.5 * np.sin(np.pi * f * (np.cos(a) * x + np.sin(a) * y))
    img = c0 * (1 - mix[..., None]) + c1 * mix[..., None]
    for _ in range(rng.integers(0, 5)):   # clutter: boxes and blobs that are not faces
        cx, cy, rx, ry = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4)
        inside = (np.abs(x - cx) < rx) & (np.abs(y - cy) < ry) if rng.random() < 0.5 else \
            ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        img[inside] = rng.uniform(0, 255, 3)
    return img.astype(np.float32)


def _ellipse_alpha(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (x + 0.5) / w * 2 - 1, (y + 0.5) / h * 2 - 1
    r = np.sqrt((u / 0.85) ** 2 + (v / 0.95) ** 2)
    return np.clip((1 - r) / 0.15, 0, 1)[..., None]


def _paste(img: np.ndarray, face: np.ndarray, cx: float, cy: float, side_h: int, side_w: int) -> None:
    import cv2

    patch = cv2.resize(face, (side_w, side_h), interpolation=cv2.INTER_AREA).astype(np.float32)
    alpha = _ellipse_alpha(side_h, side_w)
    s = img.shape[0]
    y0, x0 = int(round(cy - side_h / 2)), int(round(cx - side_w / 2))
    ys, xs = slice(max(y0, 0), min(y0 + side_h, s)), slice(max(x0, 0), min(x0 + side_w, s))
    py, px = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    if ys.stop > ys.start and xs.stop > xs.start:
        a = alpha[py, px]
        img[ys, xs] = img[ys, xs] * (1 - a) + patch[py, px] * a


def composite(faces: np.ndarray, rng: np.random.Generator, cfg: CompositeConfig) -> tuple[np.ndarray, list]:
    """One training image uint8 [size, size, 3] and its faces [(cx, cy, side)] as fractions (side of the height)."""
    s = cfg.size
    img = _background(rng, s)
    aspect = math.exp(rng.uniform(-cfg.stretch, cfg.stretch))   # width / height of a face on this image
    n = int(rng.choice(3, p=cfg.count_probs))
    boxes: list[tuple[float, float, float]] = []
    for _ in range(n):
        lo, hi = cfg.side_range if n == 1 else cfg.pair_side_range
        for _try in range(20):
            side = rng.uniform(lo, hi) * s
            sw = side * aspect
            if n == 1 and rng.random() < cfg.leaving:   # partly out: the centre near an edge, inside the image
                cx, cy = rng.uniform(0, s), rng.uniform(0, s)
                edge = rng.integers(4)
                near = rng.uniform(0, 0.35)
                if edge == 0:
                    cx = near * sw
                elif edge == 1:
                    cx = s - 1e-3 - near * sw
                elif edge == 2:
                    cy = near * side
                else:
                    cy = s - 1e-3 - near * side
            else:
                cx = rng.uniform(min(sw / 2, s / 2), max(s - sw / 2, s / 2))
                cy = rng.uniform(min(side / 2, s / 2), max(s - side / 2, s / 2))
            if all(math.hypot(cx - bx * s, cy - by * s) > 0.5 * (side + bs * s) for bx, by, bs in boxes):
                break
        else:
            continue
        _paste(img, faces[rng.integers(len(faces))], cx, cy, max(int(round(side)), 4), max(int(round(sw)), 4))
        boxes.append((cx / s, cy / s, side / s))
    img += rng.normal(0, rng.uniform(0, 8), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def targets(boxes: list[list], cfg: FaceLocatorConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(heat [B, g, g] with 1 at each centre cell and a Gaussian around it, regression [B, 3, g, g] (dx, dy,
    log side) and its mask [B, g, g]) for the faces of a batch."""
    g, b = cfg.grid, len(boxes)
    heat = torch.zeros(b, g, g)
    reg = torch.zeros(b, 3, g, g)
    mask = torch.zeros(b, g, g)
    yy, xx = torch.meshgrid(torch.arange(g) + 0.5, torch.arange(g) + 0.5, indexing="ij")
    for i, faces in enumerate(boxes):
        for cx, cy, side in faces:
            gx, gy = cx * g, cy * g
            ix, iy = min(int(gx), g - 1), min(int(gy), g - 1)
            sigma = 0.12 * side * g + 0.3
            heat[i] = torch.maximum(heat[i], torch.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma ** 2)))
            heat[i, iy, ix] = 1.0
            reg[i, :, iy, ix] = torch.tensor([gx - ix - 0.5, gy - iy - 0.5, math.log(side)])
            mask[i, iy, ix] = 1.0
    return heat, reg, mask


def locator_loss(out: torch.Tensor, heat: torch.Tensor, reg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on the centre scores plus L1 on the boxes at the centres."""
    p = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = -(pos * (1 - p) ** 2 * torch.log(p)).sum()
    neg_loss = -((1 - pos) * (1 - heat) ** 4 * p ** 2 * torch.log(1 - p)).sum()
    n = pos.sum().clamp(min=1)
    box = (F.l1_loss(out[:, 1:], reg, reduction="none").sum(1) * mask).sum() / n
    return (pos_loss + neg_loss) / n + box


def face_pool(data: str, every: int = 10, max_clips: int = 0) -> np.ndarray:
    """Every `every`-th rendered frame of a lip-sync recording: the faces composites are made of."""
    _, clips = load_clips(data, ("frames",), max_clips)
    return np.concatenate([c["frames"][::every] for c in clips])


def batch_of(faces: np.ndarray, n: int, rng: np.random.Generator, cfg: CompositeConfig) -> tuple[np.ndarray, list]:
    imgs, boxes = zip(*(composite(faces, rng, cfg) for _ in range(n)))
    return np.stack(imgs), list(boxes)


def locator_report(model: FaceLocator, faces: np.ndarray, images: int = 400, seed: int = 1234,
                   cfg: CompositeConfig | None = None) -> dict:
    """Count accuracy and box errors on `images` composites drawn with a fixed seed."""
    cfg = cfg or CompositeConfig(size=model.cfg.size)
    rng = np.random.default_rng(seed)
    imgs, truth = batch_of(faces, images, rng, cfg)
    model.eval()
    with torch.no_grad():
        found = decode_faces(model(frame_tensor(imgs, model.cfg.size)), model.cfg)
    by_count: dict[int, list[bool]] = {0: [], 1: [], 2: []}
    centre_err, side_err = [], []
    for t, f in zip(truth, found):
        by_count[len(t)].append(len(f) == len(t))
        for cx, cy, side in t:   # each true face against the nearest found one
            if f:
                best = min(f, key=lambda b: math.hypot(b.cx - cx, b.cy - cy))
                centre_err.append(math.hypot(best.cx - cx, best.cy - cy) / side)
                side_err.append(abs(math.log(best.side / side)))
    return {"images": images, "count_accuracy": float(np.mean([a for v in by_count.values() for a in v])),
            "count_accuracy_by_faces": {str(k): float(np.mean(v)) if v else None for k, v in by_count.items()},
            "centre_error_of_side_median": float(np.median(centre_err)) if centre_err else None,
            "side_log_error_median": float(np.median(side_err)) if side_err else None}


def train_face_locator(data: str, out: str, heldout: str | None = None, steps: int = 2000, batch: int = 32,
                       lr: float = 2e-3, seed: int = 0, ckpt_every_s: float = 120.0, max_clips: int = 0,
                       progress: bool = True, cfg: FaceLocatorConfig | None = None) -> dict:
    """Train on composites of `data`'s faces; report on composites of `heldout`'s (unseen identities)."""
    outp = Path(out)
    faces = face_pool(data, max_clips=max_clips)
    cfg = cfg or FaceLocatorConfig()
    comp = CompositeConfig(size=cfg.size)
    model = FaceLocator(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        # The composites' randomness comes from `gen`, so a resumed run continues the same stream.
        rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=gen)))
        imgs, boxes = batch_of(faces, batch, rng, comp)
        return locator_loss(model(frame_tensor(imgs, cfg.size)), *targets(boxes, cfg))

    run = train_resumable(outp, model, opt, gen, batch_loss, steps, "train face-locator", "face_locator/loss",
                          ckpt_every_s, progress)
    save_checkpoint(outp / "locator.pt", {"kind": "face-locator", "cfg": asdict(cfg), "model": model.state_dict()})
    result = {**run, "train": locator_report(model, faces, images=200)}
    if heldout:
        result["heldout"] = locator_report(model, face_pool(heldout))
    (outp / "locator.json").write_text(json.dumps(result, indent=2))
    return result
