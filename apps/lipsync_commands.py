"""`forcekit lipsync` (the local loop) and `forcekit bench lipsync` (fps and audio-to-mouth latency, JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from forcekit.cli import CommandError, positive_float, positive_int

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "lipsync"


def _bundle(spec: str | None, device: str):
    """The lip-sync bundle a ``--bundle`` names (default: models/lipsync); a clear error for a world model."""
    from runtime.session import resolve_bundle

    if spec is None:
        if not (SHIPPED / "config.json").is_file():
            raise CommandError(f"no lip-sync bundle under {SHIPPED}: pass --bundle DIR (or random-lipsync, "
                               "untrained, to try the loop)")
        spec = str(SHIPPED)
    bundle = resolve_bundle(spec, device)
    if "lipsync" not in bundle.extra:
        raise CommandError(f"bundle {spec!r} is not a lip-sync bundle (it has no lip-sync spec)")
    return bundle


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def lipsync(args: argparse.Namespace) -> int:
    import numpy as np

    from apps.lipsync import (
        AudioClipSource,
        LatestFrame,
        LipsyncLoop,
        LipsyncLoopConfig,
        MicSource,
        VideoSource,
        open_face_locator,
    )
    from runtime import open_session

    _threads(args.threads)
    session = open_session(_bundle(args.bundle, args.device), device=args.device)
    frames = LatestFrame()
    video = VideoSource(int(args.video) if args.video.isdigit() else args.video, frames)
    audio = (AudioClipSource.from_wav(args.audio, args.block_ms / 1000) if args.audio
             else MicSource(args.mic_rate, args.block_ms / 1000))
    window = None
    if not args.no_window:
        from apps.lipsync import Window

        window = Window(args.window)
    kept: list = []

    def on_frame(frame, loop) -> None:
        if window is not None:
            window.show(frame, loop)
        if args.out:
            kept.append(frame)

    loop = LipsyncLoop(session, audio, frames, LipsyncLoopConfig(block_s=args.block_ms / 1000, seconds=args.seconds),
                       on_frame, face_locator=open_face_locator(args.face_locator))
    player = None if args.no_playback else _player(loop)
    video.start()
    try:
        stats = loop.run()
    finally:
        video.close()
        if player is not None:
            player.stop()
            player.close()
        if window is not None:
            window.close()
    if args.out and kept:
        from runtime.video import write_video

        write_video(args.out, np.stack(kept), session.fps)
        stats["out"] = args.out
    stats["bundle"] = session.bundle.name
    print(json.dumps(stats) if args.json else
          f"re-synced {stats['frames']} frames; fps {stats['fps']}; audio->mouth ms p50 "
          f"{stats['audio_to_mouth_ms_p50']} p95 {stats['audio_to_mouth_ms_p95']}; video {stats['video']}")
    return 0


def _player(loop):
    """Delayed playback of the driving audio through sounddevice, or None (with a note) without it."""
    try:
        import sounddevice
    except ImportError:
        print("note: no sounddevice package: the audio is not played back (pip install sounddevice)",
              file=sys.stderr)
        return None
    stream = sounddevice.OutputStream(samplerate=loop.playback.rate, channels=1, dtype="float32",
                                      callback=lambda out, n, *_: out.__setitem__((slice(None), 0),
                                                                                  loop.playback.read(n)))
    stream.start()
    return stream


def bench_lipsync(args: argparse.Namespace) -> int:
    import os
    import platform

    import torch

    from apps.lipsync import LipsyncLoopConfig, open_face_locator
    from apps.lipsync_bench import run_lipsync_bench

    _threads(args.threads)
    bundle = _bundle(args.bundle, args.device)
    report = run_lipsync_bench(bundle, seconds=args.seconds, frames=args.frames,
                               loop=LipsyncLoopConfig(block_s=args.block_ms / 1000), device=args.device,
                               rate=args.rate, face_locator=open_face_locator(args.face_locator))
    report.update({"bundle": bundle.name, "weights": bundle.extra.get("weights", "trained"),
                   "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                   "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__})
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def eval_lipsync_browser(args: argparse.Namespace) -> int:
    from apps.lipsync_browser import BrowserSyncConfig, browser_resync

    _threads(args.threads)
    cfg = BrowserSyncConfig(voices=args.voices, seconds=args.seconds, chromium=args.chromium)
    print(json.dumps(browser_resync(args.bundle, args.clips, args.out, cfg)))
    return 0


def add_face_locator_arg(p) -> None:
    p.add_argument("--face-locator", default=None, help="face locator dir (default: models/face_locator when "
                   "present); 'none': re-sync a fixed centre crop of the camera")


def register(commands) -> None:
    p = commands.add("lipsync", help="re-sync a face (webcam or --video FILE) to a voice (microphone or --audio "
                     "FILE.wav) in a pygame window, the voice played back delayed to match", func=lipsync)
    p.add_argument("--bundle", default=None, help="lip-sync bundle dir (default: models/lipsync), or random-lipsync")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--video", default="0", help="camera index or video file")
    add_face_locator_arg(p)
    p.add_argument("--audio", default=None, help="16-bit WAV file played as the microphone (default: the microphone)")
    p.add_argument("--mic-rate", type=positive_int, default=48000, help="microphone sample rate (resampled)")
    p.add_argument("--block-ms", type=positive_float, default=10.0, help="audio block size, ms")
    p.add_argument("--seconds", type=positive_float, default=None, help="stop after this long")
    p.add_argument("--window", type=positive_int, default=384, help="window size, pixels")
    p.add_argument("--no-window", action="store_true", help="no pygame window (with --out or --json)")
    p.add_argument("--no-playback", action="store_true", help="do not play the delayed audio")
    p.add_argument("--out", default=None, help="also write the re-synced frames to this video file")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the stats as one line of JSON")

    p = commands.add("lipsync", group="bench", func=bench_lipsync,
                     help="lip-sync speed: fps at the bundle's frame size and audio-to-mouth latency p50/p95 of "
                          "the real-time loop, feature window included (JSON)")
    p.add_argument("--bundle", default="random-lipsync",
                   help="lip-sync bundle dir, or random-lipsync (the shipped geometry, random weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seconds", type=positive_float, default=6.0, help="length of the real-time run")
    p.add_argument("--frames", type=positive_int, default=100, help="frames of the back-to-back throughput run")
    p.add_argument("--rate", type=positive_int, default=48000, help="sample rate of the simulated microphone")
    p.add_argument("--block-ms", type=positive_float, default=10.0, help="microphone block size, ms")
    add_face_locator_arg(p)
    p.add_argument("--json", action="store_true", help="one line of JSON")

    p = commands.add("lipsync-browser", group="eval", func=eval_lipsync_browser,
                     help="the served stream measured in headless Chromium: a held-out face as the fake camera, "
                          "other clips' voices as the fake microphone; writes OUT/browser for `eval lipsync`")
    p.add_argument("--bundle", default=str(SHIPPED), help="lip-sync bundle dir (default: models/lipsync)")
    p.add_argument("--clips", required=True, help="held-out clips (forcekit record --env lipsync:heldout)")
    p.add_argument("--out", required=True, help="output dir: browser/ (recording format), browser.json, the "
                   "fake devices' files")
    p.add_argument("--voices", type=positive_int, default=4, help="clips after the first whose voices drive it")
    p.add_argument("--seconds", type=positive_float, default=None,
                   help="seconds of returned stream to capture (default: the voices' length + 1)")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium binary")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
