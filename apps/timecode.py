"""A frame-index timecode painted as a strip of black and white cells under a video frame.

Why: a stream measured at its far end (the lip-sync page in a browser, after WebRTC's encoder, jitter
buffer and frame drops) must tell which generated frame each received picture is. RTP timestamps do not:
the sender offsets them at random and frames are dropped on the way. The strip survives the video codec
(cells of a few dozen pixels, black or white) and is read back from the received picture, scaled or not.

Layout: ``BITS`` cells side by side under the frame, each ``width // BITS`` pixels wide and as tall; the first
``BITS - 1`` cells hold the index modulo ``2 ** (BITS - 1)`` (4,096 frames: 164 s at 25 fps before it wraps),
most significant bit first, white for 1; the last holds their parity, so a misread cell is caught instead of
giving a wrong index.
"""

from __future__ import annotations

import numpy as np

BITS = 13   # 12 data cells and their parity: an even count of data cells, so a wholly inverted strip fails too
PERIOD = 2 ** (BITS - 1)


def strip_height(width: int) -> int:
    """Height in pixels of the strip `stamp` adds under a frame ``width`` pixels wide."""
    if width < BITS:
        raise ValueError(f"a timecode needs a frame at least {BITS} pixels wide, got {width}")
    return width // BITS


def _bits(index: int) -> list[int]:
    value = index % PERIOD
    data = [(value >> (BITS - 2 - i)) & 1 for i in range(BITS - 1)]
    return data + [sum(data) % 2]


def stamp(frame: np.ndarray, index: int) -> np.ndarray:
    """``frame`` [H, W, 3] uint8 with the strip for ``index`` under it: [H + strip_height(W), W, 3]."""
    h, w = frame.shape[:2]
    cell = strip_height(w)
    strip = np.zeros((cell, w, 3), np.uint8)
    for i, bit in enumerate(_bits(index)):
        if bit:
            strip[:, i * cell:(i + 1) * cell] = 255
    return np.concatenate([frame[..., :3], strip], 0)


def split(image: np.ndarray, frame_height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A received picture -> (the frame, the strip), given the sent frame's size ``frame_height`` x ``width``
    (the picture may be scaled uniformly: the split is where the sent frame ended)."""
    h = image.shape[0]
    total = frame_height + strip_height(width)
    cut = int(round(h * frame_height / total))
    return image[:cut], image[cut:]


def read(strip: np.ndarray) -> int | None:
    """The index (modulo ``PERIOD``) a received strip holds, or None when its parity does not check out."""
    if strip.ndim == 3:
        strip = strip[..., :3].mean(-1)
    h, w = strip.shape
    if h < 1 or w < BITS:
        return None
    cell = w / BITS
    y0, y1 = int(h * 0.25), max(int(h * 0.25) + 1, int(np.ceil(h * 0.75)))
    bits = []
    for i in range(BITS):
        x0, x1 = int(i * cell + cell * 0.25), max(int(i * cell + cell * 0.25) + 1, int(i * cell + cell * 0.75))
        bits.append(int(strip[y0:y1, x0:x1].mean() > 127.5))
    if sum(bits[:-1]) % 2 != bits[-1]:
        return None
    return int(sum(b << (BITS - 2 - i) for i, b in enumerate(bits[:-1])))


def unwrap(indices: list[int]) -> list[int]:
    """Indices read modulo ``PERIOD``, in arrival order -> increasing indices (a wrap adds ``PERIOD``)."""
    out, offset, last = [], 0, None
    for i in indices:
        if last is not None and i + offset < last - PERIOD // 2:
            offset += PERIOD
        out.append(i + offset)
        last = out[-1]
    return out
