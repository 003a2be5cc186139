"""Does the world model follow the keys? Engine and model from one state, each key held.

`eval world` scores a model on the engine's own action sequence, and PSNR there rewards a
model that ignores the keys and predicts a calm average of what could happen next. This asks
the player's question directly: from one real start, hold no key and then each key for
``hold`` frames, in the engine (replayed from its seed: the engines here are deterministic,
which is checked) and in the model (the same seed for every key, so the noise is the same
and only the action differs). A key's *response* is how far its rollout moves away from the
no-key rollout (mean absolute pixel difference, 0-255). The model's response over the
engine's is its *response ratio*: 1 reacts as strongly as the game, 0 ignores the key. The
*sampling spread* (the no-key rollout under another noise seed) says how much of a model's
response could be noise rather than control.

A response says "something moved", not "the right thing moved". Three more checks a player
makes at once: the *pan* (per key, the horizontal shift of the view in pixels per frame,
`training.metrics.horizontal_pan`, in engine and model: a turn must pan the same way); the
*floor stream* (per key, how far the bottom third of the view moves down minus the top third,
`training.metrics.floor_stream`: walking forward streams the floor down and the ceiling up, so a
walk must stream the same way); and *stillness* (no key held for ``still`` frames: the engine's
frame does not change, so the model's must not drift either; reported as the mean absolute
frame-to-frame change and the lowest PSNR of any generated frame against the last real one). The still
check starts ``settle`` no-key frames after the key checks' start, once Doom's momentum has run out, and
its ``at_rest`` figures keep the starts where the engine's own frames really stay put (the screen flashes
when the acid floor hurts); the lowest PSNR against the engine's own frame at each step is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.record import RandomSticky
from training.evaluate import DEFAULT_HELDOUT_SEED

OTHER_NOISE = 1_000_003   # seed offset for the sampling-spread rollout


@dataclass
class ControlEvalConfig:
    bundle: str
    env: str
    episodes: int = 8
    hold: int = 8                  # frames each key is held after the context
    context: int = 4               # real frames the model starts from
    start_max: int = 40            # random-policy frames played before the context: 0..start_max
    seed: int = DEFAULT_HELDOUT_SEED
    steps: int | None = None
    guidance: float | None = None
    max_hold: int = 12             # the random policy's longest hold before the context
    still: int = 64                # frames with no key held for the stillness check (0: skip it)
    settle: int = 32               # no-key frames played before the still check's context (momentum runs out)
    rest_db: float = 30.0          # a still start is "at rest" where the engine's own frames stay this close (PSNR)
    pan_threshold: float = 1.0     # engine pans under this (pixels per frame) have no direction to match
    mode: str = "session"          # or "bidirectional": a teacher, as eval world plays it (BidirectionalSession)


def _start(env, seed: int, cfg: ControlEvalConfig) -> tuple[list, np.ndarray, list, list] | None:
    """Play the random policy from ``reset(seed)`` to a random start. Returns the actions played,
    the context frames, the action that produced each context frame (None where the episode
    began) and those that produced the frames before them; None if the episode ends first."""
    rng = np.random.default_rng([seed, 11])
    policy = RandomSticky(env.action_spec, rng, cfg.max_hold)
    start = int(rng.integers(0, cfg.start_max + 1))
    frames, actions = [env.reset(seed)], []
    while len(frames) < start + cfg.context:
        actions.append(policy(frames[-1]))
        frame, done = env.step(actions[-1])
        if done:
            return None
        frames.append(frame)
    producers = [None, *actions]
    return actions, np.stack(frames[start:]), producers[start:], producers[:start]


def _settled(env, seed: int, start: tuple, no_key: np.ndarray, cfg: ControlEvalConfig
             ) -> tuple[tuple, np.ndarray] | None:
    """No key held from ``start`` for ``cfg.settle`` frames, then ``cfg.still`` more, in one engine replay: the still
    check's start (as `_start` returns it, its context the newest settling frames, where Doom's momentum has run
    out and the engine's own frame stops changing) and the engine's ``cfg.still`` frames after it. None if the
    episode ends first."""
    prefix, context, context_actions, history = start
    frames = _engine_hold(env, seed, prefix, no_key, cfg.settle + cfg.still, context[-1])
    if frames is None:
        return None
    producers = [*history, *context_actions, *[no_key] * cfg.settle]
    n = len(context)
    still_start = ([*prefix, *[no_key] * cfg.settle], np.concatenate([context, frames[:cfg.settle]])[-n:],
                   producers[-n:], producers[:-n])
    return still_start, frames[cfg.settle:]


def _engine_hold(env, seed: int, prefix: list, key: np.ndarray, hold: int, last_context: np.ndarray
                 ) -> np.ndarray | None:
    """Replay ``prefix`` from ``reset(seed)``, then hold ``key``; None if the episode ends."""
    frame = env.reset(seed)
    for a in prefix:
        frame, done = env.step(a)
        if done:
            return None
    if not np.array_equal(frame, last_context):
        raise RuntimeError(f"{type(env).__name__} is not deterministic: replaying seed {seed} did not reach the "
                           "same frame, so the held-key rollouts cannot start from one state")
    out = []
    for _ in range(hold):
        frame, done = env.step(key)
        if done:
            return None
        out.append(frame)
    return np.stack(out)


def _model_hold(session, seed: int, start: tuple, key: np.ndarray, hold: int) -> np.ndarray:
    _, context, context_actions, history = start
    session.reset(seed, context=context, context_actions=context_actions, action_history=history)
    return np.stack([session.step(key)[0] for _ in range(hold)])


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def mean_pan(last_context: np.ndarray, rollout: np.ndarray) -> float:
    """Mean horizontal pan in pixels per frame over a rollout that follows ``last_context``."""
    return _mean_motion("horizontal_pan", last_context, rollout)


def mean_stream(last_context: np.ndarray, rollout: np.ndarray) -> float:
    """Mean floor stream (`training.metrics.floor_stream`: walking forward > 0) in pixels per frame, shifts of
    up to 4 pixels (fewer in frames under 15 pixels high)."""
    return _mean_motion("floor_stream", last_context, rollout, max_shift=min(4, last_context.shape[0] // 3 - 1))


def _mean_motion(metric: str, last_context: np.ndarray, rollout: np.ndarray, **kwargs) -> float:
    import torch

    from training import metrics

    seq = torch.from_numpy(np.concatenate([last_context[None], rollout]))
    return float(getattr(metrics, metric)(seq[:-1], seq[1:], **kwargs).float().mean())


def stillness(last_context: np.ndarray, rollout: np.ndarray, engine: np.ndarray | None = None
              ) -> dict[str, float]:
    """How still a no-key rollout stays: mean |frame-to-frame change| (0-255) and the lowest PSNR of a
    frame against the last real one (dB); given the ``engine``'s own no-key frames, also the lowest PSNR of
    a frame against the engine's frame at the same step (the engine keeps moving for a few frames after
    a key is released, Doom's momentum, so "against the last real frame" is a fair goal only at rest)."""
    import torch

    from training.metrics import PSNR_CAP, psnr

    seq = np.concatenate([last_context[None], rollout]).astype(np.float32)
    change = float(np.abs(np.diff(seq, axis=0)).mean())
    last = torch.from_numpy(last_context).expand(len(rollout), *last_context.shape)
    floor = float(psnr(torch.from_numpy(rollout), last).clamp(max=PSNR_CAP).min())
    out = {"change": change, "min_psnr": floor}
    if engine is not None:
        out["min_psnr_vs_engine"] = float(psnr(torch.from_numpy(rollout), torch.from_numpy(engine))
                                          .clamp(max=PSNR_CAP).min())
    return out


