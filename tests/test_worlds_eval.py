"""Evaluation against the engine: alignment, metrics, probe, CLI (issue 3)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime import Bundle, ModelConfig
from runtime.codec import PixelCodec
from training.envs import ActionSpec
from training.evaluate import WorldEvalConfig, rollout_pair
from training.probe import InverseDynamicsProbe, ProbeConfig, accuracy, load_probe, train_probe


class StepEnv:
    """Pixel (0,0,0) counts frames, pixel (0,0,1) names the key that produced the frame."""

    def __init__(self):
        self.action_spec = ActionSpec(keys=["a", "b", "c"])

    def _frame(self, producer):
        f = np.zeros((8, 8, 3), np.uint8)
        f[0, 0, 0], f[0, 0, 1] = self.t, producer
        return f

    def reset(self, seed):
        self.t = 0
        return self._frame(0)

    def step(self, action):
        self.t += 1
        held = np.flatnonzero(np.asarray(action) > 0.5)
        return self._frame(held[0] + 1 if len(held) else 0), False


class OracleSession:
    """A 'world model' that knows the engine's rule: right iff actions are aligned as documented."""

    def reset(self, seed, context, context_actions, action_history=None):
        assert len(context_actions) == len(context)
        self.t = int(context[-1, 0, 0, 0])

    def step(self, action):
        self.t += 1
        f = np.zeros((1, 8, 8, 3), np.uint8)
        held = np.flatnonzero(np.asarray(action) > 0.5)
        f[0, 0, 0, 0], f[0, 0, 0, 1] = self.t, held[0] + 1 if len(held) else 0
        return f


def test_rollout_pair_feeds_model_and_engine_the_same_actions():
    cfg = WorldEvalConfig(bundle="", env="", horizon=16, context=3, start_max=5)
    ep = rollout_pair(StepEnv(), OracleSession(), seed=1, cfg=cfg)
    assert ep["real"].shape == (19, 8, 8, 3) and ep["generated"].shape == (16, 8, 8, 3)
    np.testing.assert_array_equal(ep["generated"], ep["real"][3:])       # exact: infinite PSNR
    assert len(set(ep["real"][3:, 0, 0, 1].tolist())) > 1                 # the actions really varied


