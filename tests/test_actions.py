"""Actions that are not finite numbers are refused everywhere: `ActionSpace.encode`, the session's step."""

import math

import numpy as np
import pytest
import torch

from runtime import ActionSpace, open_session

SPACE = ActionSpace(keys=("forward", "left"), values=("mouse_x",))


@pytest.mark.parametrize("action", [
    [math.nan, 0.0, 0.0], [0.0, math.inf, 0.0], [0.0, 0.0, -math.inf],
    np.array([0.0, np.nan, 0.0]), torch.tensor([0.0, 0.0, float("inf")]),
    [0.0, 0.0, 1e300],  # finite in float64, infinite once stored as float32
    {"keys": ["forward"], "mouse_x": math.nan}, {"mouse_x": math.inf}, {"mouse_x": -1e39}, {"mouse_x": 10**400},
])
def test_non_finite_actions_are_refused(action):
    with pytest.raises(ValueError, match="finite"):
        SPACE.encode(action)


@pytest.mark.parametrize("action", [[10**400, 0, 0], [[1, 0], [0]], ["forward", 1.0]])
def test_unreadable_vectors_are_a_value_error(action):
    with pytest.raises(ValueError, match="as an action"):
        SPACE.encode(action)


def test_finite_actions_still_encode():
    assert SPACE.encode({"keys": ["left"], "mouse_x": -2.5}).tolist() == [0.0, 1.0, -2.5]
    assert SPACE.encode([1, 0, 3]).tolist() == [1.0, 0.0, 3.0]
    assert SPACE.encode({"mouse_x": 3.0e38}).tolist()[2] == pytest.approx(3.0e38)


def test_a_session_refuses_a_nan_action_and_keeps_going():
    session = open_session("random-tiny")
    dim = session.action_space.dim
    with pytest.raises(ValueError, match="finite"):
        session.step([math.nan] + [0.0] * (dim - 1))
    frames = session.step(["forward"])
    assert frames.dtype == np.uint8 and session.stats()["chunks"] == 1


def test_a_session_refuses_non_finite_audio_features():
    from runtime import Bundle, ModelConfig

    session = open_session(Bundle.random(ModelConfig.tiny(audio_dim=4)))
    with pytest.raises(ValueError, match="finite"):
        session.step(None, audio=np.full((1, 4), np.inf, np.float32))
    assert session.step(None, audio=np.zeros((1, 4), np.float32)).dtype == np.uint8
