"""Sharded episode storage with atomic appends.

Layout of a data directory:
    meta.json          engine, version, resolution, action space, fps (written once, atomically)
    shard_00000.npz    whole episodes: frames uint8 [N,H,W,3], actions float32 [N,D],
                       episode_lengths int64 [E], episode_seeds int64 [E]; optionally more
                       per-frame arrays [N, ...] (named with their shapes in meta.json's
                       "frame_arrays", e.g. lip-sync audio and mouth truth) and episode_info,
                       one JSON string per episode
Each shard is written to a hidden temp file, fsynced and renamed into place, then the directory
is fsynced: a killed recorder leaves complete shards only (and at most a stale temp file that
readers ignore and the next recorder removes). Shards are zip files whose members carry CRCs,
so a corrupt or truncated shard is detected and reported by name.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
SHARD_RE = re.compile(r"^shard_(\d{5})\.npz$")
MEMBERS = ("frames", "actions", "episode_lengths", "episode_seeds")


class ShardError(ValueError):
    """A shard that cannot be read or is inconsistent; the message starts with its path.

    A ValueError, like the runtime's BundleError: bad input the user can fix, reported by the CLI
    as one line."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(fileobj)` on a temp file next to `path`, fsync it, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Episode:
    frames: np.ndarray     # uint8 [T, H, W, 3]
    actions: np.ndarray    # float32 [T, D]; actions[t] produced frames[t+1]
    seed: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)   # more per-frame arrays [T, ...]
    info: dict | None = None                                      # stored as JSON in episode_info


def check_meta(meta: object, where: Path) -> None:
    """Refuse a meta.json without a usable ``resolution`` [H, W] and ``action_space`` {"keys": [...]}."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    res = meta.get("resolution")
    if (not isinstance(res, list) or len(res) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in res)):
        raise ValueError(f"{where}: 'resolution' must be [height, width] in pixels, got {res!r}")
    space = meta.get("action_space")
    if (not isinstance(space, dict) or not isinstance(space.get("keys"), list)
            or not isinstance(space.get("values", []), list)):
        raise ValueError(f"{where}: 'action_space' must be an object with a 'keys' list, got {space!r}")


class ShardStore:
    """One data directory: reads its metadata and shard list, appends shards atomically."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def read_meta(self) -> dict:
        """The recording's metadata, checked for what readers rely on (resolution, action space)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such data directory (record one with `forcekit record`)")
        if not self.meta_path.is_file():
            raise FileNotFoundError(f"{self.meta_path}: no meta.json; is {self.root} a forcekit data dir?")
        try:
            meta = json.loads(self.meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.meta_path}: not valid JSON ({e})") from e
        check_meta(meta, self.meta_path)
        return meta

    def write_meta(self, meta: dict) -> None:
        """Write meta.json once; a later call must describe the same recording (resume guard)."""
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, **meta}
        if self.meta_path.exists():
            old = self.read_meta()
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(f"{self.meta_path}: existing recording differs in {diff}; use another --out")
            return
        atomic_write_bytes(self.meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))

    # -- shards -----------------------------------------------------------------------------
    def shard_paths(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if SHARD_RE.match(p.name))

    def remove_stale_temps(self) -> list[Path]:
        stale = [p for p in self.root.glob(".shard_*.tmp")]
        for p in stale:
            p.unlink()
        return stale

    def append(self, episodes: list[Episode]) -> Path:
        """Write the episodes as the next shard, atomically. Returns the shard path."""
        if not episodes:
            raise ValueError("append needs at least one episode")
        existing = self.shard_paths()
        index = int(SHARD_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
        for ep in episodes:
            if ep.frames.dtype != np.uint8 or ep.frames.ndim != 4 or len(ep.actions) != len(ep.frames):
                raise ValueError(f"bad episode: frames {ep.frames.dtype} {ep.frames.shape}, "
                                 f"actions {ep.actions.shape}")
            if set(ep.arrays) != set(episodes[0].arrays) or (ep.info is None) != (episodes[0].info is None):
                raise ValueError("episodes of one shard must carry the same arrays and all or no info")
            bad = {k: a.shape for k, a in ep.arrays.items() if len(a) != len(ep.frames)}
            if bad:
                raise ValueError(f"bad episode: per-frame arrays {bad} for {len(ep.frames)} frames")
        arrays = {
            "frames": np.concatenate([e.frames for e in episodes]),
            "actions": np.concatenate([e.actions for e in episodes]).astype(np.float32),
            "episode_lengths": np.array([len(e.frames) for e in episodes], np.int64),
            "episode_seeds": np.array([e.seed for e in episodes], np.int64),
        }
        for name in episodes[0].arrays:
            if name in arrays or name == "episode_info":
                raise ValueError(f"per-frame array name {name!r} is reserved")
            arrays[name] = np.concatenate([e.arrays[name] for e in episodes])
        if episodes[0].info is not None:
            arrays["episode_info"] = np.array([json.dumps(e.info) for e in episodes])
        path = self.root / f"shard_{index:05d}.npz"
        atomic_write_bytes(path, lambda f: np.savez_compressed(f, **arrays))
        return path


def open_shard(path: Path, members: tuple[str, ...] = MEMBERS) -> dict[str, np.ndarray]:
    """Read the named members of a shard; any failure raises ShardError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [m for m in members if m not in z.files]
            if missing:
                raise ShardError(f"{path}: missing arrays {missing}")
            return {m: z[m] for m in members}
    except ShardError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ShardError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e