def control_response(env, session, cfg: ControlEvalConfig, progress: bool = False) -> dict:
    """Per-key response of engine and model from ``cfg.episodes`` held-out starts (see the module doc)."""
    from tqdm import tqdm

    spec = env.action_spec
    keys = list(spec.keys)
    options = {None: spec.vector([]), **{k: spec.vector([k]) for k in keys}}
    engine: dict[str, list[float]] = {k: [] for k in keys}
    model: dict[str, list[float]] = {k: [] for k in keys}
    pan_engine: dict[str, list[float]] = {k: [] for k in keys}
    pan_model: dict[str, list[float]] = {k: [] for k in keys}
    stream_engine: dict[str, list[float]] = {k: [] for k in keys}
    stream_model: dict[str, list[float]] = {k: [] for k in keys}
    still_engine, still_model, spread, seeds = [], [], [], []
    bar = tqdm(total=cfg.episodes, desc="eval controls", disable=not progress)
    for seed in range(cfg.seed, cfg.seed + 10 * cfg.episodes):
        if len(seeds) == cfg.episodes:
            break
        start = _start(env, seed, cfg)
        if start is None:
            continue
        prefix, context = start[:2]
        real = {k: _engine_hold(env, seed, prefix, a, cfg.hold, context[-1]) for k, a in options.items()}
        if any(r is None for r in real.values()):
            continue                                # the episode ended while a key was held
        gen = {k: _model_hold(session, seed, start, a, cfg.hold) for k, a in options.items()}
        for k in keys:
            engine[k].append(_diff(real[k], real[None]))
            model[k].append(_diff(gen[k], gen[None]))
            pan_engine[k].append(mean_pan(context[-1], real[k]))
            pan_model[k].append(mean_pan(context[-1], gen[k]))
            stream_engine[k].append(mean_stream(context[-1], real[k]))
            stream_model[k].append(mean_stream(context[-1], gen[k]))
        settled = _settled(env, seed, start, options[None], cfg) if cfg.still else None
        if settled is not None:
            still_start, still_real = settled
            last = still_start[1][-1]
            still_engine.append(stillness(last, still_real))
            still_model.append(stillness(last, _model_hold(session, seed, still_start, options[None], cfg.still),
                                         still_real))
        other_noise = _model_hold(session, seed + OTHER_NOISE, start, options[None], cfg.hold)
        spread.append(_diff(other_noise, gen[None]))
        seeds.append(seed)
        bar.update(1)
    bar.close()
    if not seeds:
        raise RuntimeError(f"no held-out episode lasted {cfg.context + cfg.hold} frames from its start")
    per_key = {k: {"engine": round(float(np.mean(engine[k])), 3), "model": round(float(np.mean(model[k])), 3),
                   "ratio": _ratio(model[k], engine[k]), **_pan(pan_engine[k], pan_model[k], cfg.pan_threshold),
                   **_pan(stream_engine[k], stream_model[k], cfg.pan_threshold, "stream")}
               for k in keys}
    every_engine, every_model = sum(engine.values(), []), sum(model.values(), [])
    return {"env": cfg.env, "bundle": cfg.bundle, "episodes": len(seeds), "seeds": seeds, "hold": cfg.hold,
            "context_frames": cfg.context, "keys": per_key, "response_ratio": _ratio(every_model, every_engine),
            "engine_response": round(float(np.mean(every_engine)), 3),
            "model_response": round(float(np.mean(every_model)), 3),
            "sampling_spread": round(float(np.mean(spread)), 3),
            "still": _still(still_engine, still_model, cfg)}


