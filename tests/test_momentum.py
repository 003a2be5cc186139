"""Action momentum (``ModelConfig.action_momentum``): the running average of the keys as a condition.

What matters is that training and playing agree: the clips a stage trains on and the stream a
player drives must hand the model the same average for the same keys, from the same start.
"""

import numpy as np
import pytest
import torch

from runtime import Bundle, ModelConfig
from runtime.actions import ActionCondition, key_momentum
from runtime.codec import PixelCodec
from tests.helpers import moving_clips
from training.latents import LatentClips, synthetic_latents


def test_key_momentum_is_the_running_average_and_carries_its_state():
    gen = torch.Generator().manual_seed(0)
    acts = (torch.rand(9, 3, generator=gen) > 0.5).float()
    out, last = key_momentum(acts, 0.8)
    assert torch.equal(out[:, :3], acts)
    for t in range(9):   # s_t = sum_k (1 - d) d^(t-k) a_k
        want = sum(0.2 * 0.8 ** (t - k) * acts[k] for k in range(t + 1))
        assert torch.allclose(out[t, 3:], want, atol=1e-6)
    assert torch.equal(last, out[-1, 3:])
    head, state = key_momentum(acts[:4], 0.8)
    tail, _ = key_momentum(acts[4:], 0.8, state)   # a stream, chunk by chunk, gives the same average
    assert torch.allclose(torch.cat([head, tail]), out)
    with pytest.raises(ValueError, match="decay"):
        key_momentum(acts, 1.0)


def test_action_momentum_config_is_checked_and_widens_the_condition():
    cfg = ModelConfig.tiny(action_momentum=0.8)
    assert cfg.action_condition_dim == 2 * cfg.actions.dim
    assert ModelConfig.tiny().action_condition_dim == cfg.actions.dim
    assert ModelConfig.from_dict(cfg.to_dict()).action_momentum == 0.8
    with pytest.raises(ValueError, match="action_momentum"):
        ModelConfig.tiny(action_momentum=1.0)
    with pytest.raises(ValueError, match="action_momentum"):
        ModelConfig.tiny(action_momentum=0.5, action_space={})


def test_clips_get_the_average_per_episode_once_and_wrong_widths_are_refused():
    clips = synthetic_latents(3, 10, (3, 8, 8), 5)
    cfg = ModelConfig.tiny(action_momentum=0.5)
    moved = clips.for_model(cfg)
    assert moved.cond.shape == (30, 10) and moved.for_model(cfg) is moved
    for r, n, _ in clips.episodes:   # each episode's average starts from rest at its first frame
        assert torch.allclose(moved.cond[r:r + n], key_momentum(clips.cond[r:r + n], 0.5)[0])
    assert clips.for_model(ModelConfig.tiny()) is clips
    narrow = LatentClips(clips.latents, clips.cond[:, :3], clips.episodes)
    with pytest.raises(ValueError, match="action channels"):
        narrow.for_model(cfg)


def _recorded_conditions(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def hook(_module, _args, kwargs):
        if kwargs.get("action") is not None:
            seen.append(kwargs["action"][0].clone())
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("mode", ["session", "bidirectional"])
def test_a_stream_hands_the_model_the_average_its_training_clips_hold(mode):
    """The actions before the context, context frames and their actions, then held keys: every frame's
    condition in the stream equals the row a training clip of the same episode holds, and a reset starts
    the average afresh."""
    from runtime import open_session
    from training.evaluate import BidirectionalSession

    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=8, window_frames=3, sink_frames=0,
                           stack_frames=1, action_momentum=0.7)
    torch.manual_seed(0)
    bundle = Bundle.random(cfg, codec=PixelCodec(1))
    session = open_session(bundle, steps=1) if mode == "session" else BidirectionalSession(bundle, steps=1)
    seen = _recorded_conditions(bundle.model)
    keys = cfg.actions.keys
    history = [None, [keys[0]], [keys[0], keys[3]], [keys[0]]]   # the frames before the context
    recorded = [[keys[0]], [keys[0]], []]                     # the actions that produced the context frames
    held = [[], [keys[2]], [keys[1]], [keys[1], keys[2]]]
    want = key_momentum(cfg.actions.encode_many([*history, *recorded, *held]), 0.7)[0]   # a training clip's rows
    frames = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    for _ in range(2):
        session.reset(0, context=frames, context_actions=recorded, action_history=history)
        for frame, action in enumerate(held, start=len(history) + len(recorded)):
            session.step(action)
            assert torch.allclose(seen[-1][-1], want[frame], atol=1e-6), (frame, seen[-1][-1], want[frame])
        if mode == "bidirectional":   # the whole window: context and generated frames
            assert torch.allclose(seen[-1], want[-len(seen[-1]):], atol=1e-6)


