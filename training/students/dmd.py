"""Stage 4, SF-DMD: self-forcing rollouts trained by distribution matching against the bidirectional teacher.

Self forcing. The student generates clips the way a session does: `runtime.rollout.Rollout`
(the same object `open_session` drives: KV cache, the bundle's few-step schedule, the
``cache_from`` recipe) starting from real clean context frames, one chunk at a time, each
chunk conditioned on the student's own previous chunks. Each chunk draws a random exit step:
its output is the x0 prediction of that step. The rollout runs without gradients; before every
chunk of the window that will be scored (drawn first) the rollout's context is snapshotted, and
after the scores are known each such chunk's exit step is replayed with gradients against its
snapshot in ``cache_mode="readonly"`` (the cache is detached, as in Self-Forcing) and
back-propagated at once. Peak memory is one chunk's graph plus one context copy per scored
chunk, whatever the rollout length.

Distribution matching (DMD/DMD2). The rollout x0 is re-noised to a random level t; the real
score is the frozen bidirectional teacher with classifier-free guidance on the actions (or,
``real_score="causal"``, a causal teacher under teacher forcing: `score_x0`), the
fake score a critic initialised from the teacher and trained ``critic_steps`` times per
generator step with flow matching on the (detached) rollouts. In x0 terms the KL gradient is
x0_fake - x0_real; normalised per sample by mean|x0 - x0_real|, it is applied through the
surrogate 0.5 |x0 - sg(x0 - grad)|², so the student moves towards the teacher's prediction
and away from its own current distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime import Bundle, ChunkCondition, Rollout, SamplerConfig
from runtime.sampler import predict_x0
from training.conditions import Conditions, cat, chunk_condition, model_inputs, null
from training.latents import LatentClips
from training.students.common import (
    StageConfig,
    eval_batch,
    few_step_eval,
    frozen_copy,
    guided_tf_velocity,
    model_clips,
    run_stage,
    save_bundle,
    trainable_copy,
)
from training.teacher import stacked


@dataclass
class DMDConfig(StageConfig):
    lr: float = 2e-5
    critic_lr: float | None = None  # None: lr
    guidance_scale: float | None = None  # real-score CFG; None: the teacher bundle's
    critic_steps: int = 2
    context_frames: int | None = None  # real clean frames before the rollout; None: the first chunk
    rollout_chunks: int | None = None  # None: fill clip_frames; more: a long rollout scored in windows
    cache_from: str = "clean"  # the KV-cache recipe trained with, written into the bundle
    sample_steps: int = 2
    t_min: float = 0.02
    t_max: float = 0.98
    real_score: str = "bidirectional"  # or "causal": the causal teacher under teacher forcing (see score_x0)
    # DMD's regression term (Yin et al. 2024): the rollout's frames also pulled toward the recorded frames of the
    # same clip and keys, which a self-forcing rollout never sees otherwise; a deterministic engine (a still
    # Doom view, a turn) has one right next frame, and the student's own frames must reproduce it.
    regression_weight: float = 0.0
    # Still clips (`LatentClips.sample_still`): this share of each batch holds a frame at rest with no key for the
    # whole rollout. A long play with no key compounds the student's per-frame blur; recordings hold few long
    # stretches at rest, and a rollout from one, scored and regressed against the unchanged frame, is the
    # engine's own behaviour (0: off).
    still_share: float = 0.0


# -- the DMD gradient ---------------------------------------------------------------------------------
def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """KL gradient w.r.t. the generated sample, in x0 units, normalised per sample (DMD)."""
    norm = (x0 - x0_real).abs().flatten(1).mean(1).clamp(min=1e-6).view(-1, *[1] * (x0.ndim - 1))
    return (x0_fake - x0_real) / norm


def regression_gradient(x0: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The regression term's gradient w.r.t. the generated sample, normalised per sample like `dmd_gradient`
    (so ``regression_weight`` 1 weighs it as the DMD gradient): a unit push from the recorded frame to x0."""
    return dmd_gradient(x0, truth, x0)


def dmd_surrogate(x0: torch.Tensor, grad: torch.Tensor, count: int) -> torch.Tensor:
    """0.5 |x0 - sg(x0 - grad)|² summed over ``x0`` and divided by ``count``: d/dx0 = grad / count."""
    return 0.5 * (x0.float() - (x0 - grad).detach().float()).pow(2).sum() / count


