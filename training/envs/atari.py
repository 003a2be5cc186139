"""ALE Atari adapter (bundled ROMs through gymnasium): Breakout, Pong and friends.

Actions are multi-hot keys built from the game's minimal action set ("fire", "up", "down",
"left", "right"); a held-key set maps to the engine action whose meaning matches it, so a
human and the recorder speak the same language.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.envs.base import ActionSpec, resize_frame

TOKENS = ("UP", "DOWN", "LEFT", "RIGHT", "FIRE")
BINDINGS = {"up": "up", "down": "down", "left": "left", "right": "right", "space": "fire",
            "w": "up", "s": "down", "a": "left", "d": "right"}
# Pong's paddle moves with the engine's RIGHT (up) and LEFT (down) actions.
GAME_BINDINGS = {"pong": {"up": "right", "w": "right", "down": "left", "s": "left", "space": "fire"}}


@dataclass
class AtariConfig:
    game: str = "breakout"
    size: tuple[int, int] = (64, 64)
    frame_skip: int = 4                      # emulator frames per recorded frame (60 Hz)


def _tokens(meaning: str) -> frozenset[str]:
    out, rest = set(), meaning
    for t in TOKENS:
        if t in rest:
            out.add(t.lower())
            rest = rest.replace(t, "")
    return frozenset(out)


class AtariEnv:
    def __init__(self, cfg: AtariConfig) -> None:
        import ale_py
        import gymnasium as gym

        gym.register_envs(ale_py)
        name = "".join(p.capitalize() for p in cfg.game.split("_"))
        try:
            self._env = gym.make(f"ALE/{name}-v5", frameskip=cfg.frame_skip, repeat_action_probability=0.0,
                                 full_action_space=False)
        except gym.error.Error as e:
            raise ValueError(f"unknown Atari game {cfg.game!r}: {e}") from e
        self.cfg = cfg
        self.size = tuple(cfg.size)
        self.fps = 60.0 / cfg.frame_skip
        self._ale_version = ale_py.__version__
        meanings = self._env.unwrapped.get_action_meanings()
        self._meaning_sets = [_tokens(m) for m in meanings]
        keys = [t.lower() for t in TOKENS if any(t.lower() in s for s in self._meaning_sets)]
        bindings = GAME_BINDINGS.get(cfg.game, BINDINGS)
        self.action_spec = ActionSpec(keys=keys, bindings={b: k for b, k in bindings.items() if k in keys})
        self._last = None

    def engine_action(self, action: np.ndarray) -> int:
        """The engine action whose meaning equals the held keys (else the largest subset, NOOP last)."""
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape[0] != self.action_spec.dim:
            raise ValueError(f"expected an action vector of length {self.action_spec.dim}, got {a.shape}")
        held = frozenset(k for k, x in zip(self.action_spec.keys, a) if x > 0.5)
        best, best_n = 0, -1
        for i, s in enumerate(self._meaning_sets):
            if s <= held and len(s) > best_n:
                best, best_n = i, len(s)
        return best

    def reset(self, seed: int) -> np.ndarray:
        obs, _ = self._env.reset(seed=int(seed) % (2**31))
        self._last = resize_frame(obs, self.size)
        return self._last

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        obs, _, terminated, truncated, _ = self._env.step(self.engine_action(action))
        self._last = resize_frame(obs, self.size)
        return self._last, bool(terminated or truncated)

    def metadata(self) -> dict:
        return {"engine": "ale", "version": self._ale_version, "game": self.cfg.game,
                "frame_skip": self.cfg.frame_skip, "fps": self.fps, "resolution": list(self.size),
                "action_space": self.action_spec.to_dict()}

    def close(self) -> None:
        self._env.close()
