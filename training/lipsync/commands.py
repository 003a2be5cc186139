"""The lip-sync subcommands: `train mouth-probe`, `train syncnet`, `train face-locator`, `train audio-mouth`,
`eval lipsync` (see forcekit/cli.py).

Recording is `forcekit record --env lipsync:train` / `lipsync:heldout` (training/data/record.py).
"""

from __future__ import annotations

import argparse
import json

from forcekit.cli import positive_int_list


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _train_mouth_probe(args: argparse.Namespace) -> int:
    from training.lipsync.probes import train_mouth_probe

    _threads(args.threads)
    print(json.dumps(train_mouth_probe(args.data, args.out, heldout=args.heldout, steps=args.steps, batch=args.batch,
                                       lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s,
                                       max_clips=args.max_clips)))
    return 0


def _train_syncnet(args: argparse.Namespace) -> int:
    from training.lipsync.probes import train_syncnet

    _threads(args.threads)
    print(json.dumps(train_syncnet(args.data, args.out, heldout=args.heldout, steps=args.steps,
                                   clips_per_batch=args.clips_per_batch, windows_per_clip=args.windows_per_clip,
                                   lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s,
                                   max_clips=args.max_clips)))
    return 0


def _train_face_locator(args: argparse.Namespace) -> int:
    from training.lipsync.face_locator import train_face_locator

    _threads(args.threads)
    print(json.dumps(train_face_locator(args.data, args.out, heldout=args.heldout, steps=args.steps, batch=args.batch,
                                        lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s,
                                        max_clips=args.max_clips)))
    return 0


def _eval_lipsync(args: argparse.Namespace) -> int:
    from training.lipsync.evaluate import evaluate_lipsync

    _threads(args.threads)
    result = evaluate_lipsync(args.clips, mouth_probe=args.mouth_probe, syncnet=args.syncnet,
                              reference=args.reference, max_shift=args.max_shift, max_clips=args.max_clips)
    text = json.dumps(result, indent=None if args.json else 2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _train_audio_mouth(args: argparse.Namespace) -> int:
    from runtime.audio_mouth import AudioMouthConfig
    from training.lipsync.audio_mouth import AudioMouthTrainConfig, train_audio_mouth

    _threads(args.threads)
    cfg = AudioMouthTrainConfig(data=args.data, out=args.out, heldout=args.heldout or "", steps=args.steps,
                                batch=args.batch, lr=args.lr, seed=args.seed, ckpt_every_s=args.ckpt_every_s,
                                max_clips=args.max_clips)
    print(json.dumps(train_audio_mouth(cfg, AudioMouthConfig(hidden=args.hidden))))
    return 0


def _common(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--data", required=True, help="lip-sync training data (forcekit record --env lipsync:train)")
    p.add_argument("--heldout", default=None, help="held-out data (--env lipsync:heldout) for the reported numbers")
    p.add_argument("--out", required=True, help="run dir (a rerun continues from its ckpt.pt)")
    p.add_argument("--steps", type=int, default=steps, help="total optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and the initial weights")
    p.add_argument("--max-clips", type=int, default=0, help="train on the first N clips only (0: all)")
    p.add_argument("--ckpt-every-s", type=float, default=120.0, help="checkpoint every N seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")


def register(commands) -> None:
    p = commands.add("mouth-probe", help="train the mouth-parameter regressor (open, width, round) on rendered "
                     "faces (resumable)", func=_train_mouth_probe, group="train")
    _common(p, steps=3000)
    p.add_argument("--batch", type=int, default=64, help="frames per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")

    p = commands.add("syncnet", help="train the SyncNet-style audio-visual embedding on rendered clips "
                     "(contrastive; resumable)", func=_train_syncnet, group="train")
    _common(p, steps=3000)
    p.add_argument("--clips-per-batch", type=int, default=16, help="clips per step")
    p.add_argument("--windows-per-clip", type=int, default=4, help="windows per clip in a batch (timing negatives)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")

    p = commands.add("face-locator", help="train the face locator of the lip-sync apps on composites of rendered "
                     "faces (zero, one or two per image; resumable)", func=_train_face_locator, group="train")
    _common(p, steps=2000)
    p.add_argument("--batch", type=int, default=32, help="composite images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")

    p = commands.add("audio-mouth", help="train the audio -> mouth net a lip-sync bundle told the mouth reads the "
                     "audio with (resumable)", func=_train_audio_mouth, group="train")
    _common(p, steps=2000)
    p.add_argument("--batch", type=int, default=256, help="frames per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--hidden", type=positive_int_list, default=[512, 256], help="hidden widths, e.g. 512,256")

    p = commands.add("lipsync", help="lip-sync of clips (frames + audio): mouth agreement and offset, LSE-C / "
                     "LSE-D real vs shuffled audio, PSNR/SSIM outside the mouth (JSON)", func=_eval_lipsync,
                     group="eval")
    p.add_argument("--clips", required=True, help="clips dir in the lip-sync recording format")
    p.add_argument("--mouth-probe", default=None, help="run dir of `forcekit train mouth-probe`")
    p.add_argument("--syncnet", default=None, help="run dir of `forcekit train syncnet`")
    p.add_argument("--reference", default=None, help="input frames (same clips) for PSNR/SSIM outside the mouth")
    p.add_argument("--max-shift", type=int, default=10, help="offsets tried by the sync scores, in frames")
    p.add_argument("--max-clips", type=int, default=0, help="evaluate the first N clips only (0: all)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--json", action="store_true", help="one-line JSON")
