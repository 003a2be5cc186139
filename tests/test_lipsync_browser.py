"""`serve --lipsync` in a real headless Chromium whose camera and microphone are files (a Y4M face, a WAV voice)."""

import os

import numpy as np
import pytest

from apps.lipsync import write_wav
from apps.lipsync_bench import speechlike
from apps.lipsync_browser import CHROMIUM, CHROMIUM_ARGS, BrowserSyncConfig, browser_resync, write_y4m
from apps.lipsync_serve import LipsyncServeConfig, create_lipsync_app
from apps.serve import ServerThread
from runtime.presets import random_bundle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (make test installs it via apt)"),
]
sync_api = pytest.importorskip("playwright.sync_api")


def test_browser_camera_and_microphone_from_files_get_resynced_video(tmp_path):
    rng = np.random.default_rng(0)
    write_y4m(tmp_path / "face.y4m", rng.integers(60, 200, (10, 120, 160, 3), dtype=np.uint8))
    write_wav(tmp_path / "voice.wav", speechlike(48000, 4.0), 48000)
    args = CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={tmp_path / 'face.y4m'}",
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


def test_the_returned_stream_is_measured_frame_by_frame_against_the_fake_microphone(tmp_path):
    """`eval lipsync-browser`: every returned picture is placed by its timecode, the voice by the audio the
    server heard, and the span is written for `eval lipsync` (random weights: the plumbing, not the sync)."""
    from training.data.record import RecordConfig, record
    from training.lipsync.record import load_clips

    clips = tmp_path / "clips"
    record(RecordConfig(env="lipsync:heldout", episodes=3, size=(32, 32), episodes_per_shard=3), str(clips),
           progress=False)
    bundle = tmp_path / "bundle"
    random_bundle("random-lipsync-tiny").save(bundle)
    report = browser_resync(str(bundle), str(clips), str(tmp_path / "out"), BrowserSyncConfig(voices=2))
    _, voices = load_clips(str(clips), ("mouth",))
    assert report["unreadable_timecodes"] == 0 and report["frames"] > 20
    assert report["span_frames"] == report["frames"] + report["filled_frames"]
    assert report["voice_phase_peak"] > 0.3 and report["browser_audio_rate"] in (44100, 48000)
    meta, back = load_clips(report["out"], ("frames", "actions", "audio", "mouth"))
    ep = back[0]
    assert meta["resolution"] == [32, 32] and len(ep["frames"]) == report["span_frames"]
    truth = np.concatenate([v["mouth"] for v in voices[1:3]])          # the voices the camera's face was driven by
    first = report["first_frame_index"] + report["voice_phase_frames"]
    j = (first + np.arange(len(ep["mouth"]))) % len(truth)
    assert np.allclose(ep["mouth"], truth[j])
