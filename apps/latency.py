"""`forcekit bench latency`: what a player feels, measured on the two real paths.

- local: session -> pipeline -> paced consumer (what `forcekit play` runs, minus drawing).
- webrtc: `forcekit serve` in-process on loopback and a real aiortc peer that decodes the VP8
  video and sends key snapshots over the data channel (what the page does).

Input alternates between no keys and one bound key every `toggle_s` seconds (x 0.75-1.25 at
random, so changes fall at random phases of the frame clock). Input-to-frame
latency is the time from an input change to the first frame generated under it (local: frame
produced / handed to the display; webrtc: that frame decoded at the peer, found by its RTP
pts, which the server reports in an `applied` message). Time to first frame counts from
opening the session (local) or from posting the offer (webrtc).
"""

from __future__ import annotations

import asyncio
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from apps.pipeline import Pipeline, PipelineConfig, percentiles_ms


@dataclass
class LatencyConfig:
    seconds: float = 8.0  # measured time per path
    toggle_s: float = 0.5  # time between input changes
    fps: float | None = None  # playback rate (default: the bundle's)
    webrtc: bool = True
    warmup_chunks: int = 16  # generated before measuring, so one-off start-up costs are reported apart


def _intervals(times: list[float]) -> dict:
    d = np.diff(np.asarray(times, dtype=np.float64))
    out = {"frame_interval_ms": percentiles_ms(d)}
    out["frame_jitter_ms"] = float(d.std() * 1e3) if d.size > 1 else None
    return out


def warm_up(open_fn: Callable[[], object], chunks: int) -> dict:
    """Open a session and step it: the first chunk of the process is the cold start figure."""
    t0 = time.perf_counter()
    session = open_fn()
    opened = time.perf_counter()
    session.step(action=None)
    first = time.perf_counter()
    for _ in range(max(0, chunks - 1)):
        session.step(action=None)
    done = time.perf_counter()
    return {
        "open_session_ms": (opened - t0) * 1e3,
        "cold_first_chunk_ms": (first - opened) * 1e3,
        "warm_chunk_ms": (done - first) * 1e3 / max(1, chunks - 1),
        "frame_size": list(session.frame_size), "frames_per_chunk": int(session.frames_per_chunk),
        "bundle_fps": float(session.fps), "action_space": session.action_space.to_dict(),
    }


def measure_local(open_fn: Callable[[], object], cfg: LatencyConfig, key: str) -> dict:
    t0 = time.perf_counter()
    pipe = Pipeline(open_fn(), PipelineConfig(fps=cfg.fps))
    shown: list[float] = []
    first_frame = None
    rng = np.random.default_rng(0)
    done = threading.Event()

    def toggle_keys() -> None:  # its own thread, at random phases relative to the frame clock
        held = False
        while not done.wait(cfg.toggle_s * rng.uniform(0.75, 1.25)):
            held = not held
            pipe.inputs.set_keys([key] if held else [])

    with pipe:
        toggler = threading.Thread(target=toggle_keys, daemon=True)
        toggler.start()
        end = time.perf_counter() + cfg.seconds
        while time.perf_counter() < end:
            frame = pipe.next_frame(timeout=1.0)
            if frame is not None:
                shown.append(time.perf_counter())
                if first_frame is None:
                    first_frame = shown[-1]
        done.set()
        toggler.join()
    s = pipe.stats()
    return {
        "time_to_first_frame_ms": None if first_frame is None else (first_frame - t0) * 1e3,
        "input_to_frame_ms": s["input_to_frame_ms"],
        "input_to_display_ms": s["input_to_display_ms"],
        **_intervals(shown),
        "fps": s["fps"], "generated_fps": s["generated_fps"], "target_fps": s["target_fps"],
        "frames_shown": s["frames_shown"], "dropped": s["dropped"],
        "input_changes": len(pipe._gen_latency),
    }


async def measure_webrtc(open_fn: Callable[[], object], cfg: LatencyConfig, key: str) -> dict:
    import aiohttp
    from aiohttp import web

    from apps import rtc_client
    from apps.serve import SERVER, ServeConfig, create_app

    app = create_app(open_fn, ServeConfig(max_sessions=1, warmup_chunks=0, pipeline=PipelineConfig(fps=cfg.fps)))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as http:
            t0 = time.perf_counter()
            peer, status, body = await rtc_client.connect(base, http)
            if peer is None:
                raise RuntimeError(f"offer refused: {status} {body}")
            await asyncio.wait_for(peer.opened.wait(), 20)
            await asyncio.wait_for(peer.first_frame.wait(), 60)
            first_frame = peer.frames[0][1]
            held = False
            rng = np.random.default_rng(0)
            end = time.perf_counter() + cfg.seconds
            while time.perf_counter() < end:
                held = not held
                peer.send_keys([key] if held else [])
                peer.send({"type": "ping", "t": time.perf_counter()})
                await asyncio.sleep(cfg.toggle_s * rng.uniform(0.75, 1.25))  # random phase
            await asyncio.sleep(0.5)  # let the last change arrive
            server_stats = app[SERVER].peers[peer.peer_id].pipeline.stats()
            await peer.close()
    finally:
        await runner.cleanup()

    latencies, matched = [], 0
    pts = np.asarray([p for p, _ in peer.frames])
    arrivals = np.asarray([a for _, a in peer.frames])
    for msg in peer.of_type("applied"):
        sent = peer.sent_at.get(msg["seq"])
        idx = np.nonzero(pts >= msg["pts"])[0]
        if sent is None or idx.size == 0:
            continue
        matched += 1
        latencies.append(arrivals[idx[0]] - sent)
    rtts = [m["_received"] - m["t"] for m in peer.of_type("pong")]
    return {
        "time_to_first_frame_ms": (first_frame - t0) * 1e3,
        "input_to_frame_ms": percentiles_ms(latencies),
        "server_input_to_frame_ms": server_stats["input_to_frame_ms"],
        **_intervals(list(arrivals)),
        "frames_received": len(peer.frames),
        "fps": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else None,
        "input_changes": len(peer.sent_at), "matched": matched,
        "first_pts": int(pts[0]) if pts.size else None,
        "ping_rtt_ms": percentiles_ms(rtts),
    }


def run_latency_bench(open_fn: Callable[[], object], cfg: LatencyConfig) -> dict:
    warm = warm_up(open_fn, cfg.warmup_chunks)
    bindings = warm["action_space"]["bindings"]
    if not bindings:
        raise ValueError("this bundle binds no keys, so input-to-frame latency cannot be measured")
    key = sorted(bindings)[0]
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "python": platform.python_version()},
        "startup": warm, "toggled_key": key, "seconds": cfg.seconds, "toggle_s": cfg.toggle_s,
        "local": measure_local(open_fn, cfg, key),
    }
    if cfg.webrtc:
        report["webrtc"] = asyncio.run(measure_webrtc(open_fn, cfg, key))
    return report
