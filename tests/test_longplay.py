import numpy as np
import pytest
import torch

from runtime import Bundle, ModelConfig, SamplerConfig, open_session
from training.longplay import (
    LongPlayConfig,
    collapse_frame,
    high_frequency_ratio,
    long_play,
    plot_long_play,
    policy_actions,
    row_structure,
)


def test_high_frequency_ratio_separates_noise_from_smooth_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (4, 32, 32, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.repeat(((np.sin(xx / 6) + np.cos(yy / 5)) * 60 + 128)[None, :, :, None], 3, -1)
    smooth = np.repeat(smooth, 4, 0).astype(np.uint8)
    assert high_frequency_ratio(noise) > 1.5
    assert high_frequency_ratio(smooth) < 0.2


def test_row_structure_tells_a_banded_view_from_a_melted_texture():
    """A Doom-like view (dark sky, a wall band, a green floor) against the flat textured mush a melted
    rollout becomes: their variances are alike, their layouts are not."""
    rng = np.random.default_rng(0)
    view = np.zeros((2, 48, 48, 3))
    view[:, :18] = (5, 5, 30)
    view[:, 18:26] = (140, 140, 110)
    view[:, 26:] = (20, 90, 20)
    view = np.clip(view + rng.normal(0, 8, view.shape), 0, 255).astype(np.uint8)
    melt = np.clip(rng.normal(80, 40, (2, 48, 48, 3)), 0, 255).astype(np.uint8)
    assert melt.astype(float).var() > 0.5 * view.astype(float).var()
    assert row_structure(view) > 20 * row_structure(melt)


def test_long_play_tracks_memory_and_frames(tmp_path):
    cfg = ModelConfig.tiny(num_layers=1, latent_height=4, latent_width=4, window_frames=4, sink_frames=1)
    session = open_session(Bundle.random(cfg, sampler=SamplerConfig(steps=1)))
    result = long_play(session, LongPlayConfig(frames=300, policy="random", window=50), progress=False)
    assert result["frames"] == 300 and len(result["points"]) == 6
    assert result["kv_cache_bytes_constant"]
    assert all(p["spatial_var"] > 0 and p["row_structure"] >= 0 for p in result["points"])
    assert result["row_structure_last"] == result["points"][-1]["row_structure"]
    plot_long_play([result], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


class StampedSession:
    """A real tiny session whose frames carry, in pixel (0, 0, 1), the bitmask of the keys of
    the action given `lag` steps earlier (lag 0: the action that produced the frame)."""

    def __init__(self, session, lag: int = 0):
        self.inner, self.lag, self.given = session, lag, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, action):
        frames = self.inner.step(action).copy()
        self.given.append(self.action_space.encode(action))
        vec = self.given[-1 - self.lag] if len(self.given) > self.lag else torch.zeros_like(self.given[-1])
        frames[:, 0, 0, 1] = sum(1 << i for i, x in enumerate(vec.tolist()) if x > 0.5)
        return frames


class BitProbe:
    """Reads the stamped bitmask back, in its own key order (reversed, to test the mapping)."""

    def __init__(self, keys):
        self.cfg = type("Cfg", (), {"keys": list(reversed(keys))})()
        self.index = [keys.index(k) for k in self.cfg.keys]

    def predict(self, before, after):
        bits = after[:, 0, 0, 1].long()
        return torch.stack([(bits >> i) & 1 for i in self.index], 1).bool()


def test_long_play_probe_accuracy_is_aligned_with_the_commanded_actions():
    cfg = ModelConfig.tiny(num_layers=1, latent_height=4, latent_width=4, window_frames=4, sink_frames=1)
    bundle = Bundle.random(cfg, sampler=SamplerConfig(steps=1))
    probe = BitProbe(list(cfg.actions.keys))
    play = LongPlayConfig(frames=120, policy="random", window=40)
    aligned = long_play(StampedSession(open_session(bundle)), play, progress=False, probe=probe)
    assert [p["probe_exact"] for p in aligned["points"]] == [1.0, 1.0, 1.0]
    lagged = long_play(StampedSession(open_session(bundle), lag=1), play, progress=False, probe=probe)
    assert lagged["probe_exact_first"] < 1.0 or lagged["probe_exact_last"] < 1.0


def test_long_play_refuses_a_probe_for_other_keys():
    cfg = ModelConfig.tiny(num_layers=1, latent_height=4, latent_width=4, window_frames=4, sink_frames=1)
    session = open_session(Bundle.random(cfg, sampler=SamplerConfig(steps=1)))
    with pytest.raises(ValueError, match="probe reads keys"):
        long_play(session, LongPlayConfig(frames=10, policy="noop"), progress=False, probe=BitProbe(["jump"]))


def test_policies_give_one_action_per_chunk_and_refuse_unknown_keys():
    cfg = ModelConfig.tiny(num_layers=1, latent_height=4, latent_width=4)
    space = cfg.actions
    assert policy_actions("noop", space, 5, 0) == [None] * 5
    held = policy_actions(f"hold:{space.keys[0]}+{space.keys[1]}", space, 7, 0)
    assert held == [[space.keys[0], space.keys[1]]] * 7
    assert policy_actions("random", space, 40, 1) != policy_actions("random", space, 40, 2)   # per-seed keys
    with pytest.raises(ValueError, match="unknown action key 'jump'"):
        policy_actions("hold:jump", space, 3, 0)
    for bad in ("hold:", "walk"):
        with pytest.raises(ValueError, match="policy must be"):
            policy_actions(bad, space, 3, 0)


def test_collapse_frame_is_the_first_window_under_the_layout():
    points = [{"frame": 100 * (i + 1), "row_structure": r} for i, r in enumerate([190.0, 120.0, 8.0, 150.0])]
    assert collapse_frame(points, 10.0) == 300
    assert collapse_frame(points, 5.0) is None


def test_long_play_holds_a_key_and_reports_its_seed():
    cfg = ModelConfig.tiny(num_layers=1, latent_height=4, latent_width=4, window_frames=4, sink_frames=1)
    bundle = Bundle.random(cfg, sampler=SamplerConfig(steps=1))
    key = cfg.actions.keys[0]
    given = []
    session = open_session(bundle)
    step = session.step
    session.step = lambda action: (given.append(action), step(action))[1]
    result = long_play(session, LongPlayConfig(frames=60, policy=f"hold:{key}", window=20, seed=3,
                                               collapse_layout=1e9), progress=False)
    assert given == [[key]] * len(given) and len(given) >= 60
    assert result["seed"] == 3 and result["policy"] == f"hold:{key}"
    assert result["collapsed_at"] == 20   # every layout is under an absurd threshold: the first window
