"""Latent codecs: frames (uint8) <-> latents (float), plus a registry by name.

A bundle's ``config.json`` names its codec (``{"type": "pixel"}``) and stores the codec's
weights in ``weights.safetensors`` under the ``codec.`` prefix. The identity ``pixel`` codec
lets untrained bundles decode end to end before a trained codec exists.

Most codecs are per-frame: one latent frame decodes to one video frame, independently. A
temporal codec (``temporal = True``, e.g. the Wan VAE in `runtime.wan_vae`) decodes a latent
frame together with what came before it, so a stream decodes through a `StreamingDecoder`:
``decode_chunk`` keeps the state that links one chunk to the next, ``reset`` starts a new
stream. Every codec has one (`Codec.streaming_decoder`); a per-frame codec's is stateless.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.warp import CameraMotion


class Codec(nn.Module, ABC):
    """encode: uint8 ``[n, H, W, 3]`` -> float ``[n, C, h, w]``; decode: the way back.

    An interface: a codec that leaves out one of the abstract methods cannot be built.
    """

    type_name = "abstract"
    temporal = False  # True: latent frames decode with their past (use `streaming_decoder`)

    @property
    @abstractmethod
    def spatial_factor(self) -> int:
        """Decoded pixels per latent pixel along each side."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latent of one ``height x width`` frame."""

    @abstractmethod
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[n, H, W, 3]`` -> latents ``[n, C, h, w]``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents ``[n, C, h, w]`` -> uint8 frames ``[n, H, W, 3]``."""

    def config(self) -> dict[str, Any]:
        return {"type": self.type_name}

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: dict[str, Any]) -> Codec:
        """The codec a ``config()`` dict describes (weights loaded separately)."""

    def streaming_decoder(self) -> StreamingDecoder:
        """A decoder for one stream, chunk after chunk (per-frame codecs: stateless ``decode``)."""
        return FrameDecoder(self)


class StreamingDecoder(ABC):
    """Decodes one stream's latent chunks in order; holds whatever links a chunk to the next.

    Why a separate object: a session's codec is shared (one set of weights), the stream state
    is not; two sessions on one bundle each hold their own decoder.
    """

    @abstractmethod
    def decode_chunk(self, latents: torch.Tensor, motion: CameraMotion | None = None) -> torch.Tensor:
        """The next latent frames ``[n, C, h, w]`` -> the video frames they complete, uint8 ``[m, H, W, 3]``.
        ``motion``: how the view moved into each of the ``n`` frames (`CausalDiT.camera_move`), for a decoder
        that draws on the frame it showed last (`runtime.autoencoder.RefiningDecoder`); others ignore it."""

    @abstractmethod
    def reset(self, last_frame: np.ndarray | None = None) -> None:
        """Forget the stream: the next chunk is decoded as the first of a new one. ``last_frame``: the real
        frame uint8 ``[H, W, 3]`` the stream continues from, for a decoder that draws on the frame before."""

    @property
    def state_bytes(self) -> int:
        """Bytes of tensors held between chunks (bounded: it must not grow with the stream)."""
        return 0


class FrameDecoder(StreamingDecoder):
    """A per-frame codec's streaming decoder: each chunk decodes on its own."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def decode_chunk(self, latents: torch.Tensor, motion: CameraMotion | None = None) -> torch.Tensor:
        return self.codec.decode(latents)

    def reset(self, last_frame: np.ndarray | None = None) -> None:
        """Nothing to forget: per-frame decoding has no state."""


def frames_to_float(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``[n, H, W, 3]`` -> float32 ``[n, 3, H, W]`` in [-1, 1]."""
    t = torch.as_tensor(frames)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {t.dtype} {list(t.shape)}")
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def float_to_frames(x: torch.Tensor) -> torch.Tensor:
    """float ``[n, 3, H, W]`` in [-1, 1] -> uint8 ``[n, H, W, 3]``."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class PixelCodec(Codec):
    """Identity codec: latents are the RGB frame in [-1, 1], optionally average-pooled by ``downsample``.

    With ``downsample > 1`` decoding upsamples (nearest): a cheap stand-in, not a real codec.
    """

    type_name = "pixel"

    def __init__(self, downsample: int = 1) -> None:
        super().__init__()
        self.downsample = downsample

    @property
    def spatial_factor(self) -> int:
        return self.downsample

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return 3, height // self.downsample, width // self.downsample

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames_to_float(frames)
        return F.avg_pool2d(x, self.downsample) if self.downsample > 1 else x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(latents, scale_factor=self.downsample, mode="nearest") if self.downsample > 1 else latents
        return float_to_frames(x)

    def config(self) -> dict[str, Any]:
        return {"type": self.type_name, "downsample": self.downsample}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PixelCodec:
        return cls(downsample=int(cfg.get("downsample", 1)))


CODECS: dict[str, type[Codec]] = {}


def register_codec(name: str, cls: type[Codec]) -> None:
    CODECS[name] = cls


def build_codec(cfg: dict[str, Any]) -> Codec:
    name = cfg.get("type")
    if name not in CODECS:
        raise ValueError(f"unknown codec type {name!r}; known: {sorted(CODECS)}")
    return CODECS[name].from_config(cfg)


register_codec("pixel", PixelCodec)
import runtime.autoencoder  # noqa: E402,F401  (registers "conv_ae": the trained latent codec)
import runtime.wan_vae  # noqa: E402,F401  (registers "wan_vae"; diffusers is imported only when one is built)
