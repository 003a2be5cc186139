"""What an action is, for one bundle: named held keys (multi-hot) plus named continuous values.

Sessions, apps and data recording all go through `ActionSpace.encode`, so a wrong key name,
shape or dtype, or a value that is not finite (NaN or infinite: the model would turn it into
NaN frames), fails in one place with a message that says what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class ActionSpace:
    """``keys``: multi-hot action names; ``values``: continuous action names (e.g. mouse deltas);
    ``bindings``: keyboard key name (lowercase, e.g. "w", "left", "space") -> action key name."""

    keys: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    bindings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "values", tuple(self.values))
        names = self.keys + self.values
        if len(set(names)) != len(names):
            raise ValueError(f"action names must be unique, got {list(names)}")
        bad = {kb: name for kb, name in self.bindings.items() if name not in self.keys}
        if bad:
            raise ValueError(f"bindings point at unknown action keys {bad}; action keys are {list(self.keys)}")

    @property
    def dim(self) -> int:
        return len(self.keys) + len(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "values": list(self.values), "bindings": dict(self.bindings)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActionSpace:
        return cls(tuple(d.get("keys", ())), tuple(d.get("values", ())), dict(d.get("bindings", {})))

    def describe(self) -> str:
        parts = [f"held keys from {list(self.keys)}"] if self.keys else []
        if self.values:
            parts.append(f"values {list(self.values)}")
        return "an action: None, a list of " + ", ".join(parts) + f", or a vector of length {self.dim}"

    def from_keyboard(self, pressed: Iterable[str]) -> list[str]:
        """Map pressed keyboard keys to action key names; keys with no binding are ignored."""
        out: list[str] = []
        for kb in pressed:
            name = self.bindings.get(str(kb).lower())
            if name is not None and name not in out:
                out.append(name)
        return out

    def encode(self, action: Any) -> torch.Tensor:
        """One action -> float32 ``[dim]``: multi-hot keys followed by continuous values."""
        vec = torch.zeros(self.dim, dtype=torch.float32)
        if action is None:
            return vec
        if isinstance(action, torch.Tensor | np.ndarray):
            return self._encode_vector(action)
        if isinstance(action, Mapping):
            unknown = set(action) - {"keys"} - set(self.values)
            if unknown:
                raise ValueError(f"unknown action fields {sorted(unknown)}; expected 'keys' and values "
                                 f"{list(self.values)}")
            self._set_keys(vec, action.get("keys", ()))
            for i, name in enumerate(self.values):
                if name in action:
                    value = action[name]
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        raise ValueError(f"action value {name!r} must be a number, got {value!r}")
                    number = float(value) if isinstance(value, float) or abs(value) < 2**64 else math.inf
                    if not math.isfinite(number) or abs(number) > torch.finfo(torch.float32).max:
                        raise ValueError(f"action value {name!r} must be a finite float32, got {value!r}")
                    vec[len(self.keys) + i] = number
            return vec
        if isinstance(action, str):
            self._set_keys(vec, [action])
            return vec
        if isinstance(action, Iterable):
            items = list(action)
            if all(isinstance(a, str) for a in items):
                self._set_keys(vec, items)
                return vec
            try:
                arr = np.asarray(items)
            except (TypeError, ValueError) as e:  # ragged nesting
                raise ValueError(f"cannot read {items!r} as an action ({e}); expected {self.describe()}") from e
            if arr.dtype.kind not in "biuf":  # mixed strings and numbers, or ints too large for any dtype
                raise ValueError(f"cannot read {items!r} as an action; expected {self.describe()}")
            return self._encode_vector(arr)
        raise ValueError(f"cannot read {type(action).__name__} as an action; expected {self.describe()}")

    def encode_many(self, actions: Iterable[Any]) -> torch.Tensor:
        return torch.stack([self.encode(a) for a in actions]) if actions else torch.zeros(0, self.dim)

    def _set_keys(self, vec: torch.Tensor, names: Iterable[str]) -> None:
        if isinstance(names, str):
            names = [names]
        for name in names:
            if not isinstance(name, str) or name not in self.keys:
                raise ValueError(f"unknown action key {name!r}; this bundle's keys are {list(self.keys)}")
            vec[self.keys.index(name)] = 1.0

    def _encode_vector(self, arr: Any) -> torch.Tensor:
        t = torch.as_tensor(arr)
        if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"action vector must be float or int, got dtype {t.dtype}; expected {self.describe()}")
        if t.shape != (self.dim,):
            raise ValueError(f"action vector must have shape ({self.dim},), got {tuple(t.shape)}; "
                             f"expected {self.describe()}")
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise ValueError(f"action vector must be finite (no NaN or infinity), got {t.tolist()}")
        return t


def key_momentum(actions: torch.Tensor, decay: float, speed: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame actions ``[F, A]`` -> ``[F, 2A]``: each frame's action followed by the exponential
    average of the actions so far, ``s_t = decay * s_(t-1) + (1 - decay) * a_t`` (from ``speed``,
    default 0), and the last average, the state a stream carries into its next frames.

    In a game with momentum the view does not move by the key held now: Doom keeps 90.6% of the
    player's speed per tic, so walking starts slowly and goes on after the key is released. The
    average is the speed the keys built up; a model conditioned on it is told how fast it moves
    instead of having to read it from frames it generated itself (`ModelConfig.action_momentum`).
    """
    if not 0 <= decay < 1:
        raise ValueError(f"momentum decay must be in [0, 1), got {decay}")
    speed = torch.zeros(actions.shape[-1], dtype=actions.dtype) if speed is None else speed.to(actions.dtype)
    out = torch.empty_like(actions)
    for t in range(len(actions)):
        speed = decay * speed + (1 - decay) * actions[t]
        out[t] = speed
    return torch.cat([actions, out], -1), speed


class ActionCondition:
    """A stream's per-frame action condition: encoded actions, followed by their exponential average
    (`key_momentum`) when the model was trained with ``momentum`` > 0. The average is the stream's
    state: `reset` it with the stream, and feed every frame's action through ``__call__`` in order
    (context frames included)."""

    def __init__(self, space: ActionSpace, momentum: float = 0.0) -> None:
        self.space, self.momentum = space, momentum
        self.reset()

    @property
    def dim(self) -> int:
        return self.space.dim * (2 if self.momentum else 1)

    def reset(self) -> None:
        self.speed = torch.zeros(self.space.dim)

    def __call__(self, actions: Iterable[Any]) -> torch.Tensor:
        """Actions of the next frames -> their condition ``[n, dim]`` (advances the average)."""
        vec = self.space.encode_many(list(actions))
        if not self.momentum:
            return vec
        out, self.speed = key_momentum(vec, self.momentum, self.speed)
        return out
