"""ViZDoom adapter: first-person 3D scenarios bundled with vizdoom (freedoom data).

The player moves forward/back and turns (plus optional strafing): the controls a world model
has to learn. ViZDoom writes `_vizdoom/` and `_vizdoom.ini` into the current directory, so
the engine is started from a scratch directory and the process cwd is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from training.envs.base import ActionSpec, resize_frame

# Engine buttons per action key name; the key names are the runtime's action names.
BUTTONS = {
    "forward": "MOVE_FORWARD",
    "backward": "MOVE_BACKWARD",
    "turn_left": "TURN_LEFT",
    "turn_right": "TURN_RIGHT",
    "strafe_left": "MOVE_LEFT",
    "strafe_right": "MOVE_RIGHT",
    "attack": "ATTACK",
}
BINDINGS = {
    "w": "forward", "up": "forward", "s": "backward", "down": "backward",
    "a": "turn_left", "left": "turn_left", "d": "turn_right", "right": "turn_right",
    "q": "strafe_left", "e": "strafe_right", "space": "attack",
}


@dataclass
class DoomConfig:
    scenario: str = "health_gathering"
    size: tuple[int, int] = (64, 64)
    frame_skip: int = 2                      # engine tics per recorded frame (35 tics/s)
    keys: tuple[str, ...] = ("forward", "backward", "turn_left", "turn_right")


@contextlib.contextmanager
def _in_dir(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class DoomEnv:
    def __init__(self, cfg: DoomConfig, scratch_dir: str | None = None) -> None:
        import vizdoom as vzd

        for k in cfg.keys:
            if k not in BUTTONS:
                raise ValueError(f"unknown Doom action key {k!r}; known: {sorted(BUTTONS)}")
        cfg_path = os.path.join(vzd.scenarios_path, f"{cfg.scenario}.cfg")
        if not os.path.exists(cfg_path):
            known = sorted(f[:-4] for f in os.listdir(vzd.scenarios_path) if f.endswith(".cfg"))
            raise ValueError(f"unknown ViZDoom scenario {cfg.scenario!r}; bundled: {known}")
        self.cfg = cfg
        self.size = tuple(cfg.size)
        self.fps = 35.0 / cfg.frame_skip
        self.action_spec = ActionSpec(keys=list(cfg.keys),
                                      bindings={b: k for b, k in BINDINGS.items() if k in cfg.keys})
        self._vzd = vzd
        self._own_scratch = scratch_dir is None
        self._scratch = scratch_dir or tempfile.mkdtemp(prefix="forcekit-vizdoom-")
        self._last = None
        g = vzd.DoomGame()
        with _in_dir(self._scratch):
            g.load_config(cfg_path)
            g.set_window_visible(False)
            g.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
            g.set_screen_format(vzd.ScreenFormat.RGB24)
            g.set_available_buttons([getattr(vzd.Button, BUTTONS[k]) for k in cfg.keys])
            g.set_mode(vzd.Mode.PLAYER)
            g.init()
        self._game = g

    def _frame(self) -> np.ndarray:
        state = self._game.get_state()
        return resize_frame(state.screen_buffer, self.size)

    def reset(self, seed: int) -> np.ndarray:
        self._game.set_seed(int(seed) % (2**31))
        self._game.new_episode()
        self._last = self._frame()
        return self._last

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.shape[0] != self.action_spec.dim:
            raise ValueError(f"expected an action vector of length {self.action_spec.dim}, got {a.shape}")
        self._game.make_action([bool(x > 0.5) for x in a[: len(self.cfg.keys)]], self.cfg.frame_skip)
        if self._game.is_episode_finished():
            return self._last, True
        self._last = self._frame()
        return self._last, False

    def metadata(self) -> dict:
        return {"engine": "vizdoom", "version": self._vzd.__version__, "scenario": self.cfg.scenario,
                "frame_skip": self.cfg.frame_skip, "fps": self.fps, "resolution": list(self.size),
                "action_space": self.action_spec.to_dict()}

    def close(self) -> None:
        self._game.close()
        if self._own_scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
