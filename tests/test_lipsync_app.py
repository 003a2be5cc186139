"""`forcekit lipsync` and `forcekit bench lipsync` headless, on files, with a tiny random lip-sync bundle."""

import json

import numpy as np

from apps.lipsync import (
    AudioClipSource,
    DelayedAudio,
    LatestFrame,
    LipsyncLoop,
    LipsyncLoopConfig,
    centre_crop,
    read_wav,
    write_wav,
)
from apps.lipsync_bench import speechlike
from runtime import open_session


def test_delayed_audio_plays_the_input_later_by_the_delay():
    d = DelayedAudio(1000, 0.05)
    x = np.arange(1, 201, dtype=np.float32)
    for block in np.split(x, 4):
        d.write(block)
    out = np.concatenate([d.read(30) for _ in range(9)])
    assert not out[:50].any() and np.array_equal(out[50:250], x) and not out[250:].any()


def test_centre_crop_takes_the_middle_square():
    frame = np.zeros((60, 100, 3), np.uint8)
    frame[:, 20:80] = 255
    crop = centre_crop(frame, (30, 30))
    assert crop.shape == (30, 30, 3) and crop.min() == 255


def test_loop_without_video_or_with_broken_audio_keeps_going():
    session = open_session("random-lipsync-tiny")
    audio = speechlike(22050, 0.4)
    audio[3000:3100] = np.nan                                   # a broken capture block
    loop = LipsyncLoop(session, AudioClipSource(audio, 22050, 0.01), LatestFrame(), LipsyncLoopConfig())
    stats = loop.run()
    assert stats["video"] == "no video" and stats["bad_audio_blocks"] >= 1
    assert stats["frames"] + stats["dropped_frames"] == 10        # every frame of the 0.4 s, none lost silently


class _BurstSource:
    """All the audio in one block at the first poll, as a browser or a busy machine may deliver it."""

    def __init__(self, samples, rate):
        self.samples, self.rate, self.done = samples, rate, False

    def start(self):
        from apps.pipeline import now

        return now() + 5.0   # a loop clock that starts later than the audio arrives

    def poll(self):
        if self.done:
            return []
        self.done = True
        return [self.samples]

    def close(self):
        pass


def test_latency_counts_from_when_the_audio_arrived_not_from_a_clock():
    """Audio that arrived in a burst (here even before the loop's clock) is late by the time it waited
    for its frame: positive, never the negative a clock-based latency gives."""
    loop = LipsyncLoop(open_session("random-lipsync-tiny"), _BurstSource(speechlike(22050, 0.4), 22050),
                       LatestFrame(), LipsyncLoopConfig())
    stats = loop.run()
    assert stats["frames"] > 0 and 0 < stats["audio_to_mouth_ms_p50"] <= stats["audio_to_mouth_ms_p95"]


def test_lipsync_command_on_files_headless(tmp_path, monkeypatch, capsys):
    from forcekit.cli import main
    from runtime.video import write_video

    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    rng = np.random.default_rng(0)
    write_video(tmp_path / "face.mp4", rng.integers(0, 255, (12, 48, 64, 3), dtype=np.uint8), 25.0)
    voice = speechlike(44100, 1.0) * 4                          # loud: clips
    write_wav(tmp_path / "voice.wav", voice, 44100)
    assert read_wav(tmp_path / "voice.wav")[1] == 44100
    assert main(["lipsync", "--bundle", "random-lipsync-tiny", "--video", str(tmp_path / "face.mp4"),
                 "--audio", str(tmp_path / "voice.wav"), "--no-playback", "--window", "64",
                 "--out", str(tmp_path / "out.mp4"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["frames"] + stats["dropped_frames"] == 25 and stats["video"] == "ok"
    # from the arrival of the 10 ms block holding the frame's sample: at least the lookahead, less a block
    assert stats["clipped_samples"] > 0 and stats["audio_to_mouth_ms_p50"] > stats["feature_lookahead_ms"] - 10
    assert (tmp_path / "out.mp4").stat().st_size > 0


def test_lipsync_command_refuses_a_world_model(capsys):
    from forcekit.cli import main

    assert main(["lipsync", "--bundle", "random-tiny", "--audio", "x.wav"]) != 0
    assert "not a lip-sync bundle" in capsys.readouterr().err


def test_bench_lipsync_reports_fps_and_latency(capsys):
    from forcekit.cli import main

    assert main(["bench", "lipsync", "--bundle", "random-lipsync-tiny", "--seconds", "1", "--frames", "10",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["weights"] == "random" and r["frame_size"] == [32, 32] and r["fps"] > 0
    assert r["audio_to_mouth_ms_p95"] >= r["audio_to_mouth_ms_p50"] > r["feature_lookahead_ms"] - 10 > 70
    assert r["realtime_frames"] + r["dropped_frames"] >= 20
    # The shipped face locator is the default: it finds the face in the camera-sized frame, so nothing passes through.
    assert r["face_locator"] is True and r["video"] == "ok" and r["passed_through_frames"] == 0
    assert main(["bench", "lipsync", "--seconds", "0"]) == 2                  # a usage error, one line
    assert "--seconds: must be a number > 0" in capsys.readouterr().err
