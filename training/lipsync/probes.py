"""The two learned measuring sticks, trained here on rendered clips (no downloaded weights).

MouthProbe: a small CNN that reads (open, width, round) off one face crop. Trained on real
rendered frames with light blur / noise augmentation (generated frames are softer than
rendered ones); applied to generated frames it tells whether their mouths match the truth.

SyncNet: an audio-visual embedding in the manner of Chung & Zisserman's SyncNet (and
LatentSync's retrained one): a video tower over `span` consecutive lower-face crops and an
audio tower over the log-mel columns of the same frames, trained contrastively (InfoNCE). A
batch takes several windows from each clip, so the negatives include the same face and voice
at other times: the embedding must learn timing, not who is speaking.

Both trainers are resumable (ckpt.pt, atomically replaced every `ckpt_every_s` seconds; a
rerun continues from it) and write probe.pt / syncnet.pt plus a JSON summary of held-out
numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.audio_features import AudioFeatureConfig, frame_windows, log_mel
from training.checkpoint import load_checkpoint, save_checkpoint, train_resumable
from training.lipsync.metrics import mouth_agreement, summarise_sync, sync_scores
from training.lipsync.record import load_clips


def _conv_tower(cin: int, channels: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    layers = []
    for i, c in enumerate(channels):
        k = 5 if i == 0 else 3
        layers += [nn.Conv2d(cin, c, k, stride=2, padding=k // 2), nn.GroupNorm(min(8, c), c), nn.SiLU()]
        cin = c
    return nn.Sequential(*layers), cin


def _to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    return frames.movedim(-1, -3).float().div(127.5).sub(1.0)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random blur and noise on float images [n, C, H, W] (half of them blurred, all a little noisy)."""
    n = len(x)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    return x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.06


# -- the mouth-parameter regressor -----------------------------------------------------------------
@dataclass
class MouthProbeConfig:
    size: tuple[int, int] = (96, 96)
    channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 128