def test_probe_learns_actions_from_real_pairs(tmp_path):
    rec = subprocess.run([sys.executable, "-m", "forcekit", "record", "--env", "doom:health_gathering",
                          "--episodes", "2", "--max-frames", "120", "--size", "32", "--out", str(tmp_path / "d")],
                         capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    result = train_probe(str(tmp_path / "d"), str(tmp_path / "d"), str(tmp_path / "p"), steps=150, batch=32,
                         lr=2e-3, progress=False, channels=(16, 32))
    chance = 0.5
    assert result["train"]["per_key"] > chance + 0.1, result
    probe = load_probe(tmp_path / "p")
    assert probe.cfg.keys == ["forward", "backward", "turn_left", "turn_right"]
    assert accuracy(torch.tensor([[True, False]]), torch.tensor([[1.0, 0.0]])) == {"exact": 1.0, "per_key": 1.0}


def test_eval_world_cli_end_to_end(tmp_path):
    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=8, window_frames=3, sink_frames=0,
                           action_space={"keys": ["left", "right", "fire"], "values": [], "bindings": {}})
    bundle = Bundle.random(cfg, codec=PixelCodec(2))
    bundle.extra = {"data": str(tmp_path / "train")}
    bundle.save(tmp_path / "b")
    probe = InverseDynamicsProbe(ProbeConfig(keys=["left", "right", "fire"], size=(16, 16)))
    from training.probe import save_probe

    save_probe(probe, tmp_path / "probe")
    cmd = [sys.executable, "-m", "forcekit", "eval", "world", "--bundle", str(tmp_path / "b"), "--env",
           "atari:breakout", "--episodes", "2", "--horizon", "8", "--context", "2", "--steps", "2", "--json",
           "--probe", str(tmp_path / "probe"), "--plot", str(tmp_path / "w.png"), "--video", str(tmp_path / "w.mp4"),
           "--frames", str(tmp_path / "f.png")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(result["psnr_by_horizon"]) == ["1", "2", "4", "8"] and result["episodes"] == 2
    assert all(0 < v < 100 for v in result["psnr_by_horizon"].values())
    assert result["sharpness_ratio"] > 0
    assert 0 <= result["probe"]["generated_exact"] <= 1 and result["seeds"][0] >= 100000
    assert (tmp_path / "w.png").stat().st_size > 0 and (tmp_path / "w.mp4").stat().st_size > 0
    import matplotlib.image

    grid = matplotlib.image.imread(tmp_path / "f.png")   # 2 episodes x (real, generated), 4 horizons, 2x scale
    side = 2 * (bundle.frame_size[0] + 2)
    assert grid.shape[:2] == (4 * side, 4 * side), grid.shape
    bi = subprocess.run(cmd[:cmd.index("--probe")] + ["--mode", "bidirectional"], capture_output=True, text=True)
    assert bi.returncode == 0, bi.stderr[-2000:]
    result = json.loads(bi.stdout.strip().splitlines()[-1])
    assert result["mode"] == "bidirectional" and result["episodes"] == 2 and result["steps"] == 2


def test_copy_baseline_is_exact_for_a_static_engine():
    from training.evaluate import CopyLastFrame

    class Static(StepEnv):
        def step(self, action):
            return self._frame(0), False

    env = Static()
    env.t = 0
    ep = rollout_pair(env, CopyLastFrame(), seed=0, cfg=WorldEvalConfig(bundle="", env="", horizon=4, context=2))
    np.testing.assert_array_equal(ep["generated"], ep["real"][2:])


def test_eval_world_refuses_training_seeds(tmp_path):
    rec = subprocess.run([sys.executable, "-m", "forcekit", "record", "--env", "atari:breakout", "--episodes", "1",
                          "--max-frames", "4", "--size", "16", "--seed", "100000", "--out", str(tmp_path / "train")],
                         capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=8,
                           action_space={"keys": ["left", "right", "fire"], "values": [], "bindings": {}})
    bundle = Bundle.random(cfg, codec=PixelCodec(2))
    bundle.extra = {"data": str(tmp_path / "train")}
    bundle.save(tmp_path / "b")
    from training.evaluate import evaluate_world

    with pytest.raises(ValueError, match="used to train"):
        evaluate_world(WorldEvalConfig(bundle=str(tmp_path / "b"), env="atari:breakout", episodes=1), progress=False)


def test_horizontal_pan_finds_the_shift_and_its_sign():
    from training.metrics import horizontal_pan

    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 16, 32, 3), dtype=np.uint8))
    moved = torch.stack([torch.roll(f, s, dims=1) for f, s in zip(frames, (4, -2, 0))])
    assert horizontal_pan(frames, moved).tolist() == [4, -2, 0]
    with pytest.raises(ValueError, match="max_shift"):
        horizontal_pan(frames, moved, max_shift=32)


def test_floor_stream_is_positive_when_the_floor_moves_down_and_the_ceiling_up():
    from training.metrics import floor_stream

    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 24, 16, 3), dtype=np.uint8))
    moved = frames.clone()
    for i, s in enumerate((2, -1, 0, 3)):   # bottom third moves down by s, top third up by s
        moved[i, 16:] = torch.roll(frames[i, 16:], s, 0)
        moved[i, :8] = torch.roll(frames[i, :8], -s, 0)
    assert floor_stream(frames, moved).tolist() == [4, -2, 0, 6]
    assert floor_stream(frames, frames).tolist() == [0, 0, 0, 0]   # a still view streams nothing
    with pytest.raises(ValueError, match="max_shift"):
        floor_stream(frames, moved, max_shift=8)


def test_laplacian_variance_is_lower_for_a_blurred_frame():
    from training.metrics import laplacian_variance

    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)).float()
    blurred = torch.nn.functional.avg_pool2d(frames.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)
    sharp, soft = laplacian_variance(frames), laplacian_variance(blurred)
    assert sharp.shape == (2,) and (soft < 0.2 * sharp).all()