# -- one self-forcing rollout -----------------------------------------------------------------------
@dataclass
class ChunkRecord:
    snapshot: dict
    cond: ChunkCondition
    exit_input: tuple[torch.Tensor, float]
    frames: slice


def self_forcing_rollout(rollout: Rollout, context: torch.Tensor, action: Conditions, chunks: int,
                         generator: torch.Generator, random_exit: bool = True, keep: slice | None = None
                         ) -> tuple[torch.Tensor, list[ChunkRecord]]:
    """Real ``context`` then ``chunks`` generated chunks, each ending at a random exit step (no gradients;
    ``random_exit=False``: the full schedule, as inference runs it).

    Returns the whole clip ``[B, F, ...]`` (context + generated x0) and what the replay needs, for the
    chunks inside the frames ``keep`` only (default: all): each record holds a copy of the context, so a
    long rollout scored on one window keeps the window's records, not one per chunk.
    """
    pattern = rollout.pattern
    rollout.reset()
    k = context.shape[1]
    with torch.no_grad():
        while rollout.frames < k:
            s, n = rollout.frames, rollout.next_chunk_frames()
            rollout.add_context(context[:, s:s + n], chunk_condition(action[:, s:s + n]))
        parts, records = [context], []
        for _ in range(chunks):
            s, n = rollout.frames, rollout.next_chunk_frames()
            steps = len(_levels(rollout)) - 1
            # last_step keeps the exit step's input as context: step 0's input is pure noise, so never exit there
            lowest = 1 if rollout.sampler.cache_from == "last_step" else 0
            exit_step = int(torch.randint(lowest, steps, (1,), generator=generator)) if random_exit else None
            cond = chunk_condition(action[:, s:s + n])
            kept = keep is None or (keep.start <= s and s + n <= keep.stop)
            snap = rollout.snapshot() if kept else None
            noise = torch.randn((context.shape[0], n, *context.shape[2:]), generator=generator).to(context)
            parts.append(rollout.generate_chunk(noise, cond, exit_step=exit_step))
            if kept:
                records.append(ChunkRecord(snap, cond, rollout.exit_input, slice(s, s + n)))
    assert pattern.is_whole(rollout.frames)
    return torch.cat(parts, 1), records


def _levels(rollout: Rollout) -> list[float]:
    from runtime.sampler import chunk_levels

    return chunk_levels(rollout.sampler, rollout.chunk)


def replay_exit_step(rollout: Rollout, record: ChunkRecord) -> torch.Tensor:
    """The chunk's exit step again, with gradients, against its detached read-only context."""
    rollout.restore(record.snapshot)
    x, t = record.exit_input
    return predict_x0(x, rollout.velocity(x, t, record.cond, cache_mode="readonly"), t)


def score_window_start(pattern, frames: int, window: int, context: int, generator: torch.Generator) -> int:
    """First frame of the ``window``-frame stretch of a ``frames``-frame rollout that is scored this step.

    A rollout longer than the teacher's clip (Self-Forcing++-style long rollouts, which expose the
    student to its own drifted context) is scored on one random chunk-aligned window; its first
    ``context`` frames, generated ones included, stay clean for the scores, so the teacher judges
    how the student continues its own past. The window and its context end on chunk boundaries.
    """
    starts = [s for s in range(frames - window + 1)
              if pattern.is_whole(s) and pattern.is_whole(s + context) and pattern.is_whole(s + window)]
    return starts[int(torch.randint(len(starts), (1,), generator=generator))] if len(starts) > 1 else 0


# -- scores -------------------------------------------------------------------------------------------
def bidirectional_x0(model, clip: torch.Tensor, t: torch.Tensor, action: Conditions, guidance: float,
                     previous: torch.Tensor | None = None) -> torch.Tensor:
    """x0 prediction of a bidirectional model on a clip whose frames sit at levels ``t`` ``[B, F]``
    (``previous``: the stacked clean frames of a frame-stacking model, `training.teacher.stacked`)."""
    if guidance != 1.0:
        both = None if previous is None else torch.cat([previous, previous])
        v = model(torch.cat([clip, clip]), torch.cat([t, t]), **model_inputs(cat([action, null(action)], 0)),
                  previous=both)
        v_cond, v_uncond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
    else:
        v = model(clip, t, **model_inputs(action), previous=previous)
    return clip - t[:, :, None, None, None] * v