def action_dim(meta: dict) -> int:
    """Width of a recorded action row: one entry per key, then one per value."""
    return len(meta["action_space"]["keys"]) + len(meta["action_space"].get("values", []))


def verify_shard(path: Path, meta: dict) -> dict[str, np.ndarray]:
    """Read every byte of a shard (zip CRCs checked) and check it against the metadata."""
    arr = open_shard(path)
    frames, actions, lengths = arr["frames"], arr["actions"], arr["episode_lengths"]
    h, w = meta["resolution"]
    dim = action_dim(meta)
    problems = []
    if frames.dtype != np.uint8 or frames.shape[1:] != (h, w, 3):
        problems.append(f"frames {frames.dtype} {frames.shape}, expected uint8 [N,{h},{w},3]")
    if actions.shape != (len(frames), dim):
        problems.append(f"actions {actions.shape}, expected ({len(frames)}, {dim})")
    if int(lengths.sum()) != len(frames) or (lengths <= 0).any():
        problems.append(f"episode lengths sum to {int(lengths.sum())}, frames {len(frames)}")
    if len(arr["episode_seeds"]) != len(lengths):
        problems.append("episode_seeds and episode_lengths differ in length")
    if not np.isfinite(actions).all():
        problems.append("non-finite actions")
    if meta.get("frame_arrays"):
        extra = open_shard(path, tuple(meta["frame_arrays"]))
        for name, spec in meta["frame_arrays"].items():
            a = extra[name]
            if a.shape != (len(frames), *spec["shape"]) or str(a.dtype) != spec["dtype"]:
                problems.append(f"{name} {a.dtype} {a.shape}, expected {spec['dtype']} [{len(frames)}, "
                                f"{', '.join(map(str, spec['shape']))}]")
            elif a.dtype.kind == "f" and not np.isfinite(a).all():
                problems.append(f"non-finite {name}")
    if problems:
        raise ShardError(f"{path}: " + "; ".join(problems))
    return arr


def check_dir(root: str | os.PathLike) -> tuple[dict, list[str]]:
    """Verify every shard of a data dir. Returns (summary, list of 'path: problem' strings)."""
    store = ShardStore(root)
    meta = store.read_meta()
    keys = meta["action_space"]["keys"]
    bad, episodes, frames, seeds = [], 0, 0, []
    key_frames = np.zeros(len(keys), np.int64)
    combos: Counter = Counter()
    shards = store.shard_paths()
    for path in shards:
        try:
            arr = verify_shard(path, meta)
        except ShardError as e:
            bad.append(str(e))
            continue
        episodes += len(arr["episode_lengths"])
        frames += len(arr["frames"])
        seeds.extend(int(s) for s in arr["episode_seeds"])
        held = arr["actions"][:, : len(keys)] > 0.5
        key_frames += held.sum(0)
        combos.update("+".join(k for k, h in zip(keys, row) if h) or "noop" for row in held)
    summary = {
        "dir": str(store.root), "engine": meta.get("engine"), "version": meta.get("version"),
        "env": meta.get("env"), "resolution": meta["resolution"], "fps": meta.get("fps"),
        "shards": len(shards), "bad_shards": len(bad), "episodes": episodes, "frames": frames,
        "seeds": [min(seeds), max(seeds)] if seeds else None,
        "action_key_fraction": {k: round(float(n) / max(frames, 1), 4) for k, n in zip(keys, key_frames)},
        "action_histogram": dict(combos.most_common()),
        "stale_temp_files": [p.name for p in store.root.glob(".shard_*.tmp")],
    }
    return summary, bad
