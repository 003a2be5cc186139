"""Subcommands this package adds to the `forcekit` CLI (see forcekit/cli.py)."""

from __future__ import annotations

import argparse
import math

from forcekit.cli import nonnegative_int, positive_float, positive_int


def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default="auto",
                   help="bundle directory, 'random-tiny' (untrained tiny model) or 'auto' (the bundle shipped "
                        "under models/, else random-tiny)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps per chunk (default: the bundle's)")
    p.add_argument("--guidance", type=positive_float, default=None,
                   help="classifier-free guidance scale on the actions (default: the bundle's)")
    p.add_argument("--fps", type=positive_float, default=None, help="playback rate (default: the bundle's)")


def _open_fn(args: argparse.Namespace, bundle=None):
    """A function opening a fresh session on the bundle (loaded once, unless given) with the CLI's settings."""
    from runtime import open_session
    from runtime.session import resolve_bundle

    bundle = resolve_bundle(args.bundle) if bundle is None else bundle
    return lambda: open_session(bundle, device=args.device, steps=args.steps, guidance=args.guidance)


def play(args: argparse.Namespace) -> int:
    from pathlib import Path

    from apps.pipeline import PipelineConfig
    from apps.play import PlayConfig, Player

    session = _open_fn(args)()
    for _ in range(args.warmup):  # one-off start-up costs before the clock starts
        session.step(action=None)
    session.reset(seed=0)
    player = Player(session, PlayConfig(window_min=args.window, hud=not args.no_hud,
                                                 record_dir=Path(args.record_dir)),
                    PipelineConfig(fps=args.fps))
    stats = player.run(max_frames=args.max_frames)
    print(f"played {player.frames_shown} frames; fps {stats['fps']}; input->frame ms {stats['input_to_frame_ms']}")
    for path in player.recordings:
        print(f"recorded {path}")
    return 0


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0: any free port), got {port}")
    return port


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _ice_server(text: str) -> str:
    from apps.serve import ice_server

    try:
        ice_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def serve(args: argparse.Namespace) -> int:
    import logging
    import sys

    from apps.pipeline import PipelineConfig
    from apps.serve import ServeConfig, bind, create_app, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ServeConfig(max_sessions=args.max_sessions, codec=args.codec, bitrate=args.bitrate,
                         idle_timeout_s=args.idle_timeout, warmup_chunks=args.warmup,
                         ice_servers=tuple(args.ice_server), allowed_origins=tuple(args.allow_origin),
                         pipeline=PipelineConfig(fps=args.fps))
    from runtime.session import resolve_bundle

    bundle = resolve_bundle(args.bundle)  # a bad bundle is the first thing to say; loading it is quick
    try:  # before anything slow, and before saying where to go
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"forcekit serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
              f"(another server there? choose another --port)", file=sys.stderr)
        return 1
    host = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    if args.lipsync:  # webcam + microphone in, re-synced face out: its own app (apps/lipsync_serve.py)
        from apps.lipsync import open_face_locator
        from apps.lipsync_serve import LipsyncServeConfig, create_lipsync_app

        app = create_lipsync_app(bundle, LipsyncServeConfig(max_sessions=args.max_sessions,
                                                            face_locator=open_face_locator(args.face_locator)))
        serve_forever(app, sock, lambda port: print(f"forcekit serve --lipsync: open http://{host}:{port}/",
                                                    flush=True))
        return 0

    def announce(port: int) -> None:  # listening, model warmed up
        print(f"forcekit serve: open http://{host}:{port}/ (max {args.max_sessions} session(s), "
              f"{args.codec} at {args.bitrate // 1000} kbit/s)", flush=True)

    serve_forever(create_app(_open_fn(args, bundle), config), sock, announce)
    return 0


def bench_latency(args: argparse.Namespace) -> int:
    import json

    from apps.latency import LatencyConfig, run_latency_bench

    report = run_latency_bench(_open_fn(args), LatencyConfig(seconds=args.seconds, toggle_s=args.toggle,
                                                             fps=args.fps, webrtc=not args.local_only))
    report["bundle"] = args.bundle
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def register(commands) -> None:
    p = commands.add("play", help="play a bundle in a local pygame window (held keys -> actions)", func=play)
    _bundle_args(p)
    p.add_argument("--window", type=positive_int, default=512,
                   help="scale frames so the shorter side is this many pixels")
    p.add_argument("--no-hud", action="store_true", help="hide the fps/latency overlay")
    p.add_argument("--record-dir", default="recordings", help="where F5 writes mp4 files")
    p.add_argument("--max-frames", type=positive_int, default=None,
                   help="quit after this many frames (for scripts; default: play until the window closes)")
    p.add_argument("--warmup", type=nonnegative_int, default=16, help="chunks generated (and discarded) before playing")

    p = commands.add("serve", help="serve a bundle to browsers over WebRTC (page at /)", func=serve)
    _bundle_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8080, help="TCP port of the page and the offer endpoint")
    p.add_argument("--max-sessions", type=_at_least_one, default=2, help="concurrent peers; more get 503")
    p.add_argument("--codec", choices=["vp8", "h264"], default="vp8", help="video codec sent to the browser")
    p.add_argument("--bitrate", type=positive_int, default=800_000, help="video bitrate cap, bits/s")
    p.add_argument("--idle-timeout", type=_seconds, default=20.0,
                   help="close a peer silent on its data channel for this many seconds")
    p.add_argument("--ice-server", type=_ice_server, action="append", default=[], metavar="URL",
                   help="STUN/TURN server for NAT traversal, repeatable: stun:HOST[:PORT] or "
                        "turn:HOST[:PORT],USERNAME,CREDENTIAL with an optional ?transport=udp or tcp after the "
                        "port (default: none; loopback and LAN need none, and none is contacted unasked)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept offers from pages at ORIGIN (scheme://host[:port]; '*' for any), "
                        "repeatable (default: only the server's own page on localhost or an IP address)")
    p.add_argument("--warmup", type=nonnegative_int, default=16,
                   help="chunks generated at start-up to warm the runtime")
    p.add_argument("--lipsync", action="store_true",
                   help="lip-sync mode: the browser sends webcam + microphone, gets the face re-synced (a lip-sync "
                        "--bundle, e.g. models/lipsync or random-lipsync)")
    from apps.lipsync_commands import add_face_locator_arg

    add_face_locator_arg(p)

    p = commands.add("latency", help="time to first frame, input-to-frame latency and frame jitter (JSON)",
                     func=bench_latency, group="bench")
    _bundle_args(p)
    p.add_argument("--seconds", type=positive_float, default=8.0, help="measured time per path")
    p.add_argument("--toggle", type=positive_float, default=0.5, help="seconds between input changes")
    p.add_argument("--local-only", action="store_true", help="skip the WebRTC loopback path")
    p.add_argument("--json", action="store_true", help="one line of JSON (default: indented)")
