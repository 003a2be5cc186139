"""`forcekit eval world`: a world model against the real engine, from the same context, same actions.

For each held-out episode: the engine runs the recording policy for `start + context` frames;
the last `context` real frames (and the actions that produced them) start a session
(`open_session(bundle).reset(seed, context=...)`); then engine and model are fed the same
`horizon` actions, one frame at a time. Reported per horizon h (1, 2, 4, ... frames after the
context): PSNR and SSIM of generated vs real frame h, and, with a probe, the inverse-dynamics
accuracy on generated pairs vs on the real pairs of the same steps. The sharpness ratio (variance
of the Laplacian, generated over real, per frame, averaged over the horizon) catches what PSNR
rewards: a blurred average of the possible futures scores well on PSNR and near 0 here.
Alignment: the action taken at real frame t produces frame t+1, so `session.step(a_t)` is
compared with real frame t+1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.metrics import PSNR_CAP, horizons, laplacian_variance, psnr, ssim

DEFAULT_HELDOUT_SEED = 100_000


@dataclass
class WorldEvalConfig:
    bundle: str
    env: str
    episodes: int = 4
    horizon: int = 64
    context: int = 4
    start_max: int = 40            # real frames played before the context starts: 0..start_max (random)
    seed: int = DEFAULT_HELDOUT_SEED
    steps: int | None = None       # sampler steps (None: the bundle's)
    guidance: float | None = None  # action CFG scale (None: the bundle's)
    probe: str | None = None
    max_hold: int = 12
    mode: str = "session"          # "session": open_session (causal, KV cache); "bidirectional", "copy": below


class CopyLastFrame:
    """The trivial baseline: every 'generated' frame repeats the last context frame."""

    def reset(self, seed: int, context: np.ndarray, context_actions, action_history=None) -> None:
        self.last = np.asarray(context)[-1:]

    def step(self, action) -> np.ndarray:
        return self.last.copy()

    def stats(self) -> dict:
        return {"steps": 0}


class BidirectionalSession:
    """A bidirectional teacher played as a world model, the way it was trained.

    Each `step` samples the new frame jointly with the last `window` frames as clean context
    under full attention (`training.teacher.sample_clip`, Euler with CFG). A causal session
    would instead cache context keys that never saw the new frame, which a bidirectional
    model was not trained for; the causal teacher of issue 4 is trained for that.
    Same reset/step protocol as `StreamSession`.
    """

    def __init__(self, bundle, steps: int | None = None, guidance: float | None = None) -> None:
        self.model, self.codec = bundle.model.eval(), bundle.codec.eval()
        self.steps = steps or bundle.sampler.steps
        self.guidance = bundle.sampler.guidance_scale if guidance is None else guidance
        self.window = bundle.config.window_frames + bundle.config.sink_frames
        self.actions = bundle.config.action_condition()

    @torch.no_grad()
    def reset(self, seed: int, context: np.ndarray, context_actions, action_history=None) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.latents = self.codec.encode(torch.as_tensor(context))
        self.actions.reset()
        if action_history is not None:
            self.actions(action_history)   # the running average only (StreamSession.reset)
        self.cond = self.actions(context_actions)

    @torch.no_grad()
    def step(self, action) -> np.ndarray:
        from training.teacher import sample_clip

        ctx, cond = self.latents[-self.window:], self.cond[-self.window:]
        cond = torch.cat([cond, self.actions([action])])
        x = sample_clip(self.model, ctx[None], cond[None], self.steps, self.guidance, self.generator)[0]
        self.latents, self.cond = torch.cat([ctx, x]), cond
        return self.codec.decode(x).numpy()

    def stats(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance}


def training_seeds(bundle) -> set[int]:
    """Seeds of the episodes the bundle was trained on, when its data dir is still around."""
    data = bundle.extra.get("data")
    if not data or not Path(data, "meta.json").exists():
        return set()
    from training.data.shards import ShardStore, open_shard

    return {int(s) for p in ShardStore(data).shard_paths() for s in open_shard(p, ("episode_seeds",))["episode_seeds"]}


def check_heldout(bundle, first_seed: int, episodes: int) -> None:
    """Refuse engine seeds the bundle was trained on among those an eval may use (up to 10 per episode:
    episodes too short are skipped)."""
    overlap = training_seeds(bundle) & set(range(first_seed, first_seed + 10 * episodes))
    if overlap:
        raise ValueError(f"seeds {sorted(overlap)[:5]} were used to train this bundle; pick another --seed")


def rollout_pair(env, session, seed: int, cfg: WorldEvalConfig) -> dict:
    """One episode: real and generated frames after a shared context, under the same actions."""
    from training.data.record import RandomSticky

    rng = np.random.default_rng([seed, 7])
    policy = RandomSticky(env.action_spec, rng, cfg.max_hold)
    start = int(rng.integers(0, cfg.start_max + 1))
    frames, actions = [env.reset(seed)], []
    while len(frames) < start + cfg.context + cfg.horizon:
        a = policy(frames[-1])
        actions.append(a)
        frame, done = env.step(a)
        if done:
            return {}
        frames.append(frame)
    real = np.stack(frames[start:])                 # [context + horizon, H, W, 3]
    acts = np.stack(actions[start:])                # acts[i] produced real[i + 1]
    producers = [None, *actions]                     # producers[i] produced frames[i]
    session.reset(seed, context=real[: cfg.context], context_actions=producers[start:start + cfg.context],
                  action_history=producers[:start])
    gen = []
    for h in range(cfg.horizon):
        gen.append(session.step(acts[cfg.context - 1 + h])[0])
    return {"real": real, "generated": np.stack(gen), "actions": acts}


def evaluate_world(cfg: WorldEvalConfig, video: str | None = None, progress: bool = True,
                   frames: str | None = None) -> dict:
    from tqdm import tqdm

    from runtime import Bundle, open_session
    from training.envs import make_env

    bundle = Bundle.load(cfg.bundle)
    check_heldout(bundle, cfg.seed, cfg.episodes)
    if bundle.config.frames_per_chunk != 1:
        raise ValueError("eval world compares frame by frame: the bundle needs frames_per_chunk=1")
    env = make_env(cfg.env, size=bundle.frame_size)
    modes = {"session": lambda: open_session(bundle, steps=cfg.steps, guidance=cfg.guidance),
             "bidirectional": lambda: BidirectionalSession(bundle, cfg.steps, cfg.guidance), "copy": CopyLastFrame}
    if cfg.mode not in modes:
        raise ValueError(f"unknown eval mode {cfg.mode!r}: expected one of {sorted(modes)}")
    session = modes[cfg.mode]()
    probe = None
    if cfg.probe:
        from training.probe import load_probe

        probe = load_probe(cfg.probe)
    hs = horizons(cfg.horizon)
    ps, ss, sharp, gen_acc, real_acc, episodes, seed = [], [], [], [], [], [], cfg.seed
    bar = tqdm(total=cfg.episodes, desc="eval world", disable=not progress)
    try:
        while len(episodes) < cfg.episodes and seed < cfg.seed + 10 * cfg.episodes:
            ep = rollout_pair(env, session, seed, cfg)
            seed += 1
            if not ep:
                continue                            # episode ended too early for the horizon
            real, gen = torch.from_numpy(ep["real"][cfg.context:]), torch.from_numpy(ep["generated"])
            ps.append(psnr(gen, real))
            ss.append(ssim(gen, real))
            sharp.append(laplacian_variance(gen) / laplacian_variance(real).clamp(min=1e-6))
            if probe is not None:
                before_real = torch.from_numpy(ep["real"][cfg.context - 1:-1])
                before_gen = torch.cat([before_real[:1], gen[:-1]])
                acts = torch.from_numpy(ep["actions"][cfg.context - 1:])
                gen_acc.append(probe.predict(before_gen, gen) == (acts > 0.5))
                real_acc.append(probe.predict(before_real, real) == (acts > 0.5))
            episodes.append((seed - 1, ep))
            bar.update(1)
    finally:
        env.close()
        bar.close()
    if not episodes:
        raise RuntimeError(f"no held-out episode lasted {cfg.context + cfg.horizon} frames")
    p, s = torch.stack(ps).clamp(max=PSNR_CAP), torch.stack(ss)
    result = {
        "bundle": cfg.bundle, "env": cfg.env, "episodes": len(episodes), "seeds": [e[0] for e in episodes],
        "mode": cfg.mode, "context_frames": cfg.context, "horizon": cfg.horizon,
        "steps": session.stats()["steps"],
        "guidance_scale": bundle.sampler.guidance_scale if cfg.guidance is None else cfg.guidance,
        "psnr_by_horizon": {str(h): round(float(p[:, h - 1].mean()), 3) for h in hs},
        "ssim_by_horizon": {str(h): round(float(s[:, h - 1].mean()), 4) for h in hs},
        "psnr_mean": round(float(p.mean()), 3), "ssim_mean": round(float(s.mean()), 4),
        "sharpness_ratio": round(float(torch.stack(sharp).mean()), 4),
    }
    if probe is not None:
        g, r = torch.stack(gen_acc), torch.stack(real_acc)   # [episodes, horizon, keys]
        result["probe"] = {"generated_exact": round(float(g.all(-1).float().mean()), 4),
                           "real_exact": round(float(r.all(-1).float().mean()), 4),
                           "generated_per_key": round(float(g.float().mean()), 4),
                           "real_per_key": round(float(r.float().mean()), 4)}
    rollouts = [e for _, e in episodes]
    if video:
        write_side_by_side(video, rollouts, cfg.context, bundle.fps)
    if frames:
        write_frame_grid(frames, rollouts, cfg.context, hs)
    return result


def write_side_by_side(path: str, episodes: list[dict], context: int, fps: float, scale: int = 4) -> None:
    """An mp4 of real | generated, episode after episode (opencv, imported here)."""
    import cv2

    h, w = episodes[0]["real"].shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (2 * w * scale, h * scale))
    try:
        for ep in episodes:
            for real, gen in zip(ep["real"][context:], ep["generated"]):
                frame = np.concatenate([real, gen], 1).repeat(scale, 0).repeat(scale, 1)
                writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    finally:
        writer.release()


def write_frame_grid(path: str, episodes: list[dict], context: int, hs: list[int], rows: int = 4,
                     scale: int = 2) -> None:
    """A lossless PNG of the first `rows` episodes: the real frame above the generated one at each horizon in
    `hs`, left to right, so blur and lost objects show where an mp4's compression would hide them."""
    import matplotlib.image

    def strip(frames: np.ndarray) -> np.ndarray:
        return np.concatenate([np.pad(frames[h - 1], ((1, 1), (1, 1), (0, 0)), constant_values=255) for h in hs], 1)

    grid = np.concatenate([strip(f) for ep in episodes[:rows] for f in (ep["real"][context:], ep["generated"])])
    matplotlib.image.imsave(path, grid.repeat(scale, 0).repeat(scale, 1))


def plot_world(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = [int(h) for h in result["psnr_by_horizon"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(hs, list(result["psnr_by_horizon"].values()), marker="o")
    axes[0].set_ylabel("PSNR (dB)")
    axes[1].plot(hs, list(result["ssim_by_horizon"].values()), marker="o", color="tab:orange")
    axes[1].set_ylabel("SSIM")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("frames after the context")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(result['bundle']).parent.name}/{Path(result['bundle']).name} ({result['mode']}) vs "
                 f"{result['env']}: {result['episodes']} held-out episodes, {result['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dump(result: dict, as_json: bool) -> str:
    return json.dumps(result) if as_json else json.dumps(result, indent=2)
