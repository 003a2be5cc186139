"""The public runtime API: sessions, bundles, actions, devices, and their errors."""

import json

import numpy as np
import pytest
import torch

from runtime import ActionSpace, Bundle, BundleError, ChunkPattern, ModelConfig, SamplerConfig, open_session
from runtime.sampler import chunk_levels, shift_timesteps


def test_session_step_shapes_and_stats():
    s = open_session(Bundle.random(ModelConfig.tiny(frames_per_chunk=2)))
    frames = s.step(["forward", "left"])
    assert frames.dtype == np.uint8 and frames.shape == (2, 8, 8, 3)
    s.step()
    stats = s.stats()
    for key in ("fps", "first_frame_ms", "chunk_ms_p50", "chunk_ms_p95", "kv_cache_bytes"):
        assert stats[key] is not None and stats[key] > 0, key


def test_same_seed_same_frames_and_reset():
    s = open_session(Bundle.random(seed=1))
    a = [s.step("forward") for _ in range(3)]
    s.reset(seed=0)
    b = [s.step("forward") for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    s.reset(seed=5)
    c = s.step("forward")
    assert not np.array_equal(a[0], c)


def test_actions_change_the_frames():
    bundle = Bundle.random(seed=2)
    s = open_session(bundle)
    quiet = s.step(None)
    s.reset(0)
    loud = s.step(["forward", "attack"])
    assert not np.array_equal(quiet, loud)


def test_action_space_encoding_and_errors():
    space = ActionSpace(keys=("forward", "left"), values=("mouse_dx",), bindings={"w": "forward"})
    assert space.encode(None).tolist() == [0, 0, 0]
    assert space.encode(["left"]).tolist() == [0, 1, 0]
    assert space.encode({"keys": ["forward"], "mouse_dx": 0.5}).tolist() == [1, 0, 0.5]
    assert space.encode(np.array([1.0, 0.0, -1.0])).tolist() == [1, 0, -1]
    assert space.from_keyboard(["W", "q"]) == ["forward"]
    with pytest.raises(ValueError, match="unknown action key 'jump'.*forward"):
        space.encode(["jump"])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        space.encode(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        space.encode(np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="must be a number"):
        space.encode({"mouse_dx": "fast"})
    with pytest.raises(ValueError, match="unknown action keys"):
        ActionSpace(keys=("a",), bindings={"x": "b"})
    assert ActionSpace.from_dict(space.to_dict()) == space


def test_session_rejects_wrong_action_audio_video_and_device():
    s = open_session("random-tiny")
    with pytest.raises(ValueError, match="unknown action key 'jump'"):
        s.step(["jump"])
    with pytest.raises(ValueError, match="takes no audio"):
        s.step(None, audio=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="unknown device 'gpu9'"):
        open_session("random-tiny", device="gpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            open_session("random-tiny", device="cuda")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        open_session("random-tiny", steps=0)


def test_audio_and_video_conditioning():
    cfg = ModelConfig.tiny(audio_dim=4, video_channels=3, frames_per_chunk=2)
    s = open_session(Bundle.random(cfg))
    video = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    a = s.step(None, audio=np.zeros((2, 4)), video=video)
    s.reset(0)
    b = s.step(None, audio=np.ones((2, 4)), video=video)
    assert a.shape == (2, 8, 8, 3) and not np.array_equal(a, b)
    with pytest.raises(ValueError, match=r"audio must have shape \[2, 4\]"):
        s.step(None, audio=np.zeros((3, 4)), video=video)
    with pytest.raises(ValueError, match="video-conditioned"):
        s.step(None, audio=np.zeros((2, 4)))


def test_context_frames_start_the_stream():
    bundle = Bundle.random(ModelConfig.tiny(frames_per_chunk=2))
    ctx = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    s = open_session(bundle)
    s.reset(0, context=ctx, context_actions=[["forward"]] * 4)
    after_ctx = s.step(None)
    s.reset(0)
    no_ctx = s.step(None)
    assert not np.array_equal(after_ctx, no_ctx)
    with pytest.raises(ValueError, match="chunk boundary"):
        s.reset(0, context=ctx[:3])
    with pytest.raises(ValueError, match="one action per context frame"):
        s.reset(0, context=ctx, context_actions=[None])


def test_text_cross_attention_requires_text():
    from runtime.model import CausalDiT

    model = CausalDiT(ModelConfig.tiny(text_dim=8)).eval()
    x = torch.randn(1, 2, 3, 8, 8)
    out = model(x, torch.rand(1, 2), text=torch.randn(1, 5, 8))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="text cross-attention"):
        model(x, torch.rand(1, 2))


def test_bundle_round_trip(tmp_path):
    bundle = Bundle.random(ModelConfig.tiny(frames_per_chunk=2), seed=3,
                           sampler=SamplerConfig(kind="euler", steps=4, shift=3.0))
    bundle.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.config == bundle.config and loaded.sampler == bundle.sampler
    a = open_session(bundle).step("forward")
    b = open_session(tmp_path / "b").step("forward")
    assert np.array_equal(a, b)
    bundle.save(tmp_path / "b")  # overwriting an existing bundle keeps it whole
    assert Bundle.load(tmp_path / "b").config == bundle.config


def test_bundle_errors_name_the_file_and_tensor(tmp_path):
    path = Bundle.random(seed=0).save(tmp_path / "b")
    weights = path / "weights.safetensors"
    with pytest.raises(BundleError, match="not a bundle directory"):
        Bundle.load(tmp_path / "missing")

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="weights.safetensors: unreadable or truncated"):
        Bundle.load(path)
    weights.write_bytes(data)

    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["ffn_dim"] = 48
    (path / "config.json").write_text(json.dumps(cfg))
    shape_error = r"weights.safetensors: tensor blocks\.0\.ffn\.net\.0\.proj\.(weight|bias) has shape \[64"
    with pytest.raises(BundleError, match=shape_error):
        Bundle.load(path)
    cfg["model"]["ffn_dim"] = 64
    cfg["model"]["num_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"missing tensor blocks\.2\."):
        Bundle.load(path)
    cfg["model"]["num_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"unexpected tensor blocks\.1\."):
        Bundle.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="config.json: not valid JSON"):
        Bundle.load(path)
    (path / "config.json").unlink()
    with pytest.raises(BundleError, match="config.json: missing"):
        Bundle.load(path)


def test_config_json_round_trip_and_validation():
    cfg = ModelConfig.tiny(frames_per_chunk=3, first_chunk_frames=1, text_dim=8)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "heads": 3})
    with pytest.raises(ValueError, match="patch_size"):
        ModelConfig.tiny(patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig.tiny(latent_height=7)
    with pytest.raises(ValueError, match="cache_from"):
        SamplerConfig(cache_from="sometimes")
    for one_step in (dict(steps=1), dict(steps=2, first_chunk_steps=1), dict(timesteps=[0.5])):
        with pytest.raises(ValueError, match="last_step.*at least 2 denoising steps"):
            SamplerConfig(cache_from="last_step", **one_step)
        SamplerConfig(cache_from="clean", **one_step)
    with pytest.raises(ValueError, match="last_step.*at least 2"):
        open_session(Bundle.random(sampler=SamplerConfig(steps=2, cache_from="last_step")), steps=1)


def test_chunk_pattern_bookkeeping():
    p = ChunkPattern(frames_per_chunk=3, first_chunk_frames=1, tokens_per_frame=4)
    assert [p.chunk_start(c) for c in range(4)] == [0, 1, 4, 7]
    assert [p.chunk_frames(c) for c in range(3)] == [1, 3, 3]
    assert p.num_chunks(7) == 3 and p.num_chunks(8) == 4 and p.is_whole(7) and not p.is_whole(5)
    assert p.chunk_index(8).tolist() == [0, 1, 1, 1, 2, 2, 2, 3]
    dense = p.block_causal(4).to_dense()
    assert dense.shape == (16, 16)
    assert dense[0, :4].all() and not dense[0, 4:].any()  # first chunk: one frame
    assert dense[4, :16].all()  # frame 1 sees its whole chunk (frames 1-3)


def test_sampler_levels():
    cfg = SamplerConfig(kind="euler", steps=4, first_chunk_steps=8)
    assert chunk_levels(cfg, 0)[0] == 1.0 and len(chunk_levels(cfg, 0)) == 9
    assert chunk_levels(cfg, 1) == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = chunk_levels(SamplerConfig(steps=4, shift=3.0), 1)
    assert shifted[0] == 1.0 and shifted[2] == pytest.approx(0.75)  # 3*.5/(1+2*.5)
    assert shift_timesteps(torch.tensor(0.0), 5.0) == 0
    explicit = chunk_levels(SamplerConfig(timesteps=[0.25, 1.0, 0.5]), 0)
    assert explicit == [1.0, 0.5, 0.25, 0.0]


def test_guidance_strengthens_held_keys_only():
    """Action CFG: the null action is 'no key', so guidance changes nothing without keys and pushes
    frames further from the no-key frames when keys are held."""
    bundle = Bundle.random(seed=3)

    def frames(guidance, action):
        s = open_session(bundle, guidance=guidance, seed=0)
        assert s.stats()["guidance"] == (guidance or bundle.sampler.guidance_scale)
        return np.stack([s.step(action) for _ in range(3)]).astype(np.float64)

    assert np.abs(frames(3.0, None) - frames(None, None)).max() <= 1
    quiet = frames(None, None)
    plain, guided = frames(None, ["forward", "attack"]), frames(3.0, ["forward", "attack"])
    assert np.abs(guided - quiet).mean() > 1.5 * np.abs(plain - quiet).mean()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="guidance"):
            open_session(bundle, guidance=bad)
