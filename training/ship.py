"""`forcekit ship`: turn a trained bundle into a shipped one under ``models/``.

A shipped world model carries real start scenes (``runtime.start_scenes``) cut from recorded
episodes, so `play`, `serve` and `generate` open on a scene the engine rendered rather than on
the model's guess from noise, and a card that says how it was made and how good it is.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from runtime import Bundle
from runtime.autoencoder import ConvAEConfig
from runtime.start_scenes import StartScenes
from training.data.dataset import ClipDataset
from training.latents import conditioning_actions


def scenes_from_data(data: str | os.PathLike, scenes: int, frames: int, seed: int = 0) -> StartScenes:
    """``scenes`` runs of ``frames`` real frames, one from each of ``scenes`` episodes spread evenly
    over the data dir, at a random offset; actions are each frame's conditioning action."""
    ds = ClipDataset(data, clip_frames=frames)
    episodes = [row for row in ds.episode_rows if row[2] >= frames]
    if len(episodes) < scenes:
        raise ValueError(f"{data}: only {len(episodes)} episodes have {frames} frames; {scenes} scenes wanted")
    rng = np.random.default_rng(seed)
    picks = np.linspace(0, len(episodes) - 1, scenes).round().astype(int)
    out_frames, out_actions = [], []
    for i in picks:
        shard_index, row, length, _ = episodes[i]
        shard = ds.load_shard(shard_index)
        offset = int(rng.integers(0, length - frames + 1))
        cond = conditioning_actions(torch.from_numpy(shard["actions"][row:row + length])).numpy()
        out_frames.append(shard["frames"][row + offset:row + offset + frames])
        out_actions.append(cond[offset:offset + frames])
    return StartScenes(np.stack(out_frames), np.stack(out_actions).astype(np.float32))


# What a decoder swap may add or change: the refiner's fields of the codec config.
REFINER_FIELDS = tuple(name for name in ConvAEConfig.__dataclass_fields__ if name.startswith("refine_"))


def replace_decoder(b: Bundle, codec_dir: str | os.PathLike) -> None:
    """Give ``b`` the decoder of the codec in ``codec_dir`` (a codec dir, or a bundle dir: that bundle's decoder and
    frame refiner, e.g. a shipped student's, for a retrained student of the same codec), which must share the
    bundle codec's encoder, latent normalisation and geometry (so the model's latents mean the same to both)."""
    from training.codec import load_codec_or_bundle

    new = load_codec_or_bundle(codec_dir)
    old = b.codec

    def shared(codec) -> dict:
        return {k: v for k, v in codec.config().items() if k not in REFINER_FIELDS}

    if type(new) is not type(old) or shared(new) != shared(old):
        raise ValueError(f"--decoder {codec_dir}: its codec config differs from the bundle's (train it with "
                         "`forcekit train codec --init BUNDLE --freeze-encoder` or `forcekit train refiner --init "
                         "BUNDLE`)")
    for name, tensor in old.encoder.state_dict().items():
        if not torch.equal(tensor, new.encoder.state_dict()[name]):
            raise ValueError(f"--decoder {codec_dir}: its encoder differs from the bundle's ({name}); the model's "
                             "latents would not mean the same to it")
    b.codec = new.to(next(old.parameters()).device).eval()


def ship(bundle: str | os.PathLike, out: str | os.PathLike, start_data: str | None = None, scenes: int = 8,
         scene_frames: int | None = None, card: str | None = None, name: str | None = None, seed: int = 0,
         steps: int | None = None, stack_noise: float | None = None, noise_scale: float | None = None,
         decoder: str | None = None, reproject: bool | None = None, warp_mode: str | None = None,
         detail_sigma: float | None = None, detail_margin: int | None = None,
         detail_fov: float | None = None) -> Path:
    """Copy ``bundle`` to ``out`` with start scenes from ``start_data``, the card file ``card`` and,
    given ``steps``, that many sampler steps per chunk by default (``stack_noise``: the sampler's
    inference-time noise on the stacked frames; ``noise_scale``: its sampling temperature; ``decoder``:
    a codec dir whose decoder replaces the bundle's; ``reproject``: `SamplerConfig.reproject`; ``warp_mode``: how a
    camera-warp model resamples its stacked frames at inference, `ModelConfig.warp_mode`; ``detail_sigma``: the
    refining codec's `ConvAEConfig.refine_detail_sigma`, texture carried with the view; ``detail_margin``: its
    `ConvAEConfig.refine_detail_margin`, the canvas kept past the view's edges; ``detail_fov``: its
    `ConvAEConfig.refine_detail_fov`, the view's field of view that turns the canvas as a pinhole camera)."""
    b = Bundle.load(bundle)
    if decoder is not None:
        replace_decoder(b, decoder)
        b.extra = {**b.extra, "decoder": str(decoder)}   # where the decoder came from, next to the stages' configs
    for flag, setting, value in (("--detail-sigma", "refine_detail_sigma", detail_sigma),
                                 ("--detail-margin", "refine_detail_margin", detail_margin),
                                 ("--detail-fov", "refine_detail_fov", detail_fov)):
        if value is None:
            continue
        if getattr(b.codec, "refiner", None) is None:
            raise ValueError(f"{flag} needs a codec with a frame refiner; {bundle}'s has none (--decoder "
                             "a `forcekit train refiner` run)")
        b.codec.cfg = replace(b.codec.cfg, **{setting: value})
    if noise_scale is not None:
        b.sampler = replace(b.sampler, noise_scale=noise_scale)
    if reproject is not None:
        b.sampler = replace(b.sampler, reproject=reproject)
    if warp_mode is not None:
        if not b.config.camera_warp:
            raise ValueError(f"--warp-mode needs a camera-warp bundle; {bundle} warps no frames")
        b.config = replace(b.config, warp_mode=warp_mode)
        b.model.config = b.config
    if stack_noise is not None:
        if not b.config.stack_frames:
            raise ValueError(f"--stack-noise needs a frame-stacking bundle; {bundle} stacks no frames")
        b.sampler = replace(b.sampler, stack_noise=stack_noise)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        if b.sampler.timesteps is not None:
            raise ValueError(f"{bundle}: its sampler lists explicit timesteps {b.sampler.timesteps}; --steps "
                             "would be ignored")
        b.sampler.steps = steps
    if start_data is not None:
        pattern = b.config.chunk_pattern
        n = scene_frames or pattern.first_frames
        if not pattern.is_whole(n):
            raise ValueError(f"--scene-frames {n} must end on a chunk boundary of the bundle's pattern {pattern}")
        b.start_scenes = scenes_from_data(start_data, scenes, n, seed)
        b.start_scenes.check_fits(b.frame_size, b.config.actions.dim, f"start scenes from {start_data}")
    if card is not None:
        b.card = Path(card).read_text()
    if name is not None:
        b.name = name
    return b.save(out)
