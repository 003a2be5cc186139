"""Stage 1, the causal teacher: teacher-forcing flow matching, initialised from the bidirectional teacher.

Each clip runs once as ``[clean | noisy]`` under the teacher-forcing mask (see common.py), so
every chunk learns to denoise itself given the real clean chunks before it, the context a
session commits with ``cache_from="clean"``. With diffusion forcing the noisy chunks carry
independent noise levels (``ChunkPattern.chunk_index`` spreads them over frames); since a
noisy chunk never sees another noisy chunk under this mask, that costs nothing and gives the
model every level in every position. Actions are dropped for whole clips with probability
``action_dropout`` so the causal teacher keeps classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime import Bundle, SamplerConfig
from training.conditions import Conditions, dropped
from training.latents import LatentClips
from training.students.common import (
    StageConfig,
    check_clip,
    chunk_noise_levels,
    eval_batch,
    few_step_eval,
    grad_step,
    model_clips,
    run_stage,
    save_bundle,
    tf_velocity,
    trainable_copy,
)
from training.teacher import stacked_noised


@dataclass
class CausalConfig(StageConfig):
    lr: float = 2e-4
    diffusion_forcing: bool = True  # independent noise level per chunk (else one per clip)
    action_dropout: float = 0.1
    ema: float = 0.99
    sample_steps: int = 50  # Euler steps written into the bundle's sampler
    stack_noise: float = 0.0  # frame stacking: noise augmentation of the stacked frames, a level up to this
    eval_steps: tuple[int, ...] = (4, 16)  # Euler steps of the teacher-forcing eval


def causal_loss(model, x0: torch.Tensor, action: Conditions, cfg: CausalConfig, generator: torch.Generator
                ) -> torch.Tensor:
    b, f = x0.shape[:2]
    t = chunk_noise_levels(model, b, f, generator, cfg.diffusion_forcing).to(x0)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    drop = torch.rand(b, 1, 1, generator=generator) < cfg.action_dropout
    action = dropped(action, drop)
    tt = t[:, :, None, None, None]
    previous, level = stacked_noised(model, x0, generator, cfg.stack_noise)
    v = tf_velocity(model, x0, (1 - tt) * x0 + tt * noise, t, action, previous, level)
    return (v.float() - (noise - x0)).pow(2).mean()


def train_causal(teacher: Bundle, clips: LatentClips, cfg: CausalConfig, eval_clips: LatentClips | None = None,
                 progress: bool = True) -> dict:
    """Train (or resume) in ``cfg.out``; writes ``out/bundle`` (EMA weights, Euler sampler with CFG)."""
    torch.manual_seed(cfg.seed)
    model = trainable_copy(teacher.model, cfg.device)
    check_clip(model, cfg.clip_frames)
    clips, eval_clips = model_clips(model, clips, eval_clips)
    ema = trainable_copy(teacher.model, cfg.device).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = clips.starts(cfg.clip_frames)
    held = eval_batch(eval_clips or clips, cfg)

    def step_fn(step: int) -> dict[str, float]:
        x0, action = clips.sample(cfg.batch, cfg.clip_frames, gen, starts)
        loss = causal_loss(model, x0, action, cfg, gen)
        gnorm = grad_step(loss, model, opt, cfg.grad_clip)
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - cfg.ema)
        return {"loss": float(loss.detach()), "grad_norm": gnorm}

    def eval_fn() -> dict[str, float]:  # the same metric the few-step students report, here with Euler
        return few_step_eval(ema, held, cfg.eval_steps, kind="euler")

    summary = run_stage("causal", cfg, {"model": model, "ema": ema}, {"opt": opt}, gen, step_fn, eval_fn, progress)
    sampler = SamplerConfig(kind="euler", steps=cfg.sample_steps, guidance_scale=teacher.sampler.guidance_scale,
                            shift=teacher.sampler.shift, cache_from="clean")
    note = ("Causal teacher: teacher-forcing flow matching (forcekit train causal) initialised from the "
            f"bidirectional teacher; diffusion forcing {cfg.diffusion_forcing}; EMA {cfg.ema} weights.")
    summary["bundle"] = str(save_bundle(ema, teacher, sampler, "causal", cfg, summary, note))
    return summary
