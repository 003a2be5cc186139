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
    """Context frames and their actions, then held keys: every frame's condition in the stream equals the
    row a training clip of the same episode holds, and a reset starts the average from rest again."""
    from runtime import open_session
    from training.evaluate import BidirectionalSession

    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=8, window_frames=3, sink_frames=0,
                           stack_frames=1, action_momentum=0.7)
    torch.manual_seed(0)
    bundle = Bundle.random(cfg, codec=PixelCodec(1))
    session = open_session(bundle, steps=1) if mode == "session" else BidirectionalSession(bundle, steps=1)
    seen = _recorded_conditions(bundle.model)
    keys = cfg.actions.keys
    recorded = [None, [keys[0]], [keys[0]]]                   # the actions that produced the context frames
    held = [[], [keys[2]], [keys[1]], [keys[1], keys[2]]]
    want = key_momentum(cfg.actions.encode_many([*recorded, *held]), 0.7)[0]   # the rows a training clip holds
    frames = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    for _ in range(2):
        session.reset(0, context=frames, context_actions=recorded)
        for frame, action in enumerate(held, start=len(recorded)):
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
