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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.canvas import ViewCanvas
from runtime.codec import Codec, FrameDecoder, StreamingDecoder, float_to_frames, frames_to_float, register_codec
from runtime.config import WARP_MODES
from runtime.warp import CameraMotion, gaussian_blur, warp_frames


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
    # A refiner after the decoder (`FrameRefiner`, 0: none): at full resolution it blends the decoded frame
    # with the frame shown before it, moved by the camera (`RefiningDecoder`), so texture the latents cannot
    # place travels with the view and a still view stays as it was. Width, residual blocks, resampling.
    refine_channels: int = 0
    refine_blocks: int = 2
    refine_warp: str = "bilinear"
    # Texture carried with the view after the refiner (0: off; it is not trained): the detail of the frame shown
    # before (what a Gaussian blur of this sigma, in pixels, removes) replaces the refined frame's own, moved by
    # the camera motion without resampling blur (`ConvAutoencoder.carry_detail`), so texture travels with a turn or
    # a walk instead of fading into the decode's average. Where a turn uncovers the view, the refined frame keeps its
    # own.
    refine_detail_sigma: float = 0.0
    # Pixels of canvas kept beyond each edge of the view for the carried texture (`runtime.canvas.ViewCanvas`), so
    # what a turn carries out of the view comes back with its texture when the view turns back (0: none).
    refine_detail_margin: int = 0
    # The view's horizontal field of view in degrees, for the carried texture (`forcekit eval camera` measures it on
    # recorded turns): a turn then moves the canvas as a pinhole camera's yaw, the view's edges faster than its
    # centre, on a cylinder around the camera (`runtime.canvas.CylinderMap`); 0: a turn moves it as a translation.
    refine_detail_fov: float = 0.0

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
        if self.refine_channels < 0 or self.refine_blocks < 0:
            raise ValueError(f"refine_channels and refine_blocks must be >= 0, got {self.refine_channels}, "
                             f"{self.refine_blocks}")
        if self.refine_detail_sigma < 0:
            raise ValueError(f"refine_detail_sigma must be >= 0 (0: off), got {self.refine_detail_sigma}")
        if not isinstance(self.refine_detail_margin, int) or self.refine_detail_margin < 0:
            raise ValueError(f"refine_detail_margin must be a whole number of pixels >= 0, got "
                             f"{self.refine_detail_margin!r}")
        fov = self.refine_detail_fov
        if isinstance(fov, bool) or not isinstance(fov, (int, float)) or not 0 <= fov < 180:
            raise ValueError(f"refine_detail_fov must be a field of view in [0, 180) degrees (0: flat), got {fov!r}")
        if self.refine_warp not in WARP_MODES:
            raise ValueError(f"refine_warp must be one of {WARP_MODES}, got {self.refine_warp!r}")


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


MOTION_CHANNELS = 5   # translation right, down and log zoom (each a plane), then the flow right and down


