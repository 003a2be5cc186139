"""Stage 3, TF-CM continuous (sCM, in the flow-matching parameterisation): dCM's limit of zero step size.

With f(x_t, t) = x_t - t v(x_t, t) (common to dCM and the runtime's consistency sampler), the
discrete loss |f(x_t, t) - f⁻(x_{t-Δ}, t-Δ)|² tends to Δ²|df⁻/dt|², whose gradient is
2Δ (df⁻/dt)ᵀ ∂f/∂θ. Along the teacher's probability-flow ODE, dx/dt = v_teacher (with CFG):

    df/dt = dx/dt - v(x_t, t) - t · d/dt v(x_t, t),
    d/dt v(x_t, t) = ∂v/∂x · dx/dt + ∂v/∂t        (one forward-mode JVP, tangent (dx/dt, 1)).

The JVP runs through the whole model (all blocks, attention included: the runtime picks the
reference attention under forward-mode AD on CPU, the fused Triton JVP kernel on GPU) with
``torch.func.jvp`` and no gradient: the tangent is a stop-gradient target. Stabilisers from
sCM: the JVP term is ramped in over ``tangent_warmup`` steps (r · t · dv/dt, r: 0 -> 1), and the
tangent g is normalised per sample, g / (rms(g) + c). The loss is |f - sg(f - g)|², whose
value is rms(g)² ≈ constant after normalisation; the un-normalised rms(df/dt), the quantity
training drives down, is logged as ``tangent_rms``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime import Bundle, SamplerConfig
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
class SCMConfig(StageConfig):
    guidance_scale: float | None = None  # teacher CFG; None: the causal teacher bundle's
    tangent_warmup: int = 100
    tangent_norm_c: float = 0.1
    t_min: float = 0.02
    sample_steps: int = 2


def velocity_and_time_derivative(model, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                                 action: torch.Tensor, dx_dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v(x_t, t), d/dt v(x_t(t), t)) under teacher forcing, by ``torch.func.jvp`` through the model."""
    def velocity(x, tt):
        return tf_velocity(model, clean, x, tt, action)

    with torch.no_grad():
        return torch.func.jvp(velocity, (x_t, t), (dx_dt, torch.ones_like(t)))


def normalised_tangent(g: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """g / (rms(g) + c) per sample, and rms(g) ``[B]``."""
    rms = g.float().pow(2).flatten(1).mean(1).sqrt()
    return g / (rms + c).view(-1, *[1] * (g.ndim - 1)), rms


def scm_loss(student, teacher, x0: torch.Tensor, action: torch.Tensor, cfg: SCMConfig, guidance: float,
             warm: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    b, f = x0.shape[:2]
    chunks = student.config.chunk_pattern.num_chunks(f)
    t = per_chunk(cfg.t_min + (1 - cfg.t_min) * torch.rand(b, chunks, generator=generator), student, f).to(x0)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    tt = t[:, :, None, None, None]
    x_t = (1 - tt) * x0 + tt * noise
    with torch.no_grad():
        dx_dt = guided_tf_velocity(teacher, x0, x_t, t, action, guidance)
    v_minus, dv_dt = velocity_and_time_derivative(student, x0, x_t, t, action, dx_dt)
    g, rms = normalised_tangent(dx_dt - v_minus - warm * tt * dv_dt, cfg.tangent_norm_c)
    f_theta = x_t - tt * tf_velocity(student, x0, x_t, t, action)
    loss = (f_theta.float() - (f_theta.detach() - g).float()).pow(2).mean()
    return loss, rms.mean()


def train_scm(teacher: Bundle, clips: LatentClips, cfg: SCMConfig, eval_clips: LatentClips | None = None,
              progress: bool = True) -> dict:
    """Distil the causal teacher bundle into a few-step student in ``cfg.out`` (writes ``out/bundle``)."""
    torch.manual_seed(cfg.seed)
    frozen = frozen_copy(teacher.model, cfg.device)
    check_clip(frozen, cfg.clip_frames)
    clips, eval_clips = model_clips(frozen, clips, eval_clips)
    student = trainable_copy(teacher.model, cfg.device)
    guidance = teacher.sampler.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = clips.starts(cfg.clip_frames)
    held = eval_batch(eval_clips or clips, cfg)

    def step_fn(step: int) -> dict[str, float]:
        warm = min(1.0, step / max(1, cfg.tangent_warmup))
        x0, action = clips.sample(cfg.batch, cfg.clip_frames, gen, starts)
        loss, tangent_rms = scm_loss(student, frozen, x0, action, cfg, guidance, warm, gen)
        gnorm = grad_step(loss, student, opt, cfg.grad_clip)
        return {"loss": float(loss.detach()), "tangent_rms": float(tangent_rms), "grad_norm": gnorm, "warm": warm}

    summary = run_stage("scm", cfg, {"student": student}, {"opt": opt}, gen, step_fn,
                        lambda: few_step_eval(student, held, cfg.eval_steps), progress)
    sampler = SamplerConfig(kind="consistency", steps=cfg.sample_steps, cache_from="clean")
    note = (f"TF-CM continuous student (forcekit train scm): sCM in flow-matching form, JVP tangent, teacher CFG "
            f"{guidance}, tangent warm-up {cfg.tangent_warmup} steps, normalisation c={cfg.tangent_norm_c}.")
    summary["bundle"] = str(save_bundle(student, teacher, sampler, "scm", cfg, summary, note))
    return summary
