"""The bidirectional teacher: action-conditioned flow matching over latent clips.

`CausalDiT` runs with no mask (every frame sees every frame). Each training clip has a random
clean prefix (context frames at t = 0, no loss) and a noisy suffix whose frames carry either
one shared noise level or independent per-frame levels (diffusion forcing). One model thus
learns to (a) generate a whole clip given context and (b) denoise the newest frame given clean
past frames, which is what a session asks of it frame by frame. Actions are dropped (zeroed)
for whole clips with probability `action_dropout`, so sampling can use classifier-free
guidance: v = v_uncond + g (v_cond - v_uncond).

Frame stacking (``ModelConfig.stack_frames``): every frame also sees the clean latents of the
frames before it on the channel axis (`runtime.stacking`), noise-augmented by up to
``stack_noise`` so that copying the past is not enough. Such a teacher cannot sample a whole
clip at once (a frame's past is not known before it is generated): `sample_clip` then
generates frame by frame.

Distributed: run under torchrun; DDP averages gradients, every rank draws its own clips and
noise (generators seeded with the rank), only rank 0 writes files (no collective inside that
branch), and every rank leaves the run at the same step.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from runtime import Bundle, CausalDiT, ModelConfig, SamplerConfig
from runtime.audio_mouth import AudioToMouth
from runtime.codec import Codec
from runtime.stacking import noised, previous_frames
from training.camera import calibrate_camera_flow, calibrate_camera_motion
from training.checkpoint import Every, load_checkpoint, save_checkpoint, tensorboard_writer
from training.conditions import Conditions, cat, dropped, frame_count, model_inputs, null
from training.latents import LatentClips


@dataclass
class TeacherTrainConfig:
    out: str = ""
    steps: int = 2000
    batch: int = 8
    clip_frames: int = 8
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999               # the EMA's decay once warmed up (`ema_decay`)
    action_dropout: float = 0.1
    context_prob: float = 0.75       # share of clips with a clean context prefix
    per_frame_noise_prob: float = 0.5  # share of clips with independent per-frame noise levels
    timestep_shift: float = 1.0      # >1 moves training levels toward pure noise (t' = s t / (1 + (s - 1) t))
    # Where the loss counts: a latent-pixel box (a lip-sync model's mask box, the only place its output
    # is used) and the weight of the pixels outside it (1: the whole frame alike).
    loss_region: tuple[int, int, int, int] | None = None
    outside_weight: float = 1.0
    stack_noise: float = 0.0         # frame stacking: noise augmentation level of the stacked frames, up to
    seed: int = 0
    ckpt_every_s: float = 180.0
    log_every: int = 10
    guidance_scale: float = 1.5      # written into the bundle's sampler
    sample_steps: int = 50
    save_rank_states: bool = False   # write each rank's final weights (DDP consistency checks)
    device: str = "cpu"              # where the model and the clips sit ("cuda": rank r of a DDP run takes cuda:r)
    max_seconds: float = 0.0         # > 0: stop after this much wall time of this run (a GPU budget), bundle written
    extra: dict = field(default_factory=dict)


def lr_at(cfg: TeacherTrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def ema_decay(target: float, step: int) -> float:
    """The EMA's decay at optimizer step ``step`` (from 0): ``(1 + step) / (10 + step)``, capped at ``target``.

    A constant 0.999 keeps 0.999^N of the initial weights in the average after N steps: 37 % of a random
    model after 1,000 steps, 13 % after 2,000, and the bundle is the average. Ramped, the initial weights'
    share is below 1e-12 after 100 steps, and the average still spans about a ninth of the steps so far."""
    return min(target, (1 + step) / (10 + step))


def noise_levels(batch: int, frames: int, cfg: TeacherTrainConfig, generator: torch.Generator
                 ) -> torch.Tensor:
    """Per-frame t [B, F]: 0 on a random clean prefix, logit-normal levels on the rest."""
    shared = torch.sigmoid(torch.randn(batch, 1, generator=generator)).expand(batch, frames)
    per_frame = torch.sigmoid(torch.randn(batch, frames, generator=generator))
    use_pf = torch.rand(batch, 1, generator=generator) < cfg.per_frame_noise_prob
    t = torch.where(use_pf, per_frame, shared).clone()
    prefix = torch.randint(1, frames, (batch,), generator=generator)
    prefix = torch.where(torch.rand(batch, generator=generator) < cfg.context_prob, prefix, torch.zeros_like(prefix))
    t[torch.arange(frames)[None, :] < prefix[:, None]] = 0.0
    s = cfg.timestep_shift
    return s * t / (1 + (s - 1) * t)


def region_weights(size: tuple[int, int], box: tuple[int, int, int, int] | None, outside: float
                   ) -> torch.Tensor:
    """``[h, w]`` loss weights: 1 inside ``box`` (y0, x0, y1, x1), ``outside`` elsewhere; all 1 without a box."""
    if box is None:
        return torch.ones(size)
    y0, x0, y1, x1 = box
    w = torch.full(size, float(outside))
    w[y0:y1, x0:x1] = 1.0
    return w


def flow_matching_loss(model: torch.nn.Module, x0: torch.Tensor, cond: Conditions, cfg: TeacherTrainConfig,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity MSE on the noisy frames. Returns (loss, the noise drawn: per-rank checks use it)."""
    b, f = x0.shape[:2]
    t = noise_levels(b, f, cfg, generator).to(x0)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    drop = torch.rand(b, 1, 1, generator=generator) < cfg.action_dropout
    cond = dropped(cond, drop)
    tt = t[:, :, None, None, None]
    x_t = (1 - tt) * x0 + tt * noise
    previous, level = stacked_noised(model, x0, generator, cfg.stack_noise)
    v = model(x_t, t, **model_inputs(cond), previous=previous, stack_level=level)
    weight = (t > 0).to(x0)[:, :, None, None, None] * region_weights(x0.shape[-2:], cfg.loss_region,
                                                                      cfg.outside_weight).to(x0)
    err = (v.float() - (noise - x0)).pow(2) * weight
    return err.sum() / (weight.sum() * x0.shape[2]).clamp(min=1e-12), noise


