"""The face locator (runtime/face_locator.py), its training composites, and how the lip-sync apps act on
no face, two faces and a face leaving the frame (apps/lipsync.py, `FaceCropper`)."""

import math

import numpy as np
import pytest
import torch

from apps.lipsync import DEFAULT_FACE_LOCATOR, FaceCropper, LatestFrame, LipsyncLoop, LipsyncLoopConfig, centre_crop
from apps.lipsync_bench import speechlike
from runtime import open_session
from runtime.face_locator import FaceLocator, FaceLocatorConfig, decode_faces, find_faces, load_face_locator
from training.checkpoint import save_checkpoint
from training.lipsync.face_locator import CompositeConfig, composite, locator_loss, targets


def _output_for(boxes_per_image, cfg):
    """The locator output that decodes to exactly these faces: a confident logit at each centre cell."""
    heat, reg, mask = targets(boxes_per_image, cfg)
    logit = torch.where(heat.eq(1), torch.tensor(8.0), torch.tensor(-8.0))
    return torch.cat([logit[:, None], reg], 1)


def test_decoding_the_targets_gives_back_the_faces():
    cfg = FaceLocatorConfig()
    truth = [[(0.3, 0.4, 0.5), (0.8, 0.7, 0.25)], [], [(0.51, 0.49, 0.9)]]
    found = decode_faces(_output_for(truth, cfg), cfg)
    assert [len(f) for f in found] == [2, 0, 1]
    for faces, boxes in zip(found, truth):
        for box in boxes:
            best = min(faces, key=lambda f: math.hypot(f.cx - box[0], f.cy - box[1]))
            assert best.cx == pytest.approx(box[0], abs=1e-5) and best.cy == pytest.approx(box[1], abs=1e-5)
            assert best.side == pytest.approx(box[2], rel=1e-5) and best.score > 0.99


def test_decoding_keeps_only_peaks_above_the_threshold():
    cfg = FaceLocatorConfig(threshold=0.5)
    out = torch.full((1, 4, cfg.grid, cfg.grid), -8.0)
    out[0, 1:] = 0.0                                 # centred in its cell, side 1
    out[0, 0, 5, 5], out[0, 0, 5, 6] = 3.0, 2.0    # a peak and its weaker neighbour: one face
    out[0, 0, 10, 2] = -0.5                          # a peak below the threshold: none
    faces = decode_faces(out, cfg)[0]
    assert len(faces) == 1 and faces[0].cx == pytest.approx(5.5 / cfg.grid) and faces[0].side == 1.0


def test_the_loss_is_lower_for_the_right_answer():
    cfg = FaceLocatorConfig()
    truth = [[(0.3, 0.4, 0.5)], [(0.6, 0.5, 0.3), (0.2, 0.2, 0.3)]]
    heat, reg, mask = targets(truth, cfg)
    right = locator_loss(_output_for(truth, cfg), heat, reg, mask)
    wrong = locator_loss(_output_for([[(0.7, 0.7, 0.2)], []], cfg), heat, reg, mask)
    assert float(right) < 0.1 < float(wrong)


def test_composites_hold_the_faces_where_their_boxes_say():
    face = np.zeros((40, 40, 3), np.uint8)
    face[...] = (255, 0, 255)
    rng = np.random.default_rng(0)
    cfg = CompositeConfig(size=64)
    counts = []
    for _ in range(120):
        img, boxes = composite(face[None], rng, cfg)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and len(boxes) <= 2
        counts.append(len(boxes))
        for cx, cy, side in boxes:
            assert 0 <= cx < 1 and 0 <= cy < 1 and 0.2 <= side <= 0.95
            px = img[int(cy * 64), int(cx * 64)].astype(int)
            assert np.abs(px - (255, 0, 255)).max() < 60          # the face's colour at its centre, less noise
    assert set(counts) == {0, 1, 2}


class _Scripted(torch.nn.Module):
    """A locator that 'finds' the faces of a script, one entry per call (the last repeats)."""

    def __init__(self, script):
        super().__init__()
        self.cfg, self.script, self.calls = FaceLocatorConfig(), script, 0

    def forward(self, x):
        boxes = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return _output_for([boxes] * x.shape[0], self.cfg)


def test_the_cropper_cuts_the_face_out_of_a_wide_frame():
    frame = np.full((48, 96, 3), 20, np.uint8)
    frame[12:36, 60:84] = 200                                   # a 24 px "face" centred at (72, 24)
    # the locator sees the frame padded to 96 x 96: the face's centre is at (72, 48) there, side 24
    cropper = FaceCropper(_Scripted([[(72 / 96, 48 / 96, 24 / 96)]]), (32, 32))
    crop, resync, status = cropper(frame)
    assert status == "ok" and resync and crop.shape == (32, 32, 3) and crop[2:-2, 2:-2].min() == 200


