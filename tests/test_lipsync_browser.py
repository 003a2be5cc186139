"""`serve --lipsync` in a real headless Chromium whose camera and microphone are files (a Y4M face, a WAV voice)."""

import os

import numpy as np
import pytest

from apps.lipsync import write_wav
from apps.lipsync_bench import speechlike
from apps.lipsync_serve import LipsyncServeConfig, create_lipsync_app
from apps.serve import ServerThread
from runtime.presets import random_bundle

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic", "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (make test installs it via apt)"),
]
sync_api = pytest.importorskip("playwright.sync_api")


def write_y4m(path, frames: np.ndarray, fps: int = 25) -> None:
    """uint8 RGB frames [n, H, W, 3] as a Y4M file with the 'C420' header Chromium's fake camera wants."""
    n, h, w, _ = frames.shape
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


def test_browser_camera_and_microphone_from_files_get_resynced_video(tmp_path):
    rng = np.random.default_rng(0)
    write_y4m(tmp_path / "face.y4m", rng.integers(60, 200, (10, 120, 160, 3), dtype=np.uint8))
    write_wav(tmp_path / "voice.wav", speechlike(48000, 4.0), 48000)
    args = ARGS + [f"--use-file-for-fake-video-capture={tmp_path / 'face.y4m'}",
                   f"--use-file-for-fake-audio-capture={tmp_path / 'voice.wav'}"]
    app = create_lipsync_app(random_bundle("random-lipsync-tiny"), LipsyncServeConfig(display=96))
    with ServerThread(app) as srv, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_function("window.lipsyncStats.frames > 15 && window.lipsyncStats.server && "
                                   "window.lipsyncStats.server.fps && window.lipsyncStats.audioPackets > 20",
                                   timeout=30000)
            stats = page.evaluate("window.lipsyncStats")
            text = page.inner_text("#stats")
        finally:
            browser.close()
    s = stats["server"]
    assert stats["error"] is None and s["video"] == "ok" and s["error"] is None
    assert s["audio_rate"] in (44100, 48000) and s["audio_to_mouth_ms_p50"] > 0
    assert "fps" in text and "audio->mouth" in text
    assert stats["audioTracks"] == 1 and stats["audioPackets"] > 20   # the voice comes back, as RTP audio
