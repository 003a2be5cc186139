"""Start scenes: bundles that carry real frames to start streams from, and `forcekit ship`."""

import numpy as np
import pytest

from forcekit.cli import main
from runtime import Bundle, ModelConfig, open_session
from runtime.bundle import BundleError
from runtime.start_scenes import START_SCENES_FILE, StartScenes
from training.data import ShardStore
from training.data.shards import Episode


def _scenes(n_scenes=3, frames=2, size=(8, 8), dim=5, seed=0) -> StartScenes:
    rng = np.random.default_rng(seed)
    return StartScenes(rng.integers(0, 255, (n_scenes, frames, *size, 3), dtype=np.uint8),
                       (rng.random((n_scenes, frames, dim)) > 0.5).astype(np.float32))


def _bundle_with_scenes(tmp_path) -> tuple[Bundle, StartScenes]:
    b = Bundle.random(ModelConfig.tiny(), seed=0)
    b.start_scenes = _scenes()
    b.save(tmp_path / "b")
    return Bundle.load(tmp_path / "b"), b.start_scenes


def test_start_scenes_round_trip_and_sessions_start_from_them(tmp_path):
    loaded, scenes = _bundle_with_scenes(tmp_path)
    np.testing.assert_array_equal(loaded.start_scenes.frames, scenes.frames)
    np.testing.assert_array_equal(loaded.start_scenes.actions, scenes.actions)

    s = open_session(loaded, steps=2)
    frames_from_scene = [s.step(["forward"]) for _ in range(3)]
    # the same as passing scene seed % S explicitly as context
    s.reset(seed=0, context=scenes.frames[0], context_actions=list(scenes.actions[0]))
    explicit = [s.step(["forward"]) for _ in range(3)]
    for a, b in zip(frames_from_scene, explicit):
        np.testing.assert_array_equal(a, b)
    # the scene matters: without it (noise start) or with another scene the frames differ
    s.reset(seed=0, start_scene=False)
    assert not np.array_equal(s.step(["forward"]), frames_from_scene[0])
    s.reset(seed=4)   # scene 4 % 3 == 1
    from_seed = s.step(["forward"])
    s.reset(seed=4, context=scenes.frames[1], context_actions=list(scenes.actions[1]))
    np.testing.assert_array_equal(s.step(["forward"]), from_seed)
    s.reset(seed=4, context=scenes.frames[0], context_actions=list(scenes.actions[0]))
    assert not np.array_equal(s.step(["forward"]), from_seed)


def test_truncated_or_mismatched_start_scenes_are_named(tmp_path):
    _bundle_with_scenes(tmp_path)
    f = tmp_path / "b" / START_SCENES_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=START_SCENES_FILE):
        Bundle.load(tmp_path / "b")
    _scenes(size=(16, 16)).save(f)
    with pytest.raises(BundleError, match="16x16"):
        Bundle.load(tmp_path / "b")
    _scenes(dim=3).save(f)
    with pytest.raises(BundleError, match="action space has 5"):
        Bundle.load(tmp_path / "b")


def test_ship_cuts_scenes_from_recorded_episodes(tmp_path, capsys):
    store = ShardStore(tmp_path / "data")
    store.write_meta({"engine": "x", "resolution": [8, 8], "action_space": {"keys": list("abcde")}})
    rng = np.random.default_rng(0)
    eps = [Episode(rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
                   (rng.random((n, 5)) > 0.5).astype(np.float32), seed) for seed, n in enumerate([6, 7, 9, 5])]
    store.append(eps)
    Bundle.random(ModelConfig.tiny(), seed=0).save(tmp_path / "trained")
    card = tmp_path / "card.md"
    card.write_text("# shipped\n\nmeasured things\n")
    assert main(["ship", "--bundle", str(tmp_path / "trained"), "--out", str(tmp_path / "models" / "default"),
                 "--start-data", str(tmp_path / "data"), "--scenes", "3", "--scene-frames", "3",
                 "--card", str(card), "--name", "default", "--steps", "3"]) == 0
    shipped = Bundle.load(tmp_path / "models" / "default")
    assert shipped.name == "default" and shipped.card == card.read_text() and shipped.sampler.steps == 3
    scenes = shipped.start_scenes
    assert scenes.frames.shape == (3, 3, 8, 8, 3)
    all_frames = np.concatenate([e.frames for e in eps])
    all_actions = np.concatenate([e.actions for e in eps])
    starts = np.cumsum([0] + [len(e.frames) for e in eps])
    for frames, actions in zip(scenes.frames, scenes.actions):
        # a real run of consecutive frames of one episode, with each frame's conditioning action
        row = next(i for i in range(len(all_frames)) if np.array_equal(all_frames[i], frames[0]))
        episode = int(np.searchsorted(starts, row, side="right") - 1)
        assert row + 3 <= starts[episode + 1]
        np.testing.assert_array_equal(all_frames[row:row + 3], frames)
        for j in range(3):
            expected = np.zeros(5, np.float32) if row + j == starts[episode] else all_actions[row + j - 1]
            np.testing.assert_array_equal(actions[j], expected)
    capsys.readouterr()
    assert main(["ship", "--bundle", str(tmp_path / "trained"), "--out", str(tmp_path / "x"),
                 "--start-data", str(tmp_path / "data"), "--scenes", "3", "--scene-frames", "7"]) == 1
    assert "only 2 episodes have 7 frames" in capsys.readouterr().err