def test_the_cropper_names_no_face_two_faces_and_a_face_leaving():
    frame = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    none = FaceCropper(_Scripted([[]]), (32, 32))
    crop, resync, status = none(frame)
    assert status == "no face" and not resync and np.array_equal(crop, centre_crop(frame, (32, 32)))
    two = FaceCropper(_Scripted([[(0.25, 0.5, 0.2), (0.7, 0.5, 0.4)]]), (32, 32))
    crop, resync, status = two(frame)
    assert status == "2 faces: re-syncing the largest" and resync
    assert np.array_equal(crop, FaceCropper(_Scripted([[(0.7, 0.5, 0.4)]]), (32, 32))(frame)[0])
    leaving = FaceCropper(_Scripted([[(0.02, 0.5, 0.5)]]), (32, 32))
    crop, resync, status = leaving(frame)
    assert status == "face leaving the frame" and not resync and crop.shape == (32, 32, 3)


def test_the_loop_passes_frames_through_without_a_face_and_restarts_when_it_returns():
    session = open_session("random-lipsync-tiny")
    resets = []
    reset = session.reset
    session.reset = lambda *a, **k: (resets.append(a), reset(*a, **k))
    face = [(0.5, 0.5, 0.6)]
    locator = _Scripted([face] * 3 + [[]] * 3 + [face])
    frames = LatestFrame()
    frames.put(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    from apps.lipsync import AudioClipSource

    loop = LipsyncLoop(session, AudioClipSource(speechlike(22050, 0.4), 22050, 0.01), frames, LipsyncLoopConfig(),
                       face_locator=locator)
    stats = loop.run()
    assert stats["frames"] + stats["dropped_frames"] == 10 and stats["video"] == "ok"
    assert stats["passed_through_frames"] == 3 and len(resets) == 2   # the start, and the face's return


def test_loading_a_locator_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no face locator"):
        load_face_locator(tmp_path)
    (tmp_path / "locator.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable face locator"):
        load_face_locator(tmp_path)
    save_checkpoint(tmp_path / "locator.pt", {"kind": "codec", "cfg": {}, "model": {}})
    with pytest.raises(ValueError, match="not a face locator"):
        load_face_locator(tmp_path)
    cfg = FaceLocatorConfig(size=32, channels=(8, 8), stride=4)
    model = FaceLocator(cfg)
    from dataclasses import asdict

    save_checkpoint(tmp_path / "locator.pt", {"kind": "face-locator", "cfg": asdict(cfg), "model": model.state_dict()})
    loaded = load_face_locator(tmp_path)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.skipif(not (DEFAULT_FACE_LOCATOR / "locator.pt").exists(), reason="models/face_locator not shipped")
def test_the_shipped_locator_counts_unseen_faces():
    """Faces the recorder never rendered (identity seeds far from its splits), composited as in training."""
    from training.lipsync.renderer import FaceIdentity, RenderConfig, render_clip

    faces = np.concatenate([render_clip(FaceIdentity.sample(900_000 + i), np.full((2, 3), 0.4), 25.0, i,
                                        RenderConfig(size=(96, 96))).frames for i in range(12)])
    model = load_face_locator(DEFAULT_FACE_LOCATOR)
    rng = np.random.default_rng(7)
    right = []
    for _ in range(60):
        img, boxes = composite(faces, rng, CompositeConfig(size=model.cfg.size, leaving=0.0))
        right.append(len(find_faces(model, img)) == len(boxes))
    assert np.mean(right) >= 0.85


def test_train_face_locator_resumes_and_reports(tmp_path, capsys):
    from forcekit.cli import main
    from training.data.record import RecordConfig, record
    from training.lipsync.speech import speech_available

    if speech_available() is not None:
        pytest.skip("espeak-ng unavailable")
    data = tmp_path / "data"
    record(RecordConfig(env="lipsync:train", episodes=1, size=(48, 48), episodes_per_shard=1), str(data),
           progress=False)
    args = ["train", "face-locator", "--data", str(data), "--heldout", str(data), "--out", str(tmp_path / "fl"),
            "--batch", "4"]
    assert main(args + ["--steps", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--steps", "3"]) == 0
    import json

    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 3 and res["steps_this_run"] == 1
    held = res["heldout"]
    assert set(held["count_accuracy_by_faces"]) == {"0", "1", "2"} and 0 <= held["count_accuracy"] <= 1
    assert isinstance(load_face_locator(tmp_path / "fl"), FaceLocator)
