"""Long play: does a rollout stay alive for as long as a user plays?

Runs a session for many frames (no-op or random held keys) and tracks, per window of frames:
spatial variance of the frames (collapse to a constant drives it to 0), frame-to-frame change
(frozen video drives it to 0; noise drives it up to the level of unrelated frames), a
high-frequency energy ratio (noise raises it), the scene's layout (`row_structure`: a view that
melts into one flat texture loses its sky, wall and floor bands while its variance and change still
look alive), process memory and KV-cache bytes (both must stay flat), and, given an
inverse-dynamics probe, how often the probe reads the commanded keys from consecutive generated
frames (controls that fade over a long rollout drive it down).
The policies: no key, random held keys (one draw per ``seed``: a gate on one key sequence holds for that sequence
only), or one key combination held for the whole play (``hold:forward``): the engine keeps walking into a wall
and sliding along it, so a model whose scene melts when a key is held long fails it within a few hundred frames.
A view *collapses* at the first window whose layout falls under ``collapse_layout``: the recorded Doom frames stay
above it (a view against a wall keeps its texture's bands), a melted one tiles one flat texture.
`forcekit eval longplay` prints the summary as JSON and plots the curves.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from forcekit.cli import nonnegative_float, positive_int, seed_int


@dataclass
class LongPlayConfig:
    frames: int = 10_000
    policy: str = "random"  # "random" held keys, "noop", or "hold:KEY[+KEY]": those keys held throughout
    window: int = 100  # frames per reported point
    seed: int = 0
    # layout (`row_structure`) under which a window counts as collapsed: of 69,072 recorded health_gathering frames
    # 0.03 % are under 10 and the median is 193; the melted rollouts of docs/world_controls.md sit at 2-5
    collapse_layout: float = 10.0


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def high_frequency_ratio(frames: np.ndarray) -> float:
    """Energy of neighbouring-pixel differences over total variance: about 2 for white noise,
    far lower for natural or rendered images."""
    x = frames.astype(np.float64).mean(axis=-1)
    dx = np.diff(x, axis=-1).var() + np.diff(x, axis=-2).var()
    total = x.var(axis=(-1, -2)).mean()
    return float(dx / (2 * total)) if total > 1e-9 else 0.0


def row_structure(frames: np.ndarray) -> float:
    """Variance over the rows of each frame's row means (over width and colour), averaged over the frames
    ``[n, H, W, 3]``: large for a view of bands (a sky, a wall, a floor), near 0 for one flat texture."""
    rows = frames.astype(np.float64).mean(axis=(-1, -2))
    return float(rows.var(axis=-1).mean())


def probe_key_columns(probe, action_space) -> list[int]:
    """Columns of the session's action vectors in the probe's key order; the key sets must match."""
    keys = list(action_space.keys)
    missing = [k for k in probe.cfg.keys if k not in keys]
    if missing:
        raise ValueError(f"the probe reads keys {probe.cfg.keys} but the bundle's action space has {keys}")
    return [keys.index(k) for k in probe.cfg.keys]


def policy_actions(policy: str, action_space, chunks: int, seed: int) -> list:
    """One action per chunk for ``policy``: ``noop``, ``random`` (held keys of random durations, drawn from
    ``seed``) or ``hold:KEY[+KEY...]`` (those keys, by name, held for every chunk)."""
    from runtime.commands import random_actions

    if policy == "noop":
        return [None] * chunks
    if policy == "random":
        return random_actions(action_space, chunks, seed)
    if policy.startswith("hold:") and policy[5:]:
        keys = policy[5:].split("+")
        action_space.encode(keys)   # an unknown key fails here, naming the keys the bundle has
        return [keys] * chunks
    raise ValueError(f"policy must be 'noop', 'random' or 'hold:KEY[+KEY]', got {policy!r}")


def collapse_frame(points: list[dict], layout: float) -> int | None:
    """The frame ending the first window whose layout fell under ``layout`` (None: the view never collapsed)."""
    return next((p["frame"] for p in points if p["row_structure"] < layout), None)


def long_play(session, cfg: LongPlayConfig, progress: bool = True, probe=None) -> dict:
    """Play ``cfg.frames`` frames; with ``probe``, each (previous, new) frame pair is checked
    against the action given to the step that produced the new frame."""
    import torch
    from tqdm import tqdm

    chunks = session.config.chunk_pattern.num_chunks(cfg.frames)
    actions = policy_actions(cfg.policy, session.action_space, chunks, cfg.seed)
    session.reset(cfg.seed)
    columns = probe_key_columns(probe, session.action_space) if probe is not None else None
    points, buffer, hits, prev_last = [], [], [], None
    done = 0
    bar = tqdm(total=cfg.frames, desc=f"long play ({cfg.policy})", unit="frame", file=sys.stderr,
               disable=not progress)
    for action in actions:
        frames = session.step(action)
        if probe is not None and (prev_last is not None or buffer):
            last = buffer[-1][-1] if buffer else prev_last
            before = np.concatenate([last[None], frames[:-1]]).astype(np.uint8)
            truth = session.action_space.encode(action)[columns] > 0.5
            pred = probe.predict(torch.from_numpy(before), torch.from_numpy(frames))
            hits.append((pred == truth).numpy())
        buffer.append(frames)
        done += len(frames)
        bar.update(len(frames))
        if sum(len(b) for b in buffer) >= cfg.window or done >= cfg.frames:
            block = np.concatenate(buffer).astype(np.float64)
            seq = block if prev_last is None else np.concatenate([prev_last[None], block])
            points.append({
                "frame": done,
                "spatial_var": float(block.var(axis=(1, 2, 3)).mean()),
                "change": float(np.abs(np.diff(seq, axis=0)).mean()) if len(seq) > 1 else 0.0,
                "hf_ratio": high_frequency_ratio(block),
                "row_structure": row_structure(block),
                "rss_mb": rss_bytes() / 2**20,
                "kv_cache_bytes": session.stats()["kv_cache_bytes"],
            })
            if hits:
                h = np.concatenate(hits)
                points[-1].update(probe_exact=float(h.all(1).mean()), probe_per_key=float(h.mean()))
            prev_last, buffer, hits = block[-1], [], []
        if done >= cfg.frames:
            break
    bar.close()
    stats = session.stats()
    first, last = points[0], points[-1]
    return {
        "frames": done, "policy": cfg.policy, "seed": cfg.seed, "fps": stats["fps"],
        "collapsed_at": collapse_frame(points, cfg.collapse_layout),
        "kv_cache_bytes_constant": len({p["kv_cache_bytes"] for p in points}) == 1,
        "rss_mb_first": first["rss_mb"], "rss_mb_last": last["rss_mb"],
        "spatial_var_first": first["spatial_var"], "spatial_var_last": last["spatial_var"],
        "change_first": first["change"], "change_last": last["change"],
        "hf_ratio_first": first["hf_ratio"], "hf_ratio_last": last["hf_ratio"],
        "row_structure_first": first["row_structure"], "row_structure_last": last["row_structure"],
        **({"probe_exact_first": first["probe_exact"], "probe_exact_last": last["probe_exact"],
            "probe_per_key_first": first["probe_per_key"], "probe_per_key_last": last["probe_per_key"]}
           if probe is not None else {}),
        "points": points,
    }


def plot_long_play(results: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("spatial_var", "frame variance"), ("change", "frame-to-frame change"),
            ("hf_ratio", "high-frequency ratio (noise ~ 2)"), ("row_structure", "layout (row-mean variance)"),
            ("rss_mb", "process memory (MiB)")]
    if all("probe_per_key" in r["points"][0] for r in results):
        keys.append(("probe_per_key", "probe accuracy per key (commanded keys)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for r in results:
        x = [p["frame"] for p in r["points"]]
        for ax, (k, title) in zip(axes, keys):
            ax.plot(x, [p[k] for p in r["points"]], label=f"{r['policy']} (seed {r['seed']})")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("frame")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def register(commands) -> None:
    p = commands.add("longplay", group="eval", func=_cli,
                     help="long rollout (no-op, random keys): flat memory? collapse to constant or noise? (JSON, PNG)")
    p.add_argument("--bundle", default="random-tiny",
                   help="bundle directory, 'random-tiny' or 'auto' (the bundle shipped under models/)")
    p.add_argument("--frames", type=positive_int, default=10_000, help="frames generated per policy")
    p.add_argument("--policies", default="noop,random",
                   help="comma-separated: noop, random, hold:KEY[+KEY] (e.g. hold:forward: the key held throughout)")
    p.add_argument("--window", type=positive_int, default=100, help="frames per measured window along the rollout")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler steps per chunk (default: the bundle's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise and of the random keys")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="play each policy this many times, seeds --seed, --seed + 1, ... (other random keys, "
                        "another start scene)")
    p.add_argument("--collapse-layout", type=nonnegative_float, default=LongPlayConfig.collapse_layout,
                   help="layout under which a window counts as collapsed (recorded Doom frames: 0.03 %% under 10)")
    p.add_argument("--probe", default=None, help="probe dir (forcekit train probe): accuracy on generated pairs")
    p.add_argument("--plot", default=None, help="write the curves to this PNG")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")


def _cli(args) -> int:
    from runtime import open_session
    from runtime.session import resolve_bundle

    probe = None
    if args.probe:
        from training.probe import load_probe

        probe = load_probe(args.probe)
    results = []
    policies = [p.strip() for p in args.policies.split(",")]
    bundle = resolve_bundle(args.bundle, args.device)   # loaded once; each play opens its own stream on it
    for policy in policies:   # every policy checked before the first frame is played
        policy_actions(policy, bundle.config.actions, 1, args.seed)
    for policy in policies:
        for seed in range(args.seed, args.seed + args.seeds):
            session = open_session(bundle, device=args.device, steps=args.steps)
            play = LongPlayConfig(args.frames, policy, args.window, seed, args.collapse_layout)
            results.append(long_play(session, play, probe=probe))
    if args.plot:
        plot_long_play(results, args.plot)
    summary = [{k: v for k, v in r.items() if k != "points"} for r in results]
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0
