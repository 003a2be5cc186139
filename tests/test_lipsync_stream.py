"""Streaming audio features: microphone blocks at any rate in, the same features as the offline recording out."""

import numpy as np
import pytest
import torch

from runtime.audio_features import (
    AudioFeatureConfig,
    StreamingAudioFeatures,
    StreamingResampler,
    clipped_fraction,
    frame_features,
    resample,
)

CFG = AudioFeatureConfig()


def speechlike(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Silence, then a tone with noise bursts: columns of every kind (floor, loud, changing)."""
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    a = 0.4 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 3 * t) > 0) + 0.05 * rng.standard_normal(n)
    a[: int(0.12 * sr)] = 0.0
    return a.astype(np.float32)


def streamed(audio: np.ndarray, sr: int, seed: int = 1, max_block: int = 1500) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    s = StreamingAudioFeatures(CFG, sr)
    outs, counts, i = [], [], 0
    while i < len(audio):
        b = int(rng.integers(1, max_block))
        outs.append(s.push(audio[i:i + b]))
        counts.append(len(outs[-1]))
        i += b
    outs.append(s.flush())
    return np.concatenate(outs), counts


@pytest.mark.parametrize("sr", [16000, 48000, 44100, 8000])
def test_streamed_features_equal_the_offline_features(sr):
    audio = speechlike(sr, 0.9)
    offline = frame_features(audio, sr, CFG)
    online, _ = streamed(audio, sr)
    assert online.shape == offline.shape
    np.testing.assert_allclose(online, offline, atol=1e-5)
    assert np.abs(offline).max() > 0.5   # not a comparison of two silences


def test_int16_stereo_and_clipping_as_offline():
    audio = speechlike(48000, 0.5) * 3.0          # far beyond full scale: clipped by both paths
    stereo = np.stack([audio, audio * 0.5], 1)
    pcm = np.round(np.clip(stereo, -1, 1) * 32767).astype(np.int16)
    online, _ = streamed(pcm, 48000, max_block=700)
    np.testing.assert_allclose(online, frame_features(pcm, 48000, CFG), atol=1e-5)
    s = StreamingAudioFeatures(CFG, 48000)
    s.push(stereo)
    assert s.clipped_samples == round(clipped_fraction(stereo) * len(stereo)) > 0.02 * len(stereo)


def test_each_frame_comes_out_as_soon_as_its_lookahead_is_in():
    s = StreamingAudioFeatures(CFG, 16000)
    need = int(round(s.lookahead_s * 16000))           # samples past frame t's time
    spf = CFG.samples_per_frame
    assert s.lookahead_s == pytest.approx(0.0825)      # 7 columns of 10 ms after the frame + half a window
    for t in range(4):
        out = s.push(np.zeros(t * spf + need - 1 - s.samples_in, np.float32))
        assert s.frames == t                           # one sample short of frame t
        out = s.push(np.zeros(1, np.float32))
        assert s.frames == t + 1 and len(out) == 1
        assert not out.any()                           # silence is exactly 0


def test_memory_is_bounded_on_a_long_stream():
    s = StreamingAudioFeatures(CFG, 44100)
    block = speechlike(44100, 0.1)
    for _ in range(100):                              # 10 s
        s.push(block)
    assert s.frames >= 245
    assert len(s._samples) < 2000 and len(s._cols) <= CFG.window


def test_streaming_resampler_equals_resample_and_refuses_bad_input():
    x = torch.from_numpy(speechlike(44100, 0.3))
    r = StreamingResampler(44100, 16000)
    parts = [r.push(x[i:i + 999]) for i in range(0, len(x), 999)] + [r.flush()]
    np.testing.assert_allclose(torch.cat(parts).numpy(), resample(x, 44100, 16000).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="sample rates must be positive"):
        StreamingResampler(0, 16000)
    s = StreamingAudioFeatures(CFG, 16000)
    with pytest.raises(ValueError, match="NaN or inf"):
        s.push(np.array([0.0, np.nan], np.float32))
    s.flush()
    with pytest.raises(ValueError, match="flushed"):
        s.push(np.zeros(10, np.float32))
