"""The lip-sync model on the world model's machinery: latent clips with audio and masked video, the
teacher and the student stages on them, and the bundle they write playing in a lip-sync session."""

import json
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from runtime import open_session
from runtime.codec import PixelCodec
from runtime.lipsync import LipsyncSession, LipsyncSpec, lipsync_config
from training.conditions import FrameConditions, cat, chunk_condition, dropped, frame_count, model_inputs, null
from training.lipsync.latents import encode_lipsync_latents, synthetic_lipsync_latents, union_mouth_box


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from training.data.record import RecordConfig, record

    out = tmp_path_factory.mktemp("lipsync") / "train"
    record(RecordConfig(env="lipsync:train", episodes=2, size=(32, 32), episodes_per_shard=2), str(out),
           progress=False)
    return str(out)


def recorded(data):
    from training.lipsync.record import load_clips

    return load_clips(data, ("frames", "mouth_box"))[1]


def test_conditions_drop_audio_and_actions_but_keep_the_video():
    c = FrameConditions(audio=torch.ones(2, 3, 4), video=torch.ones(2, 3, 5, 2, 2))
    u = null(c)
    assert u.audio.abs().sum() == 0 and torch.equal(u.video, c.video) and u.action is None
    d = dropped(c, torch.tensor([True, False]))
    assert d.audio[0].abs().sum() == 0 and torch.equal(d.audio[1], c.audio[1]) and torch.equal(d.video, c.video)
    both = cat([c, u], 0)
    assert both.audio.shape == (4, 3, 4) and frame_count(both[:, 1:]) == 2
    assert set(model_inputs(c)) == {"action", "audio", "video"} and chunk_condition(c).video is c.video
    a = torch.ones(2, 3, 4)                             # the world model's bare action tensor: as before
    assert torch.equal(null(a), torch.zeros_like(a)) and model_inputs(a) == {"action": a}
    assert torch.equal(dropped(a, torch.tensor([True, False]))[0], torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least one"):
        FrameConditions()


def test_lipsync_latents_mask_the_box_carry_the_audio_and_the_reference(data, tmp_path):
    clips_np = recorded(data)
    box = union_mouth_box(data, margin=1)
    for c in clips_np:                                  # the union covers every recorded mouth box
        b = c["mouth_box"]
        assert (b[:, 0] >= box[0]).all() and (b[:, 1] >= box[1]).all()
        assert (b[:, 2] <= box[2]).all() and (b[:, 3] <= box[3]).all()
    spec = LipsyncSpec(mask_box=box, fill=0)
    clips = encode_lipsync_latents(data, PixelCodec(1), spec, cache_dir=tmp_path, progress=False)
    frames = np.concatenate([c["frames"] for c in clips_np])
    assert torch.allclose(clips.latents.float(), PixelCodec(1).encode(torch.from_numpy(frames)), atol=1e-2)
    y0, x0, y1, x1 = box
    video = clips.cond.video.float()
    assert torch.allclose(video[:, :, y0:y1, x0:x1], torch.full_like(video[:, :, y0:y1, x0:x1], -1.0))
    outside = clips.latents.float().clone()
    outside[:, :, y0:y1, x0:x1] = -1.0
    assert torch.equal(video, outside)
    from training.data.shards import ShardStore, open_shard

    actions = np.concatenate([open_shard(p, ("actions",))["actions"] for p in ShardStore(data).shard_paths()])
    assert torch.equal(clips.cond.audio, torch.from_numpy(actions))   # actions[t] belongs to frames[t]: no shift
    x0, cond = clips.sample(3, 4, torch.Generator().manual_seed(0))
    assert cond.video.shape == (3, 4, 6, 32, 32) and cond.audio.shape == (3, 4, 512)
    firsts = clips.latents[[r for r, _, _ in clips.episodes]].float()
    for b in range(3):                                  # channels 3..5: the clip's first frame, every frame
        assert any(torch.equal(cond.video[b, 0, 3:], f) for f in firsts)
        assert torch.equal(cond.video[b, 0, 3:], cond.video[b, -1, 3:])
    again = encode_lipsync_latents(data, PixelCodec(1), spec, cache_dir=tmp_path, progress=False)
    assert torch.equal(again.cond.video, clips.cond.video) and torch.equal(again.reference, clips.reference)
    assert len(list(tmp_path.glob("lipsync-latents-*.pt"))) == 1


def test_cropped_and_told_mouth_latents(data, tmp_path):
    from runtime.lipsync import crop_around, mouth_features
    from training.data.shards import ShardStore, open_shard

    box = union_mouth_box(data, margin=1)
    crop = crop_around(box, (32, 32), 1, 4)
    spec = LipsyncSpec(mask_box=box, fill=0, crop_box=crop, face_size=(32, 32), condition="mouth")
    clips = encode_lipsync_latents(data, PixelCodec(1), spec, cache_dir=tmp_path, progress=False)
    frames = np.concatenate([c["frames"] for c in recorded(data)])
    y0, x0, y1, x1 = crop
    assert torch.allclose(clips.latents.float(), PixelCodec(1).encode(torch.from_numpy(
        np.ascontiguousarray(frames[:, y0:y1, x0:x1]))), atol=1e-2)
    mouth = np.concatenate([open_shard(p, ("mouth",))["mouth"] for p in ShardStore(data).shard_paths()])
    assert torch.equal(clips.cond.audio, torch.from_numpy(mouth_features(mouth, 512)))
    assert torch.equal(clips.cond.audio[:, 3:6], clips.cond.audio[:, :3])   # the three parameters, tiled
    plain = encode_lipsync_latents(data, PixelCodec(1), replace(spec, condition="audio"), cache_dir=tmp_path,
                                   progress=False)
    assert not torch.equal(plain.cond.audio, clips.cond.audio)              # cached apart from the oracle's
    assert len(list(tmp_path.glob("lipsync-latents-*.pt"))) == 2


def test_plain_latents_of_lipsync_data_need_the_spec(data):
    from training.latents import encode_latents

    with pytest.raises(ValueError, match="needs a lip-sync bundle's spec"):
        encode_latents(data, PixelCodec(4), progress=False)


def test_teacher_learns_to_read_the_audio():
    """On clips whose masked 'mouth' row is set by the audio, the teacher's loss with the true audio falls
    below its loss with silence: the audio reaches the frames through the adapter."""
    from runtime.bundle import Bundle
    from training.teacher import TeacherTrainConfig, action_gap, train_teacher

    spec = LipsyncSpec(mask_box=(6, 0, 8, 8))
    clips = synthetic_lipsync_latents(8, 8, (3, 8, 8), spec.audio_config.dim, seed=0)
    cfg = lipsync_config(PixelCodec(1), (8, 8), spec, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                         ffn_dim=64, freq_dim=32, window_frames=3, sink_frames=0)
    with tempfile.TemporaryDirectory() as out:
        tc = TeacherTrainConfig(out=out, steps=120, batch=8, clip_frames=4, lr=2e-3, warmup=5, ckpt_every_s=1e9,
                                log_every=1000, extra={"lipsync": spec.to_dict()})
        train_teacher(tc, cfg, clips, PixelCodec(1), fps=25.0, progress=False)
        bundle = Bundle.load(f"{out}/bundle")
    x0, cond = clips.sample(16, 4, torch.Generator().manual_seed(1))
    gap = action_gap(bundle.model, x0, cond, 0.9, torch.Generator().manual_seed(2))
    assert gap > 0.02, gap   # an untrained model: about 0.008; one trained on silence only: about 0.005
    assert bundle.extra["lipsync"]["mask_box"] == [6, 0, 8, 8]


@pytest.mark.parametrize("crop", [[], ["--crop-margin", "1"]], ids=["whole", "crop"])
def test_the_recipe_stages_run_on_lipsync_data_and_the_student_plays(data, tmp_path, capsys, crop):
    """Teacher -> causal -> dCM -> SF-DMD through the CLI at toy size (the recipe's dry run in a test)."""
    from forcekit.cli import main

    model = ["--layers", "1", "--heads", "2", "--head-dim", "16", "--ffn", "32", "--freq-dim", "32", "--patch", "2"]
    run = tmp_path / "runs"
    assert main(["train", "lipsync-teacher", "--data", data, "--codec", "pixel:4", "--out", str(run / "teacher"),
                 "--steps", "2", "--batch", "2", "--clip-frames", "4", "--sink-frames", "1", *model,
                 "--audio-tokens", "--outside-weight", "0.1", "--context-prob", "0.25", *crop]) == 0
    stage = ["--batch", "2", "--clip-frames", "4", "--steps", "2", "--eval-every", "2", "--heldout", data,
             "--heldout-episodes", "1"]
    assert main(["train", "causal", "--bundle", str(run / "teacher/bundle"), "--out", str(run / "causal"),
                 *stage]) == 0
    assert main(["train", "dcm", "--bundle", str(run / "causal/bundle"), "--out", str(run / "dcm"), *stage]) == 0
    assert main(["train", "dmd", "--bundle", str(run / "dcm/bundle"), "--teacher", str(run / "teacher/bundle"),
                 "--out", str(run / "dmd"), *stage]) == 0
    capsys.readouterr()
    config = json.loads((run / "dmd/bundle/config.json").read_text())
    assert config["extra"]["lipsync"]["reference"] == "first" and config["model"]["video_channels"] == 6
    spec = LipsyncSpec.from_dict(config["extra"]["lipsync"])   # the students keep the teacher's audio tokens
    drawn = spec.model_size(32, 32)
    assert (spec.crop_box is not None) == bool(crop) and (drawn != (32, 32)) == bool(crop)
    assert [config["model"]["latent_height"], config["model"]["latent_width"]] == [drawn[0] // 4, drawn[1] // 4]
    assert config["model"]["audio_region"] == list(spec.latent_box(drawn, (drawn[0] // 4, drawn[1] // 4)))
    s = open_session(str(run / "dmd/bundle"))
    assert isinstance(s, LipsyncSession)
    frame = recorded(data)[0]["frames"][0]
    out = s.step(audio=np.zeros(512, np.float32), video=frame)
    assert out.shape == (1, 32, 32, 3)
    gen = tmp_path / "gen"
    assert main(["eval", "lipsync-generate", "--bundle", str(run / "dmd/bundle"), "--clips", data,
                 "--out", str(gen)]) == 0
    assert json.loads(capsys.readouterr().out)["ab_clips"] == 2
    assert main(["eval", "lipsync", "--clips", str(gen / "ab"), "--reference", str(gen / "ab_input"), "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["identity"]["psnr"] <= 100
    own = np.concatenate([c["frames"] for c in recorded(str(gen / "own"))])
    real = np.concatenate([c["frames"] for c in recorded(data)])
    y0, x0, y1, x1 = config["extra"]["lipsync"]["mask_box"]
    own[:, y0:y1, x0:x1] = real[:, y0:y1, x0:x1] = 0
    assert np.array_equal(own, real)      # composited: nothing outside the mask box changes
    # --steps overrides the bundle's sampler steps: a teacher is measured the way its students are
    assert main(["eval", "lipsync-generate", "--bundle", str(run / "dmd/bundle"), "--clips", data,
                 "--out", str(tmp_path / "gen3"), "--no-ab", "--steps", "3"]) == 0
    capsys.readouterr()
    three = np.concatenate([c["frames"] for c in recorded(str(tmp_path / "gen3" / "own"))])
    assert three.shape == own.shape and not np.array_equal(three, np.concatenate(
        [c["frames"] for c in recorded(str(gen / "own"))]))


def test_audio_tokens_reach_the_mask_box_tokens_directly():
    """With ``audio_region`` the tokens over the box get the audio added to their input: the audio changes
    the output even with the adaLN audio path zeroed; a region outside the latent, or one without audio, is
    refused."""
    from runtime.config import ModelConfig
    from runtime.model import CausalDiT

    cfg = ModelConfig.tiny(audio_dim=6, audio_region=(4, 2, 7, 5))
    assert ModelConfig.from_dict(cfg.to_dict()).audio_region == (4, 2, 7, 5)
    torch.manual_seed(0)
    model = CausalDiT(cfg).eval()
    # patches of 2x2 on 8x8: rows 4-6 touch patch rows 2-3, columns 2-4 touch patch columns 1-2
    assert model.audio_tokens.flatten().nonzero().flatten().tolist() == [9, 10, 13, 14]
    torch.nn.init.zeros_(model.condition_embedder.audio_embedder.linear_2.weight)
    torch.nn.init.zeros_(model.condition_embedder.audio_embedder.linear_2.bias)
    x, t = torch.randn(1, 2, 3, 8, 8), torch.full((1, 2), 0.5)
    with torch.no_grad():
        quiet = model(x, t, audio=torch.zeros(1, 2, 6))
        loud = model(x, t, audio=torch.ones(1, 2, 6))
    assert (quiet - loud).abs().max() > 1e-3
    for bad in ((4, 2, 9, 5), (4, 4, 7, 4)):
        with pytest.raises(ValueError, match="audio_region"):
            ModelConfig.tiny(audio_dim=6, audio_region=bad)
    with pytest.raises(ValueError, match="audio_dim"):
        ModelConfig.tiny(audio_region=(4, 2, 7, 5))


def test_the_mask_box_in_latent_pixels_and_the_loss_outside_it():
    """`latent_box` covers every latent pixel the mask box touches (plus the margin); with outside weight 0
    the teacher's loss ignores errors outside it, with weight 1 it is the plain mean."""
    from training.teacher import TeacherTrainConfig, flow_matching_loss, region_weights

    spec = LipsyncSpec(mask_box=(55, 28, 82, 68))
    assert spec.latent_box((96, 96), (24, 24), margin=0) == (13, 7, 21, 17)
    assert spec.latent_box((96, 96), (24, 24)) == (12, 6, 22, 18)
    assert spec.latent_box((96, 96), (24, 24), margin=5) == (8, 2, 24, 22)

    box = (2, 2, 5, 6)
    inside = region_weights((8, 8), box, 0.0).bool()

    class Exact(torch.nn.Module):   # clean frames are 0, so the true velocity is x_t / t; off by `outside` there
        def __init__(self, outside: float):
            super().__init__()
            self.outside = outside

        def forward(self, x_t, t, **_):
            return x_t / t[:, :, None, None, None] + torch.where(inside, 0.0, self.outside)

    x0 = torch.zeros(2, 3, 3, 8, 8)
    cfg = TeacherTrainConfig(context_prob=0.0, loss_region=box, outside_weight=0.0)
    loss = {off: float(flow_matching_loss(Exact(off), x0, torch.zeros(2, 3, 4), cfg,
                                          torch.Generator().manual_seed(0))[0]) for off in (0.0, 3.0)}
    assert loss[0.0] == pytest.approx(0.0, abs=1e-6) and loss[3.0] == pytest.approx(0.0, abs=1e-6)
    whole = TeacherTrainConfig(context_prob=0.0)
    assert float(flow_matching_loss(Exact(3.0), x0, torch.zeros(2, 3, 4), whole,
                                    torch.Generator().manual_seed(0))[0]) == pytest.approx(9.0 * (1 - 12 / 64))
