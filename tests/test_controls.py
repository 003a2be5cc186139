"""`eval controls`: held-key response of a model against its engine."""

import json
import subprocess
import sys

import numpy as np
import pytest

from training.controls import ControlEvalConfig, control_response
from training.envs import ActionSpec


def texture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 16, 3), dtype=np.uint8)


class ShiftEnv:
    """A seeded texture that 'left'/'right' scroll by one pixel per frame; 'fire' does nothing.
    Pixel row 0 stores the scroll position so that a session can read the state off a frame."""

    def __init__(self):
        self.action_spec = ActionSpec(keys=["left", "right", "fire"])

    def _frame(self):
        f = np.roll(texture(self.seed), self.x, axis=1)
        f[0, 0, 0] = self.x % 256
        return f

    def reset(self, seed):
        self.seed, self.x = seed, 0
        return self._frame()

    def step(self, action):
        self.x += int(action[1] > 0.5) - int(action[0] > 0.5)
        return self._frame(), False


class OracleSession(ShiftEnv):
    """Knows the engine's rule: as responsive as the engine."""

    def reset(self, seed, context, context_actions, action_history=None):
        assert len(context_actions) == len(context)
        self.seed, self.x = seed % 1_000_003, int(context[-1, 0, 0, 0])

    def step(self, action):
        return super().step(action)[0][None]


class DeafSession(OracleSession):
    """Ignores the keys."""

    def step(self, action):
        return ShiftEnv.step(self, np.zeros(3))[0][None]


def test_oracle_matches_the_engine_and_a_deaf_model_scores_zero():
    cfg = ControlEvalConfig(bundle="", env="", episodes=3, hold=5, context=2, start_max=6)
    oracle = control_response(ShiftEnv(), OracleSession(), cfg)
    assert oracle["episodes"] == 3 and oracle["response_ratio"] == pytest.approx(1.0)
    assert oracle["keys"]["left"]["engine"] > 10 and oracle["keys"]["fire"]["engine"] == 0
    assert oracle["keys"]["fire"]["ratio"] is None           # the engine itself ignores 'fire'
    assert oracle["sampling_spread"] == 0                   # a deterministic 'model'
    deaf = control_response(ShiftEnv(), DeafSession(), cfg)
    assert deaf["response_ratio"] == 0 and deaf["keys"]["left"]["engine"] == oracle["keys"]["left"]["engine"]


class MirroredSession(OracleSession):
    """Reacts as strongly as the engine, but turns the wrong way."""

    def step(self, action):
        return ShiftEnv.step(self, np.asarray(action)[[1, 0, 2]])[0][None]


class ShimmeringSession(OracleSession):
    """Follows the keys, but adds fresh noise to every frame: nothing stands still."""

    calls = 0

    def step(self, action):
        frame = super().step(action)[0].astype(np.int16)
        ShimmeringSession.calls += 1
        noise = np.random.default_rng(ShimmeringSession.calls).integers(-20, 21, frame.shape)
        return np.clip(frame + noise, 0, 255).astype(np.uint8)[None]


def test_pan_direction_and_stillness():
    cfg = ControlEvalConfig(bundle="", env="", episodes=2, hold=4, context=2, start_max=4, still=6)
    oracle = control_response(ShiftEnv(), OracleSession(), cfg)
    left, right = oracle["keys"]["left"], oracle["keys"]["right"]
    assert left["pan_engine"] == -1 and left["pan_model"] == -1 and right["pan_model"] == 1
    assert left["pan_same_way"] == 1 and oracle["keys"]["fire"]["pan_same_way"] is None
    assert {"stream_engine", "stream_model", "stream_same_way"} <= set(left)   # walking's direction, per key
    assert oracle["still"]["engine_change"] == 0 and oracle["still"]["model_change"] == 0
    assert oracle["still"]["model_min_psnr"] == 100 and oracle["still"]["starts"] == 2
    assert oracle["still"]["at_rest"] == {"starts": 2, "rest_db": 30.0, "engine_change": 0, "model_change": 0,
                                          "model_min_psnr": 100, "model_min_psnr_mean": 100}
    mirrored = control_response(ShiftEnv(), MirroredSession(), cfg)
    assert mirrored["response_ratio"] == pytest.approx(1.0)      # the response ratio cannot tell ...
    assert mirrored["keys"]["left"]["pan_same_way"] == 0          # ... but the pan can
    assert mirrored["keys"]["left"]["pan_model"] == 1
    shimmer = control_response(ShiftEnv(), ShimmeringSession(), cfg)
    assert shimmer["still"]["model_change"] > 5 and shimmer["still"]["model_min_psnr"] < 30
    assert shimmer["keys"]["left"]["pan_same_way"] == 1


