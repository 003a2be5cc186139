"""Optional last stage, guidance distillation: fold the student's action CFG into one pass.

A few-step student that barely follows the keys on its own can follow them under
classifier-free guidance on the actions (the null action is "no key held", so guidance
pushes each frame further along what the held keys change; `forcekit eval controls` measures
it), but guidance costs a second batch row in every pass. This stage teaches a copy of the
student to give, in one conditional pass, the x0 prediction its frozen self gives under
guidance ``g``: under teacher forcing on real clips, at the noise levels its sampler visits,

    loss = | f_student(x_t, t, a) - [f_u + g (f_c - f_u)]_frozen |^2,   f(x_t, t) = x_t - t v(x_t, t)

Frames without a held key have f_c = f_u, so their target is the frozen student's own output:
what the student does when nothing is pressed does not move.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from runtime import Bundle, SamplerConfig
from runtime.sampler import chunk_levels
from training.latents import LatentClips
from training.students.common import (
    StageConfig,
    check_clip,
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


@dataclass
class GuidanceConfig(StageConfig):
    guidance_scale: float = 5.0
    lr: float = 3e-5
    sample_steps: int | None = None   # student steps written into the bundle (None: the input bundle's)


def visited_levels(sampler: SamplerConfig, max_steps: int) -> torch.Tensor:
    """The nonzero noise levels a 1..max_steps-step schedule of this sampler visits."""
    levels = {t for n in range(1, max_steps + 1) for t in chunk_levels(sampler, chunk=1, steps=n)[:-1]}
    return torch.tensor(sorted(levels))


def guidance_loss(student, frozen, x0: torch.Tensor, action: torch.Tensor, levels: torch.Tensor, scale: float,
                  generator: torch.Generator) -> torch.Tensor:
    b, f = x0.shape[:2]
    chunks = student.config.chunk_pattern.num_chunks(f)
    t = per_chunk(levels[torch.randint(len(levels), (b, chunks), generator=generator)], student, f).to(x0)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    tt = t[:, :, None, None, None]
    x_t = (1 - tt) * x0 + tt * noise
    with torch.no_grad():
        target = x_t - tt * guided_tf_velocity(frozen, x0, x_t, t, action, scale)
    pred = x_t - tt * tf_velocity(student, x0, x_t, t, action)
    return (pred.float() - target.float()).pow(2).mean()


def train_guidance(student_bundle: Bundle, clips: LatentClips, cfg: GuidanceConfig,
                   eval_clips: LatentClips | None = None, progress: bool = True) -> dict:
    """Distil ``student_bundle`` under action CFG ``cfg.guidance_scale`` into ``cfg.out/bundle`` (guidance 1)."""
    torch.manual_seed(cfg.seed)
    frozen = frozen_copy(student_bundle.model, cfg.device)
    check_clip(frozen, cfg.clip_frames)
    clips, eval_clips = model_clips(frozen, clips, eval_clips)
    student = trainable_copy(student_bundle.model, cfg.device)
    base = student_bundle.sampler
    steps = cfg.sample_steps or base.steps
    levels = visited_levels(base, max(steps, *cfg.eval_steps))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = clips.starts(cfg.clip_frames)
    held = eval_batch(eval_clips or clips, cfg)

    def step_fn(step: int) -> dict[str, float]:
        x0, action = clips.sample(cfg.batch, cfg.clip_frames, gen, starts)
        loss = guidance_loss(student, frozen, x0, action, levels, cfg.guidance_scale, gen)
        return {"loss": float(loss.detach()), "grad_norm": grad_step(loss, student, opt, cfg.grad_clip)}

    summary = run_stage("guidance", cfg, {"student": student}, {"opt": opt}, gen, step_fn,
                        lambda: few_step_eval(student, held, cfg.eval_steps), progress)
    sampler = replace(base, steps=steps, guidance_scale=1.0)
    note = (f"Guidance-distilled student (forcekit train guidance): one pass gives what `{student_bundle.name}` "
            f"gives under action CFG {cfg.guidance_scale} at levels {[round(float(t), 3) for t in levels]}.")
    summary["bundle"] = str(save_bundle(student, student_bundle, sampler, "guidance", cfg, summary, note))
    return summary
