"""Stage 2, TF-CM discrete (dCM): consistency distillation of the causal teacher under teacher forcing.

The student's consistency function is the runtime's consistency sampler read as a function:
f(x_t, t) = x_t - t v(x_t, t), which predicts x0 and is the identity at t = 0 by construction.
[0, 1] is split into ``intervals`` levels t_0 = 0 < ... < t_N = 1. For a clean clip, each
chunk draws its own level index n (chunks do not see each other's noisy frames under the
teacher-forcing mask, so independent levels are free), is noised to x_{t_n}, and the frozen
causal teacher takes one Euler step of its probability-flow ODE, with classifier-free
guidance on the actions, to x_{t_{n-1}}. The loss pulls the student's f(x_{t_n}, t_n) towards
the EMA target's f(x_{t_{n-1}}, t_{n-1}); at n = 1 that target is the teacher's one-step
denoise itself, which anchors the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime import Bundle, SamplerConfig
from runtime.sampler import shift_timesteps
from training.latents import LatentClips
from training.students.common import (
    StageConfig,
    check_clip,
    ema_update,
    eval_batch,
    few_step_eval,
    frozen_copy,
    grad_step,
    guided_tf_velocity,
    model_clips,
    per_chunk,
    run_stage,
    save_bundle,
    tf_velocity,
    trainable_copy,
)
from training.teacher import stacked_noised


@dataclass
class DCMConfig(StageConfig):
    intervals: int = 16
    shift: float = 1.0  # warp of the level grid (runtime.sampler.shift_timesteps)
    guidance_scale: float | None = None  # teacher CFG; None: the causal teacher bundle's
    ema: float = 0.99
    sample_steps: int = 2
    # frame stacking: noise on the stacked frames every model sees, a level up to this per clip (a model
    # trained with --stack-noise-condition is told it, and learns to see through its own frames' errors)
    stack_noise: float = 0.0


def level_grid(cfg: DCMConfig) -> torch.Tensor:
    """``intervals + 1`` levels from 0 to 1."""
    grid = torch.linspace(0.0, 1.0, cfg.intervals + 1)
    return shift_timesteps(grid, cfg.shift) if cfg.shift != 1.0 else grid


def consistency(model, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, action: torch.Tensor,
                previous: torch.Tensor | None = None, stack_level: torch.Tensor | None = None) -> torch.Tensor:
    """f(x_t, t) = x_t - t v(x_t, t): the student's x0 prediction under teacher forcing."""
    return x_t - t[:, :, None, None, None] * tf_velocity(model, clean, x_t, t, action, previous, stack_level)


def dcm_loss(student, target, teacher, x0: torch.Tensor, action: torch.Tensor, cfg: DCMConfig, guidance: float,
             generator: torch.Generator) -> torch.Tensor:
    b, f = x0.shape[:2]
    grid = level_grid(cfg).to(x0)
    chunks = student.config.chunk_pattern.num_chunks(f)
    n = per_chunk(torch.randint(1, cfg.intervals + 1, (b, chunks), generator=generator), student, f)
    t, t_prev = grid[n], grid[n - 1]
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = (1 - t[:, :, None, None, None]) * x0 + t[:, :, None, None, None] * noise
    # noise on the stacked frames (as the teacher was trained): a student fed its own, imperfect frames at
    # inference has seen a previous frame that is not the truth
    previous, level = stacked_noised(student, x0, generator, cfg.stack_noise)
    with torch.no_grad():
        v = guided_tf_velocity(teacher, x0, x_t, t, action, guidance, previous, level)
        x_prev = x_t + (t_prev - t)[:, :, None, None, None] * v
        y = consistency(target, x0, x_prev, t_prev, action, previous, level)
    return (consistency(student, x0, x_t, t, action, previous, level).float() - y.float()).pow(2).mean()


def train_dcm(teacher: Bundle, clips: LatentClips, cfg: DCMConfig, eval_clips: LatentClips | None = None,
              progress: bool = True) -> dict:
    """Distil the causal teacher bundle into a few-step student in ``cfg.out`` (writes ``out/bundle``)."""
    torch.manual_seed(cfg.seed)
    frozen = frozen_copy(teacher.model, cfg.device)
    check_clip(frozen, cfg.clip_frames)
    clips, eval_clips = model_clips(frozen, clips, eval_clips)
    student = trainable_copy(teacher.model, cfg.device)
    target = frozen_copy(teacher.model, cfg.device)
    guidance = teacher.sampler.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = clips.starts(cfg.clip_frames)
    held = eval_batch(eval_clips or clips, cfg)

    def step_fn(step: int) -> dict[str, float]:
        x0, action = clips.sample(cfg.batch, cfg.clip_frames, gen, starts)
        loss = dcm_loss(student, target, frozen, x0, action, cfg, guidance, gen)
        gnorm = grad_step(loss, student, opt, cfg.grad_clip)
        ema_update(target, student, cfg.ema)
        return {"loss": float(loss.detach()), "grad_norm": gnorm}

    summary = run_stage("dcm", cfg, {"student": student, "target": target}, {"opt": opt}, gen, step_fn,
                        lambda: few_step_eval(student, held, cfg.eval_steps), progress)
    sampler = SamplerConfig(kind="consistency", steps=cfg.sample_steps, cache_from="clean")
    note = (f"TF-CM discrete student (forcekit train dcm): {cfg.intervals} teacher ODE intervals, teacher CFG "
            f"{guidance}, EMA target {cfg.ema}.")
    summary["bundle"] = str(save_bundle(student, teacher, sampler, "dcm", cfg, summary, note))
    return summary
