"""Audio -> mouth: the lip-sync bundle's ear, a small MLP from a frame's audio-feature window to the
mouth parameters (open, width, round) the renderer draws.

Why a separate net: a video model that must learn the audio -> mouth mapping through its denoising
loss learns it slowly (the sixth sitting's audio-conditioned teacher reached a mouth correlation of
0.16 with the truth on held-out clips), while this MLP, trained on the same windows against the
recorded mouth track, reaches 0.9 in a minute. So a bundle whose spec's condition is ``"mouth"`` is a
renderer told the mouth parameters (the truth in training), and carries this net to read them from
the audio in a session (`Bundle.audio_mouth`, tensors ``audio_mouth.*``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.small_nets import load_net_file

MOUTH_DIM = 3   # open, width, round (training.lipsync.renderer.MOUTH_PARAMS)


@dataclass
class AudioMouthConfig:
    in_dim: int = 512                       # audio features per frame (AudioFeatureConfig.dim)
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    dropout: float = 0.2

    def __post_init__(self) -> None:
        self.hidden = [int(h) for h in self.hidden]
        if self.in_dim < 1 or not self.hidden or min(self.hidden) < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"audio_mouth: in_dim and hidden widths must be >= 1, dropout in [0, 1), got "
                             f"{asdict(self)}")


class AudioToMouth(nn.Module):
    """features ``[n, in_dim]`` -> mouth parameters ``[n, 3]``; inputs and outputs normalised by the
    training set's statistics (buffers, so they travel with the weights)."""

    def __init__(self, cfg: AudioMouthConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.in_dim
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, MOUTH_DIM))
        self.register_buffer("in_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("in_std", torch.ones(cfg.in_dim))
        self.register_buffer("out_mean", torch.zeros(MOUTH_DIM))
        self.register_buffer("out_std", torch.ones(MOUTH_DIM))

    def set_normalisation(self, features: torch.Tensor, mouth: torch.Tensor) -> None:
        """Per-dimension mean and std of the training features and mouth track."""
        with torch.no_grad():
            self.in_mean.copy_(features.mean(0))
            self.in_std.copy_(features.std(0).clamp(min=1e-4))
            self.out_mean.copy_(mouth.mean(0))
            self.out_std.copy_(mouth.std(0).clamp(min=1e-4))

    def normalised(self, features: torch.Tensor) -> torch.Tensor:
        """The prediction in units of the training mouth track's std (what the loss compares)."""
        return self.net((features - self.in_mean) / self.in_std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.normalised(features) * self.out_std + self.out_mean

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)


def build_audio_mouth(d: dict[str, Any]) -> AudioToMouth:
    return AudioToMouth(AudioMouthConfig(**d))


def load_audio_mouth(path: str | Path) -> AudioToMouth:
    """A trained net: a run dir holding audio_mouth.pt (`forcekit train audio-mouth`), or the file itself."""
    d = load_net_file(path, "audio_mouth.pt", "audio-mouth", "audio -> mouth net", "audio-mouth")
    model = build_audio_mouth(d["cfg"])
    model.load_state_dict(d["model"])
    return model.eval()
