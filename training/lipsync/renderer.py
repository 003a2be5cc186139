"""A procedural speaking face, in numpy: every frame's mouth, head pose and identity are known.

Why procedural: no face data set can be downloaded here, and a lip-sync model is only
measurable against the truth if the truth exists. The renderer draws a face from a handful of
soft-edged shapes (anti-aliased through a first-order signed distance, so a mouth parameter
changes pixels smoothly) in "face coordinates": the head's pose (translation, roll, scale, a
small yaw that slides the features across the face) is an affine map from the image to these
coordinates. The body moves with half the head's translation, the background never moves.

The mouth has three parameters in [0, 1]: `open` (jaw drop), `width` (spread, as in "ee") and
`round` (rounding / protrusion, as in "oo"). It is drawn last but for the hair fringe and
glasses, both of which stay above it, so changing the mouth changes only the pixels inside
`mouth_box`, the bounding box of the largest mouth this identity can make at the frame's pose.
The tests check exactly that; the identity metric uses the same box as its mask.

Everything is deterministic given the seed: `FaceIdentity.sample(seed)`, `head_motion` and
`blink_track` draw from `numpy.random.default_rng(seed)` only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MOUTH_PARAMS = ("open", "width", "round")
POSE_PARAMS = ("tx", "ty", "roll", "scale", "yaw")   # image units (x, y in [-1, 1]), radians, factor, face units

SKIN_LIGHT = np.array([250, 222, 196], np.float32)
SKIN_DARK = np.array([84, 52, 36], np.float32)
HAIR_COLOURS = np.array([[20, 16, 14], [60, 38, 24], [110, 72, 40], [200, 160, 90], [150, 60, 30],
                         [160, 160, 160], [90, 90, 100]], np.float32)
EYE_COLOURS = np.array([[60, 40, 25], [40, 90, 140], [70, 110, 60], [100, 80, 50]], np.float32)
HAIR_STYLES = ("bald", "short", "fringe", "long")
BACKGROUNDS = ("flat", "gradient", "stripes", "blobs")


@dataclass
class RenderConfig:
    """size: (H, W) of the face crop; motion / blinks scale the head motion and blink rate."""

    size: tuple[int, int] = (96, 96)
    motion: float = 1.0            # 0: a still head; 1: a few pixels and degrees at 96x96
    blink_rate_hz: float = 0.3     # mean blinks per second

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)
        if len(self.size) != 2 or min(self.size) < 16:
            raise ValueError(f"render size must be (H, W) with both >= 16, got {self.size}")


@dataclass
class FaceIdentity:
    """Everything about a person and their surroundings that stays fixed over a clip."""

    seed: int
    skin: list[float]              # RGB
    face_width: float              # half-width in face units (the crop is [-1, 1])
    face_height: float
    jaw: float                     # superellipse exponent: 2 round, ~3 square
    hair_style: str
    hair: list[float]
    hairline: float                # face-unit height of the hairline (more negative: higher forehead)
    eye: list[float]
    eye_spacing: float
    lips: list[float]
    mouth_half_width: float
    lip_thickness: float
    mouth_max_open: float
    glasses: bool
    glasses_colour: list[float]
    shirt: list[float]
    background: str
    bg_colours: list[list[float]]
    bg_seed: int
    light: list[float]             # (ambient, strength, direction x, direction y)

    @classmethod
    def sample(cls, seed: int) -> FaceIdentity:
        rng = np.random.default_rng([0x1D, int(seed)])
        tone = rng.uniform(0, 1)
        skin = (1 - tone) * SKIN_LIGHT + tone * SKIN_DARK + rng.normal(0, 6, 3)
        hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.normal(0, 8, 3)
        lips = skin * np.array([0.78, 0.52, 0.52]) + np.array([30, 0, 5]) + rng.normal(0, 5, 3)
        return cls(
            seed=int(seed), skin=_col(skin), face_width=float(rng.uniform(0.44, 0.56)),
            face_height=float(rng.uniform(0.58, 0.68)), jaw=float(rng.uniform(2.0, 3.2)),
            hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))], hair=_col(hair),
            hairline=float(rng.uniform(-0.42, -0.28)),
            eye=_col(EYE_COLOURS[rng.integers(len(EYE_COLOURS))]), eye_spacing=float(rng.uniform(0.17, 0.22)),
            lips=_col(lips), mouth_half_width=float(rng.uniform(0.14, 0.18)),
            lip_thickness=float(rng.uniform(0.022, 0.034)), mouth_max_open=float(rng.uniform(0.13, 0.17)),
            glasses=bool(rng.uniform() < 0.3), glasses_colour=_col(rng.uniform(0, 90, 3)),
            shirt=_col(rng.uniform(20, 235, 3)), background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
            bg_colours=[_col(rng.uniform(10, 245, 3)) for _ in range(2)], bg_seed=int(rng.integers(2**31)),
            light=[float(rng.uniform(0.8, 1.0)), float(rng.uniform(0.05, 0.25)),
                   float(rng.uniform(-1, 1)), float(rng.uniform(-1, 0.3))],
        )

    def to_dict(self) -> dict:
        return asdict(self)

    # Where the mouth sits in face units; the same numbers drive drawing and the mouth box.
    @property
    def mouth_centre_y(self) -> float:
        return 0.02 + 0.53 * self.face_height


def _col(c: np.ndarray) -> list[float]:
    return [round(float(x), 2) for x in np.clip(c, 0, 255)]


def head_motion(frames: int, fps: float, seed: int, amount: float = 1.0) -> np.ndarray:
    """Smooth small head motion [frames, 5] (POSE_PARAMS): a sum of slow sinusoids per parameter.

    Independent of the speech on purpose: a sync model must read the mouth, not the head.
    """
    rng = np.random.default_rng([0x4EAD, int(seed)])
    t = np.arange(frames) / fps
    amp = np.array([0.035, 0.03, 0.06, 0.025, 0.06]) * amount
    pose = np.zeros((frames, 5))
    for k in range(5):
        for _ in range(3):
            f, ph, a = rng.uniform(0.08, 0.6), rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.6)
            pose[:, k] += a * amp[k] * np.sin(2 * np.pi * f * t + ph)
    pose[:, 3] += 1.0
    return pose.astype(np.float32)


def blink_track(frames: int, fps: float, seed: int, rate_hz: float = 0.3) -> np.ndarray:
    """Eyelid closure in [0, 1] per frame: blinks of about 0.2 s at random times."""
    rng = np.random.default_rng([0xB1, int(seed)])
    t = np.arange(frames) / fps
    out = np.zeros(frames)
    if rate_hz <= 0 or frames == 0:
        return out.astype(np.float32)
    at = rng.uniform(0, 1.5 / rate_hz)
    while at < t[-1] + 1:
        half = rng.uniform(0.07, 0.12)
        out = np.maximum(out, np.clip(1 - np.abs(t - at) / half, 0, 1))
        at += rng.exponential(1 / rate_hz) + 0.4
    return out.astype(np.float32)


# -- drawing primitives ---------------------------------------------------------------------------
def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float, px: float,
             p: float = 2.0) -> np.ndarray:
    """Coverage in [0, 1] of a (super)ellipse, anti-aliased over about one pixel (px face units)."""
    a, b = max(a, 1e-4), max(b, 1e-4)
    du, dv = np.abs(u - cx) / a, np.abs(v - cy) / b
    if p == 2.0:
        d = np.sqrt(du * du + dv * dv)
        gu, gv = du / a, dv / b
        grad = np.sqrt(gu * gu + gv * gv) / np.maximum(d, 1e-6)
    else:
        s = du**p + dv**p
        d = s ** (1 / p)
        common = np.maximum(d, 1e-6) ** (1 - p)
        gu, gv = common * du ** (p - 1) / a, common * dv ** (p - 1) / b
        grad = np.sqrt(gu * gu + gv * gv)
    # The first-order estimate is poor far from a thin ellipse; outside its bounding box the
    # distance to the box is a lower bound, so the larger of the two is used.
    dist = np.maximum((d - 1) / np.maximum(grad, 1e-6), np.maximum(du * a - a, dv * b - b))
    return np.clip(0.5 - dist / px, 0.0, 1.0)


def _over(canvas: np.ndarray, alpha_acc: np.ndarray, colour, alpha: np.ndarray) -> None:
    """Premultiplied 'over' of a flat (or per-pixel) colour with coverage `alpha`, in place."""
    a = alpha[..., None]
    canvas *= 1 - a
    canvas += np.asarray(colour, np.float32) * a
    alpha_acc *= 1 - alpha
    alpha_acc += alpha


class FaceRenderer:
    """Draws frames of one identity; the background and pixel grid are built once per identity."""

    def __init__(self, identity: FaceIdentity, cfg: RenderConfig | None = None) -> None:
        self.id = identity
        self.cfg = cfg or RenderConfig()
        h, w = self.cfg.size
        self.x = np.broadcast_to(((np.arange(w) + 0.5) / w * 2 - 1)[None, :], (h, w)).astype(np.float32)
        self.y = np.broadcast_to(((np.arange(h) + 0.5) / h * 2 - 1)[:, None], (h, w)).astype(np.float32)
        self.pixel = 2.0 / min(h, w)
        self.background = self._background()

    def _background(self) -> np.ndarray:
        idn, (h, w) = self.id, self.cfg.size
        c0, c1 = (np.array(c, np.float32) for c in idn.bg_colours)
        rng = np.random.default_rng(idn.bg_seed)
        if idn.background == "flat":
            mix = np.zeros((h, w), np.float32)
        elif idn.background == "gradient":
            ang = rng.uniform(0, 2 * np.pi)
            mix = np.clip(0.5 + 0.5 * (np.cos(ang) * self.x + np.sin(ang) * self.y), 0, 1)
        elif idn.background == "stripes":
            ang, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
            mix = 0.5 + 0.5 * np.sin(np.pi * freq * (np.cos(ang) * self.x + np.sin(ang) * self.y))
        else:
            mix = np.zeros((h, w), np.float32)
            for _ in range(6):
                cx, cy, r = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.15, 0.5)
                mix = np.maximum(mix, _ellipse(self.x, self.y, cx, cy, r, r, 0.3))
        return (c0 * (1 - mix[..., None]) + c1 * mix[..., None]).astype(np.float32)

    def _face_coords(self, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        tx, ty, roll, scale, _ = (float(p) for p in pose)
        dx, dy = (self.x - tx) / scale, (self.y - ty) / scale
        c, s = np.cos(roll), np.sin(roll)
        return c * dx + s * dy, -s * dx + c * dy, self.pixel / scale

    def _mouth_geometry(self, mouth: np.ndarray) -> dict:
        idn = self.id
        o, w, r = (float(np.clip(m, 0, 1)) for m in mouth)
        mw = idn.mouth_half_width * (0.85 + 0.35 * w) * (1 - 0.4 * r)
        ih = 0.5 * idn.mouth_max_open * o * (1 + 0.2 * r)
        return {"mw": mw, "ih": ih, "iw": mw * (0.8 - 0.25 * r), "cy": idn.mouth_centre_y + 0.6 * ih,
                "lt": idn.lip_thickness * (1 + 0.6 * r)}

    def mouth_box(self, pose: np.ndarray) -> np.ndarray:
        """Pixel box (y0, x0, y1, x1), end-exclusive, that holds every mouth this face can make at `pose`."""
        idn = self.id
        mx = 0.8 * float(pose[4])
        ih_max = 0.5 * idn.mouth_max_open * 1.2
        half_w = idn.mouth_half_width * 1.2
        lt_max = idn.lip_thickness * 1.6
        top = idn.mouth_centre_y - lt_max
        bottom = idn.mouth_centre_y + 1.6 * ih_max + lt_max
        corners = np.array([[mx - half_w, top], [mx + half_w, top], [mx - half_w, bottom], [mx + half_w, bottom]])
        tx, ty, roll, scale, _ = (float(p) for p in pose)
        c, s = np.cos(roll), np.sin(roll)
        xs = (c * corners[:, 0] - s * corners[:, 1]) * scale + tx
        ys = (s * corners[:, 0] + c * corners[:, 1]) * scale + ty
        h, w = self.cfg.size
        # +-2 pixels: anti-aliasing reaches half a pixel beyond the shape, rounding another.
        y0, y1 = np.floor((ys.min() + 1) / 2 * h) - 2, np.ceil((ys.max() + 1) / 2 * h) + 2
        x0, x1 = np.floor((xs.min() + 1) / 2 * w) - 2, np.ceil((xs.max() + 1) / 2 * w) + 2
        return np.array([max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)], np.int32)

    def render(self, mouth: np.ndarray, pose: np.ndarray, blink: float = 0.0) -> np.ndarray:
        """One uint8 frame [H, W, 3] for mouth (open, width, round), pose (POSE_PARAMS) and eyelid closure."""
        idn = self.id
        h, w = self.cfg.size
        u, v, px = self._face_coords(pose)
        yaw = float(pose[4])
        canvas = np.zeros((h, w, 3), np.float32)
        acc = np.zeros((h, w), np.float32)
        skin = np.array(idn.skin, np.float32)
        hair = np.array(idn.hair, np.float32)
        fw, fh, fc = idn.face_width, idn.face_height, 0.02

        # Body: shoulders and neck, moving with half the head's translation and not rotating.
        bx, by = self.x - 0.5 * float(pose[0]), self.y - 0.5 * float(pose[1])
        _over(canvas, acc, idn.shirt, _ellipse(bx, by, 0, fc + fh + 0.62, 1.05, 0.55, self.pixel))
        _over(canvas, acc, skin * 0.82, _ellipse(bx, by, 0, fc + fh * 0.9, fw * 0.5, 0.4, self.pixel))
        if idn.hair_style == "long":
            _over(canvas, acc, hair * 0.9, _ellipse(u, v, 0, fc + 0.12, fw * 1.22, fh * 1.15, px))
        for side in (-1, 1):
            _over(canvas, acc, skin * 0.92, _ellipse(u, v, side * fw * 0.97, fc + 0.03, 0.075, 0.13, px))
        _over(canvas, acc, skin, _ellipse(u, v, 0, fc, fw, fh, px, p=idn.jaw))

        # Features slide sideways with yaw (a cheap out-of-plane turn).
        fx = yaw
        _over(canvas, acc, skin * 0.84, 0.6 * _ellipse(u, v, fx * 1.1, fc + 0.2, 0.055, 0.11, px))
        for side in (-1, 1):
            _over(canvas, acc, skin * 0.55, 0.7 * _ellipse(u, v, fx * 1.1 + side * 0.035, fc + 0.29, 0.02, 0.012, px))
        ey = fc - 0.1
        openness = 1.0 - float(np.clip(blink, 0, 1))
        for side in (-1, 1):
            ex = fx + side * idn.eye_spacing
            _over(canvas, acc, (30, 22, 20), _ellipse(u, v, ex, ey, 0.105, 0.06 * openness + 0.012, px))
            white = _ellipse(u, v, ex, ey, 0.095, 0.055 * openness, px)
            _over(canvas, acc, (236, 236, 232), white)
            _over(canvas, acc, idn.eye, white * _ellipse(u, v, ex + 0.3 * fx, ey, 0.045, 0.045, px))
            _over(canvas, acc, (12, 10, 10), white * _ellipse(u, v, ex + 0.3 * fx, ey, 0.02, 0.02, px))
            _over(canvas, acc, hair * 0.8, _ellipse(u, v, ex, ey - 0.11, 0.12, 0.022, px))

        # The mouth: lips, the dark opening, upper teeth and tongue inside the opening.
        g = self._mouth_geometry(mouth)
        mx = 0.8 * fx
        _over(canvas, acc, idn.lips, _ellipse(u, v, mx, g["cy"], g["mw"], g["ih"] + g["lt"], px))
        inner = _ellipse(u, v, mx, g["cy"], g["iw"], g["ih"], px)
        _over(canvas, acc, (55, 18, 22), inner)
        _over(canvas, acc, (235, 232, 220), inner * _ellipse(u, v, mx, g["cy"] - 0.75 * g["ih"], 0.8 * g["iw"],
                                                             0.45 * g["ih"], px))
        _over(canvas, acc, (170, 70, 80), inner * _ellipse(u, v, mx, g["cy"] + 0.85 * g["ih"], 0.6 * g["iw"],
                                                           0.45 * g["ih"], px))

        if idn.hair_style in ("short", "fringe", "long"):
            line = idn.hairline + (0.1 if idn.hair_style == "fringe" else 0.0)
            cap = _ellipse(u, v, 0, fc - 0.06, fw * 1.08, fh * 1.02, px) * np.clip(0.5 + (line - v) / px, 0, 1)
            _over(canvas, acc, hair, cap)
        if idn.glasses:
            for side in (-1, 1):
                ex = fx + side * idn.eye_spacing
                ring = np.clip(_ellipse(u, v, ex, ey, 0.15, 0.1, px) - _ellipse(u, v, ex, ey, 0.125, 0.078, px), 0, 1)
                _over(canvas, acc, idn.glasses_colour, ring)
            _over(canvas, acc, idn.glasses_colour, _ellipse(u, v, fx, ey - 0.02, 0.06, 0.012, px))

        ambient, strength, lx, ly = idn.light
        gain = np.clip(ambient + strength * (lx * u + ly * v), 0.4, 1.3)[..., None]
        out = self.background * (1 - acc[..., None]) + canvas * gain
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass
class RenderedClip:
    """frames uint8 [T, H, W, 3]; mouth [T, 3]; pose [T, 5]; blink [T]; mouth_box int32 [T, 4]."""

    frames: np.ndarray
    mouth: np.ndarray
    pose: np.ndarray
    blink: np.ndarray
    mouth_box: np.ndarray
    identity: FaceIdentity


def render_clip(identity: FaceIdentity, mouth: np.ndarray, fps: float, motion_seed: int,
                cfg: RenderConfig | None = None) -> RenderedClip:
    """Render a clip whose mouth follows `mouth` [T, 3]; head motion and blinks come from `motion_seed`."""
    cfg = cfg or RenderConfig()
    mouth = np.asarray(mouth, np.float32)
    if mouth.ndim != 2 or mouth.shape[1] != 3:
        raise ValueError(f"mouth must be [T, 3] (open, width, round), got {mouth.shape}")
    if not np.isfinite(mouth).all():
        raise ValueError("mouth parameters contain NaN or inf")
    mouth = np.clip(mouth, 0, 1)
    n = len(mouth)
    pose = head_motion(n, fps, motion_seed, cfg.motion)
    blink = blink_track(n, fps, motion_seed, cfg.blink_rate_hz)
    r = FaceRenderer(identity, cfg)
    frames = np.stack([r.render(mouth[t], pose[t], blink[t]) for t in range(n)]) if n else \
        np.zeros((0, *cfg.size, 3), np.uint8)
    boxes = np.stack([r.mouth_box(pose[t]) for t in range(n)]) if n else np.zeros((0, 4), np.int32)
    return RenderedClip(frames=frames, mouth=mouth, pose=pose, blink=blink, mouth_box=boxes, identity=identity)