def _config(model: torch.nn.Module):
    """The model's config, through a DDP wrapper (None for stand-ins without one)."""
    return getattr(getattr(model, "module", model), "config", None)


def stacked_noised(model: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None,
                   noise: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The previous frames a stacking model sees for clean clips ``x0``, noise-augmented up to level
    ``noise``, and each clip's level ``[B]`` (None without noise; both None without stacking)."""
    cfg = _config(model)
    k = getattr(cfg, "stack_frames", 0)
    if not k:
        return None, None
    previous = previous_frames(x0, k)
    if noise <= 0:
        return previous, None
    return noised(previous, noise, generator, cfg.stack_noise_form)


def stacked(model: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor | None:
    """The clean previous frames a stacking model sees for clips ``x0`` (None without stacking)."""
    return stacked_noised(model, x0)[0]


@torch.no_grad()
def action_gap(model: torch.nn.Module, x0: torch.Tensor, cond: Conditions, level: float,
               generator: torch.Generator) -> float:
    """How much the true actions lower the velocity loss of the newest frame, over zeroed ones.

    Clips ``x0`` ``[B, F, ...]`` keep their first F - 1 frames clean and the last at noise
    ``level``; at a high level only the action tells where the view moves next. A gap near 0
    means the model ignores the keys, whatever its loss says (a blurred average of the moves
    scores well on PSNR, see docs/students.md).
    """
    true, zero = action_losses(model, x0, cond, level, generator)
    return zero - true


@torch.no_grad()
def action_losses(model: torch.nn.Module, x0: torch.Tensor, cond: Conditions, level: float,
                  generator: torch.Generator, region: torch.Tensor | None = None) -> tuple[float, float]:
    """The newest frame's velocity loss with the true and with zeroed conditions (actions, audio), on the
    same noise (`action_gap` is their difference); over the latent pixels where ``region`` ``[h, w]`` is
    1 (a lip-sync model's mask box: the only place its output is used), or the whole frame."""
    b, f = x0.shape[:2]
    t = torch.zeros(b, f, dtype=x0.dtype, device=x0.device)
    t[:, -1] = level
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    tt = t[:, :, None, None, None]
    x_t = (1 - tt) * x0 + tt * noise
    target = (noise - x0)[:, -1]
    previous = stacked(model, x0)
    weight = (torch.ones(x0.shape[-2:]) if region is None else region.float()).to(x0)
    weight = weight / (weight.sum() * x0.shape[0] * x0.shape[2])
    true, zero = (((model(x_t, t, **model_inputs(c), previous=previous)[:, -1].float() - target).pow(2)
                   * weight).sum().item() for c in (cond, null(cond)))
    return true, zero


@torch.no_grad()
def action_gap_report(model: torch.nn.Module, clips: LatentClips, clip_frames: int, count: int = 256,
                      seeds: int = 3, levels: tuple[float, ...] = (0.5, 0.9), batch: int = 32,
                      region: torch.Tensor | None = None) -> dict:
    """`action_gap` measured on ``count`` clips for each of ``seeds`` seeds (clips and noise), per level:
    the mean gap, its spread over the seeds, and the gap relative to the true-action loss (over
    ``region``, see `action_losses`). One seed on 32 clips, as the training log measures it, is too noisy
    to rank recipes by."""
    config = getattr(model, "config", None)      # stand-ins without a config read the clips as they are
    clips, out = (clips if config is None else clips.for_model(config)), {}
    for level in levels:
        gaps, rel = [], []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(1000 + seed)
            total, loss, n = 0.0, 0.0, 0
            while n < count:
                b = min(batch, count - n)
                x0, cond = clips.sample(b, clip_frames, g)
                true, zero = action_losses(model, x0, cond, level, g, region)
                total, loss, n = total + (zero - true) * b, loss + true * b, n + b
            gaps.append(total / count)
            rel.append(total / max(loss, 1e-12))
        out[f"t{level}"] = {"gap": round(float(torch.tensor(gaps).mean()), 6),
                            "gap_seed_std": round(float(torch.tensor(gaps).std()), 6) if seeds > 1 else 0.0,
                            "relative": round(float(torch.tensor(rel).mean()), 5)}
    return {"clips": count, "seeds": seeds, "clip_frames": clip_frames, "levels": out}


@torch.no_grad()
def sample_clip(model: CausalDiT, context: torch.Tensor, cond: Conditions, steps: int = 50,
                guidance: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bidirectional Euler sampling of a whole clip after clean `context` [B, k, C, h, w].

    `cond` [B, F, D] holds the conditioning action of every frame (context included). Returns
    the F - k generated latents. CFG: v = v_u + g (v_c - v_u), unconditional = zeroed actions.
    A frame-stacking model generates one frame at a time, each after the frames before it.
    """
    if model.config.stack_frames:
        k = context.shape[1]
        for f in range(k, frame_count(cond)):
            new = _sample_frames(model, context, cond[:, :f + 1], steps, guidance, generator)
            context = torch.cat([context, new], 1)
        return context[:, k:]
    return _sample_frames(model, context, cond, steps, guidance, generator)


def _sample_frames(model: CausalDiT, context: torch.Tensor, cond: Conditions, steps: int, guidance: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    b, k = context.shape[:2]
    f = frame_count(cond)
    shape = (b, f - k, *context.shape[2:])
    x = torch.randn(shape, generator=generator).to(context)
    levels = torch.linspace(1.0, 0.0, steps + 1)
    # stacking: one new frame, whose past is the context (a frame never sees itself)
    previous = stacked(model, torch.cat([context, x], 1))
    for t, t_next in zip(levels[:-1].tolist(), levels[1:].tolist()):
        seq = torch.cat([context, x], 1)
        tv = torch.cat([torch.zeros(b, k), torch.full((b, f - k), t)], 1).to(context)
        if guidance != 1.0:
            both = None if previous is None else torch.cat([previous, previous])
            v = model(torch.cat([seq, seq]), torch.cat([tv, tv]), **model_inputs(cat([cond, null(cond)], 0)),
                      previous=both)
            vc, vu = v.chunk(2)
            v = vu + guidance * (vc - vu)
        else:
            v = model(seq, tv, **model_inputs(cond), previous=previous)
        x = x + (t_next - t) * v[:, k:]
    return x


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_bundle(model: CausalDiT, codec: Codec, cfg: TeacherTrainConfig, fps: float, name: str, card: str,
                audio_mouth: AudioToMouth | None = None) -> Bundle:
    sampler = SamplerConfig(kind="euler", steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                            cache_from="clean")
    return Bundle(model.config, copy.deepcopy(model).cpu().eval(), codec, sampler, fps=fps, name=name, card=card,
                  extra={"stage": "teacher", **cfg.extra}, audio_mouth=audio_mouth)


def train_teacher(cfg: TeacherTrainConfig, model_cfg: ModelConfig, clips: LatentClips, codec: Codec,
                  fps: float = 15.0, progress: bool = True, audio_mouth: AudioToMouth | None = None) -> dict:
    """Train (or resume) in cfg.out: ckpt.pt, tb/, bundle/ (EMA weights, Euler sampler with CFG).
    ``audio_mouth``: a lip-sync teacher told the mouth carries this net into its bundle."""
    from tqdm import tqdm

    rank, world = _dist()
    out = Path(cfg.out)
    ckpt = load_checkpoint(out / "ckpt.pt")
    if ckpt is not None:
        model_cfg = ModelConfig.from_dict(ckpt["model_cfg"])
    if model_cfg.window_frames + model_cfg.sink_frames + 1 > cfg.clip_frames:
        raise ValueError(f"clip_frames {cfg.clip_frames} must cover the session context: window_frames "
                         f"{model_cfg.window_frames} + sink_frames {model_cfg.sink_frames} + 1")
    clips = clips.for_model(model_cfg)
    torch.manual_seed(cfg.seed)                        # identical initial weights on every rank
    model = CausalDiT(model_cfg)
    if model.camera_motion is not None and ckpt is None:   # a resumed model has it in its state
        motion, report = calibrate_camera_motion(clips, model_cfg.actions.dim, seed=cfg.seed)
        model.camera_motion.copy_(motion)
        keys = list(model_cfg.actions.keys) + list(model_cfg.actions.values)
        cfg.extra["camera_motion"] = {keys[a]: r for a, r in report.items()}
        if model.camera_flow is not None:
            flow, report = calibrate_camera_flow(clips, codec, model_cfg.actions.dim, motion, seed=cfg.seed)
            model.camera_flow.copy_(flow)
            cfg.extra["camera_flow"] = {keys[a]: r for a, r in report.items()}
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if cfg.device == "cuda" and world > 1
                          else cfg.device)
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(device)             # NCCL's collectives run on the current device
    model, clips = model.to(device), clips.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)   # own clips and noise per rank
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        gens = ckpt["generators"]
        gen.set_state(gens[rank] if rank < len(gens) else gens[0])
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    starts = clips.starts(cfg.clip_frames)
    is_main = rank == 0
    writer = tensorboard_writer(out / "tb") if is_main else None
    every = Every(cfg.ckpt_every_s)
    bar = tqdm(total=cfg.steps, initial=step, desc="train teacher", disable=not (progress and is_main))
    t0, start, first_noise, loss_val = time.time(), step, None, float("nan")
    gap_clips = clips.sample(32, cfg.clip_frames, torch.Generator().manual_seed(12345), starts)

    def checkpoint() -> None:
        gens = [gen.get_state()]
        if world > 1:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, gen.get_state())
            gens = gathered
        if is_main:   # file writes only; the collective above ran on every rank
            save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "ema": ema.state_dict(),
                                              "opt": opt.state_dict(), "step": step, "generators": gens,
                                              "model_cfg": model_cfg.to_dict(), "train_cfg": asdict(cfg)})

    if cfg.max_seconds > 0 and world > 1:
        raise ValueError("max_seconds needs a single-process run: the ranks would not agree on the last step")
    model.train()
    while step < cfg.steps and not (cfg.max_seconds > 0 and time.time() - t0 > cfg.max_seconds):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        x0, cond = clips.sample(cfg.batch, cfg.clip_frames, gen, starts)
        loss, noise = flow_matching_loss(train_model, x0, cond, cfg, gen)
        if first_noise is None:
            first_noise = noise.flatten()[:8].clone()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay(cfg.ema, step))
        step += 1
        loss_val = float(loss.detach())
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss_val:.4f}")
            if writer:
                writer.add_scalar("teacher/loss", loss_val, step)
                if step % (cfg.log_every * 10) == 0:   # does the teacher use the keys yet?
                    gap = action_gap(ema.eval(), *gap_clips, 0.9, torch.Generator().manual_seed(0))
                    writer.add_scalar("teacher/action_gap_t0.9", gap, step)
                writer.add_scalar("teacher/grad_norm", float(gnorm), step)
                writer.add_scalar("teacher/lr", opt.param_groups[0]["lr"], step)
        # The decision to checkpoint must agree across ranks: use the step count under DDP.
        due = every() if world == 1 else step % max(1, cfg.log_every * 10) == 0
        if due:
            checkpoint()
    bar.close()
    checkpoint()
    if cfg.save_rank_states:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "first_noise": first_noise,
                    "step": step}, out / f"rank{rank}.pt")
    if is_main:
        card = (f"# teacher\n\nBidirectional action-conditioned flow-matching DiT (forcekit train teacher), "
                f"{step} steps, EMA {cfg.ema}. Sampler: Euler {cfg.sample_steps} steps, CFG "
                f"{cfg.guidance_scale}.\n\n```\n{json.dumps(cfg.extra, indent=2)}\n```\n")
        make_bundle(ema, codec, cfg, fps, "teacher", card, audio_mouth).save(out / "bundle")
        if writer:
            writer.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "steps_this_run": step - start, "seconds_this_run": round(time.time() - t0, 1),
            "loss": loss_val, "rank": rank, "world": world}
