"""Lip-sync data: the face renderer, espeak timings -> mouth track, audio features, the recorder."""

import json

import numpy as np
import pytest
import torch

from runtime.audio_features import (
    AudioFeatureConfig,
    as_mono_float,
    clipped_fraction,
    frame_count,
    frame_features,
    frame_windows,
    log_mel,
    resample,
)
from training.lipsync.renderer import FaceIdentity, FaceRenderer, RenderConfig, render_clip
from training.lipsync.speech import VISEMES, Phoneme, mouth_track, phoneme_visemes, speech_available

NO_SPEECH = speech_available()
needs_espeak = pytest.mark.skipif(NO_SPEECH is not None, reason=f"espeak-ng unavailable: {NO_SPEECH}")

POSE = np.array([0.02, -0.01, 0.05, 1.01, 0.03], np.float32)


# -- renderer --------------------------------------------------------------------------------------
def test_render_is_deterministic_and_identities_differ():
    mouth = np.tile([0.5, 0.5, 0.2], (6, 1))
    a = render_clip(FaceIdentity.sample(3), mouth, 25, motion_seed=3, cfg=RenderConfig(size=(64, 64)))
    b = render_clip(FaceIdentity.sample(3), mouth, 25, motion_seed=3, cfg=RenderConfig(size=(64, 64)))
    c = render_clip(FaceIdentity.sample(4), mouth, 25, motion_seed=3, cfg=RenderConfig(size=(64, 64)))
    assert a.frames.shape == (6, 64, 64, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.pose, b.pose)
    assert np.abs(a.frames.astype(int) - c.frames.astype(int)).mean() > 10
    assert FaceIdentity.sample(3).to_dict() == FaceIdentity.sample(3).to_dict()


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 7])
def test_mouth_parameters_change_only_the_mouth_box(seed):
    r = FaceRenderer(FaceIdentity.sample(seed), RenderConfig(size=(96, 96)))
    box = r.mouth_box(POSE)
    y0, x0, y1, x1 = box
    base = r.render(np.array([0.0, 0.5, 0.0]), POSE).astype(int)
    mask = np.ones((96, 96), bool)
    mask[y0:y1, x0:x1] = False
    assert mask.mean() > 0.85, "the mouth box should be a small part of the face crop"
    for mouth in ([1.0, 0.5, 0.0], [0.3, 1.0, 0.0], [0.4, 0.0, 1.0], [1.0, 1.0, 1.0]):
        other = r.render(np.array(mouth), POSE).astype(int)
        diff = np.abs(other - base).max(-1)
        assert diff[mask].max() == 0, f"mouth {mouth} changed pixels outside the mouth box"
        assert diff[~mask].max() > 40, f"mouth {mouth} did not visibly change the mouth"


def test_blink_closes_the_eyes_and_pose_moves_the_face():
    r = FaceRenderer(FaceIdentity.sample(1), RenderConfig(size=(64, 64)))
    closed = np.array([0.0, 0.5, 0.0])
    still = np.array([0, 0, 0, 1, 0], np.float32)
    open_eyes, shut = r.render(closed, still, 0.0), r.render(closed, still, 1.0)
    eyes = slice(18, 34)
    assert np.abs(open_eyes[eyes].astype(int) - shut[eyes]).max() > 60
    moved = r.render(closed, np.array([0.1, 0, 0, 1, 0], np.float32))
    assert np.abs(moved.astype(int) - open_eyes).mean() > 5


def test_render_rejects_bad_mouth():
    with pytest.raises(ValueError, match=r"\[T, 3\]"):
        render_clip(FaceIdentity.sample(0), np.zeros((4, 2)), 25, 0)
    with pytest.raises(ValueError, match="NaN"):
        render_clip(FaceIdentity.sample(0), np.full((4, 3), np.nan), 25, 0)


# -- visemes and the mouth track -------------------------------------------------------------------
def test_viseme_table_strips_stress_and_falls_back():
    assert phoneme_visemes("'oU") == ("oh", "ou")
    assert phoneme_visemes(",aI") == ("aa", "ih")
    assert phoneme_visemes("_:") == ("sil",)
    assert phoneme_visemes("m") == ("PP",)
    assert phoneme_visemes("aI3") == ("aa", "ih")        # longest known prefix
    assert phoneme_visemes("Q9") == ("nn",)               # unknown consonant-like


