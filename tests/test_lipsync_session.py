"""A lip-sync bundle opens a session that takes audio features and face frames: `step(audio=, video=)`."""

import numpy as np
import pytest

from runtime import Bundle, open_session
from runtime.audio_features import StreamingAudioFeatures
from runtime.lipsync import LipsyncSession, LipsyncSpec, box_alpha, mask_frames
from runtime.presets import random_bundle


@pytest.fixture(scope="module")
def bundle():
    return random_bundle("random-lipsync-tiny")


def face(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)


def test_step_resyncs_only_the_masked_box_and_follows_the_audio(bundle):
    s = open_session(bundle)
    assert isinstance(s, LipsyncSession)
    frame, dim = face(), bundle.config.audio_dim
    y0, x0, y1, x1 = s.spec.mask_box
    outside = np.ones((32, 32), bool)
    outside[y0:y1, x0:x1] = False
    quiet = s.step(audio=np.zeros(dim, np.float32), video=frame)
    assert quiet.shape == (1, 32, 32, 3) and quiet.dtype == np.uint8
    assert np.array_equal(quiet[0][outside], frame[outside])   # composite: the rest of the face is the input
    s.reset(0)
    loud = s.step(audio=np.ones((1, dim), np.float32), video=frame)
    assert not np.array_equal(quiet, loud)                      # the audio reaches the mouth box


def test_guidance_pushes_along_the_audio_and_changes_nothing_in_silence(bundle):
    """CFG of a lip-sync session guides on its audio (the condition its training dropped), not only on keys."""
    frame, dim = face(), bundle.config.audio_dim
    voice = np.random.default_rng(1).normal(size=(3, dim)).astype(np.float32)

    def frames(guidance, audio):
        s = open_session(bundle, guidance=guidance, seed=0)
        return np.concatenate([s.step(audio=a, video=frame) for a in audio]).astype(np.float64)

    silent = np.zeros_like(voice)
    assert np.abs(frames(4.0, silent) - frames(1.0, silent)).max() <= 1   # cond == uncond: nothing to push
    plain, guided = frames(1.0, voice), frames(4.0, voice)
    assert np.abs(guided - plain).mean() > 0.5


def test_the_reference_is_the_first_frame_unless_given(bundle):
    s = open_session(bundle)
    a = np.zeros(bundle.config.audio_dim, np.float32)
    s.step(audio=a, video=face(0))
    first = s.step(audio=a, video=face(1))
    s.reset(0)
    s.step(audio=a, video=face(0))
    assert np.array_equal(s.step(audio=a, video=face(1)), first)   # deterministic per seed
    s.reset(0, reference=face(2))
    s.step(audio=a, video=face(0))
    assert not np.array_equal(s.step(audio=a, video=face(1)), first)


def test_bad_audio_or_video_gets_a_clear_error(bundle):
    s = open_session(bundle)
    dim = bundle.config.audio_dim
    good_a, good_v = np.zeros(dim, np.float32), face()
    with pytest.raises(ValueError, match="pass audio"):
        s.step(video=good_v)
    with pytest.raises(ValueError, match="pass video"):
        s.step(audio=good_a)
    with pytest.raises(ValueError, match=rf"audio must be features \[1, {dim}\]"):
        s.step(audio=np.zeros(16), video=good_v)
    with pytest.raises(ValueError, match="NaN or inf"):
        s.step(audio=np.full(dim, np.nan), video=good_v)
    with pytest.raises(ValueError, match=r"video must be uint8 \[1, 32, 32, 3\].*got uint8 \[64, 64, 3\]"):
        s.step(audio=good_a, video=np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="got float64"):
        s.step(audio=good_a, video=np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="takes no actions"):
        s.step(["forward"], audio=good_a, video=good_v)
    assert s.step(audio=good_a, video=good_v).shape == (1, 32, 32, 3)   # still usable after the errors


