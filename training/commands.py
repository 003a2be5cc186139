"""Subcommands this package adds to the `forcekit` CLI (see forcekit/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys

from forcekit.cli import (
    CommandError,
    UsageError,
    add_device_arg,
    field_of_view,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    positive_int_list,
    seed_int,
)
from runtime.commands import png_path, video_path
from runtime.config import STACK_NOISE_FORMS, WARP_MODES


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 64 or 64x64") from e
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: height and width must be positive")
    return h, w


def _hold_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad hold range {text!r}: expected MIN,MAX frames, e.g. 16,48") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"bad hold range {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def _levels(text: str) -> tuple[float, ...]:
    """Comma-separated noise levels, each in (0, 1]."""
    try:
        levels = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 < v <= 1 for v in levels):
        raise argparse.ArgumentTypeError(f"noise levels must lie in (0, 1], got {text!r}")
    return levels


def _record(args: argparse.Namespace) -> int:
    from training.data.record import RecordConfig, record

    cfg = RecordConfig(env=args.env, episodes=args.episodes, policy=args.policy, seed=args.seed,
                       size=args.size, frame_skip=args.frame_skip, episodes_per_shard=args.episodes_per_shard,
                       max_frames=args.max_frames, max_hold=args.max_hold, idle_prob=args.idle_prob,
                       idle_hold=args.idle_hold, jobs=args.jobs)
    print(json.dumps(record(cfg, args.out)))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from training.data.shards import check_dir

    summary, bad = check_dir(args.dir)
    print(json.dumps(summary, indent=2))
    for line in bad:
        print(f"BAD SHARD {line}", file=sys.stderr)
    if not summary["shards"]:
        raise CommandError(f"{args.dir}: no shards (shard_NNNNN.npz) in this data dir")
    return 1 if bad else 0


def _train_codec(args: argparse.Namespace) -> int:
    from runtime.autoencoder import ConvAEConfig, ConvAutoencoder
    from training.codec import CodecTrainConfig, train_codec

    cfg = CodecTrainConfig(data=args.data, out=args.out, steps=args.steps, batch=args.batch, crop=args.crop,
                           lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s, threads=args.threads,
                           edge_weight=args.edge_weight, init=args.init or "", freeze_encoder=args.freeze_encoder,
                           adversarial_weight=args.adversarial_weight, latent_blur=args.latent_blur,
                           fake_bundle=args.fake_bundle or "", fake_rollouts=args.fake_rollouts,
                           fake_frames=args.fake_frames, adversarial_pairs=args.adversarial_pairs)
    if args.freeze_encoder and not args.init:
        raise UsageError("--freeze-encoder needs --init (the trained codec whose encoder is kept)")
    init = load_codec_arg(args.init) if args.init else None
    if init is not None and not isinstance(init, ConvAutoencoder):
        raise UsageError(f"--init {args.init}: not a trained convolutional codec")
    widths = {"decoder_channels": args.decoder_channels} if args.decoder_channels else {}
    try:
        model_cfg = ConvAEConfig(latent_channels=args.latent_channels, **widths)
    except ValueError as e:
        raise UsageError(f"--decoder-channels: {e}") from None
    print(json.dumps(train_codec(cfg, model_cfg, init=init)))
    return 0


def _train_refiner(args: argparse.Namespace) -> int:
    from training.refiner import RefinerTrainConfig, train_refiner

    cfg = RefinerTrainConfig(data=args.data, out=args.out, init=args.init, motion=args.motion, steps=args.steps,
                             batch=args.batch, unroll=args.unroll, channels=args.channels, blocks=args.blocks,
                             warp=args.warp, lr=args.lr, edge_weight=args.edge_weight, latent_noise=args.latent_noise,
                             latent_blur=args.latent_blur, student=args.student or "",
                             student_chains=args.student_chains, student_share=args.student_share,
                             rest_chains=args.rest_chains, rest_skip=args.rest_skip,
                             adversarial_weight=args.adversarial_weight, lowpass=args.lowpass,
                             detail_sigma=args.detail_sigma, detail_margin=args.detail_margin,
                             detail_fov=args.detail_fov, seed=args.seed,
                             ckpt_every_s=args.ckpt_every_s, threads=args.threads, device=args.device)
    print(json.dumps(train_refiner(cfg)))
    return 0


def _eval_codec(args: argparse.Namespace) -> int:
    import torch

    from training.codec import eval_codec, load_codec_or_bundle, load_frames

    if args.threads:
        torch.set_num_threads(args.threads)
    frames, _ = load_frames(args.data)
    if args.max_frames and len(frames) > args.max_frames:
        idx = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))[: args.max_frames]
        frames = frames[idx.sort().values]
    codec = load_codec_or_bundle(args.codec)
    result = {"codec": args.codec, "data": args.data, **eval_codec(codec, frames)}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def _eval_camera(args: argparse.Namespace) -> int:
    import torch

    from training.camera import measure_turns
    from training.data import ClipDataset

    if args.threads:
        torch.set_num_threads(args.threads)
    if any(f >= 180 for f in args.fovs):
        raise UsageError(f"--fovs must be fields of view under 180 degrees, got {args.fovs}")
    data = ClipDataset(args.data, clip_frames=1)
    keys = list(data.meta["action_space"]["keys"])
    result = measure_turns(torch.from_numpy(data.all_frames()), torch.from_numpy(data.all_actions()),
                           [r[2] for r in data.episode_rows], keys, fovs=(0.0, *map(float, args.fovs)),
                           pairs=args.pairs)
    print(json.dumps({"data": args.data, **result}, indent=None if args.json else 2))
    return 0


def load_codec_arg(spec: str):
    """`pixel` or `pixel:N` (identity codec, average-pooled by N), a trained codec dir, or a bundle dir (its
    codec: a teacher can be trained on the shipped model's latents without the codec's run dir)."""
    from runtime.codec import PixelCodec
    from training.codec import load_codec_or_bundle

    if spec == "pixel" or spec.startswith("pixel:"):
        factor = spec.partition(":")[2] or "1"
        if not factor.isdigit() or int(factor) < 1:
            raise UsageError(f"--codec {spec!r}: expected pixel, pixel:N with N a positive integer, or a codec dir")
        return PixelCodec(int(factor))
    return load_codec_or_bundle(spec)


def _train_teacher(args: argparse.Namespace) -> int:
    import torch

    from runtime import ModelConfig
    from training.data.shards import ShardStore
    from training.latents import encode_latents
    from training.teacher import TeacherTrainConfig, train_teacher

    if args.clip_frames <= args.sink_frames:
        raise UsageError(f"--clip-frames ({args.clip_frames}) must exceed --sink-frames ({args.sink_frames}): "
                         "the session window is clip - 1 - sink frames")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = ShardStore(args.data).read_meta()
    codec = load_codec_arg(args.codec)
    c, h, w = codec.latent_shape(*meta["resolution"])
    space = meta["action_space"]
    model_cfg = ModelConfig(in_channels=c, latent_height=h, latent_width=w, patch_size=(1, args.patch, args.patch),
                            num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                            num_layers=args.layers, ffn_dim=args.ffn, freq_dim=args.freq_dim,
                            action_space=space, frames_per_chunk=1, stack_frames=args.stack_frames,
                            still_prior=args.still_prior, stack_noise_form=args.stack_noise_form,
                            stack_noise_condition=args.stack_noise_condition,
                            patch_overlap=args.patch_overlap,
                            camera_warp=args.camera_warp, action_momentum=args.action_momentum,
                            camera_flow=args.camera_flow, camera_fov=args.camera_fov, warp_mode=args.warp_mode,
                            rest_gate=args.rest_gate,
                            window_frames=args.clip_frames - 1 - args.sink_frames, sink_frames=args.sink_frames)
    extra = {"data": args.data, "codec": args.codec, "env": meta.get("env"), "max_episodes": args.max_episodes}
    cfg = TeacherTrainConfig(out=args.out, steps=args.steps, batch=args.batch, clip_frames=args.clip_frames,
                             lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s,
                             guidance_scale=args.guidance, sample_steps=args.sample_steps,
                             timestep_shift=args.timestep_shift, stack_noise=args.stack_noise,
                             save_rank_states=args.save_rank_states, device=args.device,
                             max_seconds=args.max_seconds, action_dropout=args.action_dropout, extra=extra)
    clips = encode_latents(args.data, codec, args.max_episodes, cache_dir=args.out)
    result = train_teacher(cfg, model_cfg, clips, codec, fps=float(meta.get("fps", 15.0)))
    if result["rank"] == 0:
        print(json.dumps(result))
    return 0


def _train_probe(args: argparse.Namespace) -> int:
    import torch

    from training.probe import train_probe

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(train_probe(args.data, args.heldout, args.out, steps=args.steps, batch=args.batch,
                                 lr=args.lr, seed=args.seed)))
    return 0


def _eval_world(args: argparse.Namespace) -> int:
    import torch

    from training.evaluate import WorldEvalConfig, dump, evaluate_world, plot_world

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = WorldEvalConfig(bundle=args.bundle, env=args.env, episodes=args.episodes, horizon=args.horizon,
                          context=args.context, seed=args.seed, steps=args.steps, guidance=args.guidance,
                          probe=args.probe, mode=args.mode)
    result = evaluate_world(cfg, video=args.video, frames=args.frames)
    if args.plot:
        plot_world(result, args.plot)
    if args.out:
        with open(args.out, "w") as f:
            f.write(dump(result, False))
    print(dump(result, args.json))
    return 0


def _eval_controls(args: argparse.Namespace) -> int:
    import torch

    from training.controls import ControlEvalConfig, evaluate_controls
    from training.evaluate import dump

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ControlEvalConfig(bundle=args.bundle, env=args.env, episodes=args.episodes, hold=args.hold,
                            context=args.context, seed=args.seed, steps=args.steps, guidance=args.guidance,
                            still=args.still, settle=args.settle, rest_db=args.rest_db,
                            mode=args.mode)
    result = evaluate_controls(cfg)
    if args.out:
        with open(args.out, "w") as f:
            f.write(dump(result, False))
    print(dump(result, args.json))
    return 0


def _eval_gap(args: argparse.Namespace) -> int:
    import torch

    from runtime import Bundle
    from training.latents import encode_latents
    from training.teacher import action_gap_report

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle)
    lipsync = bundle.extra.get("lipsync")
    clips = encode_latents(args.data, bundle.codec, args.max_episodes, cache_dir=args.latents_cache,
                           lipsync=lipsync)
    frames = args.clip_frames or bundle.config.window_frames + bundle.config.sink_frames + 1
    model = bundle.model.eval()
    result = {"bundle": args.bundle, "data": args.data,
              **action_gap_report(model, clips, frames, args.clips, args.seeds, args.levels)}
    if lipsync is not None:   # the audio's part of the loss where the output is used: the mask box
        from runtime.lipsync import LipsyncSpec
        from training.teacher import region_weights

        cfg = bundle.config
        size = (cfg.latent_height, cfg.latent_width)
        region = region_weights(size, LipsyncSpec.from_dict(lipsync).latent_box(bundle.frame_size, size), 0.0)
        result["mask_box"] = action_gap_report(model, clips, frames, args.clips, args.seeds, args.levels,
                                               region=region)
    print(json.dumps(result))
    return 0


def _ship(args: argparse.Namespace) -> int:
    from training.ship import ship

    out = ship(args.bundle, args.out, start_data=args.start_data, scenes=args.scenes, scene_frames=args.scene_frames,
               card=args.card, name=args.name, seed=args.seed, steps=args.steps, stack_noise=args.stack_noise,
               noise_scale=args.noise_scale, decoder=args.decoder, reproject=args.reproject, warp_mode=args.warp_mode,
               detail_sigma=args.detail_sigma, detail_margin=args.detail_margin, detail_fov=args.detail_fov)
    print(json.dumps({"bundle": str(out)}))
    return 0


def _add_heldout_args(p: argparse.ArgumentParser, episodes: int) -> None:
    """The options every comparison against the real engine on held-out episodes shares."""
    p.add_argument("--bundle", required=True, help="bundle dir")
    p.add_argument("--env", required=True, help="doom:<scenario> or atari:<game> (the bundle's game)")
    p.add_argument("--episodes", type=positive_int, default=episodes, help="held-out episodes compared")
    p.add_argument("--context", type=positive_int, default=4, help="real context frames given to the model")
    p.add_argument("--seed", type=seed_int, default=100000, help="first held-out engine seed (never trained on)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default: the bundle's)")
    p.add_argument("--guidance", type=positive_float, default=None, help="action CFG scale (default: the bundle's)")


def _add_result_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="also write the JSON result here")
    _threads_arg(p)
    p.add_argument("--json", action="store_true", help="one-line JSON")


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: 0, torch's choice)")


def register(commands) -> None:
    p = commands.add("ship", help="copy a trained bundle to models/NAME with real start scenes and a card",
                     func=_ship)
    p.add_argument("--bundle", required=True, help="trained bundle dir")
    p.add_argument("--out", required=True, help="shipped bundle dir, e.g. models/default")
    p.add_argument("--start-data", default=None, help="recorded data dir to cut start scenes from (held-out)")
    p.add_argument("--scenes", type=positive_int, default=8,
                   help="start scenes (a session starts from scene seed %% S)")
    p.add_argument("--scene-frames", type=positive_int, default=None,
                   help="real frames per scene (default: first chunk)")
    p.add_argument("--card", default=None, help="markdown file to use as the bundle's card.md")
    p.add_argument("--name", default=None, help="bundle name (default: the source bundle's)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the scenes' random offsets")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="default sampler steps per chunk (default: as trained)")
    p.add_argument("--stack-noise", type=nonnegative_float, default=None,
                   help="frame stacking: noise mixed into the stacked previous frames at inference, in [0, 1) "
                        "(default: as trained)")
    p.add_argument("--noise-scale", type=nonnegative_float, default=None,
                   help="sampling temperature: the scale of the noise each chunk starts from, in [0, 1] (default: as "
                        "trained, 1)")
    p.add_argument("--decoder", default=None,
                   help="codec dir (or bundle dir) whose decoder and refiner replace the bundle's (its encoder must "
                        "be the bundle's: `train codec --init BUNDLE --freeze-encoder`)")
    p.add_argument("--reproject", action=argparse.BooleanOptionalAction, default=None,
                   help="feed each generated frame back as the codec's encoding of its decoded frame "
                        "(SamplerConfig.reproject; default: the bundle's)")
    p.add_argument("--warp-mode", default=None, choices=list(WARP_MODES),
                   help="a camera-warp bundle's resampling of the stacked frames at inference (default: as trained)")
    p.add_argument("--detail-sigma", type=nonnegative_float, default=None,
                   help="a refining codec's texture carried with the view: the shown frame's detail finer than a "
                        "Gaussian blur of this sigma (pixels) moves on with the camera (0: off; default: the bundle's)")
    p.add_argument("--detail-margin", type=nonnegative_int, default=None,
                   help="pixels of the carried texture kept past each edge of the view, so what a turn carries out "
                        "comes back when the view turns back (0: none; default: the bundle's)")
    p.add_argument("--detail-fov", type=field_of_view, default=None,
                   help="the view's horizontal field of view in degrees (`forcekit eval camera`): the carried texture "
                        "turns as a pinhole camera's, the edges faster than the centre (0: as a translation; "
                        "default: the bundle's)")

    p = commands.add("record", help="record episodes from a game engine into atomic shards (resumable)",
                     func=_record)
    p.add_argument("--env", required=True, help="doom:<scenario>, atari:<game> or lipsync:train / lipsync:heldout")
    p.add_argument("--episodes", type=positive_int, required=True, help="total episodes wanted in --out")
    p.add_argument("--policy", default="random-sticky", help="action policy (random-sticky)")
    p.add_argument("--out", required=True, help="data directory (created; a rerun continues it)")
    p.add_argument("--seed", type=seed_int, default=0, help="episode i uses engine seed SEED+i")
    p.add_argument("--size", type=_size, default=None, help="frame size HxW (default: 64x64; lipsync 96x96)")
    p.add_argument("--frame-skip", type=positive_int, default=None,
                   help="engine frames per recorded frame (default: the engine adapter's)")
    p.add_argument("--episodes-per-shard", type=positive_int, default=8, help="episodes written per shard file")
    p.add_argument("--max-frames", type=positive_int, default=1000, help="cap on frames per episode")
    p.add_argument("--max-hold", type=positive_int, default=12, help="random-sticky: longest hold in frames")
    p.add_argument("--idle-prob", type=fraction, default=0.0,
                   help="random-sticky: chance that a new hold is an idle stretch (no key), so the world comes to rest")
    p.add_argument("--idle-hold", type=_hold_range, default=(16, 48), help="idle stretch length MIN,MAX in frames")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="engine processes recording in parallel (same shards as one; game engines only)")

    p = commands.add("check", help="verify every shard of a data dir and print a summary", func=_data_check,
                     group="data")
    p.add_argument("dir", help="data directory written by `forcekit record`")

    p = commands.add("codec", help="train the per-frame latent codec (resumable: rerun continues)",
                     func=_train_codec, group="train")
    p.add_argument("--data", required=True, help="training data dir (forcekit record)")
    p.add_argument("--out", required=True, help="run dir: ckpt.pt, codec.json, codec.safetensors, tb/")
    p.add_argument("--steps", type=positive_int, default=20000, help="total optimizer steps")
    p.add_argument("--batch", type=positive_int, default=32, help="frames (crops) per step")
    p.add_argument("--crop", type=nonnegative_int, default=32, help="training crop size; 0 = full frames")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--latent-channels", type=positive_int, default=8,
                   help="latent channels per position (ignored when resuming)")
    p.add_argument("--decoder-channels", type=positive_int_list, default=None,
                   help="decoder width per level, full resolution first, e.g. 16,32,64 (ignored when resuming)")
    p.add_argument("--edge-weight", type=nonnegative_float, default=0.0,
                   help="weight of an L1 loss on pixel differences (keeps texture the plain loss smooths)")
    p.add_argument("--init", default=None, help="start from this trained codec dir or bundle dir (its codec)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only, keeping --init's encoder and latent normalisation (its world "
                        "models still fit)")
    p.add_argument("--adversarial-weight", type=nonnegative_float, default=0.0,
                   help="train the decoder against a patch discriminator, this times the adaptive weight")
    p.add_argument("--latent-blur", type=fraction, default=0.0,
                   help="chance a training latent is blurred toward its 3x3 average (a world model's softer latents)")
    p.add_argument("--fake-bundle", default=None,
                   help="world-model bundle (codec = --init) whose own rolled-out latents the decoder also learns "
                        "to draw sharp (needs --adversarial-weight)")
    p.add_argument("--fake-rollouts", type=positive_int, default=64, help="training clips the bundle rolls out")
    p.add_argument("--fake-frames", type=positive_int, default=24, help="frames generated per rollout")
    p.add_argument("--adversarial-pairs", action="store_true",
                   help="the discriminator judges consecutive frames together, so texture must travel with the view "
                        "(needs --adversarial-weight)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation and batches")
    p.add_argument("--ckpt-every-s", type=positive_float, default=180.0, help="checkpoint every N seconds")
    _threads_arg(p)

    p = commands.add("refiner", help="train a codec's frame refiner: each frame drawn on the one shown before it, "
                                     "moved by the camera (resumable: rerun continues)",
                     func=_train_refiner, group="train")
    p.add_argument("--data", required=True, help="training data dir (forcekit record)")
    p.add_argument("--out", required=True, help="run dir: ckpt.pt, codec.json, codec.safetensors (ship --decoder)")
    p.add_argument("--init", required=True, help="codec dir or bundle dir: the encoder and decoder, kept frozen")
    p.add_argument("--motion", required=True,
                   help="bundle with a camera warp whose measured key motion moves the previous frame")
    p.add_argument("--steps", type=positive_int, default=3000, help="total optimizer steps")
    p.add_argument("--batch", type=positive_int, default=8, help="chains of real frames per step")
    p.add_argument("--unroll", type=positive_int, default=4, help="frames per chain after its real first frame")
    p.add_argument("--channels", type=positive_int, default=24, help="refiner width (full resolution)")
    p.add_argument("--blocks", type=nonnegative_int, default=2, help="refiner residual blocks")
    p.add_argument("--warp", default="bilinear", choices=list(WARP_MODES), help="how the previous frame is resampled")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--edge-weight", type=nonnegative_float, default=0.5,
                   help="weight of the L1 loss on pixel differences")
    p.add_argument("--latent-noise", type=nonnegative_float, default=0.1,
                   help="latent noise std, relative to the batch's latent std (a world model's imperfect latents)")
    p.add_argument("--latent-blur", type=fraction, default=0.5,
                   help="chance a latent is blurred toward its 3x3 average")
    p.add_argument("--student", default=None,
                   help="world-model bundle whose own rollouts from real frames the refiner also learns on (its "
                        "latents drift where the engine stands still)")
    p.add_argument("--student-chains", type=positive_int, default=1024, help="chains the --student plays, once")
    p.add_argument("--student-share", type=fraction, default=0.5,
                   help="share of each batch from the --student's chains")
    p.add_argument("--rest-chains", type=nonnegative_int, default=0,
                   help="also this many --student chains from still stretches, after up to --rest-skip unseen no-key "
                        "frames, every target the still real frame")
    p.add_argument("--rest-skip", type=positive_int, default=256, help="most no-key frames played before a rest chain")
    p.add_argument("--adversarial-weight", type=nonnegative_float, default=0.0,
                   help="judge the drawn frames with a patch discriminator, this times the adaptive weight")
    p.add_argument("--lowpass", type=positive_int, default=1,
                   help="compare drawn and real frames averaged over NxN pixels (the texture left to the judge)")
    p.add_argument("--detail-sigma", type=nonnegative_float, default=0.0,
                   help="train with the texture carried with the view, as `ship --detail-sigma` runs it (0: off)")
    p.add_argument("--detail-margin", type=nonnegative_int, default=0,
                   help="with --detail-sigma: the canvas kept past the view's edges, as `ship --detail-margin`")
    p.add_argument("--detail-fov", type=field_of_view, default=0.0,
                   help="with --detail-sigma: the view's field of view in degrees, as `ship --detail-fov`")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation and batches")
    p.add_argument("--ckpt-every-s", type=positive_float, default=180.0, help="checkpoint every N seconds")
    _threads_arg(p)
    add_device_arg(p)

    p = commands.add("codec", help="codec reconstruction PSNR/SSIM on held-out frames and decode latency",
                     func=_eval_codec, group="eval")
    p.add_argument("--codec", required=True, help="codec dir (codec.json + codec.safetensors) or a bundle dir")
    p.add_argument("--data", required=True, help="held-out data dir")
    p.add_argument("--max-frames", type=nonnegative_int, default=4096, help="evaluate on at most N frames (0: all)")
    _threads_arg(p)
    p.add_argument("--json", action="store_true", help="one-line JSON")

    p = commands.add("camera", help="how each key turns the recorded view: per field of view (0: a translation), the "
                     "best centre shift per frame and its error, and the field of view that fits best",
                     func=_eval_camera, group="eval")
    p.add_argument("--data", required=True, help="recorded data dir (forcekit record)")
    p.add_argument("--pairs", type=positive_int, default=400, help="steady-turn frame pairs per key")
    p.add_argument("--fovs", type=positive_int_list, default=[60, 70, 80, 90, 100, 110],
                   help="fields of view tried, degrees, besides 0 (a translation)")
    _threads_arg(p)
    p.add_argument("--json", action="store_true", help="one-line JSON")

    p = commands.add("teacher", help="train the bidirectional action-conditioned flow-matching teacher "
                     "(resumable; torchrun for DDP)", func=_train_teacher, group="train")
    p.add_argument("--data", required=True, help="training data dir (forcekit record)")
    p.add_argument("--codec", required=True,
                   help="codec dir (forcekit train codec), a bundle dir (its codec), or pixel / pixel:N")
    p.add_argument("--out", required=True, help="run dir: ckpt.pt, tb/, bundle/")
    p.add_argument("--steps", type=positive_int, default=2000, help="total optimizer steps")
    p.add_argument("--batch", type=positive_int, default=8, help="clips per step per rank")
    p.add_argument("--clip-frames", type=positive_int, default=8, help="frames per training clip")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="peak learning rate")
    p.add_argument("--layers", type=positive_int, default=6, help="transformer blocks")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--head-dim", type=positive_int, default=32, help="width of each head (even, >= 6 for 3D RoPE)")
    p.add_argument("--ffn", type=positive_int, default=512, help="feed-forward hidden width")
    p.add_argument("--freq-dim", type=positive_int, default=64, help="sinusoidal timestep embedding size")
    p.add_argument("--patch", type=positive_int, default=2, help="spatial patch size on the latent")
    p.add_argument("--sink-frames", type=nonnegative_int, default=0,
                   help="session sink frames (window = clip - 1 - sink)")
    p.add_argument("--max-episodes", type=nonnegative_int, default=0,
                   help="encode only the first N episodes (0: all)")
    p.add_argument("--guidance", type=positive_float, default=1.5, help="CFG scale written into the bundle's sampler")
    p.add_argument("--sample-steps", type=positive_int, default=50,
                   help="Euler steps written into the bundle's sampler")
    p.add_argument("--timestep-shift", type=positive_float, default=1.0,
                   help="train on noise levels shifted toward t = 1 by this factor (where only the action tells "
                        "where the view moves)")
    p.add_argument("--stack-frames", type=nonnegative_int, default=0,
                   help="frame stacking: each frame sees the clean latents of this many previous frames on its "
                        "channel axis (DIAMOND/GameNGen), so copying the last view, moved by the key, is local")
    p.add_argument("--stack-noise", type=nonnegative_float, default=0.0,
                   help="noise augmentation of the stacked frames during training, a random level up to this")
    p.add_argument("--stack-noise-form", choices=STACK_NOISE_FORMS, default="mix",
                   help="how the stacked frames take the noise: mix (1-l) x + l n, or add x + l n (unbiased)")
    p.add_argument("--stack-noise-condition", action="store_true",
                   help="tell the model the stacked frames' noise level (an embedding beside the timestep's), so "
                        "it copies a clean stacked frame as it is instead of shrinking it toward the mean")
    p.add_argument("--still-prior", type=nonnegative_float, default=0.0,
                   help="with stacking: predict the velocity on top of the 'nothing moved' estimate (the previous "
                        "frame, with this std of change in latent units), so a fresh model is a still world")
    p.add_argument("--patch-overlap", type=nonnegative_int, default=0,
                   help="the patch embedding also reads this many latent pixels beyond each patch's edges, so a "
                        "one-column move is visible to every token")
    p.add_argument("--camera-warp", action="store_true",
                   help="with stacking: the held keys move the stacked frames by the camera's motion per key, "
                        "measured from the training data before training, before the model reads them")
    p.add_argument("--action-momentum", type=fraction, default=0.0,
                   help="each frame's actions also carry their running average with this decay per frame (the "
                        "speed the keys built up in a game with momentum: Doom keeps 0.906 of the speed per tic, "
                        "0.82 per recorded frame of 2 tics); 0: off")
    p.add_argument("--camera-flow", action="store_true",
                   help="with --camera-warp and --action-momentum: the keys' running averages also move the stacked "
                        "frames by a per-pixel flow per key (walking's parallax), measured from the training data")
    p.add_argument("--camera-fov", type=field_of_view, default=0.0,
                   help="with --camera-warp: the view's horizontal field of view in degrees (forcekit eval camera), "
                        "so a turn moves the stacked frames as a pinhole camera's turn; 0: a translation")
    p.add_argument("--warp-mode", default="bilinear", choices=list(WARP_MODES),
                   help="how the camera warp resamples the stacked frames (bicubic blurs a fractional move less)")
    p.add_argument("--rest-gate", action="store_true",
                   help="with --still-prior: a learned gate of each frame's level, keys and their averages on the "
                        "residual, which can close where nothing moves")
    p.add_argument("--action-dropout", type=fraction, default=0.1,
                   help="chance a clip's actions are zeroed (classifier-free guidance on the keys; 0 with --rest-gate: "
                        "a zeroed clip that moves would teach the gate that rest moves)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation, batches and noise")
    p.add_argument("--ckpt-every-s", type=positive_float, default=180.0, help="checkpoint every N seconds")
    _threads_arg(p)
    add_device_arg(p)
    p.add_argument("--max-seconds", type=nonnegative_float, default=0.0,
                   help="stop after this much wall time of this run and write the bundle (0: run every step)")
    p.add_argument("--save-rank-states", action="store_true", help="write rankN.pt (DDP consistency checks)")

    p = commands.add("probe", help="train the inverse-dynamics probe (frame pair -> action) on real pairs",
                     func=_train_probe, group="train")
    p.add_argument("--data", required=True, help="training data dir")
    p.add_argument("--heldout", default=None, help="held-out data dir for the reported accuracy")
    p.add_argument("--out", required=True, help="run dir: probe.pt, probe.json, ckpt.pt")
    p.add_argument("--steps", type=positive_int, default=2000, help="total optimizer steps")
    p.add_argument("--batch", type=positive_int, default=64, help="frame pairs per step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of initialisation and batches")
    _threads_arg(p)

    p = commands.add("world", help="world model vs the real engine: per-horizon PSNR/SSIM and probe accuracy "
                     "on held-out episodes", func=_eval_world, group="eval")
    _add_heldout_args(p, episodes=4)
    p.add_argument("--horizon", type=positive_int, default=64, help="frames generated after the context")
    p.add_argument("--probe", default=None, help="probe dir (forcekit train probe) for action accuracy")
    p.add_argument("--mode", default="session", choices=["session", "bidirectional", "copy"],
                   help="session: open_session (causal, KV cache); bidirectional: a teacher samples each new "
                   "frame jointly with its context window, as it was trained; copy: baseline repeating the "
                   "last context frame")
    p.add_argument("--plot", type=png_path, default=None, help="write PSNR/SSIM vs horizon to this PNG")
    p.add_argument("--video", type=video_path, default=None, help="write a real | generated side-by-side mp4")
    p.add_argument("--frames", type=png_path, default=None,
                   help="write the real frame above the generated one at each reported horizon, first 4 "
                   "episodes, to this PNG (lossless)")
    _add_result_args(p)

    p = commands.add("controls", help="does the model follow the keys? engine and model from one held-out state, "
                     "each key held: response vs the engine's (JSON)", func=_eval_controls, group="eval")
    _add_heldout_args(p, episodes=8)
    p.add_argument("--hold", type=positive_int, default=8, help="frames each key is held")
    p.add_argument("--still", type=nonnegative_int, default=64,
                   help="frames with no key held for the stillness check (0: skip it)")
    p.add_argument("--settle", type=nonnegative_int, default=32,
                   help="no-key frames the engine plays before the still check's context, so it starts at rest")
    p.add_argument("--rest-db", type=nonnegative_float, default=30.0,
                   help="still starts count as at rest where the engine's own frames stay this close to the last "
                        "real one (PSNR, dB)")
    p.add_argument("--mode", default="session", choices=["session", "bidirectional"],
                   help="session: open_session (causal, KV cache); bidirectional: a teacher samples each new frame "
                        "jointly with its context window (as eval world --mode bidirectional)")
    _add_result_args(p)

    p = commands.add("gap", help="does a teacher use the keys? its loss with zeroed vs true actions on held-out "
                     "clips, the newest frame at high noise (several seeds)", func=_eval_gap, group="eval")
    p.add_argument("--bundle", required=True, help="bundle dir (a bidirectional teacher)")
    p.add_argument("--data", required=True, help="held-out data dir (forcekit record)")
    p.add_argument("--clips", type=positive_int, default=256, help="clips per seed")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds (clip choice and noise)")
    p.add_argument("--levels", type=_levels, default=(0.5, 0.9),
                   help="noise levels of the newest frame, comma separated, each in (0, 1]")
    p.add_argument("--clip-frames", type=nonnegative_int, default=0,
                   help="frames per clip (0: the session context + 1)")
    p.add_argument("--max-episodes", type=nonnegative_int, default=0,
                   help="encode only the first N episodes (0: all)")
    p.add_argument("--latents-cache", default=None, help="dir for the encoded latents (default: none)")
    _threads_arg(p)

    from training.students.commands import register as register_students

    register_students(commands)