def _pan(engine: list[float], model: list[float], threshold: float, name: str = "pan") -> dict:
    """Mean pan (or floor stream) of engine and model for one key, and on the starts where the engine's is
    at least ``threshold`` pixels per frame, the share where the model's goes the same way."""
    moving = [(e, m) for e, m in zip(engine, model) if abs(e) >= threshold]
    agree = sum(np.sign(e) == np.sign(m) for e, m in moving)
    return {f"{name}_engine": round(float(np.mean(engine)), 3), f"{name}_model": round(float(np.mean(model)), 3),
            f"{name}_same_way": round(agree / len(moving), 3) if moving else None}


def _still(engine: list[dict], model: list[dict], cfg: ControlEvalConfig) -> dict | None:
    """The no-key figures over every start, and ``at_rest``: the same over the starts where the engine's own
    frames stay within ``cfg.rest_db`` of the last real frame (where "the frame does not change" holds; elsewhere
    the view coasts on Doom's momentum or the screen flashes when the floor hurts)."""
    if not engine:
        return None
    rest = [i for i, e in enumerate(engine) if e["min_psnr"] >= cfg.rest_db]
    at_rest = {"starts": len(rest), "rest_db": cfg.rest_db}
    if rest:
        kept_engine, kept_model = [engine[i] for i in rest], [model[i] for i in rest]
        at_rest.update(engine_change=_stat(kept_engine, "change", np.mean, 3),
                       model_change=_stat(kept_model, "change", np.mean, 3),
                       model_min_psnr=_stat(kept_model, "min_psnr", np.min),
                       model_min_psnr_mean=_stat(kept_model, "min_psnr", np.mean))
    return {"frames": cfg.still, "settle": cfg.settle, "starts": len(engine), "at_rest": at_rest,
            "engine_change": _stat(engine, "change", np.mean, 3),
            "model_change": _stat(model, "change", np.mean, 3),
            "model_change_max": _stat(model, "change", np.max, 3),
            "model_min_psnr": _stat(model, "min_psnr", np.min),
            "model_min_psnr_mean": _stat(model, "min_psnr", np.mean),
            "engine_min_psnr": _stat(engine, "min_psnr", np.min),
            "engine_min_psnr_mean": _stat(engine, "min_psnr", np.mean),
            "model_min_psnr_vs_engine": _stat(model, "min_psnr_vs_engine", np.min),
            "model_min_psnr_vs_engine_mean": _stat(model, "min_psnr_vs_engine", np.mean)}


def _stat(rows: list[dict], key: str, reduce, digits: int = 2) -> float:
    """``reduce`` (np.mean, np.min, np.max) of ``key`` over the per-start ``rows``, rounded."""
    return round(float(reduce([r[key] for r in rows])), digits)


def _ratio(model: list[float], engine: list[float]) -> float | None:
    e = float(np.mean(engine))
    return round(float(np.mean(model)) / e, 3) if e > 0 else None


def evaluate_controls(cfg: ControlEvalConfig, progress: bool = True) -> dict:
    """`control_response` of a bundle against its engine (held-out seeds only)."""
    from runtime import Bundle, open_session
    from training.envs import make_env
    from training.evaluate import BidirectionalSession, check_heldout

    bundle = Bundle.load(cfg.bundle)
    check_heldout(bundle, cfg.seed, cfg.episodes)
    env = make_env(cfg.env, size=bundle.frame_size)
    try:
        if cfg.mode not in ("session", "bidirectional"):
            raise ValueError(f"unknown controls mode {cfg.mode!r}: expected 'session' or 'bidirectional'")
        session = (open_session(bundle, steps=cfg.steps, guidance=cfg.guidance) if cfg.mode == "session"
                   else BidirectionalSession(bundle, cfg.steps, cfg.guidance))
        result = control_response(env, session, cfg, progress=progress)
    finally:
        env.close()
    stats = session.stats()
    result["steps"], result["guidance"] = stats["steps"], stats["guidance"]
    return result