def test_mouth_track_follows_a_known_phoneme_sequence():
    # silence, "ma", pause, "oo", silence; 25 fps, times chosen on frame centres.
    seq = [Phoneme("m", 0.40, 0.48), Phoneme("a", 0.48, 0.72), Phoneme("_", 0.72, 1.20),
           Phoneme("u:", 1.20, 1.44)]
    m = mouth_track(seq, fps=25, frames=50)
    t = lambda s: int(round(s * 25))  # noqa: E731
    assert m.shape == (50, 3)
    assert np.allclose(m[: t(0.25)], VISEMES["sil"][0], atol=1e-6), "leading silence is the closed mouth"
    assert m[t(0.44), 0] < 0.05, "a bilabial closes the lips at its centre"
    assert m[t(0.60), 0] == pytest.approx(VISEMES["aa"][0][0], abs=1e-6), "the vowel's target at its centre"
    assert m[t(0.60), 0] == m[:, 0].max()
    assert np.allclose(m[t(0.76):t(1.16), 0], 0.0, atol=1e-6), "a pause holds the mouth closed"
    assert m[t(1.32), 2] == pytest.approx(1.0, abs=1e-6), "'oo' is fully rounded at its centre"
    assert np.allclose(m[t(1.60):], VISEMES["sil"][0], atol=1e-6), "trailing silence closes the mouth"
    # Coarticulation: the mouth opens before the vowel starts and moves smoothly (no frame jumps > 0.5).
    assert m[t(0.52), 0] > 0.2
    assert np.abs(np.diff(m, axis=0)).max() < 0.5


def test_low_dominance_consonant_borrows_from_its_neighbours():
    k_between_a = mouth_track([Phoneme("a", 0.2, 0.4), Phoneme("k", 0.4, 0.48), Phoneme("a", 0.48, 0.68)], 50, 50)
    k_between_u = mouth_track([Phoneme("u:", 0.2, 0.4), Phoneme("k", 0.4, 0.48), Phoneme("u:", 0.48, 0.68)], 50, 50)
    at_k = int(0.44 * 50)
    assert k_between_a[at_k, 0] > k_between_u[at_k, 0] + 0.2
    assert k_between_u[at_k, 2] > 0.5


@needs_espeak
def test_espeak_gives_audio_and_ordered_phoneme_timings():
    from training.lipsync.speech import Espeak

    e = Espeak.get()
    slow = e.synthesize("hello world", "en+m3", rate=120)
    fast = e.synthesize("hello world", "en+m3", rate=300)
    assert slow.sample_rate == 22050 and slow.audio.dtype == np.float32
    assert 0.05 < np.abs(slow.audio).max() <= 1.0
    names = [p.name.lstrip("'") for p in slow.phonemes]
    assert names[:4] == ["h", "@", "l", "oU"]
    starts = [p.start for p in slow.phonemes]
    assert starts == sorted(starts) and all(p.end >= p.start for p in slow.phonemes)
    assert fast.duration < 0.75 * slow.duration
    with pytest.raises(ValueError, match="no voice"):
        e.synthesize("hi", "xx-nonexistent")


# -- audio features --------------------------------------------------------------------------------
def test_resample_keeps_a_tone_and_removes_what_cannot_be_represented():
    sr = 22050
    t = np.arange(sr // 2) / sr
    y = resample(torch.from_numpy((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)), sr, 16000)
    assert len(y) == 8000
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    assert np.abs(y.numpy()[100:-100] - ref[100:-100]).max() < 1e-3
    alias = resample(torch.from_numpy((0.5 * np.sin(2 * np.pi * 10000 * t)).astype(np.float32)), sr, 16000)
    assert alias[100:-100].abs().max() < 0.01


def test_features_align_with_video_frames():
    cfg = AudioFeatureConfig()
    audio = np.zeros(16000, np.float32)                     # 1 s = 25 frames
    burst = slice(8000, 8640)                                # 0.50 .. 0.54 s, i.e. frame 12.5 .. 13.5
    audio[burst] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(640) / 16000)
    f = frame_windows(log_mel(audio, 16000, cfg), 25, cfg)
    assert f.shape == (25, cfg.window, cfg.n_mels)
    loud = [int(i) for i in np.nonzero(f.amax((1, 2)).numpy() > 0.5)[0]]
    # Frame t's window spans columns 4t-8 .. 4t+8 (times t/25 -0.08 .. +0.08 s).
    assert loud == [11, 12, 13, 14, 15]
    col = f[12].amax(1).numpy()
    assert col[:9].max() < 0.05 and col[11:14].min() > 0.8     # the burst starts 2 columns after t = 12's time
    # The same audio at 44.1 kHz gives the same features within resampling error.
    t44 = np.arange(44100) / 44100
    a44 = np.where((t44 >= 0.5) & (t44 < 0.54), 0.5 * np.sin(2 * np.pi * 1000 * t44), 0).astype(np.float32)
    f44 = frame_windows(log_mel(a44, 44100, cfg), 25, cfg)
    # (Compared where the burst is loud: near the floor the log amplifies tiny resampling errors.)
    assert (f44 - f).abs().mean() < 0.005 and (f44 - f)[f > 0.5].abs().max() < 0.05
    assert frame_count(16000, 16000, 25) == 25 and frame_count(16001, 16000, 25) == 26


