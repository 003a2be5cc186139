"""A small per-frame convolutional autoencoder: the latent codec of the shipped world models.

Why our own and not diffusers' `AutoencoderKL`: decode speed is the constraint. The world
model must play at >= 30 fps on a 2-core CPU *including* decoding every frame, which leaves a
few milliseconds per frame for the decoder. AutoencoderKL's blocks (GroupNorm everywhere,
two+ ResNet blocks per level, a mid-block with attention) cost several times more per pixel
than the plain residual conv stack below, and its KL term is not needed: we train a
deterministic autoencoder with a small latent-noise augmentation (so the decoder tolerates the
imperfect latents a world model generates) and store the latent normalisation in the config.

Latents are normalised to roughly zero mean, unit variance (`shift`, `scale` measured on the
training data), which is what flow matching with unit Gaussian noise expects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.codec import Codec, float_to_frames, frames_to_float, register_codec


@dataclass
class ConvAEConfig:
    latent_channels: int = 8
    # Width and residual blocks per level, full resolution first; each level after the first
    # halves the resolution. The decoder is kept narrow on purpose: it runs on every played frame.
    encoder_channels: list[int] = field(default_factory=lambda: [24, 48, 96])
    encoder_blocks: list[int] = field(default_factory=lambda: [0, 1, 1])
    decoder_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    decoder_blocks: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Latent normalisation per channel, z = (raw - shift) / scale; measured after training
    # (None: identity). Normalised latents are what the world model sees.
    shift: list[float] | None = None
    scale: list[float] | None = None

    def __post_init__(self) -> None:
        lists = [self.encoder_channels, self.encoder_blocks, self.decoder_channels, self.decoder_blocks]
        if len(self.encoder_channels) < 1 or len({len(x) for x in lists}) != 1:
            raise ValueError("encoder/decoder channels and blocks need one entry per level "
                             f"(same length >= 1), got {lists}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        for name in ("shift", "scale"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} needs {self.latent_channels} entries, got {len(v)}")
        if self.scale is not None and min(self.scale) <= 0:
            raise ValueError(f"scale entries must be > 0, got {self.scale}")


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Upsample(nn.Module):
    """Sub-pixel upsampling: a 3x3 conv to 4x channels, then pixel shuffle (no checkerboard)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(F.silu(x)), 2)


class Encoder(nn.Module):
    def __init__(self, cfg: ConvAEConfig) -> None:
        super().__init__()
        ch = cfg.encoder_channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers += [ResBlock(c) for _ in range(cfg.encoder_blocks[i])]
            if i + 1 < len(ch):
                layers.append(nn.Conv2d(c, ch[i + 1], 4, stride=2, padding=1))
        self.blocks = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.blocks(self.conv_in(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: ConvAEConfig) -> None:
        super().__init__()
        ch = cfg.decoder_channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        layers: list[nn.Module] = []
        for i in reversed(range(len(ch))):
            layers += [ResBlock(ch[i]) for _ in range(cfg.decoder_blocks[i])]
            if i > 0:
                layers.append(Upsample(ch[i], ch[i - 1]))
        self.blocks = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.blocks(self.conv_in(z))))


class ConvAutoencoder(Codec):
    """Codec interface: encode(uint8 [n,H,W,3]) -> latents [n,C,h,w]; decode(latents) -> uint8 frames."""

    type_name = "conv_ae"

    def __init__(self, cfg: ConvAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ConvAEConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        c = self.cfg.latent_channels
        shift = torch.tensor(self.cfg.shift or [0.0] * c).view(1, c, 1, 1)
        scale = torch.tensor(self.cfg.scale or [1.0] * c).view(1, c, 1, 1)
        # Not saved in state dicts: the normalisation lives in the config.
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def set_normalisation(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Fix the latent normalisation (per-channel mean and std of raw encoder outputs)."""
        self.cfg.shift = [float(x) for x in shift.reshape(-1)]
        self.cfg.scale = [float(x) for x in scale.reshape(-1)]
        self.shift.copy_(shift.reshape(self.shift.shape))
        self.scale.copy_(scale.reshape(self.scale.shape))

    # -- config -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict) -> ConvAutoencoder:
        d = {k: v for k, v in dict(cfg).items() if k != "type"}
        known = set(ConvAEConfig.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown conv_ae codec config keys {unknown}; known: {sorted(known)}")
        return cls(ConvAEConfig(**d))

    def config(self) -> dict:
        return {"type": self.type_name, **asdict(self.cfg)}

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.cfg.encoder_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"frame size {height}x{width} is not divisible by the codec factor {f}")
        return self.cfg.latent_channels, height // f, width // f

    # -- pixels <-> [-1, 1] -------------------------------------------------------------------
    @staticmethod
    def to_unit(frames: torch.Tensor) -> torch.Tensor:
        return frames_to_float(frames)

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        return float_to_frames(x).contiguous()

    # -- codec ------------------------------------------------------------------------------
    def encode_unit(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [n, 3, H, W] -> normalised latents."""
        self.latent_shape(x.shape[-2], x.shape[-1])
        return (self.encoder(x) - self.shift) / self.scale

    def decode_unit(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> [-1, 1]-ish images [n, 3, H, W] (unclamped; for training losses)."""
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected latents [n, {self.cfg.latent_channels}, h, w], got {tuple(z.shape)}")
        return self.decoder(z * self.scale + self.shift)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return self.encode_unit(self.to_unit(frames.to(p.device)).to(p.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return self.to_uint8(self.decode_unit(latents.to(p.device, p.dtype)).float())


register_codec(ConvAutoencoder.type_name, ConvAutoencoder)
