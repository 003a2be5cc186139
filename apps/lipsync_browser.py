"""`forcekit eval lipsync-browser`: the lip-sync stream measured where a user sees it, in a real browser.

A headless Chromium's fake camera plays a held-out clip's face (a Y4M file) and its fake microphone a
voice that clip never spoke: the next held-out clips' voices back to back (a WAV at the recordings' rate,
which the browser resamples, usually to 48 kHz). The page (apps/static/lipsync.html) sends both to
`forcekit serve --lipsync` over WebRTC and keeps the pictures that come back (``?capture=N``). The
measure then needs to know, for every received picture, which moment of the voice it was made for:

- the server paints each frame's audio-frame index under it (apps/timecode.py), read back from the
  received picture, so frames dropped or repeated on the way do not shift the count;
- the server keeps the first seconds of the audio it received; their circular cross-correlation with
  the (looping) voice file gives where in the file its audio frame 0 fell (the browser starts sending
  somewhere into the loop, after the connection is up).

With both, each received frame gets the true mouth, the features and the samples of the voice at its
moment, and the span is written in the recording format, so `forcekit eval lipsync` measures the
returned stream exactly as it measures offline clips (mouth correlation and offset, LSE-C against
shuffled audio). A frame index missing from what came back (dropped by the server or on the way) is
filled with the picture shown before it, as a viewer sees it, and counted. Not measured here: when the
browser plays the returned voice against the returned picture (its jitter buffers); the server's
audio-to-mouth latency is reported beside.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apps import timecode

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]


@dataclass
class BrowserSyncConfig:
    voices: int = 4                 # held-out clips after the camera's whose voices drive it, back to back
    seconds: float | None = None    # pictures to capture, in seconds of stream; None: the voices' length + 1 s
    scale: int = 3                  # the page shrinks each picture by this much before handing it over
    display: int = 288              # the server's returned picture size (LipsyncServeConfig.display)
    chromium: str = CHROMIUM
    timeout_s: float = 180.0


def write_y4m(path: str | Path, frames: np.ndarray, fps: int = 25) -> Path:
    """uint8 RGB frames [n, H, W, 3] as a Y4M file with the 'C420' header Chromium's fake camera wants."""
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"Y4M 4:2:0 needs even frame sizes, got {h}x{w}")
    rgb = frames.astype(np.float32)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    u = (rgb[..., 2] - y) * 0.564 + 128
    v = (rgb[..., 0] - y) * 0.713 + 128
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420\n".encode())
        for i in range(n):
            f.write(b"FRAME\n")
            f.write(np.clip(y[i], 0, 255).astype(np.uint8).tobytes())
            for plane in (u[i], v[i]):
                sub = plane.reshape(h // 2, 2, w // 2, 2).mean((1, 3))
                f.write(np.clip(sub, 0, 255).astype(np.uint8).tobytes())
    return Path(path)


def loop_phase(received: np.ndarray, voice: np.ndarray) -> tuple[int, float]:
    """Where in the looping ``voice`` [n] the ``received`` audio [m] (same rate) starts: (sample, peak), the
    shift maximising the circular cross-correlation and its normalised value (1: the same waveform)."""
    n = len(voice)
    x = np.asarray(received, np.float64)[:n]
    v = np.asarray(voice, np.float64)
    if len(x) < 2 or not np.any(x) or not np.any(v):
        raise ValueError("cannot place silent or empty audio in the voice")
    padded = np.zeros(n)
    padded[:len(x)] = x
    corr = np.fft.irfft(np.conj(np.fft.rfft(padded)) * np.fft.rfft(v), n)   # corr[s] = sum_i x[i] v[(i + s) % n]
    s = int(np.argmax(corr))
    window = v[(np.arange(len(x)) + s) % n]
    peak = float(corr[s] / (np.linalg.norm(x) * np.linalg.norm(window) + 1e-12))
    return s, peak


def received_frames(pictures: list[np.ndarray], frame_size: tuple[int, int], display: int
                    ) -> tuple[dict[int, np.ndarray], int]:
    """Received pictures (the face scaled to ``display`` plus its timecode strip, shrunk by the page) ->
    ({audio-frame index: the face at ``frame_size``}, unreadable pictures). A picture received twice keeps
    its first copy."""
    import cv2

    h, w = frame_size
    reads, faces, unreadable = [], [], 0
    for p in pictures:
        face, strip = timecode.split(p, display, display)
        index = timecode.read(strip)
        if index is None:
            unreadable += 1
            continue
        reads.append(index)
        faces.append(cv2.resize(np.ascontiguousarray(face), (w, h), interpolation=cv2.INTER_AREA))
    out: dict[int, np.ndarray] = {}
    for index, face in zip(timecode.unwrap(reads), faces):
        out.setdefault(index, face)
    return out, unreadable


def assemble(frames: dict[int, np.ndarray], phase_frames: int, voice: dict) -> tuple[dict, int]:
    """The received span as one recording-format episode's arrays: frame index t (held from the last
    received one where missing) paired with the voice's frame ``(t + phase_frames) % len``; and the count
    of indices filled."""
    first, last = min(frames), max(frames)
    n = len(voice["mouth"])
    shown, held, filled = [], None, 0
    for t in range(first, last + 1):
        if t in frames:
            held = frames[t]
        else:
            filled += 1
        shown.append(held)
    j = (np.arange(first, last + 1) + phase_frames) % n
    arrays = {k: voice[k][j] for k in ("actions", "audio", "mouth", "pose", "blink", "mouth_box")}
    return {"frames": np.stack(shown), **arrays}, filled


def _voice(clips: list[dict], audio_cfg) -> tuple[dict, np.ndarray]:
    """The voices back to back: per-frame arrays (features recomputed over the joined waveform) and the
    waveform (float32 in [-1, 1] at the recordings' rate)."""
    from runtime.audio_features import frame_features

    joined = {k: np.concatenate([c[k] for c in clips]) for k in ("audio", "mouth", "pose", "blink", "mouth_box")}
    wave = joined["audio"].reshape(-1).astype(np.float32) / 32768.0   # the recordings' int16 samples
    joined["actions"] = frame_features(wave, audio_cfg.sample_rate, audio_cfg, len(joined["mouth"])
                                       ).astype(np.float32)
    return joined, wave


def browser_resync(bundle_path: str, clips_dir: str, out: str, cfg: BrowserSyncConfig | None = None) -> dict:
    """Run the stream in Chromium (see the module docstring); write OUT/browser (the returned stream in the
    recording format), OUT/camera.y4m and OUT/voice.wav (what the fake devices played) and OUT/browser.json
    (what was measured on the way, also returned)."""
    import torch
    from playwright.sync_api import sync_playwright

    from apps.lipsync import mono, write_wav
    from apps.lipsync_serve import SERVER, LipsyncServeConfig, create_lipsync_app
    from apps.serve import ServerThread
    from runtime import open_session
    from runtime.audio_features import resample
    from runtime.session import resolve_bundle
    from training.data.shards import Episode, ShardStore
    from training.lipsync.generate import MEMBERS, check_clips_fit
    from training.lipsync.record import load_clips

    cfg = cfg or BrowserSyncConfig()
    if not Path(cfg.chromium).exists():
        raise FileNotFoundError(f"{cfg.chromium} missing: the browser measure needs Chromium (make install)")
    bundle = resolve_bundle(bundle_path)
    if "lipsync" not in bundle.extra:
        raise ValueError(f"bundle {bundle.name!r} is not a lip-sync bundle")
    session = open_session(bundle)   # the bundle's frame size and audio features (the server opens its own)
    audio_cfg, frame_size = session.audio_config, tuple(session.frame_size)
    meta, clips = load_clips(clips_dir, MEMBERS, 1 + cfg.voices)
    if len(clips) < 2:
        raise ValueError(f"{clips_dir}: needs at least 2 clips (a face and a voice), has {len(clips)}")
    check_clips_fit(meta, session, clips_dir)
    camera, voices = clips[0], clips[1:]
    voice, wave = _voice(voices, audio_cfg)
    fps, rate = audio_cfg.fps, audio_cfg.sample_rate
    voice_s = len(wave) / rate
    seconds = cfg.seconds or voice_s + 1.0
    want = int(seconds * fps)

    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    write_y4m(work / "camera.y4m", camera["frames"], int(round(fps)))
    write_wav(work / "voice.wav", wave, rate)
    server_cfg = LipsyncServeConfig(display=cfg.display, timecode=True, keep_audio_s=voice_s)
    app = create_lipsync_app(bundle, server_cfg)
    args = CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={work / 'camera.y4m'}",
                            f"--use-file-for-fake-audio-capture={work / 'voice.wav'}"]
    t0 = time.monotonic()
    with ServerThread(app) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=cfg.chromium, args=args, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"{srv.url}/?capture={want}&scale={cfg.scale}")
            page.wait_for_function(f"window.lipsyncCapture.frames.length >= {want} || window.lipsyncStats.error",
                                   timeout=cfg.timeout_s * 1000, polling=500)
            page_stats = page.evaluate("window.lipsyncStats")
            if page_stats["error"]:
                raise RuntimeError(f"the page failed: {page_stats['error']}")
            shot = page.evaluate("window.lipsyncCapture")
            peers = list(app[SERVER].peers.values())
            if not peers:
                raise RuntimeError("the server has no session for the page")
            peer = peers[0]
            kept, got_rate = list(peer.audio.kept), peer.audio.rate
            server_stats = peer.stats()
        finally:
            browser.close()
    wall = time.monotonic() - t0

    pictures = [np.frombuffer(base64.b64decode(b), np.uint8).reshape(shot["height"], shot["width"], 3)
                for b in shot["frames"]]
    frames, unreadable = received_frames(pictures, frame_size, cfg.display)
    if len(frames) < 2:
        raise RuntimeError(f"only {len(frames)} readable frame(s) came back of {len(pictures)} pictures")
    got = np.concatenate([mono(np.asarray(k)) for k in kept])
    got = resample(torch.from_numpy(got), got_rate, rate).numpy()
    phase, peak = loop_phase(got, wave)
    phase_frames = int(round(phase * fps / rate))
    arrays, filled = assemble(frames, phase_frames, voice)
    store = ShardStore(work / "browser")
    store.write_meta({**meta, "generated_by": f"{bundle_path} through Chromium (forcekit eval lipsync-browser)"})
    info = {**camera["info"], "driving_text": " | ".join(v["info"]["text"] for v in voices)}
    store.append([Episode(frames=arrays.pop("frames"), actions=arrays.pop("actions"), seed=0, arrays=arrays,
                          info=info)])
    report = {"out": str(work / "browser"), "pictures": len(pictures), "unreadable_timecodes": unreadable,
              "frames": len(frames), "span_frames": max(frames) - min(frames) + 1, "filled_frames": filled,
              "first_frame_index": min(frames), "voice_seconds": round(voice_s, 3),
              "voice_phase_samples": phase, "voice_phase_frames": phase_frames,
              "voice_phase_peak": round(peak, 4), "browser_audio_rate": got_rate,
              "server": server_stats, "page_frames": page_stats["frames"], "wall_s": round(wall, 1)}
    (work / "browser.json").write_text(json.dumps(report, indent=1))
    return report

