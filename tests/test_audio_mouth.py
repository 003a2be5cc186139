"""The audio -> mouth net (runtime/audio_mouth.py): trained on recorded clips, carried by a lip-sync bundle
told the mouth, read by its session."""

import json

import numpy as np
import pytest
import torch

from forcekit.cli import main
from runtime.audio_mouth import AudioMouthConfig, AudioToMouth, load_audio_mouth
from runtime.bundle import Bundle, BundleError
from runtime.codec import PixelCodec
from runtime.lipsync import LipsyncSession, LipsyncSpec, mouth_features, random_lipsync_bundle

TINY_MODEL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64,
                  freq_dim=32, window_frames=4, sink_frames=1)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from training.data.record import RecordConfig, record

    root = tmp_path_factory.mktemp("audio_mouth")
    for split, n in (("train", 6), ("heldout", 2)):
        record(RecordConfig(env=f"lipsync:{split}", episodes=n, size=(32, 32), episodes_per_shard=n),
               str(root / split), progress=False)
    return str(root / "train"), str(root / "heldout")


def told_bundle(ear: AudioToMouth | None, seed: int = 0) -> Bundle:
    spec = LipsyncSpec(mask_box=(18, 8, 28, 24), condition="mouth")
    bundle = random_lipsync_bundle(PixelCodec(4), (32, 32), spec, seed=seed, **TINY_MODEL)
    bundle.audio_mouth = ear
    return bundle


def test_train_audio_mouth_reads_the_mouth_from_the_audio_and_resumes(clips, tmp_path, capsys):
    train, heldout = clips
    out = tmp_path / "ear"
    assert main(["train", "audio-mouth", "--data", train, "--heldout", heldout, "--out", str(out),
                 "--steps", "400", "--hidden", "64,32"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["train"]["corr_mean"] > 0.8 and first["train"]["offset_frames"] == 0
    assert first["heldout"]["corr"]["open"] > 0.3     # unseen identities, voices and sentences
    ear = load_audio_mouth(out)
    assert ear.cfg.hidden == [64, 32] and ear.cfg.in_dim == 512
    assert main(["train", "audio-mouth", "--data", train, "--out", str(out), "--steps", "410",
                 "--hidden", "64,32"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_this_run"] == 10


def test_a_bundle_told_the_mouth_carries_its_ear_and_its_session_reads_the_audio_with_it(tmp_path):
    torch.manual_seed(0)
    ear = AudioToMouth(AudioMouthConfig(in_dim=512, hidden=[16])).eval()
    told_bundle(ear).save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.audio_mouth is not None
    for k, v in ear.state_dict().items():
        assert torch.equal(loaded.audio_mouth.state_dict()[k], v)

    session = LipsyncSession(loaded)
    seen = []
    model_forward = loaded.model.forward
    loaded.model.forward = lambda *a, **k: seen.append(k.get("audio")) or model_forward(*a, **k)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    feats = rng.normal(size=512).astype(np.float32)
    session.reset(0)
    session.step(audio=feats, video=frame)
    want = mouth_features(ear(torch.from_numpy(feats)[None]).detach().numpy(), 512)
    assert any(a is not None and torch.allclose(a[0, -1], torch.from_numpy(want[0]), atol=1e-5) for a in seen)


def test_a_bundle_told_the_mouth_without_an_ear_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no audio -> mouth net"):
        LipsyncSession(told_bundle(None))
    with pytest.raises(ValueError, match="reads 64 features"):
        LipsyncSession(told_bundle(AudioToMouth(AudioMouthConfig(in_dim=64, hidden=[8]))))
    told_bundle(AudioToMouth(AudioMouthConfig(hidden=[8]))).save(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    del config["audio_mouth"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="no audio_mouth section"):
        Bundle.load(tmp_path / "b")


def test_load_audio_mouth_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="train audio-mouth"):
        load_audio_mouth(tmp_path)
    (tmp_path / "audio_mouth.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        load_audio_mouth(tmp_path)


def test_teacher_takes_an_ear_only_when_told_the_mouth(clips, tmp_path, capsys):
    train, _ = clips
    assert main(["train", "lipsync-teacher", "--data", train, "--codec", "pixel:4", "--out", str(tmp_path / "t"),
                 "--steps", "1", "--audio-mouth", str(tmp_path)]) == 2
    assert "--audio-mouth goes with --mouth-condition" in capsys.readouterr().err


def test_a_teacher_told_the_mouth_and_its_student_carry_the_ear_into_a_session(clips, tmp_path, capsys):
    """train audio-mouth -> lipsync-teacher --mouth-condition --audio-mouth -> dCM: the student's bundle keeps
    the ear and re-syncs clips from their audio."""
    train, heldout = clips
    run = tmp_path / "runs"
    assert main(["train", "audio-mouth", "--data", train, "--out", str(run / "ear"), "--steps", "5",
                 "--hidden", "16"]) == 0
    model = ["--layers", "1", "--heads", "2", "--head-dim", "16", "--ffn", "32", "--freq-dim", "32", "--patch", "2"]
    assert main(["train", "lipsync-teacher", "--data", train, "--codec", "pixel:4", "--out", str(run / "teacher"),
                 "--steps", "2", "--batch", "2", "--clip-frames", "4", "--sink-frames", "1", *model,
                 "--mouth-condition", "--audio-mouth", str(run / "ear")]) == 0
    assert main(["train", "dcm", "--bundle", str(run / "teacher/bundle"), "--out", str(run / "dcm"), "--batch", "2",
                 "--clip-frames", "4", "--steps", "2", "--eval-every", "2"]) == 0
    student = Bundle.load(run / "dcm/bundle")
    assert student.extra["lipsync"]["condition"] == "mouth" and student.audio_mouth is not None
    ear = load_audio_mouth(run / "ear")
    assert torch.equal(student.audio_mouth.net[0].weight, ear.net[0].weight)
    capsys.readouterr()
    assert main(["eval", "lipsync-generate", "--bundle", str(run / "dcm/bundle"), "--clips", heldout,
                 "--out", str(run / "gen"), "--no-ab"]) == 0
    assert json.loads(capsys.readouterr().out)["clips"] == 2
