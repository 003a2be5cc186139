"""The recorder: run an engine under a policy and append whole episodes as atomic shards.

Resumable: episode i always uses seed `seed + i`, and a rerun counts the episodes already in
complete shards and continues with the next one, so a killed-and-restarted recording equals an
uninterrupted one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from training.data.shards import Episode, ShardStore, open_shard
from training.envs import ActionSpec, make_env

# Pairs of keys that cancel out; the random policy never holds both.
OPPOSITES = [{"forward", "backward"}, {"turn_left", "turn_right"}, {"left", "right"}, {"up", "down"},
             {"strafe_left", "strafe_right"}]


@dataclass
class RecordConfig:
    env: str = "doom:health_gathering"
    episodes: int = 10
    policy: str = "random-sticky"
    seed: int = 0
    size: tuple[int, int] | None = None   # None: 64x64 for engines, 96x96 for lipsync face crops
    frame_skip: int | None = None
    episodes_per_shard: int = 8
    max_frames: int = 1000          # cap on frames per episode
    max_hold: int = 12              # random-sticky: hold an action for 1..max_hold frames
    # random-sticky: the chance that a new hold is an idle stretch (no key for idle_hold[0]..idle_hold[1]
    # frames). Doom keeps most of its speed from tic to tic, so only a long idle stretch reaches a world
    # that stands still; plain sticky holds almost never do (0.07% of frames).
    idle_prob: float = 0.0
    idle_hold: tuple[int, int] = (16, 48)
    jobs: int = 1                   # engine processes recording in parallel (the shards are the same as with 1)


class RandomSticky:
    """Hold a uniformly drawn key combination for a uniformly drawn 1..max_hold frames.

    The combinations are noop, every single key, and every pair of non-opposite keys, so every
    key is held in a good share of frames, alone and combined (e.g. forward + turn). With
    ``idle_prob`` > 0 a new hold is, with that chance, no key for ``idle_hold`` frames instead: the
    stretches in which a world with momentum comes to rest. ``idle_prob`` 0 draws exactly as before.
    """

    def __init__(self, spec: ActionSpec, rng: np.random.Generator, max_hold: int, idle_prob: float = 0.0,
                 idle_hold: tuple[int, int] = (16, 48)) -> None:
        if not 0.0 <= idle_prob <= 1.0:
            raise ValueError(f"idle_prob must be in [0, 1], got {idle_prob}")
        if not 1 <= idle_hold[0] <= idle_hold[1]:
            raise ValueError(f"idle_hold must be 1 <= min <= max, got {idle_hold}")
        keys = spec.keys
        combos = [()] + [(k,) for k in keys]
        combos += [c for c in itertools.combinations(keys, 2) if set(c) not in OPPOSITES]
        self.vectors = [spec.vector(list(c)) for c in combos]
        self.rng, self.max_hold = rng, max_hold
        self.idle_prob, self.idle_hold = idle_prob, idle_hold
        self._left, self._current = 0, self.vectors[0]

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self._left <= 0:
            if self.idle_prob and self.rng.random() < self.idle_prob:
                self._current = self.vectors[0]
                self._left = int(self.rng.integers(self.idle_hold[0], self.idle_hold[1] + 1))
            else:
                self._current = self.vectors[self.rng.integers(len(self.vectors))]
                self._left = int(self.rng.integers(1, self.max_hold + 1))
        self._left -= 1
        return self._current


POLICIES = {"random-sticky": RandomSticky}


def record_episode(env, policy, seed: int, max_frames: int) -> Episode:
    frames, actions = [env.reset(seed)], []
    while True:
        a = policy(frames[-1])
        actions.append(a)
        frame, done = env.step(a)
        if done or len(frames) >= max_frames:
            break
        frames.append(frame)
    return Episode(frames=np.stack(frames), actions=np.stack(actions[: len(frames)]).astype(np.float32),
                   seed=seed)


def _engine(cfg: RecordConfig):
    return make_env(cfg.env, size=cfg.size or (64, 64), frame_skip=cfg.frame_skip)


def _record_one(cfg: RecordConfig, env, i: int) -> Episode:
    """Episode ``i``: seed + i, and its own policy RNG, which keeps a resumed (or parallel) recording identical
    to an uninterrupted one."""
    policy = POLICIES[cfg.policy](env.action_spec, np.random.default_rng([cfg.seed, i]), cfg.max_hold,
                                  cfg.idle_prob, cfg.idle_hold)
    return record_episode(env, policy, cfg.seed + i, cfg.max_frames)


_worker: dict = {}   # a recording worker's own engine and config


def _start_worker(cfg: RecordConfig) -> None:
    _worker["cfg"], _worker["env"] = cfg, _engine(cfg)


def _record_in_worker(i: int) -> Episode:
    return _record_one(_worker["cfg"], _worker["env"], i)


def episodes_done(store: ShardStore) -> int:
    return sum(len(open_shard(p, ("episode_lengths",))["episode_lengths"]) for p in store.shard_paths())


def record(cfg: RecordConfig, out: str, progress: bool = True, env=None) -> dict:
    """Record until `cfg.episodes` episodes are stored in `out`; returns a small summary.

    `env` overrides the engine built from `cfg.env` (tests use a synthetic one).
    """
    if cfg.env.startswith("lipsync:") and env is None:
        # Synthetic speaking faces: no engine or policy, the clip's speech drives everything.
        from training.lipsync.record import LipsyncConfig, record_lipsync

        lcfg = LipsyncConfig(split=cfg.env.partition(":")[2], size=cfg.size or (96, 96),
                             max_frames=cfg.max_frames)
        return record_lipsync(lcfg, out, cfg.episodes, cfg.seed, cfg.episodes_per_shard, progress)
    if cfg.policy not in POLICIES:
        raise ValueError(f"unknown policy {cfg.policy!r}; known: {sorted(POLICIES)}")
    from tqdm import tqdm

    if cfg.jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {cfg.jobs}")
    if cfg.jobs > 1 and env is not None:
        raise ValueError("parallel recording builds one engine per process from cfg.env: pass jobs=1 with env")
    store = ShardStore(out)
    env = env or _engine(cfg)
    pool = None
    try:
        idle = {"idle_prob": cfg.idle_prob, "idle_hold": list(cfg.idle_hold)} if cfg.idle_prob else {}
        store.write_meta({**env.metadata(), "env": cfg.env, "policy": cfg.policy, **idle,
                          "alignment": "actions[t] produced frames[t+1]"})
        store.remove_stale_temps()
        start = episodes_done(store)
        pending: list[Episode] = []
        bar = tqdm(total=cfg.episodes, initial=min(start, cfg.episodes), desc=f"record {cfg.env}",
                   unit="ep", disable=not progress)
        todo = range(start, cfg.episodes)
        if cfg.jobs > 1:   # episodes come back in order, so the shards are those of a serial recording
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(cfg.jobs, _start_worker, (cfg,))
            episodes = pool.imap(_record_in_worker, todo)
        else:
            episodes = (_record_one(cfg, env, i) for i in todo)
        for i, episode in zip(todo, episodes):
            pending.append(episode)
            bar.update(1)
            if len(pending) == cfg.episodes_per_shard or i == cfg.episodes - 1:
                store.append(pending)
                pending = []
        bar.close()
    finally:
        if pool is not None:
            pool.terminate()
        env.close()
    return {"out": str(store.root), "episodes": episodes_done(store), "shards": len(store.shard_paths())}
