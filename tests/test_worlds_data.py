"""Engines, recording, shard storage and the clip dataset (issue 3)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from training.data import ClipDataset, ShardError, ShardStore, check_dir
from training.data.record import RandomSticky, RecordConfig, record
from training.data.shards import Episode, open_shard
from training.envs import ActionSpec, make_env, parse_env


class CounterEnv:
    """Synthetic engine: pixel (0,0) holds the frame index, pixel (0,1) the action that produced it."""

    def __init__(self, length: int = 9, size=(8, 8)) -> None:
        self.action_spec = ActionSpec(keys=["a", "b", "c"], bindings={"x": "a"})
        self.fps, self.size, self.length = 10.0, size, length

    def _frame(self, producer: int) -> np.ndarray:
        f = np.zeros((*self.size, 3), np.uint8)
        f[0, 0, 0], f[0, 0, 1] = self.t, producer
        return f

    def reset(self, seed: int) -> np.ndarray:
        self.t = 0
        return self._frame(255)

    def step(self, action):
        self.t += 1
        producer = int(np.flatnonzero(action > 0.5)[0]) + 1 if (action > 0.5).any() else 0
        return self._frame(producer), self.t >= self.length

    def metadata(self) -> dict:
        return {"engine": "counter", "version": "0", "fps": self.fps, "resolution": list(self.size),
                "action_space": self.action_spec.to_dict()}

    def close(self) -> None:
        pass


def _record_counter(out, episodes=3, per_shard=2, length=9):
    cfg = RecordConfig(env="counter", episodes=episodes, episodes_per_shard=per_shard, max_hold=3)
    return record(cfg, str(out), progress=False, env=CounterEnv(length))


@pytest.mark.parametrize("spec", ["doom:health_gathering", "atari:breakout", "atari:pong"])
def test_record_a_few_steps_from_each_engine(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # ViZDoom must not litter the cwd: it runs in a scratch dir
    cfg = RecordConfig(env=spec, episodes=2, max_frames=6, episodes_per_shard=1, size=(64, 64))
    out = tmp_path / "rec"
    assert record(cfg, str(out), progress=False)["episodes"] == 2
    summary, bad = check_dir(out)
    assert bad == [] and summary["episodes"] == 2 and summary["frames"] == 12
    assert summary["resolution"] == [64, 64] and summary["engine"] in ("vizdoom", "ale")
    arr = open_shard(ShardStore(out).shard_paths()[0])
    assert arr["frames"].shape == (6, 64, 64, 3) and arr["frames"].dtype == np.uint8
    assert arr["frames"].std() > 0                            # a real picture, not a blank buffer
    assert not (tmp_path / "_vizdoom.ini").exists()


def test_parallel_recording_writes_the_shards_of_a_serial_one(tmp_path, monkeypatch):
    """`--jobs N`: episode i keeps seed + i and its own policy RNG, and episodes are stored in order, so two
    engine processes write the same shards as one (the GPU recipe records on all the machine's cores)."""
    monkeypatch.chdir(tmp_path)
    base = dict(env="doom:health_gathering", episodes=3, max_frames=12, episodes_per_shard=2, idle_prob=0.3)
    record(RecordConfig(**base), str(tmp_path / "one"), progress=False)
    record(RecordConfig(**base, jobs=2), str(tmp_path / "two"), progress=False)
    one, two = (ShardStore(tmp_path / d).shard_paths() for d in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two] == ["shard_00000.npz", "shard_00001.npz"]
    for a, b in zip(one, two):
        a, b = open_shard(a), open_shard(b)
        assert np.array_equal(a["frames"], b["frames"]) and np.array_equal(a["actions"], b["actions"])
    with pytest.raises(ValueError, match="jobs=1 with env"):
        record(RecordConfig(env="counter", jobs=2), str(tmp_path / "x"), progress=False, env=CounterEnv())


def test_doom_actions_change_the_view():
    env = make_env("doom:health_gathering")
    try:
        spec = env.action_spec
        assert {"forward", "backward", "turn_left", "turn_right"} <= set(spec.keys)
        assert spec.bindings["w"] == "forward" and spec.bindings["a"] == "turn_left"
        first = env.reset(3)
        for _ in range(4):
            turned, _ = env.step(spec.vector(["turn_left"]))
        assert np.abs(turned.astype(int) - first.astype(int)).mean() > 2
        with pytest.raises(ValueError, match="length"):
            env.step(np.zeros(7, np.float32))
    finally:
        env.close()


def test_bad_env_spec_is_rejected():
    with pytest.raises(ValueError, match="doom:<scenario>"):
        parse_env("quake:e1m1")
    with pytest.raises(ValueError, match="scenario"):
        make_env("doom:no_such_map")


def test_random_sticky_holds_and_covers_every_key():
    spec = ActionSpec(keys=["forward", "backward", "turn_left", "turn_right"])
    pol = RandomSticky(spec, np.random.default_rng(0), max_hold=8)
    acts = np.stack([pol(None) for _ in range(4000)])
    assert ((acts[:, 0] > 0) & (acts[:, 1] > 0)).sum() == 0          # never forward and backward at once
    frac = (acts > 0).mean(0)
    assert (frac > 0.2).all(), frac
    changes = (np.abs(np.diff(acts, axis=0)).sum(1) > 0).mean()
    assert changes < 0.35                      # actions are held, not resampled every frame


def _idle_runs(acts: np.ndarray) -> list[int]:
    """Lengths of the stretches with no key held."""
    runs, run = [], 0
    for idle in acts.sum(1) == 0:
        if idle:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    return runs + ([run] if run else [])


def test_idle_stretches_bring_the_world_to_rest_and_zero_draws_as_before():
    spec = ActionSpec(keys=["forward", "backward", "turn_left", "turn_right"])
    pol, base = RandomSticky(spec, np.random.default_rng(3), 8), RandomSticky(spec, np.random.default_rng(3), 8,
                                                                                idle_prob=0.0)
    np.testing.assert_array_equal(np.stack([pol(None) for _ in range(500)]),
                                  np.stack([base(None) for _ in range(500)]))
    idle = RandomSticky(spec, np.random.default_rng(3), 8, idle_prob=0.2, idle_hold=(16, 24))
    acts = np.stack([idle(None) for _ in range(6000)])
    long_runs = sum(r >= 16 for r in _idle_runs(acts))
    plain_long_runs = sum(r >= 16 for r in _idle_runs(np.stack([base(None) for _ in range(6000)])))
    assert long_runs > 20 and long_runs > 5 * plain_long_runs, (long_runs, plain_long_runs)
    assert ((acts > 0).mean(0) > 0.1).all()                    # every key is still held in a good share
    with pytest.raises(ValueError, match="idle_prob"):
        RandomSticky(spec, np.random.default_rng(0), 8, idle_prob=1.5)
    with pytest.raises(ValueError, match="idle_hold"):
        RandomSticky(spec, np.random.default_rng(0), 8, idle_prob=0.1, idle_hold=(10, 5))


def test_shard_round_trip(tmp_path):
    store = ShardStore(tmp_path)
    store.write_meta({"engine": "x", "resolution": [4, 4], "action_space": {"keys": ["a", "b"]}})
    rng = np.random.default_rng(0)
    eps = [Episode(rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8),
                   rng.random((n, 2)).astype(np.float32), s) for n, s in [(5, 10), (3, 11)]]
    path = store.append(eps)
    arr = open_shard(path)
    np.testing.assert_array_equal(arr["frames"], np.concatenate([e.frames for e in eps]))
    np.testing.assert_array_equal(arr["actions"], np.concatenate([e.actions for e in eps]))
    assert arr["episode_lengths"].tolist() == [5, 3] and arr["episode_seeds"].tolist() == [10, 11]
    with pytest.raises(ValueError, match="differs"):
        store.write_meta({"engine": "y", "resolution": [4, 4], "action_space": {"keys": ["a", "b"]}})


