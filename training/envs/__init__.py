"""Game engine adapters behind one interface (see base.py): `make_env("doom:health_gathering")`."""

from __future__ import annotations

from training.envs.base import ActionSpec, Env, resize_frame

__all__ = ["ActionSpec", "Env", "make_env", "parse_env", "resize_frame"]

ENGINES = ("doom", "atari")


def parse_env(spec: str) -> tuple[str, str]:
    """'doom:health_gathering' -> ('doom', 'health_gathering'); a bad spec raises ValueError."""
    engine, sep, name = spec.partition(":")
    if not sep or engine not in ENGINES or not name:
        raise ValueError(f"bad --env {spec!r}: expected doom:<scenario> or atari:<game>")
    return engine, name


def make_env(spec: str, size: tuple[int, int] = (64, 64), frame_skip: int | None = None) -> Env:
    """Build an adapter; vizdoom / ale-py are imported only here, when an engine is asked for."""
    engine, name = parse_env(spec)
    if engine == "doom":
        from training.envs.doom import DoomConfig, DoomEnv

        cfg = DoomConfig(scenario=name, size=tuple(size))
        if frame_skip:
            cfg.frame_skip = frame_skip
        return DoomEnv(cfg)
    from training.envs.atari import AtariConfig, AtariEnv

    cfg = AtariConfig(game=name, size=tuple(size))
    if frame_skip:
        cfg.frame_skip = frame_skip
    return AtariEnv(cfg)
