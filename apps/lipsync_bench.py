"""`forcekit bench lipsync`: what the local loop achieves with a given bundle, without devices.

Two figures, both with encoding, decoding and compositing included:
- ``fps``: frames re-synced back to back (throughput at the bundle's frame size);
- ``audio_to_mouth_ms``: p50 / p95 over a real-time run of `apps.lipsync.LipsyncLoop` fed by a
  simulated microphone (a speech-like signal released block by block against the wall clock)
  and a fixed camera frame: from the moment the audio at a frame's time arrives to the moment
  that frame is ready. It includes the feature window's lookahead, the block size and generation.

With a face locator (the apps' default when models/face_locator is shipped) the real-time run's camera
frame is a 480x640 picture holding one rendered face, so finding and cutting the face is timed too.
"""

from __future__ import annotations

import time

import numpy as np

from apps.lipsync import AudioClipSource, LatestFrame, LipsyncLoop, LipsyncLoopConfig


def speechlike(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-rate bursts of a voiced tone with noise, and pauses (the features move as speech does)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (np.sin(2 * np.pi * 0.3 * t) > -0.5)
    voice = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t) + 0.2 * rng.standard_normal(len(t))
    return (0.3 * env * voice).astype(np.float32)


def still_frame(height: int, width: int) -> np.ndarray:
    """A smooth, face-coloured frame (any content measures speed; the weights may be random)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    return np.stack([200 - 60 * y, 150 - 40 * x, 120 + 30 * y * x], -1).astype(np.uint8)


def camera_frame_with_a_face(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A camera-sized frame holding one rendered face (side: half the height) off centre."""
    import cv2

    from training.lipsync.renderer import FaceIdentity, RenderConfig, render_clip

    side = height // 2
    face = render_clip(FaceIdentity.sample(seed), np.full((1, 3), 0.3), 25.0, seed, RenderConfig(size=(side, side)))
    frame = np.full((height, width, 3), 90, np.uint8)
    y0, x0 = height // 4, width // 2 - side // 3
    frame[y0:y0 + side, x0:x0 + side] = cv2.resize(face.frames[0], (side, side))
    return frame


def run_lipsync_bench(bundle, seconds: float = 6.0, frames: int = 100, loop: LipsyncLoopConfig | None = None,
                      device: str = "cpu", rate: int = 48000, face_locator=None) -> dict:
    from runtime import open_session

    session = open_session(bundle, device=device)
    face = still_frame(*session.frame_size)
    feats = np.zeros((frames, session.config.audio_dim), np.float32)
    session.reset(0)
    for t in range(frames):
        session.step(audio=feats[t], video=face)
    steady = session.stats()
    latest = LatestFrame()
    latest.put(face if face_locator is None else camera_frame_with_a_face())
    cfg = loop or LipsyncLoopConfig()
    cfg.seconds = seconds
    run = LipsyncLoop(session, AudioClipSource(speechlike(rate, seconds + 1.0), rate, cfg.block_s), latest, cfg,
                      face_locator=face_locator)
    start = time.perf_counter()
    live = run.run()
    return {"frame_size": list(session.frame_size), "fps": steady["fps"], "chunk_ms_p50": steady["chunk_ms_p50"],
            "chunk_ms_p95": steady["chunk_ms_p95"], "realtime_seconds": round(time.perf_counter() - start, 2),
            "realtime_fps": live["fps"], "realtime_frames": live["frames"], "dropped_frames": live["dropped_frames"],
            "audio_to_mouth_ms_p50": live["audio_to_mouth_ms_p50"],
            "audio_to_mouth_ms_p95": live["audio_to_mouth_ms_p95"],
            "feature_lookahead_ms": live["feature_lookahead_ms"], "block_ms": cfg.block_s * 1e3,
            "mic_rate": rate, "steps": steady["steps"], "face_locator": face_locator is not None,
            "video": live["video"], "passed_through_frames": live["passed_through_frames"]}