def test_atomic_append_survives_a_crash(tmp_path, monkeypatch):
    _record_counter(tmp_path, episodes=2, per_shard=2)
    before = ShardStore(tmp_path).shard_paths()

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr("training.data.shards.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _record_counter(tmp_path, episodes=4, per_shard=2)
    monkeypatch.undo()
    assert ShardStore(tmp_path).shard_paths() == before              # only complete shards are visible
    assert list(tmp_path.glob(".shard_*.tmp"))                        # the half-written one stayed hidden
    summary, bad = check_dir(tmp_path)
    assert bad == [] and summary["episodes"] == 2
    assert len(ClipDataset(tmp_path, clip_frames=4)) > 0
    # The rerun removes the stale temp file and continues where the complete shards end.
    _record_counter(tmp_path, episodes=4, per_shard=2)
    assert not list(tmp_path.glob(".shard_*.tmp"))
    assert check_dir(tmp_path)[0]["episodes"] == 4


def test_resumed_recording_equals_an_uninterrupted_one(tmp_path):
    _record_counter(tmp_path / "a", episodes=2, per_shard=2)
    _record_counter(tmp_path / "a", episodes=5, per_shard=2)           # rerun continues
    _record_counter(tmp_path / "b", episodes=5, per_shard=2)
    da, db = ClipDataset(tmp_path / "a", 1), ClipDataset(tmp_path / "b", 1)
    np.testing.assert_array_equal(da.all_frames(), db.all_frames())
    acts = [np.concatenate([open_shard(p)["actions"] for p in ShardStore(tmp_path / d).shard_paths()])
            for d in "ab"]
    np.testing.assert_array_equal(acts[0], acts[1])
    assert [r[3] for r in da.episode_rows] == [0, 1, 2, 3, 4]          # episode i used seed SEED+i


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    _record_counter(tmp_path, episodes=6, per_shard=2)
    paths = ShardStore(tmp_path).shard_paths()
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])                      # truncated
    flipped = bytearray(paths[1].read_bytes())
    mid = len(flipped) // 3
    flipped[mid:mid + 16] = bytes(255 - b for b in flipped[mid:mid + 16])
    paths[1].write_bytes(bytes(flipped))                              # corrupt payload
    summary, bad = check_dir(tmp_path)
    assert summary["bad_shards"] == 2 and summary["episodes"] == 2    # the good shard still counts
    assert any(str(paths[0]) in b for b in bad) and any(str(paths[1]) in b for b in bad)
    with pytest.raises(ShardError, match=paths[0].name):
        ClipDataset(tmp_path, clip_frames=2)
    out = subprocess.run([sys.executable, "-m", "forcekit", "data", "check", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert paths[0].name in out.stderr and paths[1].name in out.stderr and paths[2].name not in out.stderr


def test_clip_alignment_action_t_produces_frame_t_plus_1(tmp_path):
    _record_counter(tmp_path, episodes=3, per_shard=2, length=9)
    ds = ClipDataset(tmp_path, clip_frames=5)
    assert ds.episodes == 3 and ds.frames_total == 27
    assert len(ds) == 3 * (9 - 5 + 1)                                 # clips never cross episodes
    for i in range(len(ds)):
        clip = ds[i]
        f, a = clip["frames"].numpy(), clip["actions"].numpy()
        assert f.shape == (5, 8, 8, 3) and a.shape == (5, 3)
        assert f[:, 0, 0, 0].tolist() == list(range(clip["start"], clip["start"] + 5))
        for t in range(4):
            held = np.flatnonzero(a[t] > 0.5)
            assert f[t + 1, 0, 0, 1] == (held[0] + 1 if len(held) else 0)
    batch = ds.sample(4, torch.Generator().manual_seed(0))
    assert batch["frames"].shape == (4, 5, 8, 8, 3) and batch["actions"].shape == (4, 5, 3)
    held_out = ClipDataset(tmp_path, clip_frames=5, seeds={1})
    assert held_out.episodes == 1 and {held_out[i]["seed"] for i in range(len(held_out))} == {1}


def test_action_spec_converts_to_the_runtime_action_space():
    env = make_env("atari:pong")
    try:
        space = env.action_spec.to_runtime()
        assert list(space.keys) == env.action_spec.keys
        assert torch.equal(space.encode(["fire"]), torch.from_numpy(env.action_spec.vector(["fire"])))
        assert space.from_keyboard(["up", "space"]) == ["right", "fire"]     # Pong: up arrow moves the paddle up
        assert env.engine_action(env.action_spec.vector(["right", "fire"])) == 4   # RIGHTFIRE
        assert env.engine_action(env.action_spec.vector([])) == 0                  # NOOP
    finally:
        env.close()