def score_x0(model, clip: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, action: Conditions, guidance: float,
             kind: str) -> torch.Tensor:
    """x0 prediction of a score model on the re-noised clip ``x_t`` (levels ``t``).

    ``bidirectional``: the whole clip at once (the issue's recipe: the bidirectional teacher).
    ``causal``: a causal teacher under teacher forcing: each noisy frame sees the clean ``clip``
    frames before it, so the score is that of each frame's conditional given the student's own
    past, the factorisation the student samples from.
    """
    if kind == "bidirectional":
        return bidirectional_x0(model, x_t, t, action, guidance, stacked(model, clip))
    if kind == "causal":
        return x_t - t[:, :, None, None, None] * guided_tf_velocity(model, clip, x_t, t, action, guidance)
    raise ValueError(f"real_score must be 'bidirectional' or 'causal', got {kind!r}")


def renoise(clip: torch.Tensor, k: int, t_min: float, t_max: float, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise the frames after the ``k`` context frames to one random level per clip (context stays clean)."""
    b, f = clip.shape[:2]
    level = t_min + (t_max - t_min) * torch.rand(b, 1, generator=generator)
    t = torch.cat([torch.zeros(b, k), level.expand(b, f - k)], 1).to(clip)
    noise = torch.randn(clip.shape, generator=generator).to(clip)
    tt = t[:, :, None, None, None]
    return (1 - tt) * clip + tt * noise, t, noise


def critic_loss(critic, clip: torch.Tensor, k: int, action: Conditions, cfg: DMDConfig,
                generator: torch.Generator) -> torch.Tensor:
    """Flow matching of the critic on the student's (detached) rollouts: it learns the fake score."""
    x_t, t, noise = renoise(clip, k, cfg.t_min, cfg.t_max, generator)
    if cfg.real_score == "bidirectional":
        v = critic(x_t, t, **model_inputs(action), previous=stacked(critic, clip))
    else:
        v = guided_tf_velocity(critic, clip, x_t, t, action, 1.0)
    return (v[:, k:].float() - (noise - clip)[:, k:].float()).pow(2).mean()


# -- training -----------------------------------------------------------------------------------------
@torch.no_grad()
def rollout_mse(model, sampler: SamplerConfig, clean: torch.Tensor, action: torch.Tensor, k: int) -> float:
    """Latent MSE to the real frames of a session-style rollout (kv cache, own outputs as context)."""
    ro = Rollout(model, sampler, batch=clean.shape[0], kv_cache=True, generator=torch.Generator().manual_seed(3))
    chunks = ro.pattern.num_chunks(clean.shape[1]) - ro.pattern.num_chunks(k)
    clip, _ = self_forcing_rollout(ro, clean[:, :k], action, chunks, torch.Generator().manual_seed(4), False,
                                   keep=slice(0, 0))  # nothing is replayed: keep no context copies
    return float((clip[:, k:] - clean[:, k:clip.shape[1]]).pow(2).mean())


def train_dmd(student: Bundle, teacher: Bundle, clips: LatentClips, cfg: DMDConfig,
              eval_clips: LatentClips | None = None, progress: bool = True) -> dict:
    """Train (or resume) the few-step ``student`` in ``cfg.out``; writes ``out/bundle``."""
    if cfg.cache_from not in ("clean", "last_step"):
        raise ValueError(f"cache_from must be 'clean' or 'last_step', got {cfg.cache_from!r}")
    if cfg.cache_from == "last_step" and cfg.sample_steps < 2:
        raise ValueError(f"cache_from='last_step' needs sample_steps >= 2 (got {cfg.sample_steps}): with one step "
                         "the context would hold the pure-noise input of every chunk")
    if cfg.real_score not in ("bidirectional", "causal"):
        raise ValueError(f"real_score must be 'bidirectional' or 'causal', got {cfg.real_score!r}")
    if not 0.0 <= cfg.still_share <= 1.0:
        raise ValueError(f"still_share must be in [0, 1], got {cfg.still_share}")
    torch.manual_seed(cfg.seed)
    generator = trainable_copy(student.model, cfg.device)
    real = frozen_copy(teacher.model, cfg.device)
    critic = trainable_copy(teacher.model, cfg.device)
    if generator.config.to_dict() != real.config.to_dict():
        raise ValueError("student and teacher bundles have different model configs")
    clips, eval_clips = model_clips(generator, clips, eval_clips)
    pattern = generator.config.chunk_pattern
    k = pattern.first_frames if cfg.context_frames is None else cfg.context_frames
    if not pattern.is_whole(k) or k < 1:
        raise ValueError(f"context_frames {k} must be >= 1 and end on a chunk boundary of {pattern}")
    chunks = cfg.rollout_chunks or pattern.num_chunks(cfg.clip_frames) - pattern.num_chunks(k)
    frames = pattern.chunk_start(pattern.num_chunks(k) + chunks)
    guidance = teacher.sampler.guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    sampler = SamplerConfig(kind="consistency", steps=cfg.sample_steps, cache_from=cfg.cache_from,
                            shift=student.sampler.shift)
    gen = torch.Generator().manual_seed(cfg.seed)  # all training randomness (checkpointed: resume is exact)
    rollout = Rollout(generator, sampler, batch=cfg.batch, kv_cache=True, generator=gen)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr or cfg.lr, weight_decay=cfg.weight_decay)
    starts = clips.starts(frames)
    still = round(cfg.still_share * cfg.batch)
    rest = clips.rest_rows() if still else None
    held = eval_batch(eval_clips or clips, StageConfig(eval_batch=cfg.eval_batch, clip_frames=frames))

    window = min(frames, cfg.clip_frames)  # the clip length the teacher was trained on scores the rollout
    if not pattern.is_whole(window) or window <= k:
        raise ValueError(f"clip_frames {cfg.clip_frames} must end on a chunk boundary after the {k} context frames")

    def step_fn(step: int) -> dict[str, float]:
        real_clip, action = clips.sample(cfg.batch, frames, gen, starts)
        if still:
            real_clip[:still], action[:still] = clips.sample_still(still, frames, gen, rest)
        w = score_window_start(pattern, frames, window, k, gen)  # first: only its chunks keep a snapshot
        clip, records = self_forcing_rollout(rollout, real_clip[:, :k], action, chunks, gen,
                                             keep=slice(w + k, w + window))
        clip, action = clip[:, w:w + window], action[:, w:w + window]
        for _ in range(cfg.critic_steps):
            c_loss = critic_loss(critic, clip, k, action, cfg, gen)
            opt_c.zero_grad(set_to_none=True)
            c_loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
            opt_c.step()
        with torch.no_grad():
            x_t, t, _ = renoise(clip, k, cfg.t_min, cfg.t_max, gen)
            x0_real = score_x0(real, clip, x_t, t, action, guidance, cfg.real_score)
            x0_fake = score_x0(critic, clip, x_t, t, action, 1.0, cfg.real_score)
            grad = dmd_gradient(clip[:, k:], x0_real[:, k:], x0_fake[:, k:])
            truth = real_clip[:, w + k:w + window]              # the recorded frames the rollout replaced
            if cfg.regression_weight:
                grad = grad + cfg.regression_weight * regression_gradient(clip[:, k:], truth)
        opt_g.zero_grad(set_to_none=True)
        count, surrogate, first = grad.numel(), 0.0, w + k
        for rec in records:  # one chunk's graph at a time, for the chunks the window scores (all it kept)
            x0 = replay_exit_step(rollout, rec)
            loss = dmd_surrogate(x0, grad[:, rec.frames.start - first:rec.frames.stop - first], count)
            loss.backward()
            surrogate += float(loss.detach())
        gnorm = float(torch.nn.utils.clip_grad_norm_(generator.parameters(), cfg.grad_clip))
        opt_g.step()
        return {"dmd_gap": float((x0_fake - x0_real)[:, k:].pow(2).mean()), "critic_loss": float(c_loss.detach()),
                "surrogate": surrogate, "grad_norm": gnorm, "rollout_mse": float((clip[:, k:] - truth).pow(2).mean())}

    def eval_fn() -> dict[str, float]:
        return {**few_step_eval(generator, held, cfg.eval_steps),
                "sf_rollout_mse": rollout_mse(generator, sampler, held[0], held[1], k)}

    summary = run_stage("dmd", cfg, {"generator": generator, "critic": critic}, {"gen": opt_g, "critic": opt_c},
                        gen, step_fn, eval_fn, progress)
    note = (f"SF-DMD student (forcekit train dmd) from `{student.name}`: self-forcing rollouts of {chunks} chunks "
            f"after {k} real frames, {cfg.sample_steps}-step schedule with random exit steps, real score = "
            f"{cfg.real_score} teacher `{teacher.name}` with CFG {guidance}, critic updated {cfg.critic_steps}x "
            f"per step, KV cache "
            f"written from `{cfg.cache_from}` in training and in this bundle's sampler.")
    summary["bundle"] = str(save_bundle(generator, student, sampler, "dmd", cfg, summary, note))
    return summary
