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


def _open(args):
    import torch

    from runtime import open_session

    if args.threads:
        torch.set_num_threads(args.threads)
    return open_session(args.bundle, device=args.device, steps=args.steps, guidance=args.guidance)


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


def _bench_runtime(args) -> int:
    import platform

    import torch

    from runtime import open_session

    session = _open(args)
    cached = measure(session, args.frames, args.seed)
    result = {
        "bundle": session.bundle.name, "device": args.device, "frames": args.frames,
        "frame_size": list(session.frame_size), "steps": cached["steps"], "guidance": cached["guidance"],
        "frames_per_chunk": session.frames_per_chunk, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "fps": cached["fps"], "first_frame_ms": cached["first_frame_ms"], "chunk_ms_p50": cached["chunk_ms_p50"],
        "chunk_ms_p95": cached["chunk_ms_p95"], "kv_cache_bytes": cached["kv_cache_bytes"],
    }
    if not args.no_uncached:
        uncached = measure(open_session(session.bundle, device=args.device, steps=args.steps, kv_cache=False,
                                      guidance=args.guidance),
                           args.frames, args.seed)
        result["uncached_fps"] = uncached["fps"]
        result["kv_cache_speedup"] = cached["fps"] / uncached["fps"]
    print(json.dumps(result, indent=None if args.json else 2))
    return 0