def test_streamed_features_drive_a_session_and_the_bundle_round_trips(tmp_path, bundle):
    path = bundle.save(tmp_path / "b")
    s = open_session(str(path))
    feats = StreamingAudioFeatures(s.audio_config, 48000)
    t = np.arange(48000 // 2) / 48000
    out = []
    for block in np.split(np.sin(2 * np.pi * 200 * t).astype(np.float32), 25):
        for f in feats.push(block):
            out.append(s.step(audio=f, video=face()))
    assert len(out) == feats.frames > 5
    assert s.stats()["frames"] == len(out)


def test_spec_checks_and_helpers():
    with pytest.raises(ValueError, match="y0 < y1"):
        LipsyncSpec(mask_box=(10, 0, 5, 4))
    with pytest.raises(ValueError, match="reference must be one of"):
        LipsyncSpec(mask_box=(0, 0, 4, 4), reference="last")
    spec = LipsyncSpec(mask_box=(2, 3, 6, 9))
    assert LipsyncSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="does not fit"):
        spec.check_frame(5, 16)
    masked = mask_frames(np.zeros((1, 8, 12, 3), np.uint8), spec.mask_box, 200)
    assert masked.sum() == 200 * 4 * 6 * 3
    alpha = box_alpha(8, 12, spec.mask_box, 1)
    assert alpha[4, 5, 0] == 1 and alpha[2, 3, 0] == 0.5 and alpha[1, 5, 0] == 0


def test_a_plain_bundle_is_not_a_lipsync_session():
    with pytest.raises(ValueError, match="not a lip-sync bundle"):
        LipsyncSession(Bundle.random())


def test_a_cropped_spec_draws_only_its_crop_and_pastes_only_the_mask_box():
    from runtime.codec import PixelCodec
    from runtime.lipsync import crop_around, random_lipsync_bundle

    box = (18, 9, 27, 23)
    crop = crop_around(box, (32, 32), 2, 8)
    y0, x0, y1, x1 = crop
    assert (y1 - y0) % 8 == 0 and (x1 - x0) % 8 == 0 and y0 <= 16 and y1 >= 29 and x0 <= 7 and x1 >= 25
    assert crop_around((0, 0, 30, 31), (32, 32), 4, 8) == (0, 0, 32, 32)      # kept inside the frame
    spec = LipsyncSpec(mask_box=box, crop_box=crop, face_size=(32, 32))
    assert LipsyncSpec.from_dict(spec.to_dict()) == spec
    assert spec.model_size(32, 32) == (y1 - y0, x1 - x0)
    with pytest.raises(ValueError, match="crops 32x32"):
        spec.model_size(40, 40)
    with pytest.raises(ValueError, match="inside crop_box"):
        LipsyncSpec(mask_box=box, crop_box=(20, 0, 32, 32), face_size=(32, 32))
    with pytest.raises(ValueError, match="go together"):
        LipsyncSpec(mask_box=box, crop_box=crop)
    seen, masked = spec.model_inputs(np.full((1, 32, 32, 3), 7, np.uint8))
    my0, mx0, my1, mx1 = spec.model_mask_box
    assert seen.shape[1:3] == spec.model_size(32, 32) and (masked[0, my0:my1, mx0:mx1] == spec.fill).all()
    boxed = 3 * (my1 - my0) * (mx1 - mx0)
    assert masked.sum() == 7 * (seen[0].size - boxed) + spec.fill * boxed

    b = random_lipsync_bundle(PixelCodec(4), (32, 32), spec, patch_size=(1, 2, 2), num_attention_heads=2,
                              attention_head_dim=16, num_layers=2, ffn_dim=64, freq_dim=32, window_frames=4)
    assert b.frame_size == spec.model_size(32, 32)
    s = open_session(b)
    assert s.frame_size == (32, 32)                      # the session takes whole faces
    frame, dim = face(), b.config.audio_dim
    outside = np.ones((32, 32), bool)
    outside[box[0]:box[2], box[1]:box[3]] = False
    out = s.step(audio=np.ones(dim, np.float32), video=frame)
    assert out.shape == (1, 32, 32, 3) and np.array_equal(out[0][outside], frame[outside])
    assert not np.array_equal(out[0], frame)
    with pytest.raises(ValueError, match="video must be uint8"):
        s.step(audio=np.ones(dim, np.float32), video=seen[0])
