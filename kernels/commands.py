"""Subcommands this package adds to the `forcekit` CLI (see forcekit/cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from forcekit.cli import nonnegative_int, positive_int


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def register(commands) -> None:
    p = commands.add("kernels", group="bench", func=_bench_kernels,
                     help="Triton attention kernels vs SDPA / FlexAttention / flash-attn: ms and TFLOP/s "
                          "for forward, backward, forward+JVP (needs CUDA; JSON)")
    p.add_argument("--heads", type=positive_int, default=12, help="attention heads")
    p.add_argument("--head-dim", type=positive_int, default=128, help="width of each head")
    p.add_argument("--extra-head-dims", type=_csv(positive_int), default=(64,),
                   help="more geometries at the same width heads*head_dim, comma-separated ('' for none)")
    p.add_argument("--tokens-per-frame", type=positive_int, default=1560, help="tokens per latent frame")
    p.add_argument("--frames", type=positive_int, default=21, help="frames in the attended sequence")
    p.add_argument("--frames-per-chunk", type=positive_int, default=3, help="frames per causal chunk")
    p.add_argument("--first-chunk-frames", type=positive_int, default=None,
                   help="frames in the first chunk (default: --frames-per-chunk)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="dtype of q, k, v")
    p.add_argument("--masks", type=_csv(str), default=("block_causal", "teacher_forcing"),
                   help="comma-separated masks to time")
    p.add_argument("--passes", type=_csv(str), default=("fwd", "bwd", "jvp"),
                   help="comma-separated subset of fwd,bwd,jvp")
    p.add_argument("--baselines", type=_csv(str), default=("sdpa", "flex", "flash"),
                   help="comma-separated subset of sdpa,flex,flash")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed calls before timing")
    p.add_argument("--iters", type=positive_int, default=10, help="timed calls per measurement")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--device", default="cuda",
                   help="cuda (default), or cpu for a dry run of the benchmark's code (kernels interpreted: "
                        "needs TRITON_INTERPRET=1; its timings mean nothing)")


def _bench_kernels(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("forcekit bench kernels --device cpu needs TRITON_INTERPRET=1 (the kernels run interpreted)",
              file=sys.stderr)
        return 2
    if args.device != "cpu" and not torch.cuda.is_available():
        print("forcekit bench kernels needs a CUDA GPU (the Triton kernels only run interpreted on CPU, "
              "which says nothing about speed); no CUDA device found.", file=sys.stderr)
        return 2
    from kernels.bench import BenchConfig, format_table, run_benchmark

    cfg = BenchConfig(heads=args.heads, head_dim=args.head_dim, extra_head_dims=args.extra_head_dims,
                      tokens_per_frame=args.tokens_per_frame, frames=args.frames,
                      frames_per_chunk=args.frames_per_chunk, first_chunk_frames=args.first_chunk_frames,
                      batch=args.batch, dtype=args.dtype, masks=args.masks, passes=args.passes,
                      baselines=args.baselines, warmup=args.warmup, iters=args.iters)
    report = run_benchmark(cfg, args.device)
    if not args.json:
        print(format_table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0
