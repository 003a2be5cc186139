"""Training the audio -> mouth net (runtime/audio_mouth.py) on the recorded clips.

Each recorded frame holds the audio-feature window around it (``actions``) and the mouth the
renderer drew (``mouth``), so this is plain regression, frame by frame: MSE in units of the mouth
track's std. The held-out report is what `forcekit eval lipsync` reads from generated frames: the
Pearson correlation per parameter and the offset (in frames) that maximises it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.audio_mouth import MOUTH_DIM, AudioMouthConfig, AudioToMouth
from training.checkpoint import save_checkpoint, train_resumable
from training.lipsync.metrics import mouth_agreement
from training.lipsync.record import load_clips
from training.lipsync.renderer import MOUTH_PARAMS


@dataclass
class AudioMouthTrainConfig:
    data: str = ""
    out: str = ""
    heldout: str = ""
    steps: int = 2000
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0
    ckpt_every_s: float = 120.0
    max_clips: int = 0          # train on the first N clips only (0: all)


def frames_of(data: str, max_clips: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(features ``[N, dim]``, mouth ``[N, 3]``, frames per clip) of a lip-sync recording."""
    _, clips = load_clips(data, ("actions", "mouth"), max_clips)
    if not clips:
        raise ValueError(f"{data}: no clips")
    feats = torch.from_numpy(np.concatenate([c["actions"] for c in clips])).float()
    mouth = torch.from_numpy(np.concatenate([c["mouth"] for c in clips])).float()
    return feats, mouth, [len(c["actions"]) for c in clips]


@torch.no_grad()
def mouth_report(model: AudioToMouth, feats: torch.Tensor, mouth: torch.Tensor, lengths: list[int]) -> dict:
    """`eval lipsync`'s mouth agreement (`training.lipsync.metrics.mouth_agreement`) of the net's reading
    of each clip against its recorded mouth track: correlation and MAE per parameter, and the offset."""
    model.eval()
    pred = model(feats).numpy()
    cut = np.cumsum(lengths)[:-1]
    return mouth_agreement(np.split(pred, cut), np.split(mouth.numpy(), cut), MOUTH_PARAMS, max_lag=3)


def train_audio_mouth(cfg: AudioMouthTrainConfig, model_cfg: AudioMouthConfig | None = None,
                      progress: bool = True) -> dict:
    """Train (or resume) in ``cfg.out``: ckpt.pt, then audio_mouth.pt (the net) and audio_mouth.json
    (the report on the training and held-out clips)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    feats, mouth, lengths = frames_of(cfg.data, cfg.max_clips)
    if mouth.shape[1] != MOUTH_DIM:
        raise ValueError(f"{cfg.data}: mouth track has {mouth.shape[1]} parameters, expected {MOUTH_DIM}")
    model_cfg = model_cfg or AudioMouthConfig()
    model_cfg.in_dim = feats.shape[1]
    torch.manual_seed(cfg.seed)
    model = AudioToMouth(model_cfg)
    model.set_normalisation(feats, mouth)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    target = (mouth - model.out_mean) / model.out_std

    def batch_loss() -> torch.Tensor:
        i = torch.randint(0, len(feats), (cfg.batch,), generator=gen)
        return (model.normalised(feats[i]) - target[i]).pow(2).mean()

    run = train_resumable(out, model, opt, gen, batch_loss, cfg.steps, "train audio-mouth", "audio_mouth/loss",
                          cfg.ckpt_every_s, progress)
    model.eval()
    save_checkpoint(out / "audio_mouth.pt", {"kind": "audio-mouth", "cfg": asdict(model_cfg),
                                             "model": model.state_dict()})
    result = {**run, "train": mouth_report(model, feats, mouth, lengths)}
    if cfg.heldout:
        result["heldout"] = mouth_report(model, *frames_of(cfg.heldout))
    (out / "audio_mouth.json").write_text(json.dumps(result, indent=2))
    return result