def test_action_condition_without_momentum_is_the_encoded_actions():
    space = ModelConfig.tiny().actions
    cond = ActionCondition(space)
    assert cond.dim == space.dim
    assert torch.equal(cond([["forward"], None]), space.encode_many([["forward"], None]))


def test_a_momentum_teacher_and_its_students_train_on_raw_clips(tmp_path):
    """The teacher measures its camera motion on the keys alone; every stage widens the raw clips itself."""
    from training.students.causal import CausalConfig, train_causal
    from training.teacher import TeacherTrainConfig, action_gap_report, train_teacher

    clips = moving_clips({0: 1, 1: -2}, frames=200, action_dim=5)
    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=12, stack_frames=1, still_prior=0.5,
                           camera_warp=True, action_momentum=0.8, window_frames=3, sink_frames=0)
    train_teacher(TeacherTrainConfig(out=str(tmp_path / "t"), steps=2, batch=2, clip_frames=4, sample_steps=2),
                  cfg, clips, PixelCodec(1), progress=False)
    teacher = Bundle.load(tmp_path / "t" / "bundle")
    assert teacher.config.action_momentum == 0.8
    assert float(teacher.model.camera_motion[0, 0]) * 12 / 2 == pytest.approx(1, abs=0.1)   # key 0 rolls +1
    assert float(teacher.model.camera_motion[1, 0]) * 12 / 2 == pytest.approx(-2, abs=0.1)
    report = action_gap_report(teacher.model, clips, 4, count=4, seeds=1, batch=4)
    assert len(report["levels"]) == 2
    result = train_causal(teacher, clips, CausalConfig(out=str(tmp_path / "c"), steps=2, batch=2, clip_frames=4,
                                                       eval_batch=2), progress=False)
    assert Bundle.load(tmp_path / "c" / "bundle").config.action_momentum == 0.8 and result


