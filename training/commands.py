"""Subcommands this package adds to the `forcekit` CLI (see forcekit/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 64 or 64x64") from e
    return h, w


def _record(args: argparse.Namespace) -> int:
    from training.data.record import RecordConfig, record

    cfg = RecordConfig(env=args.env, episodes=args.episodes, policy=args.policy, seed=args.seed,
                       size=args.size, frame_skip=args.frame_skip, episodes_per_shard=args.episodes_per_shard,
                       max_frames=args.max_frames, max_hold=args.max_hold)
    print(json.dumps(record(cfg, args.out)))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from training.data.shards import check_dir

    summary, bad = check_dir(args.dir)
    print(json.dumps(summary, indent=2))
    for line in bad:
        print(f"BAD SHARD {line}", file=sys.stderr)
    return 1 if bad else 0


def _train_codec(args: argparse.Namespace) -> int:
    from runtime.autoencoder import ConvAEConfig
    from training.codec import CodecTrainConfig, train_codec

    cfg = CodecTrainConfig(data=args.data, out=args.out, steps=args.steps, batch=args.batch, crop=args.crop,
                           lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s, threads=args.threads)
    model_cfg = ConvAEConfig(latent_channels=args.latent_channels)
    print(json.dumps(train_codec(cfg, model_cfg)))
    return 0


def _eval_codec(args: argparse.Namespace) -> int:
    import torch

    from training.codec import eval_codec, load_codec, load_frames

    if args.threads:
        torch.set_num_threads(args.threads)
    frames = load_frames(args.data)
    if args.max_frames and len(frames) > args.max_frames:
        idx = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))[: args.max_frames]
        frames = frames[idx.sort().values]
    result = {"codec": args.codec, "data": args.data, **eval_codec(load_codec(args.codec), frames)}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def register(commands) -> None:
    p = commands.add("record", help="record episodes from a game engine into atomic shards (resumable)",
                     func=_record)
    p.add_argument("--env", required=True, help="doom:<scenario> or atari:<game>")
    p.add_argument("--episodes", type=int, required=True, help="total episodes wanted in --out")
    p.add_argument("--policy", default="random-sticky", help="action policy (random-sticky)")
    p.add_argument("--out", required=True, help="data directory (created; a rerun continues it)")
    p.add_argument("--seed", type=int, default=0, help="episode i uses engine seed SEED+i")
    p.add_argument("--size", type=_size, default=(64, 64), help="frame size HxW (default 64x64)")
    p.add_argument("--frame-skip", type=int, default=None, help="engine frames per recorded frame")
    p.add_argument("--episodes-per-shard", type=int, default=8)
    p.add_argument("--max-frames", type=int, default=1000, help="cap on frames per episode")
    p.add_argument("--max-hold", type=int, default=12, help="random-sticky: longest hold in frames")

    p = commands.add("check", help="verify every shard of a data dir and print a summary", func=_data_check,
                     group="data")
    p.add_argument("dir", help="data directory written by `forcekit record`")

    p = commands.add("codec", help="train the per-frame latent codec (resumable: rerun continues)",
                     func=_train_codec, group="train")
    p.add_argument("--data", required=True, help="training data dir (forcekit record)")
    p.add_argument("--out", required=True, help="run dir: ckpt.pt, codec.json, codec.safetensors, tb/")
    p.add_argument("--steps", type=int, default=20000, help="total optimizer steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=32, help="training crop size; 0 = full frames")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-channels", type=int, default=8, help="(ignored when resuming)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every-s", type=float, default=180.0, help="checkpoint every N seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")

    p = commands.add("codec", help="codec reconstruction PSNR/SSIM on held-out frames and decode latency",
                     func=_eval_codec, group="eval")
    p.add_argument("--codec", required=True, help="codec dir (codec.json + codec.safetensors)")
    p.add_argument("--data", required=True, help="held-out data dir")
    p.add_argument("--max-frames", type=int, default=4096, help="evaluate on at most N frames (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--json", action="store_true", help="one-line JSON")
