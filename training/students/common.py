"""What every student stage shares: the teacher-forcing forward, noise levels per chunk, the
checkpointed training loop, the few-step evaluation and the bundle each stage writes.

Teacher forcing (DESIGN.md section 3) runs the model once on ``[clean | noisy]`` with the
runtime's own ``pattern.teacher_forcing(F)`` mask and ``frame_positions = [0..F) ++ [0..F)``:
noisy chunk c sees the clean chunks before it and itself, which is exactly what a session
computes when it denoises chunk c after committing the clean chunks before it to the KV cache
(tests/test_cache_equivalence.py checks that equality). So every chunk of a clip is trained
in one forward pass, and the contexts are the ones inference will see with ``cache_from="clean"``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime import Bundle, CausalDiT, SamplerConfig
from runtime.sampler import chunk_levels
from runtime.stacking import chunk_previous, previous_frames
from training.checkpoint import Every, load_checkpoint, save_checkpoint, tensorboard_writer
from training.conditions import Conditions, cat, model_inputs, null
from training.latents import LatentClips


@dataclass
class StageConfig:
    """Fields every stage has; each stage's config extends this one."""

    out: str = ""
    steps: int = 500
    batch: int = 8
    clip_frames: int = 6
    lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every_s: float = 180.0
    log_every: int = 10
    eval_every: int = 50
    eval_batch: int = 8
    eval_steps: tuple[int, ...] = (1, 2)  # few-step sampler steps the teacher-forcing eval reports
    device: str = "cpu"                   # where the models and the clips sit while training ("cuda" on a GPU)


def model_clips(model: CausalDiT, clips: LatentClips, eval_clips: LatentClips | None
                ) -> tuple[LatentClips, LatentClips | None]:
    """The training and evaluation clips with the action condition ``model`` reads (`LatentClips.for_model`),
    on the model's device."""
    device = next(model.parameters()).device
    return (clips.for_model(model.config).to(device),
            None if eval_clips is None else eval_clips.for_model(model.config).to(device))


def check_clip(model: CausalDiT, clip_frames: int) -> None:
    """Teacher forcing shows a noisy chunk every clean frame before it; a session shows it only its sink +
    window. The last chunk of the clip sees the most, so it must fit: its first frame <= sink + window."""
    cfg = model.config
    pattern = cfg.chunk_pattern
    if not pattern.is_whole(clip_frames):
        raise ValueError(f"clip_frames {clip_frames} does not end on a chunk boundary of {pattern}")
    context = pattern.chunk_start(pattern.num_chunks(clip_frames) - 1)
    if context > cfg.window_frames + cfg.sink_frames:
        raise ValueError(f"clip_frames {clip_frames}: its last chunk (from frame {context}) sees {context} clean "
                         f"frames under teacher forcing, but a session keeps sink {cfg.sink_frames} + window "
                         f"{cfg.window_frames}: training would teach the model contexts inference never shows it")


