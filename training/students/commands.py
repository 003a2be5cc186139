"""`forcekit train causal|dcm|scm|dmd|guidance`: each reads a bundle (+ recorded data) and writes ``OUT/bundle``.

Every stage is resumable: rerun the same command and it continues from ``OUT/ckpt.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from forcekit.cli import (
    CommandError,
    UsageError,
    add_device_arg,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_int,
)


def _inputs(args: argparse.Namespace):
    """The input bundle and the latent clips (encoded once with the bundle's codec, cached)."""
    import torch

    from runtime import Bundle
    from training.latents import encode_latents

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    data = args.data or bundle.extra.get("data")
    if not data:
        raise CommandError(f"{args.bundle} records no training data: pass --data")
    cache = args.latents_cache or args.out
    lipsync = bundle.extra.get("lipsync")  # a lip-sync bundle's mask box and reference
    clips = encode_latents(data, bundle.codec, args.max_episodes, cache_dir=cache, lipsync=lipsync)
    held = (encode_latents(args.heldout, bundle.codec, args.heldout_episodes, cache_dir=cache, lipsync=lipsync)
            if args.heldout else None)
    return bundle, clips, held


def _common(cfg_cls, args: argparse.Namespace, **fields):
    names = ("out", "steps", "batch", "clip_frames", "lr", "seed", "ckpt_every_s", "eval_every", "device")
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    return cfg_cls(**given, **fields)


def _causal(args: argparse.Namespace) -> int:
    from training.students.causal import CausalConfig, train_causal

    teacher, clips, held = _inputs(args)
    cfg = _common(CausalConfig, args, diffusion_forcing=not args.no_diffusion_forcing, stack_noise=args.stack_noise)
    print(json.dumps(train_causal(teacher, clips, cfg, held)))
    return 0


def _dcm(args: argparse.Namespace) -> int:
    from training.students.dcm import DCMConfig, train_dcm

    teacher, clips, held = _inputs(args)
    cfg = _common(DCMConfig, args, intervals=args.intervals, guidance_scale=args.guidance, ema=args.ema,
                  sample_steps=args.sample_steps, stack_noise=args.stack_noise)
    print(json.dumps(train_dcm(teacher, clips, cfg, held)))
    return 0


def _scm(args: argparse.Namespace) -> int:
    from training.students.scm import SCMConfig, train_scm

    teacher, clips, held = _inputs(args)
    cfg = _common(SCMConfig, args, guidance_scale=args.guidance, tangent_warmup=args.tangent_warmup,
                  sample_steps=args.sample_steps)
    print(json.dumps(train_scm(teacher, clips, cfg, held)))
    return 0


def _dmd(args: argparse.Namespace) -> int:
    from runtime import Bundle
    from training.students.dmd import DMDConfig, train_dmd

    student, clips, held = _inputs(args)
    real = Bundle.load(args.teacher)
    cfg = _common(DMDConfig, args, guidance_scale=args.guidance, critic_steps=args.critic_steps,
                  rollout_chunks=args.rollout_chunks, context_frames=args.context_frames,
                  cache_from=args.cache_from, sample_steps=args.sample_steps, critic_lr=args.critic_lr,
                  real_score=args.real_score, regression_weight=args.regression_weight, still_share=args.still_share)
    print(json.dumps(train_dmd(student, real, clips, cfg, held)))
    return 0


def _guidance(args: argparse.Namespace) -> int:
    from training.students.guidance import GuidanceConfig, train_guidance

    student, clips, held = _inputs(args)
    cfg = _common(GuidanceConfig, args, guidance_scale=args.guidance, sample_steps=args.sample_steps)
    print(json.dumps(train_guidance(student, clips, cfg, held)))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from training.students.plot import plot_runs

    bad = [item for item in args.runs if "=" not in item]
    if bad:
        raise UsageError(f"expected LABEL=RUN_DIR, got {bad[0]!r}")
    runs = dict(item.split("=", 1) for item in args.runs)
    print(json.dumps(plot_runs(runs, args.out), indent=2))
    return 0


def _add_common(p: argparse.ArgumentParser, bundle_help: str, stage_cfg) -> None:
    """The options every stage shares; their defaults are the stage config's (``stage_cfg``), shown in --help."""
    default = {f.name: f.default for f in dataclasses.fields(stage_cfg)}
    p.add_argument("--bundle", required=True, help=bundle_help)
    p.add_argument("--out", required=True, help="run dir: ckpt.pt, metrics.json, tb/, bundle/")
    p.add_argument("--data", default=None, help="training data dir (default: the one the bundle records)")
    p.add_argument("--heldout", default=None, help="held-out data dir for the evaluation batch")
    p.add_argument("--max-episodes", type=nonnegative_int, default=0,
                   help="encode only the first N episodes (0: all)")
    p.add_argument("--heldout-episodes", type=positive_int, default=8, help="held-out episodes to encode")
    p.add_argument("--latents-cache", default=None, help="dir with cached latents (default: --out)")
    p.add_argument("--steps", type=positive_int, default=default["steps"], help="total optimizer steps")
    p.add_argument("--batch", type=positive_int, default=default["batch"], help="clips per step")
    p.add_argument("--clip-frames", type=positive_int, default=default["clip_frames"], help="frames per training clip")
    p.add_argument("--lr", type=positive_float, default=default["lr"], help="peak learning rate")
    p.add_argument("--eval-every", type=positive_int, default=default["eval_every"],
                   help="steps between held-out evaluations")
    p.add_argument("--seed", type=seed_int, default=default["seed"], help="seed of batches and noise")
    p.add_argument("--ckpt-every-s", type=positive_float, default=default["ckpt_every_s"],
                   help="checkpoint every N seconds")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: 0, torch's choice)")
    add_device_arg(p)


def register(commands) -> None:
    from training.students.causal import CausalConfig
    from training.students.dcm import DCMConfig
    from training.students.dmd import DMDConfig
    from training.students.guidance import GuidanceConfig
    from training.students.scm import SCMConfig

    p = commands.add("causal", help="causal teacher: teacher-forcing flow matching from the bidirectional "
                     "teacher (resumable)", func=_causal, group="train")
    _add_common(p, "bidirectional teacher bundle (forcekit train teacher)", CausalConfig)
    p.add_argument("--no-diffusion-forcing", action="store_true", help="one noise level per clip, not per chunk")
    p.add_argument("--stack-noise", type=float, default=0.0,
                   help="frame-stacking models: noise augmentation of the stacked frames, a level up to this")

    p = commands.add("dcm", help="TF-CM discrete: consistency distillation of the causal teacher (resumable)",
                     func=_dcm, group="train")
    _add_common(p, "causal teacher bundle (forcekit train causal)", DCMConfig)
    p.add_argument("--intervals", type=positive_int, default=16, help="teacher ODE steps that split [0, 1]")
    p.add_argument("--guidance", type=positive_float, default=None,
                   help="CFG of the teacher step (default: bundle's)")
    p.add_argument("--ema", type=fraction, default=0.99, help="EMA decay of the target network, in [0, 1)")
    p.add_argument("--sample-steps", type=positive_int, default=2, help="student steps written into the bundle")
    p.add_argument("--stack-noise", type=fraction, default=0.0,
                   help="frame-stacking models: noise on the stacked frames the student, its target and the teacher "
                        "see, a level up to this (the student then continues imperfect frames, as it will its own)")

    p = commands.add("scm", help="TF-CM continuous (sCM, flow-matching form): tangent by forward-mode JVP "
                     "through the whole model (resumable)", func=_scm, group="train")
    _add_common(p, "causal teacher bundle (forcekit train causal)", SCMConfig)
    p.add_argument("--guidance", type=positive_float, default=None,
                   help="CFG of the teacher velocity (default: bundle's)")
    p.add_argument("--tangent-warmup", type=nonnegative_int, default=100,
                   help="steps over which the JVP term ramps 0 -> 1")
    p.add_argument("--sample-steps", type=positive_int, default=2, help="student steps written into the bundle")

    p = commands.add("dmd", help="SF-DMD: self-forcing rollouts through runtime.rollout, DMD against the "
                     "bidirectional teacher (resumable)", func=_dmd, group="train")
    _add_common(p, "few-step student bundle (forcekit train dcm/scm)", DMDConfig)
    p.add_argument("--teacher", required=True, help="teacher bundle: the real score (bidirectional by default)")
    p.add_argument("--regression-weight", type=nonnegative_float, default=0.0,
                   help="DMD's regression term: also pull the rollout toward the recorded frames of the same clip "
                        "and keys, weighed against the DMD gradient (0: off)")
    p.add_argument("--still-share", type=fraction, default=0.0,
                   help="share of each batch that holds a frame at rest with no key for the whole rollout (the "
                        "engine's view does not change; a long play with no key must not either)")
    p.add_argument("--real-score", choices=("bidirectional", "causal"), default="bidirectional",
                   help="how the teacher scores the rollout: over the whole clip, or causally under teacher "
                        "forcing (pass a causal teacher bundle)")
    p.add_argument("--guidance", type=positive_float, default=None,
                   help="CFG of the real score (default: teacher's)")
    p.add_argument("--critic-steps", type=positive_int, default=2, help="fake-score updates per generator step")
    p.add_argument("--critic-lr", type=positive_float, default=None,
                   help="learning rate of the fake score (default: --lr)")
    p.add_argument("--rollout-chunks", type=positive_int, default=None,
                   help="chunks generated per rollout (default: enough to fill --clip-frames)")
    p.add_argument("--context-frames", type=positive_int, default=None,
                   help="real clean frames before the rollout (default: the first chunk)")
    p.add_argument("--cache-from", choices=("clean", "last_step"), default="clean",
                   help="KV-cache recipe used in training, written into the bundle for inference")
    p.add_argument("--sample-steps", type=positive_int, default=2,
                   help="student steps (the exit step is drawn among them)")

    p = commands.add("guidance", help="guidance distillation: one conditional pass gives what the student gives "
                     "under action CFG (resumable)", func=_guidance, group="train")
    _add_common(p, "few-step student bundle (forcekit train dmd/dcm)", GuidanceConfig)
    p.add_argument("--guidance", type=positive_float, default=5.0, help="action CFG scale to fold in")
    p.add_argument("--sample-steps", type=positive_int, default=None, help="student steps written into the bundle "
                   "(default: the input bundle's)")

    p = commands.add("students", help="plot student runs' objectives and few-step evals side by side (PNG)",
                     func=_plot, group="eval")
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR, LABEL starting with the stage (dcm, scm-fast, ...)")
    p.add_argument("--out", required=True, help="PNG path")