def test_silence_clipping_and_bad_audio_have_defined_behaviour():
    cfg = AudioFeatureConfig()
    silent = frame_features(np.zeros(8000, np.int16), 16000, cfg)
    assert silent.shape == (13, cfg.dim) and np.all(silent == 0)
    loud = np.full(1600, 3.0, np.float32)                     # beyond full scale: hard-clipped
    assert clipped_fraction(loud) == 1.0
    assert torch.equal(as_mono_float(loud), torch.ones(1600))
    assert np.isfinite(frame_features(loud, 16000, cfg)).all()
    stereo = np.stack([np.full(160, 0.5), np.full(160, -0.5)], 1).astype(np.float32)
    assert torch.equal(as_mono_float(stereo), torch.zeros(160))
    with pytest.raises(ValueError, match="NaN"):
        as_mono_float(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="whole number"):
        AudioFeatureConfig(fps=30)


# -- the recorder ----------------------------------------------------------------------------------
@needs_espeak
def test_recorder_writes_checkable_resumable_shards(tmp_path):
    from training.data.record import RecordConfig, record
    from training.data.shards import check_dir
    from training.lipsync.record import HELDOUT_IDENTITY_BASE, load_clips

    out = tmp_path / "train"
    cfg = RecordConfig(env="lipsync:train", episodes=1, size=(48, 48), episodes_per_shard=1)
    record(cfg, str(out), progress=False)
    cfg.episodes = 2
    res = record(cfg, str(out), progress=False)                # resumes: adds clip 1 only
    assert res["episodes"] == 2 and res["clips_this_run"] == 1 and res["seconds_per_clip"] < 10
    summary, bad = check_dir(out)
    assert bad == [] and summary["episodes"] == 2 and summary["engine"] == "lipsync"
    meta, clips = load_clips(str(out), ("frames", "audio", "mouth", "mouth_box"))
    acfg = AudioFeatureConfig(**meta["audio_features"])
    for c in clips:
        n = len(c["frames"])
        assert c["frames"].shape == (n, 48, 48, 3) and c["audio"].shape == (n, acfg.samples_per_frame)
        assert c["mouth"][0, 0] == pytest.approx(VISEMES["sil"][0][0]), "clips start in silence, mouth closed"
        assert c["mouth"][:, 0].max() > 0.6, "speech opens the mouth"
        assert c["info"]["voice"] in meta["voices"] and c["info"]["split"] == "train"
        assert c["info"]["identity"]["seed"] < HELDOUT_IDENTITY_BASE
    # A corrupted per-frame array is caught by `data check`.
    shard = sorted(out.glob("shard_*.npz"))[0]
    with np.load(shard) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mouth"] = arrays["mouth"][:, :2]
    np.savez(shard, **arrays)
    _, bad = check_dir(out)
    assert len(bad) == 1 and "mouth" in bad[0]
    assert json.loads((out / "meta.json").read_text())["alignment"].startswith("actions[t] is the audio")


@needs_espeak
def test_heldout_split_never_shares_voices_sentences_or_identities():
    from training.lipsync.record import HELDOUT_VOICES, TRAIN_VOICES, LipsyncConfig, draw_sentence, sentence_split

    assert not set(TRAIN_VOICES) & set(HELDOUT_VOICES)
    rng = np.random.default_rng(0)
    train = {draw_sentence(rng, "train") for _ in range(300)}
    held = {draw_sentence(rng, "heldout") for _ in range(100)}
    assert train and held and not train & held
    assert all(sentence_split(s) == "heldout" for s in held)
    assert LipsyncConfig(split="heldout").identity_seed(0, 5) > LipsyncConfig(split="train").identity_seed(999, 0)
    with pytest.raises(ValueError, match="unknown lip-sync split"):
        LipsyncConfig(split="test")
