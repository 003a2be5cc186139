"""Runtime subcommands: `forcekit generate` and `forcekit bench runtime`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from forcekit.cli import CommandError, positive_float, positive_int, seed_int


def video_path(text: str) -> str:
    """An output video file name whose suffix is a container `write_video` writes."""
    from runtime.video import check_video_path

    try:
        check_video_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def png_path(text: str) -> str:
    """An output image file name: PNG, the lossless format the plots and frame grids are written in."""
    if Path(text).suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text!r}: expected a .png file name")
    return text


def register(commands) -> None:
    p = commands.add("generate", help="generate a video from a bundle and print fps", func=_generate)
    _bundle_args(p)
    p.add_argument("--frames", type=positive_int, default=64, help="frames to generate")
    p.add_argument("--actions", default="random",
                   help="'random' (held keys for random durations) or a JSON file: a list of actions, one per "
                        "chunk (key-name lists, {'keys': [...], <value>: x} dicts or vectors of finite numbers); "
                        "the last repeats")
    p.add_argument("--out", type=video_path, default="video.mp4", help="output video file (.mp4, .mkv, .mov, .avi)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise and of the random actions")

    p = commands.add("runtime", group="bench", func=_bench_runtime,
                     help="session speed: fps, first-frame latency, chunk p50/p95, cache bytes, cache speedup (JSON)")
    _bundle_args(p)
    p.add_argument("--frames", type=positive_int, default=64, help="frames per measured run")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise and of the random actions")
    p.add_argument("--no-uncached", action="store_true", help="skip the kv_cache=False comparison run")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights and KV cache dtype (the sampler stays fp32); bf16 is the GPU setting")
    p.add_argument("--capture", default="none", choices=("none", "graphs", "compile"),
                   help="run each cached pass as a captured CUDA graph, or through torch.compile (GPU)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode with --capture compile")
    p.add_argument("--overlap", action="store_true",
                   help="also measure decode overlapped with the next chunk's denoising on a second CUDA stream")
    p.add_argument("--warmup", action="store_true",
                   help="run the measured rollout once before measuring (captures graphs, compiles, warms caches)")
    p.add_argument("--baseline", default=None, choices=("diffusers",),
                   help="also measure diffusers' WanTransformer3DModel recomputing the context with no cache")


def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="auto",
                   help="bundle directory, 'random-tiny' (untrained tiny model) or 'auto' (the bundle shipped "
                        "under models/, else random-tiny)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps per chunk (default: the bundle's)")
    p.add_argument("--guidance", type=positive_float, default=None,
                   help="classifier-free guidance scale on the actions (default: the bundle's; >1 follows keys "
                        "more strongly at about 1.5x the compute)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is faster for tiny models on a busy machine)")


def _open(args, runner_options=None):
    import torch

    from runtime.session import StreamSession, resolve_bundle

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = resolve_bundle(args.bundle, args.device)
    runner = None
    if runner_options is not None:
        from runtime.cuda_step import CudaStepModel

        runner = CudaStepModel(bundle.model, runner_options)
    return StreamSession(bundle, device=args.device, steps=args.steps, guidance=args.guidance, runner=runner,
                         text=random_text(bundle.config, getattr(args, "seed", 0)))


def random_text(config, seed: int):
    """A fixed random prompt embedding ``[512, text_dim]`` for a text-conditioned bundle run without a
    prompt (a speed measurement: Wan attends to 512 T5 tokens whatever the prompt); None without text."""
    import torch

    from runtime.presets import WAN_TEXT_TOKENS

    if not config.text_dim:
        return None
    return torch.randn(WAN_TEXT_TOKENS, config.text_dim, generator=torch.Generator().manual_seed(seed))


def random_actions(action_space, chunks: int, seed: int) -> list:
    """Held-key actions that persist for random durations, as a player would press them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    actions, current, left = [], [], 0
    for _ in range(chunks):
        if left <= 0:
            k = min(int(rng.integers(0, 3)), len(action_space.keys))
            current = sorted(rng.choice(action_space.keys, size=k, replace=False).tolist()) if k else None
            left = int(rng.integers(2, 12))
        actions.append(current)
        left -= 1
    return actions


def _load_actions(spec: str, session, chunks: int, seed: int) -> list:
    """The actions of ``--actions``: random held keys, or a JSON file checked entry by entry up front
    (a bad entry fails before any frame is generated, naming the file and the entry)."""
    if spec == "random":
        return random_actions(session.action_space, chunks, seed)
    try:
        actions = json.loads(Path(spec).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"--actions {spec}: cannot read a JSON list of actions ({e})") from e
    if not isinstance(actions, list) or not actions:
        raise CommandError(f"--actions {spec}: expected a non-empty JSON list, one action per chunk")
    for i, a in enumerate(actions):
        try:
            session.action_space.encode(a)
        except ValueError as e:
            raise CommandError(f"--actions {spec}: entry {i}: {e}") from e
    return [actions[min(i, len(actions) - 1)] for i in range(chunks)]


