"""The browser measure's pieces: the frame-index timecode, placing received audio in a looping voice, and the
received frames paired with the voice (apps/timecode.py, apps/lipsync_browser.py)."""

import cv2
import numpy as np
import pytest

from apps import timecode
from apps.lipsync_browser import assemble, loop_phase, received_frames


def test_a_timecode_survives_scaling_and_a_misread_cell_is_caught():
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (288, 288, 3), dtype=np.uint8)
    for index in (0, 1, 77, timecode.PERIOD - 1, timecode.PERIOD + 5):
        sent = timecode.stamp(face, index)
        assert sent.shape == (288 + timecode.strip_height(288), 288, 3)
        assert np.array_equal(sent[:288], face)                       # the picture itself is untouched
        small = cv2.resize(sent, (96, sent.shape[0] // 3), interpolation=cv2.INTER_AREA)
        got_face, strip = timecode.split(small, 288, 288)
        assert got_face.shape[0] == 96 and timecode.read(strip) == index % timecode.PERIOD
    strip = timecode.split(timecode.stamp(face, 77), 288, 288)[1].copy()
    cell = timecode.strip_height(288)
    strip[:, :cell] = 255 - strip[:, :cell]                           # one cell flipped on the way
    assert timecode.read(strip) is None
    assert timecode.unwrap([timecode.PERIOD - 2, timecode.PERIOD - 1, 0, 1]) == [
        timecode.PERIOD - 2, timecode.PERIOD - 1, timecode.PERIOD, timecode.PERIOD + 1]
    with pytest.raises(ValueError, match="wide"):
        timecode.strip_height(8)


def test_received_audio_is_placed_in_the_looping_voice():
    rng = np.random.default_rng(1)
    voice = rng.normal(size=8000).astype(np.float32)
    for shift in (0, 123, 7990):
        got = np.roll(voice, -shift)[:5000] + 0.3 * rng.normal(size=5000)   # starts `shift` into the loop
        s, peak = loop_phase(got, voice)
        assert s == shift and 0.8 < peak <= 1.0
    assert loop_phase(np.roll(voice, -100)[:3000] * 0.01, voice)[0] == 100   # quiet: the same place
    with pytest.raises(ValueError, match="silent"):
        loop_phase(np.zeros(100), voice)


def test_received_frames_are_read_by_timecode_and_paired_with_the_voice():
    size, display = (16, 16), 156
    faces = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(6)]

    def picture(i):   # what the page hands back: the face scaled up, stamped, shrunk by 3
        big = timecode.stamp(cv2.resize(faces[i], (display, display), interpolation=cv2.INTER_NEAREST), i)
        return cv2.resize(big, (display // 3, big.shape[0] // 3), interpolation=cv2.INTER_AREA)

    broken = picture(4).copy()
    broken[-4:] = 255 - broken[-4:]                                    # the whole strip inverted
    frames, unreadable = received_frames([picture(1), picture(2), picture(2), picture(5), broken], size, display)
    assert sorted(frames) == [1, 2, 5] and unreadable == 1
    assert all(np.abs(frames[i].astype(int) - 10 * i).max() <= 1 for i in frames)
    n = 4
    voice = {k: np.arange(n)[:, None] * np.ones((1, 2)) for k in ("actions", "audio", "mouth", "pose", "blink",
                                                                   "mouth_box")}
    arrays, filled = assemble(frames, 3, voice)
    assert filled == 2 and len(arrays["frames"]) == 5                  # frames 1..5; 3 and 4 hold frame 2
    assert [int(f[0, 0, 0]) // 10 for f in arrays["frames"]] == [1, 2, 2, 2, 5]
    assert arrays["mouth"][:, 0].tolist() == [(t + 3) % n for t in range(1, 6)]