# -- camera flow: the keys' averages move the stacked frames, pixel by pixel ---------------------------
def _walking_clips(frames: int = 400) -> LatentClips:
    """Pixel latents [3, 12, 12] where key 0's running average (decay 0.8) above 0.5 streams the bottom half
    down and the top half up by one pixel a frame, as walking moves a floor and a ceiling; key 0 is held in
    stretches of 30 frames. The texture is smooth, as a game's floor is, so the camera's translation fit
    (`calibrate_camera_motion`) finds no whole-frame move for key 0."""
    gen = torch.Generator().manual_seed(0)
    cond = torch.zeros(frames, 5)
    cond[:, 0] = ((torch.arange(frames) // 30) % 2 == 1).float()
    speed = key_momentum(cond, 0.8)[0][:, 5]
    coarse = torch.rand(1, 3, 4, 4, generator=gen) * 2 - 1   # a smooth texture: no whole shift of the frame fits
    lat = [torch.nn.functional.interpolate(coarse, size=(12, 12), mode="bicubic", align_corners=False)[0]]
    for f in range(1, frames):
        x = lat[-1].clone()
        if speed[f] > 0.5:
            x[:, 6:] = torch.roll(x[:, 6:], 1, 1)
            x[:, :6] = torch.roll(x[:, :6], -1, 1)
        lat.append((x + 0.02 * torch.randn(x.shape, generator=gen)).clamp(-1, 1))
    return LatentClips(torch.stack(lat).half(), cond, [(0, frames, 0)]).with_momentum(0.8)


def test_warp_frames_flow_moves_each_pixel_by_its_own_offset():
    from runtime.warp import warp_frames

    frames = torch.randn(1, 2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    flow = torch.zeros(1, 2, 2, 6, 8)
    flow[:, :, 1, 3:] = 2 / 6          # the bottom half one pixel down, the top half still
    moved = warp_frames(frames, torch.zeros(1, 2, 3), flow)
    assert torch.allclose(moved[..., :3, :], frames[..., :3, :], atol=1e-5)
    assert torch.allclose(moved[..., 4:, :], frames[..., 3:5, :], atol=1e-5)


def test_flow_calibration_finds_the_floor_and_ceiling_streaming_apart():
    from training.camera import calibrate_camera_flow

    clips = _walking_clips()
    motion = torch.zeros(5, 3)
    motion[1, 0] = 2 / 12          # key 1 turns: its translation explains it, no flow is fitted
    flow, report = calibrate_camera_flow(clips, PixelCodec(1), 5, motion, max_shift=2)
    down = flow[0, 1].mean(1) * 12 / 2          # latent pixels per frame per unit of the average, per row
    assert (down[7:11] > 0.3).all() and (down[1:5] < -0.3).all(), down
    inside = torch.cat([flow[0, 0, 1:5], flow[0, 0, 7:11]])   # away from the halves' wrapped rows
    assert inside.abs().mean() < 0.1 * flow[0, 1].abs().mean()        # nothing moves sideways
    assert report[0]["warped_mse"] < 0.7 * report[0]["copy_mse"]
    assert report[1]["note"] == "moved by its translation" and report[2] == {"frames": 0}
    assert flow[1:].abs().max() == 0
    with pytest.raises(ValueError, match="running averages"):
        calibrate_camera_flow(synthetic_latents(1, 10, (3, 8, 8), 5), PixelCodec(1), 5, motion)


def test_a_camera_flow_teacher_measures_its_flow_and_a_fresh_one_walks_with_the_average(tmp_path):
    from runtime import ChunkCondition, Rollout, SamplerConfig
    from training.teacher import TeacherTrainConfig, train_teacher

    with pytest.raises(ValueError, match="camera_flow"):
        ModelConfig.tiny(stack_frames=1, camera_warp=True, camera_flow=True)
    clips = _walking_clips()
    cfg = ModelConfig.tiny(in_channels=3, latent_height=12, latent_width=12, stack_frames=1, still_prior=0.5,
                           camera_warp=True, action_momentum=0.8, camera_flow=True, window_frames=3, sink_frames=0)
    train_teacher(TeacherTrainConfig(out=str(tmp_path), steps=1, batch=2, clip_frames=4, sample_steps=1),
                  cfg, LatentClips(clips.latents, clips.cond[:, :5], clips.episodes), PixelCodec(1), progress=False)
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.model.camera_flow[0, 1, 8:].mean() > 0 and "camera_flow" in bundle.extra
    # a fresh model (zero residual) with that flow: the average of the keys, not the key, moves the view
    torch.manual_seed(0)
    from runtime.model import CausalDiT

    model = CausalDiT(cfg).eval()
    model.camera_flow.copy_(bundle.model.camera_flow)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 1, 3, 12, 12, generator=gen)
    walking = torch.zeros(1, 1, 10)
    walking[..., 0], walking[..., 5] = 1.0, 0.0          # key held, but no speed built up yet
    fast = walking.clone()
    fast[..., 5] = 1.0
    outs = []
    with torch.no_grad():
        for cond in (walking, fast):
            ro = Rollout(model, SamplerConfig(kind="consistency", steps=1), kv_cache=True, generator=gen)
            ro.add_context(ctx, ChunkCondition(action=torch.zeros(1, 1, 10)))
            outs.append(ro.generate_chunk(torch.randn(ctx.shape, generator=gen), ChunkCondition(action=cond)))
    assert torch.allclose(outs[0], ctx, atol=1e-5)                       # no speed: the view stays
    assert (outs[1] - ctx).abs().mean() > 0.1                            # at speed: it streams