# -- the teacher-forcing forward --------------------------------------------------------------------
def tf_velocity(model: CausalDiT, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                action: Conditions | None, previous: torch.Tensor | None = None,
                stack_level: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity of every noisy frame ``[B, F, C, h, w]`` at levels ``t`` ``[B, F]``, each chunk
    conditioned on the clean chunks before it (one pass over ``[clean | noisy]``). ``stack_level``
    ``[B]``: the noise level of ``previous`` (read by a ``stack_noise_condition`` model)."""
    b, f = clean.shape[:2]
    pattern = model.config.chunk_pattern
    positions = torch.arange(f, device=clean.device).repeat(2)
    seq_action = None if action is None else cat([action, action], 1)
    v = model(torch.cat([clean, noisy], 1), torch.cat([torch.zeros_like(t), t], 1), **model_inputs(seq_action),
              previous=tf_previous(model, clean, previous), stack_level=stack_level,
              mask=pattern.teacher_forcing(f), frame_positions=positions)
    return v[:, f:]


def tf_previous(model: CausalDiT, clean: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor | None:
    """Frame stacking under teacher forcing: ``[clean | noisy]``'s previous frames, the clean half each
    frame's own past, the noisy half what its chunk sees while denoised (`runtime.stacking`).
    ``previous`` (e.g. noise-augmented) replaces ``previous_frames(clean)`` as the source of both."""
    k = model.config.stack_frames
    if not k:
        return None
    own = previous_frames(clean, k) if previous is None else previous
    return torch.cat([own, chunk_previous(own, model.config.chunk_pattern)], 1)


def guided_tf_velocity(model: CausalDiT, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                       action: Conditions, scale: float, previous: torch.Tensor | None = None,
                       stack_level: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance: v_u + g (v_c - v_u), unconditional = zeroed actions and audio
    (`training.conditions.null`)."""
    if scale == 1.0:
        return tf_velocity(model, clean, noisy, t, action, previous, stack_level)
    def twice(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat([x, x])

    v = tf_velocity(model, twice(clean), twice(noisy), twice(t), cat([action, null(action)], 0), twice(previous),
                    twice(stack_level))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + scale * (v_cond - v_uncond)


def per_chunk(values: torch.Tensor, model: CausalDiT, frames: int) -> torch.Tensor:
    """Spread per-chunk values ``[B, chunks]`` to per-frame ``[B, frames]`` (`ChunkPattern.chunk_index`)."""
    return values[:, model.config.chunk_pattern.chunk_index(frames).to(values.device)]


def chunk_noise_levels(model: CausalDiT, batch: int, frames: int, generator: torch.Generator,
                       independent: bool = True) -> torch.Tensor:
    """Logit-normal levels ``[B, F]`` in (0, 1): one per chunk (diffusion forcing) or one per clip."""
    chunks = model.config.chunk_pattern.num_chunks(frames)
    u = torch.sigmoid(torch.randn(batch, chunks if independent else 1, generator=generator))
    return per_chunk(u.expand(batch, chunks).contiguous(), model, frames)


def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pt, ps in zip(target.parameters(), source.parameters()):
            pt.lerp_(ps, 1 - decay)


# -- evaluation: few-step generation under teacher forcing ------------------------------------------
@torch.no_grad()
def tf_few_step_mse(model: CausalDiT, clean: torch.Tensor, action: torch.Tensor, steps: int,
                    generator: torch.Generator, kind: str = "consistency") -> float:
    """Latent MSE to the real frames of a ``steps``-step generation of every chunk after the first,
    each from real clean context (the runtime's sampler levels and update rule, fixed noise)."""
    from runtime.sampler import step as sampler_step

    levels = chunk_levels(SamplerConfig(kind=kind, steps=steps), chunk=1)
    x = torch.randn(clean.shape, generator=generator).to(clean)
    for t, t_next in zip(levels[:-1], levels[1:]):
        tt = torch.full(clean.shape[:2], t, dtype=clean.dtype, device=clean.device)
        v = tf_velocity(model, clean, x, tt, action)
        x = sampler_step(kind, x, v, t, t_next, generator)
    first = model.config.chunk_pattern.first_frames
    return float((x[:, first:] - clean[:, first:]).pow(2).mean())


def eval_batch(clips: LatentClips, cfg: StageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation clips (same seed every run and every stage: curves are comparable)."""
    return clips.sample(cfg.eval_batch, cfg.clip_frames, torch.Generator().manual_seed(12345))


def few_step_eval(model: CausalDiT, batch: tuple[torch.Tensor, torch.Tensor], steps: tuple[int, ...],
                  kind: str = "consistency") -> dict[str, float]:
    was_training = model.training
    model.eval()
    out = {f"tf_mse_{n}step": tf_few_step_mse(model, batch[0], batch[1], n, torch.Generator().manual_seed(7), kind)
           for n in steps}
    model.train(was_training)
    return out


# -- the checkpointed loop ---------------------------------------------------------------------------
def run_stage(name: str, cfg: StageConfig, modules: dict[str, torch.nn.Module],
              optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator,
              step_fn: Callable[[int], dict[str, float]], eval_fn: Callable[[], dict[str, float]] | None = None,
              progress: bool = True) -> dict:
    """Run ``step_fn(step)`` until ``cfg.steps``, resuming from ``out/ckpt.pt`` when it exists.

    Checkpoints (every module, optimiser, the generator, the step and the metric history) are
    written atomically every ``cfg.ckpt_every_s`` seconds and at the end; scalars go to
    TensorBoard (``out/tb``) and to ``out/metrics.json`` (the plots read it).
    """
    from tqdm import tqdm

    out = Path(cfg.out)
    step, history, elapsed = 0, {"train": [], "eval": []}, 0.0
    ckpt = load_checkpoint(out / "ckpt.pt")
    if ckpt is not None:
        for k, m in modules.items():
            m.load_state_dict(ckpt["modules"][k])
        for k, o in optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
        generator.set_state(ckpt["generator"])
        step, history, elapsed = ckpt["step"], ckpt["history"], ckpt["elapsed_s"]
    base_lr = {k: [g.get("initial_lr", g["lr"]) for g in o.param_groups] for k, o in optimizers.items()}
    for k, o in optimizers.items():
        for g, lr in zip(o.param_groups, base_lr[k]):
            g["initial_lr"] = lr
    writer = tensorboard_writer(out / "tb")
    every = Every(cfg.ckpt_every_s)
    started, start_step = time.time(), step

    def seconds() -> float:
        return round(elapsed + time.time() - started, 1)

    def save() -> None:
        save_checkpoint(out / "ckpt.pt", {
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "generator": generator.get_state(), "step": step, "history": history, "elapsed_s": seconds(),
            "cfg": asdict(cfg)})
        (out / "metrics.json").write_text(json.dumps(history) + "\n")

    def log(kind: str, scalars: dict[str, float]) -> None:
        history[kind].append({"step": step, "seconds": seconds(), **scalars})
        if writer is not None:
            for key, value in scalars.items():
                writer.add_scalar(f"{name}/{key}", value, step)

    if eval_fn is not None and step == 0:
        log("eval", eval_fn())
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {name}", disable=not progress)
    while step < cfg.steps:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup))
        for k, o in optimizers.items():
            for g, lr in zip(o.param_groups, base_lr[k]):
                g["lr"] = lr * warm
        scalars = step_fn(step)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log("train", scalars)
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(scalars.items())[:3]})
        if eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            log("eval", eval_fn())
        if every():
            save()
    bar.close()
    save()
    if writer is not None:
        writer.close()
    last = history["train"][-1] if history["train"] else {}
    return {"stage": name, "step": step, "steps_this_run": step - start_step, "seconds_total": seconds(),
            "train": last, "eval": history["eval"][-1] if history["eval"] else {}}


def grad_step(loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer, clip: float) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return float(norm)


# -- bundles -----------------------------------------------------------------------------------------
def trainable_copy(model: CausalDiT, device: str | torch.device = "cpu") -> CausalDiT:
    return copy.deepcopy(model).to(device).train().requires_grad_(True)


def frozen_copy(model: CausalDiT, device: str | torch.device = "cpu") -> CausalDiT:
    return copy.deepcopy(model).to(device).eval().requires_grad_(False)


def save_bundle(model: CausalDiT, base: Bundle, sampler: SamplerConfig, stage: str, cfg: StageConfig,
                summary: dict, note: str) -> Path:
    """Write ``out/bundle``: the stage's weights with the base bundle's codec and provenance."""
    extra = {**base.extra, "stage": stage, f"{stage}_config": asdict(cfg),
             f"{stage}_summary": {k: summary[k] for k in ("step", "seconds_total", "eval") if k in summary}}
    card = (f"# {stage}\n\n{note}\n\nSampler: {json.dumps(sampler.to_dict())}\n\n"
            f"Trained {summary.get('step')} steps in {summary.get('seconds_total')} s from `{base.name}`.\n\n"
            f"```\n{json.dumps(extra, indent=2, default=str)}\n```\n")
    bundle = Bundle(model.config, frozen_copy(model), base.codec, sampler, fps=base.fps, name=stage, card=card,
                    extra=extra, start_scenes=base.start_scenes, audio_mouth=base.audio_mouth)
    return bundle.save(Path(cfg.out) / "bundle")