class MouthProbe(nn.Module):
    def __init__(self, cfg: MouthProbeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.features, c = _conv_tower(3, cfg.channels)
        down = 2 ** len(cfg.channels)
        h, w = cfg.size
        if h % down or w % down:
            raise ValueError(f"mouth probe input {h}x{w} must be divisible by {down}")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * (h // down) * (w // down), cfg.hidden), nn.SiLU(),
                                  nn.Linear(cfg.hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float images [n, 3, H, W] in [-1, 1] -> mouth parameters [n, 3] in [0, 1]."""
        return torch.sigmoid(self.head(self.features(x)))

    @torch.no_grad()
    def predict(self, frames: np.ndarray | torch.Tensor, batch: int = 256) -> np.ndarray:
        """uint8 frames [T, H, W, 3] -> mouth parameters [T, 3]."""
        self.eval()
        f = torch.as_tensor(np.asarray(frames))
        if tuple(f.shape[1:3]) != tuple(self.cfg.size):
            raise ValueError(f"mouth probe was trained on {self.cfg.size} frames, got {tuple(f.shape[1:3])}")
        return torch.cat([self(_to_float(f[i:i + batch])) for i in range(0, len(f), batch)]).numpy()


def mouth_probe_report(model: MouthProbe, clips: list[dict]) -> dict:
    """Probe vs truth on clips with rendered (or generated) frames and a true mouth track."""
    return mouth_agreement([model.predict(c["frames"]) for c in clips], [c["mouth"] for c in clips])


def _save_model(path: Path, kind: str, model: nn.Module, extra: dict | None = None) -> None:
    save_checkpoint(path, {"kind": kind, "cfg": asdict(model.cfg), "model": model.state_dict(), **(extra or {})})


def load_mouth_probe(path: str | Path) -> MouthProbe:
    path = Path(path)
    d = load_checkpoint(path / "probe.pt" if path.is_dir() else path)
    if d is None or d.get("kind") != "mouth-probe":
        raise FileNotFoundError(f"{path}: no mouth probe (train one with `forcekit train mouth-probe`)")
    cfg = MouthProbeConfig(size=tuple(d["cfg"]["size"]), channels=tuple(d["cfg"]["channels"]),
                           hidden=d["cfg"]["hidden"])
    model = MouthProbe(cfg)
    model.load_state_dict(d["model"])
    return model.eval()


def train_mouth_probe(data: str, out: str, heldout: str | None = None, steps: int = 3000, batch: int = 64,
                      lr: float = 1e-3, seed: int = 0, ckpt_every_s: float = 120.0, max_clips: int = 0,
                      progress: bool = True, cfg: MouthProbeConfig | None = None) -> dict:
    """Train the mouth regressor on every rendered frame of `data`; report on `heldout`."""
    outp = Path(out)
    meta, clips = load_clips(data, ("frames", "mouth"), max_clips)
    frames = torch.from_numpy(np.concatenate([c["frames"] for c in clips]))
    mouth = torch.from_numpy(np.concatenate([c["mouth"] for c in clips]))
    cfg = cfg or MouthProbeConfig(size=tuple(meta["resolution"]))
    model = MouthProbe(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(frames), (batch,), generator=gen)
        return F.mse_loss(model(_augment(_to_float(frames[idx]), gen)), mouth[idx])

    run = train_resumable(outp, model, opt, gen, batch_loss, steps, "train mouth-probe", "mouth_probe/loss",
                          ckpt_every_s, progress)
    _save_model(outp / "probe.pt", "mouth-probe", model)
    result = {**run, "train": mouth_probe_report(model, clips[:16])}
    if heldout:
        result["heldout"] = mouth_probe_report(model, load_clips(heldout, ("frames", "mouth"))[1])
    (outp / "probe.json").write_text(json.dumps(result, indent=2))
    return result


# -- the SyncNet-style audio-visual embedding ------------------------------------------------------
@dataclass
class SyncNetConfig:
    size: tuple[int, int] = (96, 96)     # face crop size; the towers see its lower half
    span: int = 5                        # video frames per window
    audio: dict = field(default_factory=lambda: AudioFeatureConfig().to_dict())
    video_channels: tuple[int, ...] = (32, 64, 96, 128)
    audio_channels: tuple[int, ...] = (32, 64, 96, 128)
    embed: int = 128
    temperature: float = 0.1

    @property
    def audio_cfg(self) -> AudioFeatureConfig:
        return AudioFeatureConfig(**self.audio)

    def crop(self) -> tuple[slice, slice]:
        """The lower-face region both training and evaluation look at (rows, columns)."""
        h, w = self.size
        return slice(h // 2, h), slice(w // 8, w - w // 8)


class SyncNet(nn.Module):
    def __init__(self, cfg: SyncNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.video_tower, cv = _conv_tower(3 * cfg.span, cfg.video_channels)
        self.audio_tower, ca = _conv_tower(1, cfg.audio_channels)
        self.video_out = nn.Linear(cv, cfg.embed)
        self.audio_out = nn.Linear(ca, cfg.embed)

    def embed_video(self, windows: torch.Tensor) -> torch.Tensor:
        """uint8 [n, span, H, W, 3] face-crop windows -> unit embeddings [n, D]."""
        rows, cols = self.cfg.crop()
        x = _to_float(windows[:, :, rows, cols]).flatten(1, 2)
        return F.normalize(self.video_out(self.video_tower(x).mean((2, 3))), dim=-1)

    def embed_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel windows [n, columns, n_mels] -> unit embeddings [n, D]."""
        return F.normalize(self.audio_out(self.audio_tower(mel[:, None]).mean((2, 3))), dim=-1)

    def loss(self, video: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE: window i's video and audio are the only matching pair in the batch."""
        logits = self.embed_video(video) @ self.embed_audio(mel).t() / self.cfg.temperature
        target = torch.arange(len(logits))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def sync_windows(frames: np.ndarray, audio: np.ndarray, cfg: SyncNetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows of a clip: video uint8 [n, span, H, W, 3] and audio log-mel [n, columns, n_mels]."""
    acfg = cfg.audio_cfg
    t = len(frames)
    n = t - cfg.span + 1
    if n < 1:
        raise ValueError(f"a clip of {t} frames is shorter than the sync window ({cfg.span})")
    a = np.asarray(audio)
    mel = log_mel(a.reshape(-1), acfg.sample_rate, acfg)
    f = torch.as_tensor(np.asarray(frames))
    video = f.unfold(0, cfg.span, 1).permute(0, 4, 1, 2, 3)          # [n, span, H, W, 3]
    return video, frame_windows(mel, t, acfg, span=cfg.span)[:n]


@torch.no_grad()
def clip_embeddings(model: SyncNet, frames: np.ndarray, audio: np.ndarray,
                    batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    video, mel = sync_windows(frames, audio, model.cfg)
    v = torch.cat([model.embed_video(video[i:i + batch]) for i in range(0, len(video), batch)])
    a = torch.cat([model.embed_audio(mel[i:i + batch]) for i in range(0, len(mel), batch)])
    return v, a


def shuffled_pairs(clips: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(frames of clip i, audio of clip i + 1) cut to a common length: audio that does not belong."""
    out = []
    for i, c in enumerate(clips):
        other = clips[(i + 1) % len(clips)]["audio"]
        if len(clips) == 1:
            other = np.roll(other, len(other) // 2, axis=0)
        n = min(len(c["frames"]), len(other))
        out.append((c["frames"][:n], other[:n]))
    return out


def sync_report(model: SyncNet, clips: list[dict], max_shift: int = 10) -> dict:
    """LSE-C / LSE-D for the clips as they are, and with each clip's audio swapped for another's."""
    long = [c for c in clips if len(c["frames"]) >= model.cfg.span + 1]
    if not long:
        raise ValueError(f"no clip is longer than the sync window ({model.cfg.span} frames)")
    real = [sync_scores(*clip_embeddings(model, c["frames"], c["audio"]), max_shift) for c in long]
    shuf = [sync_scores(*clip_embeddings(model, f, a), max_shift) for f, a in shuffled_pairs(long)]
    return {"real": summarise_sync(real), "shuffled": summarise_sync(shuf)}


def load_syncnet(path: str | Path) -> SyncNet:
    path = Path(path)
    d = load_checkpoint(path / "syncnet.pt" if path.is_dir() else path)
    if d is None or d.get("kind") != "syncnet":
        raise FileNotFoundError(f"{path}: no syncnet (train one with `forcekit train syncnet`)")
    c = d["cfg"]
    cfg = SyncNetConfig(size=tuple(c["size"]), span=c["span"], audio=c["audio"],
                        video_channels=tuple(c["video_channels"]), audio_channels=tuple(c["audio_channels"]),
                        embed=c["embed"], temperature=c["temperature"])
    model = SyncNet(cfg)
    model.load_state_dict(d["model"])
    return model.eval()


def train_syncnet(data: str, out: str, heldout: str | None = None, steps: int = 3000, clips_per_batch: int = 16,
                  windows_per_clip: int = 4, lr: float = 5e-4, seed: int = 0, ckpt_every_s: float = 120.0,
                  max_clips: int = 0, progress: bool = True, cfg: SyncNetConfig | None = None) -> dict:
    """Train the audio-visual embedding on `data`; report LSE-C / LSE-D, real vs shuffled, on `heldout`."""
    outp = Path(out)
    meta, clips = load_clips(data, ("frames", "audio"), max_clips)
    cfg = cfg or SyncNetConfig(size=tuple(meta["resolution"]), audio=dict(meta["audio_features"]))
    if tuple(cfg.size) != tuple(meta["resolution"]) or cfg.audio != meta["audio_features"]:
        raise ValueError(f"{data}: recorded at {meta['resolution']} with other audio features than the syncnet's")
    windows = [sync_windows(c["frames"], c["audio"], cfg) for c in clips if len(c["frames"]) >= cfg.span + 4]
    if len(windows) < 2:
        raise ValueError(f"{data}: need at least 2 clips longer than {cfg.span + 4} frames to train a syncnet")
    model = SyncNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    k = min(clips_per_batch, len(windows))

    def batch_loss() -> torch.Tensor:
        vids, mels = [], []
        for ci in torch.randperm(len(windows), generator=gen)[:k].tolist():
            v, m = windows[ci]
            pick = torch.randperm(len(v), generator=gen)[:windows_per_clip]
            vids.append(v[pick]), mels.append(m[pick])
        return model.loss(torch.cat(vids), torch.cat(mels))

    run = train_resumable(outp, model, opt, gen, batch_loss, steps, "train syncnet", "syncnet/loss",
                          ckpt_every_s, progress)
    _save_model(outp / "syncnet.pt", "syncnet", model)
    result = {**run, "train": sync_report(model, clips[:16])}
    if heldout:
        result["heldout"] = sync_report(model, load_clips(heldout, ("frames", "audio"))[1])
    (outp / "syncnet.json").write_text(json.dumps(result, indent=2))
    return result
