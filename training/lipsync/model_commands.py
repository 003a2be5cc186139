"""The lip-sync model's subcommands: `train lipsync-teacher` and `eval lipsync-generate` (see forcekit/cli.py).

The data and the measuring sticks have theirs in training/lipsync/commands.py. The codec is
`forcekit train codec` on the lip-sync frames; the students after the teacher are the world
model's own stages (`forcekit train causal|dcm|dmd`), which read the lip-sync spec from the bundle.
"""

from __future__ import annotations

import argparse
import json

from forcekit.cli import (
    UsageError,
    add_device_arg,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_int,
)


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _train_lipsync_teacher(args: argparse.Namespace) -> int:
    """The teacher stage of the lip-sync recipe: `training.teacher.train_teacher` on lip-sync latent clips."""
    from runtime.audio_features import AudioFeatureConfig
    from runtime.audio_mouth import load_audio_mouth
    from runtime.lipsync import LipsyncSpec, crop_around, lipsync_config
    from training.commands import load_codec_arg
    from training.data.shards import ShardStore
    from training.lipsync.latents import encode_lipsync_latents, union_mouth_box
    from training.teacher import TeacherTrainConfig, train_teacher

    _threads(args.threads)
    if args.clip_frames <= args.sink_frames + 1:
        raise UsageError(f"--clip-frames ({args.clip_frames}) must exceed --sink-frames ({args.sink_frames}) + 1: "
                         "the session window is clip - 1 - sink frames")
    meta = ShardStore(args.data).read_meta()
    if meta.get("engine") != "lipsync":
        raise ValueError(f"{args.data}: not a lip-sync recording (forcekit record --env lipsync:train)")
    codec = load_codec_arg(args.codec)
    box = tuple(args.mask_box) if args.mask_box else union_mouth_box(args.data, args.mask_margin, args.max_episodes)
    face_size = tuple(meta["resolution"])
    crop = {} if args.crop_margin is None else {
        "crop_box": crop_around(box, face_size, args.crop_margin, codec.spatial_factor * args.patch),
        "face_size": face_size}
    if args.audio_mouth and not args.mouth_condition:
        raise UsageError("--audio-mouth goes with --mouth-condition: an audio-conditioned teacher hears the audio "
                         "itself")
    ear = load_audio_mouth(args.audio_mouth) if args.audio_mouth else None
    if ear is not None and ear.cfg.in_dim != AudioFeatureConfig(**meta["audio_features"]).dim:
        raise UsageError(f"--audio-mouth {args.audio_mouth}: reads {ear.cfg.in_dim} features, {args.data}'s audio "
                         f"features have {AudioFeatureConfig(**meta['audio_features']).dim}")
    spec = LipsyncSpec(mask_box=box, reference=args.reference, audio=dict(meta["audio_features"]),
                       condition="mouth" if args.mouth_condition else "audio", **crop)
    frame_size = spec.model_size(*face_size)
    latent_size = tuple(codec.latent_shape(*frame_size)[1:])
    region = spec.latent_box(frame_size, latent_size)
    model_cfg = lipsync_config(codec, face_size, spec, patch_size=(1, args.patch, args.patch),
                               audio_region=region if args.audio_tokens else None,
                               num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                               num_layers=args.layers, ffn_dim=args.ffn, freq_dim=args.freq_dim,
                               window_frames=args.clip_frames - 1 - args.sink_frames, sink_frames=args.sink_frames)
    extra = {"data": args.data, "codec": args.codec, "env": meta.get("env"), "max_episodes": args.max_episodes,
             "lipsync": spec.to_dict()}
    cfg = TeacherTrainConfig(out=args.out, steps=args.steps, batch=args.batch, clip_frames=args.clip_frames,
                             lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s,
                             action_dropout=args.audio_dropout, guidance_scale=args.guidance,
                             sample_steps=args.sample_steps, context_prob=args.context_prob, loss_region=region,
                             outside_weight=args.outside_weight, timestep_shift=args.timestep_shift,
                             device=args.device, extra=extra)
    clips = encode_lipsync_latents(args.data, codec, spec, args.max_episodes, cache_dir=args.out)
    print(json.dumps(train_teacher(cfg, model_cfg, clips, codec, fps=float(meta["fps"]), audio_mouth=ear)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from training.lipsync.generate import generate_lipsync

    _threads(args.threads)
    print(json.dumps(generate_lipsync(args.bundle, args.clips, args.out, args.max_clips, ab=not args.no_ab,
                                      device=args.device, steps=args.steps, guidance=args.guidance)))
    return 0



def register(commands) -> None:
    p = commands.add("lipsync-teacher", help="bidirectional lip-sync teacher: flow matching of the frames given "
                     "their audio features and the masked frame + reference on the channel axis (resumable)",
                     func=_train_lipsync_teacher, group="train")
    p.add_argument("--data", required=True, help="lip-sync training data (forcekit record --env lipsync:train)")
    p.add_argument("--codec", required=True, help="codec dir (forcekit train codec on the same frames), or pixel:N")
    p.add_argument("--out", required=True, help="run dir: ckpt.pt, cached latents, bundle/")
    p.add_argument("--steps", type=positive_int, default=4000, help="total optimizer steps")
    p.add_argument("--batch", type=positive_int, default=8, help="clips per step")
    p.add_argument("--clip-frames", type=positive_int, default=10,
                   help="frames per clip (the session window is clip - 1 - sink)")
    p.add_argument("--sink-frames", type=nonnegative_int, default=1, help="session sink frames")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--layers", type=positive_int, default=6, help="transformer blocks")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--head-dim", type=positive_int, default=32, help="width of each head")
    p.add_argument("--ffn", type=positive_int, default=512, help="feed-forward hidden width")
    p.add_argument("--freq-dim", type=positive_int, default=64, help="sinusoidal timestep embedding size")
    p.add_argument("--patch", type=positive_int, default=4, help="spatial patch on the latent (4: 36 tokens for 24x24)")
    p.add_argument("--mask-box", type=nonnegative_int, nargs=4, default=None, metavar=("Y0", "X0", "Y1", "X1"),
                   help="the masked (regenerated) box in pixels (default: the union of the recorded mouth boxes)")
    p.add_argument("--mask-margin", type=nonnegative_int, default=2,
                   help="pixels added around the union of the mouth boxes")
    p.add_argument("--crop-margin", type=nonnegative_int, default=None,
                   help="draw only a crop of the face: the mask box grown by this many pixels (to a multiple of the "
                        "codec stride x patch); default: the whole frame")
    p.add_argument("--mouth-condition", action="store_true",
                   help="condition on mouth parameters instead of the audio: the renderer's truth in training, the "
                        "--audio-mouth net's reading of the audio in a session (docs/lipsync.md, sixth sitting)")
    p.add_argument("--audio-mouth", default=None,
                   help="with --mouth-condition: the audio -> mouth net (forcekit train audio-mouth) the bundle "
                        "carries; without it the bundle is a diagnostic sessions refuse")
    p.add_argument("--reference", choices=("first", "none"), default="first",
                   help="a reference frame of the identity on the channel axis: the clip's first frame, or none")
    p.add_argument("--audio-tokens", action="store_true",
                   help="also add each frame's audio embedding to the input of the tokens over the mask box")
    p.add_argument("--outside-weight", type=nonnegative_float, default=1.0,
                   help="loss weight of the latent pixels outside the mask box (1: the whole frame alike); "
                        "the output is only used inside it")
    p.add_argument("--context-prob", type=fraction, default=0.75,
                   help="share of clips with a clean prefix (whose mouths the model can copy instead of hearing "
                        "the audio); the rest are all noisy")
    p.add_argument("--timestep-shift", type=positive_float, default=1.0,
                   help="train on noise levels shifted toward t = 1 by this factor (very large: the model is "
                        "trained as a regressor of the frame given its conditions)")
    p.add_argument("--audio-dropout", type=fraction, default=0.1, help="share of clips trained with silent audio (CFG)")
    p.add_argument("--guidance", type=positive_float, default=1.5,
                   help="audio CFG scale written into the bundle's sampler")
    p.add_argument("--sample-steps", type=positive_int, default=50,
                   help="Euler steps written into the bundle's sampler")
    p.add_argument("--max-episodes", type=nonnegative_int, default=0, help="encode only the first N clips (0: all)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation, batches and noise")
    p.add_argument("--ckpt-every-s", type=positive_float, default=180.0, help="checkpoint every N seconds")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: default)")
    add_device_arg(p)

    p = commands.add("lipsync-generate", help="re-sync recorded clips with a lip-sync bundle, frame by frame as the "
                     "live loop does: OUT/own (own audio) and the A/B case OUT/ab (clip i's face, clip i+1's voice), "
                     "in the recording format `eval lipsync` reads", func=_generate, group="eval")
    p.add_argument("--bundle", required=True, help="lip-sync bundle (forcekit train dmd on lip-sync data, or "
                   "random-lipsync-tiny)")
    p.add_argument("--clips", required=True, help="recorded clips (e.g. --env lipsync:heldout)")
    p.add_argument("--out", required=True, help="output dir: own/, ab/, ab_input/, ab_truth_a/")
    p.add_argument("--max-clips", type=nonnegative_int, default=0, help="the first N clips only (0: all)")
    p.add_argument("--no-ab", action="store_true", help="skip the A/B case")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps per frame (default: the bundle's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale on the audio (or mouth) condition "
                   "(default: the bundle's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: default)")