def motion_channels(motion: CameraMotion | None, n: int, height: int, width: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``motion`` of ``n`` frames as planes ``[n, MOTION_CHANNELS, height, width]`` in pixels of the frame
    (zoom as is); zeros where there is none."""
    out = torch.zeros(n, MOTION_CHANNELS, height, width, device=device)
    if motion is None:
        return out
    half = torch.tensor([width / 2, height / 2, 1.0], device=device)
    out[:, :3] = (motion.shift.float().to(device) * half)[:, :, None, None]
    if motion.flow is not None:
        flow = F.interpolate(motion.flow.float().to(device), size=(height, width), mode="bilinear",
                             align_corners=False)
        out[:, 3:] = flow * half[:2, None, None]
    return out


class FrameRefiner(nn.Module):
    """Draws a frame from its decode and the frame shown before it, already moved by the camera.

    The per-frame decoder can only paint texture its 4x-smaller latents locate, so it paints an average
    or a texture fixed to the latent grid; the engine's texture travels with the view. Where the decode
    agrees with the moved previous frame, the refiner keeps the previous frame's pixels (``mask`` near 1);
    where the view shows something new (an uncovered edge, an object moving) it keeps the decode, corrected
    by a residual. Output ``mask * moved + (1 - mask) * (decoded + residual)``; it starts at the decode.
    It also reads the motion itself (`motion_channels`): with no key held and no speed left the view does
    not move, and a world model's small errors there are drift, not news.
    """

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(6 + MOTION_CHANNELS, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.conv_out = nn.Conv2d(channels, 4, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        with torch.no_grad():
            self.conv_out.bias[0] = -4.0   # mask 0.018: a fresh refiner shows the decode

    def forward(self, decoded: torch.Tensor, moved: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """``decoded``, ``moved`` ``[n, 3, H, W]`` in [-1, 1], ``motion`` ``[n, MOTION_CHANNELS, H, W]``."""
        h = self.conv_out(F.silu(self.blocks(self.conv_in(torch.cat([decoded, moved, motion], 1)))))
        mask = torch.sigmoid(h[:, :1])
        return mask * moved + (1 - mask) * (decoded + h[:, 1:])


class ConvAutoencoder(Codec):
    """Codec interface: encode(uint8 [n,H,W,3]) -> latents [n,C,h,w]; decode(latents) -> uint8 frames."""

    type_name = "conv_ae"

    def __init__(self, cfg: ConvAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ConvAEConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        refine = self.cfg.refine_channels
        self.refiner = FrameRefiner(refine, self.cfg.refine_blocks) if refine else None
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

    def refine_unit(self, decoded: torch.Tensor, previous: torch.Tensor, motion: CameraMotion | None) -> torch.Tensor:
        """Decoded frames ``[n, 3, H, W]`` (`decode_unit`) drawn on the frames shown before each, ``previous``
        ``[n, 3, H, W]`` in [-1, 1], moved by ``motion`` (n frames; None: the view did not move)."""
        if self.refiner is None:
            raise ValueError("this codec has no refiner (ConvAEConfig.refine_channels)")
        n, _, h, w = decoded.shape
        planes = motion_channels(motion, n, h, w, decoded.device).to(decoded.dtype)
        if motion is not None:
            flow = None if motion.flow is None else motion.flow[:, None]
            previous = warp_frames(previous[:, None], motion.shift[:, None], flow, self.cfg.refine_warp)[:, 0]
        return self.refiner(decoded, previous.to(decoded.dtype), planes)

    def carry_detail(self, refined: torch.Tensor, moved: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """Refined frames ``[n, 3, H, W]`` whose fine detail (`ConvAEConfig.refine_detail_sigma`) is ``moved``'s: the
        frames shown before, moved by the camera without resampling blur (`runtime.canvas.ViewCanvas.move`); where
        ``held`` (``[n, 1, H, W]``) is 0 the move brought nothing shown and the refined frame keeps its own."""
        held = held.to(refined.dtype)
        # the blur is linear: one blur of the difference, not one each; 0 where nothing was shown, so what the move
        # uncovered does not leak into the detail beside it
        change = held * (moved.to(refined.dtype) - refined)
        return refined + held * (change - gaussian_blur(change, self.cfg.refine_detail_sigma))

    def streaming_decoder(self) -> StreamingDecoder:
        return RefiningDecoder(self) if self.refiner is not None else FrameDecoder(self)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return self.encode_unit(self.to_unit(frames.to(p.device)).to(p.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return self.to_uint8(self.decode_unit(latents.to(p.device, p.dtype)).float())


class RefiningDecoder(StreamingDecoder):
    """A refining codec's stream: each frame is decoded, then drawn on the frame shown before it (kept
    here, as shown: quantised), moved by the camera motion into it (`ConvAutoencoder.refine_unit`). The
    stream starts from ``reset(last_frame)``, the real frame it continues; without one its first frame is
    the plain decode. With `ConvAEConfig.refine_detail_sigma` the shown frames' fine detail travels on with the
    motion (`ConvAutoencoder.carry_detail`), kept on a ``canvas`` wider than the view by
    `ConvAEConfig.refine_detail_margin` and turned as `ConvAEConfig.refine_detail_fov` says
    (`runtime.canvas.ViewCanvas`)."""

    def __init__(self, codec: ConvAutoencoder) -> None:
        self.codec = codec
        self.previous: torch.Tensor | None = None
        self.canvas: ViewCanvas | None = None
        self.reset()

    def reset(self, last_frame: np.ndarray | None = None) -> None:
        self.previous = self.canvas = None
        if last_frame is not None:
            p = next(self.codec.parameters())
            self._show(self.codec.to_unit(torch.as_tensor(np.asarray(last_frame))[None]).to(p.device, p.dtype))

    def _show(self, frame: torch.Tensor) -> None:
        self.previous = frame
        if self.codec.cfg.refine_detail_sigma <= 0:
            return
        if self.canvas is None:
            self.canvas = ViewCanvas(frame, self.codec.cfg.refine_detail_margin, self.codec.cfg.refine_detail_fov)
        else:
            self.canvas.paint(frame)

    def decode_chunk(self, latents: torch.Tensor, motion: CameraMotion | None = None) -> torch.Tensor:
        p = next(self.codec.parameters())
        decoded = self.codec.decode_unit(latents.to(p.device, p.dtype))
        if motion is not None and len(motion.shift) != len(decoded):
            raise ValueError(f"motion holds {len(motion.shift)} frames for {len(decoded)} latent frames")
        out = []
        for i in range(len(decoded)):
            frame = decoded[i:i + 1]
            if self.previous is not None:
                step = None if motion is None else motion.at(slice(i, i + 1))
                frame = self.codec.refine_unit(frame, self.previous, step)
                if self.canvas is not None and step is not None:
                    frame = self.codec.carry_detail(frame, *self.canvas.move(step))
            shown = self.codec.to_uint8(frame.float())
            self._show(self.codec.to_unit(shown).to(p.device, p.dtype))
            out.append(shown)
        return torch.cat(out)

    @property
    def state_bytes(self) -> int:
        frame = 0 if self.previous is None else self.previous.numel() * self.previous.element_size()
        return frame + (0 if self.canvas is None else self.canvas.state_bytes)


register_codec(ConvAutoencoder.type_name, ConvAutoencoder)
