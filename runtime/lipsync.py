"""Lip-sync sessions: a face frame and the driving audio's features in, the same face re-synced out.

A lip-sync bundle is an ordinary bundle (a `CausalDiT` with ``audio_dim`` and ``video_channels``,
a per-frame codec) whose ``extra["lipsync"]`` holds a `LipsyncSpec`: which box of the frame is
masked (the mouth region, the same box in training and at inference), what fills it, whether a
reference frame of the identity rides along on the channel axis, and the audio feature config
the model was trained with. Per frame, the video condition is
``[codec(masked input frame) | codec(reference frame)]`` on the channel axis, the audio condition
the frame's log-mel window (`runtime.audio_features`), and the output is the decoded frame with,
by default, only the masked box pasted into the input (so nothing outside it can change).

With a ``crop_box`` the model sees and draws only that crop of the face (the lower face around the
mouth, as Wav2Lip and MuseTalk regenerate the lower half): the mouth is then most of what the model
draws instead of a few pixels of a few tokens, at the same native resolution; the session crops its
input frames, and pastes the crop's mask box back into the whole frame.

`open_session` returns a `LipsyncSession` for such a bundle: ``step(audio=features, video=frame)``.
The reference is the first frame the stream sees after `reset` (or the one passed to `reset`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from runtime.audio_features import AudioFeatureConfig
from runtime.bundle import Bundle
from runtime.codec import Codec
from runtime.config import ModelConfig, SamplerConfig
from runtime.model import CausalDiT
from runtime.rollout import ChunkCondition
from runtime.session import StreamSession

REFERENCES = ("first", "none")
CONDITIONS = ("audio", "mouth")


@dataclass
class LipsyncSpec:
    """How a lip-sync bundle builds its video condition and its output (stored in ``extra["lipsync"]``)."""

    mask_box: tuple[int, int, int, int]   # (y0, x0, y1, x1), pixels of the frame: masked in, regenerated out
    fill: int = 128                        # the value masked pixels get
    reference: str = "first"              # "first": the stream's first frame rides along; "none"
    composite: bool = True                 # output = input frame with only the box taken from the model
    feather: int = 2                       # pixels over which the pasted box blends into the input
    audio: dict = field(default_factory=lambda: AudioFeatureConfig().to_dict())
    crop_box: tuple[int, int, int, int] | None = None   # the part of the frame the model sees and draws
    face_size: tuple[int, int] | None = None            # (H, W) of the input frames, given with a crop_box
    condition: str = "audio"   # what the audio slot holds: "audio" features, or "mouth": mouth parameters
                               # (`mouth_features`; the truth in training, the bundle's audio_mouth net in a session)

    def __post_init__(self) -> None:
        self.mask_box = _box("mask_box", self.mask_box)
        if (self.crop_box is None) != (self.face_size is None):
            raise ValueError("crop_box and face_size go together: the crop and the size of the frames it is cut from")
        if self.crop_box is not None:
            self.crop_box, self.face_size = _box("crop_box", self.crop_box), tuple(int(v) for v in self.face_size)
            (cy0, cx0, cy1, cx1), (y0, x0, y1, x1) = self.crop_box, self.mask_box
            if not (cy0 <= y0 and cx0 <= x0 and y1 <= cy1 and x1 <= cx1):
                raise ValueError(f"mask_box {self.mask_box} must lie inside crop_box {self.crop_box}")
            if cy1 > self.face_size[0] or cx1 > self.face_size[1]:
                raise ValueError(f"crop_box {self.crop_box} does not fit {self.face_size[0]}x{self.face_size[1]} "
                                 "frames")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if not 0 <= self.fill <= 255 or self.feather < 0:
            raise ValueError(f"fill must be in 0..255 and feather >= 0, got {self.fill}, {self.feather}")
        AudioFeatureConfig(**self.audio)   # fails early on a bad audio config

    @property
    def audio_config(self) -> AudioFeatureConfig:
        return AudioFeatureConfig(**self.audio)

    def video_channels(self, latent_channels: int) -> int:
        """Channels of the video condition: the masked frame's latent, and the reference's."""
        return latent_channels * (2 if self.reference != "none" else 1)

    def check_frame(self, height: int, width: int) -> None:
        """Fails unless the spec fits input frames of ``height`` x ``width``."""
        if self.face_size is not None and (height, width) != self.face_size:
            raise ValueError(f"this spec crops {self.face_size[0]}x{self.face_size[1]} frames, got {height}x{width}")
        y0, x0, y1, x1 = self.mask_box
        if y1 > height or x1 > width:
            raise ValueError(f"mask_box {self.mask_box} does not fit {height}x{width} frames")

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the frames the model sees, for input frames of ``height`` x ``width``."""
        self.check_frame(height, width)
        if self.crop_box is None:
            return height, width
        y0, x0, y1, x1 = self.crop_box
        return y1 - y0, x1 - x0

    def crop(self, frames: np.ndarray) -> np.ndarray:
        """The part of uint8 frames ``[n, H, W, 3]`` the model sees (all of them without a crop_box)."""
        if self.crop_box is None:
            return frames
        y0, x0, y1, x1 = self.crop_box
        return frames[:, y0:y1, x0:x1]

    def paste(self, frames: np.ndarray, drawn: np.ndarray) -> np.ndarray:
        """The input ``frames`` with the model's ``drawn`` frames put back where `crop` cut them from."""
        if self.crop_box is None:
            return drawn
        y0, x0, y1, x1 = self.crop_box
        out = frames.copy()
        out[:, y0:y1, x0:x1] = drawn
        return out

    @property
    def model_mask_box(self) -> tuple[int, int, int, int]:
        """The mask box in the coordinates of the model's frames (the crop's)."""
        oy, ox = self.crop_box[:2] if self.crop_box is not None else (0, 0)
        y0, x0, y1, x1 = self.mask_box
        return y0 - oy, x0 - ox, y1 - oy, x1 - ox

    def model_inputs(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the model's frames, the same masked) for uint8 input frames ``[n, H, W, 3]``: what the codec
        encodes into the target and into the video condition, in training and in a session alike."""
        seen = self.crop(frames)
        return seen, mask_frames(seen, self.model_mask_box, self.fill)

    def latent_box(self, frame_size: tuple[int, int], latent_size: tuple[int, int], margin: int = 1
                   ) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) in latent pixels of the model's frames (``frame_size``, the crop's with a
        crop_box): those whose decoded area touches the mask box, grown by ``margin`` (the decoder reads
        neighbours, so those shape the pasted pixels too). Where a lip-sync model's output is used: where
        its losses are measured and its audio is injected."""
        (fh, fw), (h, w) = frame_size, latent_size
        y0, x0, y1, x1 = self.model_mask_box
        return (max(0, y0 * h // fh - margin), max(0, x0 * w // fw - margin),
                min(h, -(-y1 * h // fh) + margin), min(w, -(-x1 * w // fw) + margin))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("mask_box", "crop_box", "face_size"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LipsyncSpec:
        return cls(**d)


def mouth_features(mouth: np.ndarray, dim: int) -> np.ndarray:
    """Mouth parameters ``[n, 3]`` tiled to ``dim`` audio inputs: the condition of a model told which
    mouth to draw (spec condition ``"mouth"``), so it keeps the audio-conditioned model's geometry."""
    mouth = np.asarray(mouth, dtype=np.float32)
    reps = -(-dim // mouth.shape[1])
    return np.tile(mouth, (1, reps))[:, :dim]


def _box(name: str, box: Any) -> tuple[int, int, int, int]:
    box = tuple(int(v) for v in box)
    if len(box) != 4 or not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
        raise ValueError(f"{name} must be (y0, x0, y1, x1) with 0 <= y0 < y1 and 0 <= x0 < x1, got {box}")
    return box


def crop_around(box: tuple[int, int, int, int], frame_size: tuple[int, int], margin: int, multiple: int
                ) -> tuple[int, int, int, int]:
    """A crop of a ``frame_size`` frame holding ``box`` grown by ``margin`` pixels, its sides grown to a
    multiple of ``multiple`` (the codec's stride) and kept inside the frame."""
    def side(lo: int, hi: int, size: int) -> tuple[int, int]:
        lo, hi = max(0, lo - margin), min(size, hi + margin)
        length = min(size - size % multiple, -(-(hi - lo) // multiple) * multiple)
        lo = max(0, min(lo - (length - (hi - lo)) // 2, size - length))
        return lo, lo + length

    (y0, y1), (x0, x1) = side(box[0], box[2], frame_size[0]), side(box[1], box[3], frame_size[1])
    return y0, x0, y1, x1


def mask_frames(frames: np.ndarray, box: tuple[int, int, int, int], fill: int) -> np.ndarray:
    """A copy of uint8 frames ``[n, H, W, 3]`` with ``box`` (y0, x0, y1, x1) set to ``fill``."""
    y0, x0, y1, x1 = box
    out = np.array(frames, dtype=np.uint8, copy=True)
    out[:, y0:y1, x0:x1] = fill
    return out


def box_alpha(height: int, width: int, box: tuple[int, int, int, int], feather: int) -> np.ndarray:
    """float32 ``[H, W, 1]``: 1 inside ``box`` away from its edge, ramping to 0 over ``feather`` pixels
    at the edge, 0 outside (the weight of the generated pixels when pasting)."""
    y0, x0, y1, x1 = box
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
    inside = np.minimum(np.minimum(ys - y0 + 1, y1 - ys), np.minimum(xs - x0 + 1, x1 - xs)).astype(np.float32)
    alpha = np.clip(inside / (feather + 1), 0.0, 1.0) if feather else (inside > 0).astype(np.float32)
    return alpha[..., None]


def composite(generated: np.ndarray, inputs: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The input frames with the generated pixels blended in where ``alpha`` (`box_alpha`) is above 0."""
    out = alpha * generated.astype(np.float32) + (1 - alpha) * inputs.astype(np.float32)
    return np.round(out).astype(np.uint8)


def lipsync_config(codec: Codec, frame_size: tuple[int, int], spec: LipsyncSpec, **model: Any) -> ModelConfig:
    """The model geometry for a lip-sync bundle: latents from ``codec`` at ``frame_size``, audio and video
    conditions from ``spec``, no actions; ``model`` sets the rest (layers, heads, patch, window, ...)."""
    c, h, w = codec.latent_shape(*spec.model_size(*frame_size))
    return ModelConfig(**{"frames_per_chunk": 1, "window_frames": 8, "sink_frames": 1, **model,
                          "in_channels": c, "latent_height": h, "latent_width": w, "action_space": {},
                          "audio_dim": spec.audio_config.dim, "video_channels": spec.video_channels(c)})


def random_lipsync_bundle(codec: Codec, frame_size: tuple[int, int], spec: LipsyncSpec, seed: int = 0,
                          name: str = "random-lipsync", sampler: SamplerConfig | None = None,
                          **model: Any) -> Bundle:
    """An untrained lip-sync bundle (random weights): speed measurements and tests of the plumbing."""
    config = lipsync_config(codec, frame_size, spec, **model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = CausalDiT(config).eval()
    card = (f"# {name}\n\nUntrained: random weights (seed {seed}) at the lip-sync geometry ({frame_size[0]}x"
            f"{frame_size[1]} frames, codec {codec.type_name}). It measures speed and latency; its mouths are "
            "noise.\n")
    return Bundle(config, net, codec.eval(), sampler or SamplerConfig(kind="consistency", steps=1),
                  fps=spec.audio_config.fps, name=name, card=card,
                  extra={"lipsync": spec.to_dict(), "weights": "random"})


def shipped_geometry(seed: int = 0) -> Bundle:
    """``random-lipsync``: the geometry the lip-sync recipe trains (scripts/recipe_lipsync.sh), random
    weights and a random default conv codec: 96x96 crops, 8x24x24 latents, patch 4 (36 tokens a frame),
    6 layers of width 128, frame-wise chunks, a window of 8 frames and a sink of 1, one step a frame."""
    from runtime.autoencoder import ConvAEConfig, ConvAutoencoder

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        codec = ConvAutoencoder(ConvAEConfig())
    spec = LipsyncSpec(mask_box=(55, 30, 82, 66))
    return random_lipsync_bundle(codec, (96, 96), spec, seed=seed, **SHIPPED_MODEL)


def tiny_geometry(seed: int = 0) -> Bundle:
    """``random-lipsync-tiny``: 32x32 frames through the 4x pooled pixel codec (3x8x8 latents), a 2-layer
    width-32 model: what the tests and the apps' headless checks run."""
    from runtime.codec import PixelCodec

    spec = LipsyncSpec(mask_box=(18, 8, 28, 24))
    return random_lipsync_bundle(PixelCodec(4), (32, 32), spec, seed=seed, name="random-lipsync-tiny",
                                 patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                 ffn_dim=64, freq_dim=32, window_frames=4, sink_frames=1)


SHIPPED_MODEL: dict[str, Any] = {"patch_size": (1, 4, 4), "num_attention_heads": 4, "attention_head_dim": 32,
                                 "num_layers": 6, "ffn_dim": 512, "freq_dim": 64, "window_frames": 8,
                                 "sink_frames": 1}


class LipsyncSession(StreamSession):
    """`StreamSession` for a lip-sync bundle: ``step(audio=features, video=frames)`` -> re-synced frames."""

    def __init__(self, bundle: Bundle, **kwargs: Any) -> None:
        if "lipsync" not in bundle.extra:
            raise ValueError(f"bundle {bundle.name!r} is not a lip-sync bundle (no extra['lipsync'])")
        self.spec = LipsyncSpec.from_dict(bundle.extra["lipsync"])
        cfg = bundle.config
        if bundle.codec.temporal:
            raise ValueError(f"lip-sync needs a per-frame codec; {bundle.codec.type_name!r} is temporal")
        face_size = self.spec.face_size or bundle.frame_size
        drawn_size = self.spec.model_size(*face_size)
        if drawn_size != tuple(bundle.frame_size):
            raise ValueError(f"bundle {bundle.name!r}: its model draws {bundle.frame_size[0]}x{bundle.frame_size[1]} "
                             f"frames, its lip-sync spec crops {drawn_size}")
        want = (self.spec.video_channels(cfg.in_channels), self.spec.audio_config.dim)
        if (cfg.video_channels, cfg.audio_dim) != want:
            raise ValueError(f"bundle {bundle.name!r}: model takes video_channels {cfg.video_channels} and audio_dim "
                             f"{cfg.audio_dim}, its lip-sync spec implies {want[0]} and {want[1]}")
        if self.spec.condition == "mouth":
            ear = bundle.audio_mouth
            if ear is None:
                raise ValueError(f"bundle {bundle.name!r} is told mouth parameters but carries no audio -> mouth net "
                                 "(train lipsync-teacher --mouth-condition --audio-mouth DIR)")
            if ear.cfg.in_dim != self.spec.audio_config.dim:
                raise ValueError(f"bundle {bundle.name!r}: its audio -> mouth net reads {ear.cfg.in_dim} features, "
                                 f"its audio config makes {self.spec.audio_config.dim}")
        self._alpha = box_alpha(*bundle.frame_size, self.spec.model_mask_box, self.spec.feather)
        self._reference: torch.Tensor | None = None
        super().__init__(bundle, **kwargs)
        self.frame_size = tuple(face_size)   # the input frames; the model draws the crop of them

    @property
    def audio_config(self) -> AudioFeatureConfig:
        return self.spec.audio_config

    @torch.no_grad()
    def reset(self, seed: int = 0, reference: np.ndarray | None = None, **_: Any) -> None:
        """Start a new stream; ``reference`` (uint8 ``[H, W, 3]``): the identity's frame (default: the
        stream's first input frame)."""
        super().reset(seed, start_scene=False)
        self._reference = None
        if reference is not None:
            self._reference = self._encode(self.spec.crop(self._frames(reference, 1)))

    @torch.no_grad()
    def step(self, action: Any = None, audio: Any = None, video: Any = None) -> np.ndarray:
        """Re-sync the next chunk: ``video`` uint8 ``[n, H, W, 3]`` (or one ``[H, W, 3]`` frame), ``audio``
        features ``[n, audio_dim]`` (or ``[audio_dim]``); returns uint8 ``[n, H, W, 3]``."""
        start = time.perf_counter()
        n = self._rollout.next_chunk_frames()
        frames = self._frames(video, n)
        x0 = self.generate_latents(action, audio, frames)
        drawn = self.decoder.decode_chunk(x0).cpu().numpy()
        if self.spec.composite:
            drawn = composite(drawn, self.spec.crop(frames), self._alpha)
        out = self.spec.paste(frames, drawn)
        self.record_chunk((time.perf_counter() - start) * 1000, len(out))
        return out

    # -- conditions -----------------------------------------------------------------------------------
    def _frames(self, video: Any, n: int) -> np.ndarray:
        h, w = self.frame_size
        if video is None:
            raise ValueError(f"this is a lip-sync bundle: pass video, {n} uint8 frame(s) [{n}, {h}, {w}, 3]")
        frames = np.asarray(video)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape != (n, h, w, 3):
            raise ValueError(f"video must be uint8 [{n}, {h}, {w}, 3] (or one [{h}, {w}, 3] frame per frame of "
                             f"the chunk), got {frames.dtype} {list(np.asarray(video).shape)}")
        return frames

    def _encode(self, frames: np.ndarray) -> torch.Tensor:
        return self.bundle.codec.encode(torch.from_numpy(np.ascontiguousarray(frames)).to(self.device))

    def _condition(self, n: int, actions: list[Any], audio: Any, video: Any) -> ChunkCondition:
        if any(a is not None for a in actions):
            raise ValueError("a lip-sync bundle takes no actions: pass audio= and video=")
        dim = self.config.audio_dim
        if audio is None:
            raise ValueError(f"this is a lip-sync bundle: pass audio, the features of {n} frame(s) [{n}, {dim}] "
                             "(runtime.audio_features.StreamingAudioFeatures)")
        aud = np.asarray(audio, dtype=np.float32)
        if aud.ndim == 1:
            aud = aud[None]
        if aud.shape != (n, dim):
            raise ValueError(f"audio must be features [{n}, {dim}] (or [{dim}] per frame of the chunk), "
                             f"got {list(np.asarray(audio).shape)}")
        if not np.isfinite(aud).all():
            raise ValueError("audio features contain NaN or inf")
        if self.spec.condition == "mouth":   # the ear reads the mouth from the audio; the renderer is told it
            mouth = self.bundle.audio_mouth(torch.from_numpy(aud).to(self.device)).cpu().numpy()
            aud = mouth_features(mouth, dim)
        seen, masked = self.spec.model_inputs(self._frames(video, n))
        if self._reference is None and self.spec.reference != "none":
            self._reference = self._encode(seen[:1])
        parts = [self._encode(masked)]
        if self.spec.reference != "none":
            parts.append(self._reference.expand(n, *self._reference.shape[1:]))
        vid = torch.cat(parts, 1)[None]
        return ChunkCondition(None, torch.from_numpy(aud).to(self.device)[None], vid, self.text)
