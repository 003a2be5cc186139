"""Lip-sync measuring sticks: metric functions on constructed inputs, probes and `eval lipsync` plumbing."""

import json

import numpy as np
import pytest
import torch

from training.lipsync.metrics import identity_scores, mouth_agreement, outside_box_mask, pearson, sync_scores
from training.lipsync.speech import speech_available

NO_SPEECH = speech_available()


def _track(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(n, 3)), 0)
    x = np.convolve(np.ones(3) / 3, x[:, 0], "same")[:, None] * [1, 0.5, 0.2] + rng.normal(0, 0.1, (n, 3))
    return ((x - x.min(0)) / np.ptp(x, 0)).astype(np.float32)


def test_mouth_agreement_finds_correlation_error_and_offset():
    truths = [_track(80, s) for s in range(3)]
    perfect = mouth_agreement(truths, truths)
    assert perfect["corr_mean"] == pytest.approx(1.0) and perfect["mae"]["open"] == 0 and perfect["offset_frames"] == 0
    late = [np.concatenate([np.repeat(t[:1], 2, 0), t[:-2]]) for t in truths]    # video two frames late
    res = mouth_agreement(late, truths)
    assert res["offset_frames"] == 2 and res["corr_by_lag"]["2"] > 0.99 > res["corr"]["open"]
    early = [np.concatenate([t[1:], t[-1:]]) for t in truths]
    assert mouth_agreement(early, truths)["offset_frames"] == -1
    noise = [np.random.default_rng(9).uniform(size=t.shape).astype(np.float32) for t in truths]
    assert abs(mouth_agreement(noise, truths)["corr_mean"]) < 0.2
    assert np.isnan(pearson(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="same non-zero number"):
        mouth_agreement(truths, truths[:2])


def test_sync_scores_on_constructed_embeddings():
    gen = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(60, 16, generator=gen), dim=-1)
    synced = sync_scores(v, v.clone(), max_shift=5)
    assert synced["offset"] == 0 and synced["lse_d"] == pytest.approx(0.0, abs=1e-3) and synced["lse_c"] > 1.0
    early = sync_scores(v[3:], v[:-3], max_shift=5)           # video t shows audio t + 3: 3 frames early
    assert early["offset"] == -3
    assert sync_scores(v[:-2], v[2:], max_shift=5)["offset"] == 2
    unrelated = sync_scores(v, torch.nn.functional.normalize(torch.randn(60, 16, generator=gen), dim=-1), 5)
    assert unrelated["lse_c"] < 0.2 * synced["lse_c"] and unrelated["lse_d"] > synced["lse_d"] + 1.0


def test_identity_scores_ignore_the_mouth_box_only():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    boxes = np.tile([10, 8, 20, 24], (4, 1))
    gen = ref.copy()
    gen[:, 10:20, 8:24] = 0                                    # a different mouth: not an identity change
    same = identity_scores(gen, ref, boxes)
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0)
    assert same["masked_fraction"] == pytest.approx(160 / 1024, abs=1e-4)
    gen[:, :5] = 255 - gen[:, :5]                               # the forehead changed: identity lost
    worse = identity_scores(gen, ref, boxes)
    assert worse["psnr"] < 20 and worse["ssim"] < 0.95
    m = outside_box_mask(boxes[:1], (32, 32))
    assert m.shape == (1, 32, 32) and not m[0, 10:20, 8:24].any() and m[0, :10].all()
    with pytest.raises(ValueError, match="mouth boxes"):
        identity_scores(gen, ref, boxes[:2])


@pytest.mark.skipif(NO_SPEECH is not None, reason=f"espeak-ng unavailable: {NO_SPEECH}")
def test_probes_train_resume_and_eval_lipsync(tmp_path, capsys):
    from forcekit.cli import main
    from training.data.record import RecordConfig, record
    from training.lipsync.probes import load_syncnet, sync_windows, train_mouth_probe
    from training.lipsync.record import load_clips

    data = tmp_path / "data"
    record(RecordConfig(env="lipsync:train", episodes=2, size=(48, 48), episodes_per_shard=2), str(data),
           progress=False)
    first = train_mouth_probe(str(data), str(tmp_path / "mp"), steps=4, batch=8, progress=False)
    again = train_mouth_probe(str(data), str(tmp_path / "mp"), steps=6, batch=8, progress=False)
    assert first["step"] == 4 and again["step"] == 6 and again["steps_this_run"] == 2
    assert main(["train", "syncnet", "--data", str(data), "--out", str(tmp_path / "sn"), "--steps", "3",
                 "--clips-per-batch", "2", "--windows-per-clip", "3"]) == 0
    capsys.readouterr()
    model = load_syncnet(tmp_path / "sn")
    _, clips = load_clips(str(data), ("frames", "audio"))
    video, mel = sync_windows(clips[0]["frames"], clips[0]["audio"], model.cfg)
    assert video.shape[1:] == (5, 48, 48, 3) and mel.shape[1:] == (16 + 4 * 4, 32)
    assert len(video) == len(clips[0]["frames"]) - 4 == len(mel)
    out = tmp_path / "eval.json"
    assert main(["eval", "lipsync", "--clips", str(data), "--mouth-probe", str(tmp_path / "mp"), "--syncnet",
                 str(tmp_path / "sn"), "--reference", str(data), "--json", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["clips"] == 2 and res["identity"]["psnr"] == 100.0
    assert set(res["mouth"]["corr"]) == {"open", "width", "round"} and res["mouth"]["frames"] == res["frames"]
    assert set(res["sync"]) >= {"real", "shuffled"} and res["sync"]["real"]["clips"] == 2
    assert np.isfinite(res["sync"]["real"]["lse_d"]) and np.isfinite(res["sync"]["shuffled"]["lse_c"])
    assert main(["eval", "lipsync", "--clips", str(data)]) == 1          # one line naming the problem
    assert "nothing to measure" in capsys.readouterr().err