def _generate(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from runtime.video import write_video

    session = _open(args)
    session.reset(args.seed)
    chunks = session.config.chunk_pattern.num_chunks(args.frames)
    actions = _load_actions(args.actions, session, chunks, args.seed)
    frames = []
    for action in tqdm(actions, desc="generate", unit="chunk", file=sys.stderr):
        frames.append(session.step(action))
    video = np.concatenate(frames)[: args.frames]
    try:
        write_video(args.out, video, session.fps)
    except OSError as e:  # PyAV's messages do not always name the file
        raise CommandError(f"--out {args.out}: cannot write the video ({e})") from e
    stats = session.stats()
    print(f"wrote {args.out}: {len(video)} frames {video.shape[2]}x{video.shape[1]}; "
          f"{stats['fps']:.1f} fps steady state, first frame {stats['first_frame_ms']:.1f} ms "
          f"(bundle {session.bundle.name}, {stats['steps']} steps, {args.device})")
    return 0


def measure(session, frames: int, seed: int) -> dict:
    """Run ``frames`` frames of random held-key actions and return the session's stats."""
    session.reset(seed)
    chunks = session.config.chunk_pattern.num_chunks(frames)
    for action in random_actions(session.action_space, chunks, seed):
        session.step(action)
    return session.stats()


def measure_overlapped(stream, frames: int, seed: int) -> dict:
    """`measure` through an `OverlappedStream` (decode of chunk n during the denoising of n + 1)."""
    stream.reset(seed)
    session = stream.session
    chunks = session.config.chunk_pattern.num_chunks(frames)
    for action in random_actions(session.action_space, chunks, seed):
        stream.step(action)
    stream.flush()
    return {k: v for k, v in session.stats().items() if k in ("fps", "first_frame_ms", "chunk_ms_p50",
                                                              "chunk_ms_p95", "frames")}


def _bench_runtime(args) -> int:
    import platform

    import torch

    from runtime.cuda_step import StepOptions, peak_memory
    from runtime.session import StreamSession

    if args.capture == "graphs" and not args.device.startswith("cuda"):
        print(f"error: --capture graphs records CUDA graphs: it needs --device cuda, not {args.device}",
              file=sys.stderr)
        return 2
    options = StepOptions(dtype=args.dtype, capture=args.capture, compile_mode=args.compile_mode)
    session = _open(args, options if options != StepOptions() else None)
    if args.warmup:
        measure(session, args.frames, args.seed)
    with peak_memory(session.device) as peak:
        cached = measure(session, args.frames, args.seed)
    result = {
        "bundle": session.bundle.name, "device": args.device, "frames": args.frames,
        "frame_size": list(session.frame_size), "steps": cached["steps"], "guidance": cached["guidance"],
        "frames_per_chunk": session.frames_per_chunk, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "fps": cached["fps"], "first_frame_ms": cached["first_frame_ms"], "chunk_ms_p50": cached["chunk_ms_p50"],
        "chunk_ms_p95": cached["chunk_ms_p95"], "kv_cache_bytes": cached["kv_cache_bytes"],
        "video_frames": cached["frames"], "dtype": args.dtype, "capture": args.capture,
        "peak_memory_bytes": peak["bytes"],
    }
    if session.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(session.device)
    if args.capture == "graphs":
        result["graphs_captured"] = session._rollout.model.captures
    if args.overlap:
        from runtime.cuda_step import OverlappedStream

        result["overlap"] = measure_overlapped(OverlappedStream(session), args.frames, args.seed)
    if not args.no_uncached:
        from dataclasses import replace

        from runtime.cuda_step import CudaStepModel

        plain = CudaStepModel(session.bundle.model, replace(options, capture="none")) if args.dtype != "fp32" else None
        uncached = measure(StreamSession(session.bundle, device=args.device, steps=args.steps, kv_cache=False,
                                         guidance=args.guidance, runner=plain,
                                         text=None if session.text is None else session.text[0]),
                           args.frames, args.seed)
        result["uncached_fps"] = uncached["fps"]
        result["kv_cache_speedup"] = cached["fps"] / uncached["fps"]
    if args.baseline == "diffusers":
        from runtime.wan_baseline import measure_diffusers_baseline

        base = measure_diffusers_baseline(session.bundle, session.device, args.frames, args.steps,
                                          session.text, args.seed,
                                          dtype=next(session.bundle.model.parameters()).dtype)
        result["baseline"] = base
        result["speedup_vs_baseline"] = cached["fps"] / base["fps"] if base["fps"] else None
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