class CoastingEnv(ShiftEnv):
    """Keeps scrolling with no key held (as Doom's momentum carries the view on after a key is released)."""

    def step(self, action):
        self.x += 1
        return super().step(action)


class CoastingOracle(CoastingEnv, OracleSession):
    def step(self, action):
        return CoastingEnv.step(self, action)[0][None]


def test_stillness_against_the_engine_where_the_engine_itself_keeps_moving():
    cfg = ControlEvalConfig(bundle="", env="", episodes=2, hold=4, context=2, start_max=4, still=6)
    still = control_response(CoastingEnv(), CoastingOracle(), cfg)["still"]
    # the last real frame is no fair target here: the engine's own frames leave it, and so does a faithful model
    assert still["engine_min_psnr"] < 30 and still["model_min_psnr"] < 30
    assert still["model_min_psnr_vs_engine"] == 100 and still["model_min_psnr_vs_engine_mean"] == 100
    assert still["at_rest"] == {"starts": 0, "rest_db": 30.0}    # no start where the engine stands still
    frozen = control_response(CoastingEnv(), DeafSession(), cfg)["still"]   # a model that stops dead
    assert frozen["model_min_psnr_vs_engine"] < 30


class SlowingEnv(ShiftEnv):
    """Coasts on its own for the first 30 frames of an episode, then stands still unless a key is held."""

    def reset(self, seed):
        self.t = 0
        return super().reset(seed)

    def step(self, action):
        self.t += 1
        self.x += int(self.t <= 30)
        return super().step(action)


class SlowingOracle(SlowingEnv, OracleSession):
    def reset(self, seed, context, context_actions, action_history=None):
        OracleSession.reset(self, seed, context, context_actions, action_history)
        self.t = len(context) + len(action_history or [])

    def step(self, action):
        return SlowingEnv.step(self, action)[0][None]


def test_the_still_check_starts_once_the_engine_has_settled():
    cfg = ControlEvalConfig(bundle="", env="", episodes=2, hold=4, context=2, start_max=4, still=6, settle=0)
    coasting = control_response(SlowingEnv(), SlowingOracle(), cfg)["still"]
    assert coasting["settle"] == 0 and coasting["at_rest"]["starts"] == 0 and coasting["engine_change"] > 0
    cfg.settle = 32
    settled = control_response(SlowingEnv(), SlowingOracle(), cfg)["still"]
    assert settled["engine_change"] == 0 and settled["at_rest"]["starts"] == 2
    assert settled["model_min_psnr"] == 100 == settled["at_rest"]["model_min_psnr"]


def test_a_nondeterministic_engine_is_refused():
    class Drifting(ShiftEnv):
        resets = 0

        def reset(self, seed):
            Drifting.resets += 1
            self.seed, self.x = seed, Drifting.resets
            return self._frame()

    with pytest.raises(RuntimeError, match="not deterministic"):
        control_response(Drifting(), OracleSession(), ControlEvalConfig(bundle="", env="", episodes=1, context=2))


def test_eval_controls_cli_on_a_real_engine(tmp_path):
    from runtime import Bundle, ModelConfig
    from runtime.codec import PixelCodec

    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=8, window_frames=3, sink_frames=0,
                           action_space={"keys": ["left", "right", "fire"], "values": [], "bindings": {}})
    Bundle.random(cfg, codec=PixelCodec(2)).save(tmp_path / "b")
    out = subprocess.run([sys.executable, "-m", "forcekit", "eval", "controls", "--bundle", str(tmp_path / "b"),
                          "--env", "atari:breakout", "--episodes", "1", "--hold", "3", "--context", "2", "--json",
                          "--guidance", "2.0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["keys"]) == {"left", "right", "fire"} and result["guidance"] == 2.0
    assert result["engine_response"] > 0 and result["model_response"] > 0   # a random model still reacts


def test_eval_controls_plays_a_teacher_bidirectionally(tmp_path):
    from runtime import Bundle, ModelConfig
    from runtime.codec import PixelCodec
    from training.controls import evaluate_controls

    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=8, window_frames=3, sink_frames=0,
                           stack_frames=1, action_space={"keys": ["left", "right", "fire"], "values": [],
                                                         "bindings": {}})
    Bundle.random(cfg, codec=PixelCodec(2)).save(tmp_path / "b")
    result = evaluate_controls(ControlEvalConfig(bundle=str(tmp_path / "b"), env="atari:breakout", episodes=1,
                                                 hold=2, context=2, steps=2, still=3, mode="bidirectional"),
                               progress=False)
    assert result["steps"] == 2 and result["still"]["frames"] == 3 and result["model_response"] > 0
    with pytest.raises(ValueError, match="unknown controls mode"):
        evaluate_controls(ControlEvalConfig(bundle=str(tmp_path / "b"), env="atari:breakout", episodes=1,
                                            mode="bogus"), progress=False)
