"""`forcekit eval lipsync-generate`: run a lip-sync bundle over recorded clips, write what `eval lipsync` reads.

The bundle is driven the way the live loop drives it: frame by frame through `open_session`, each
input frame with its audio features (the recorded ones, which equal the streaming features of
the same audio: tests/test_lipsync_stream.py). Two sets are written, each in the recording format
(frames, the driving features as ``actions``, the driving audio, the driving audio's true mouth
track, the input's mouth boxes):

  OUT/own        every clip re-synced to its own audio            (sync and identity)
  OUT/ab         clip i's video driven by clip i+1's audio (A/B)  (must follow B, not A)
  OUT/ab_input   clip i's input frames over the same span         (the reference for identity)
  OUT/ab_truth_a the A/B frames with A's mouth track as the truth (the correlation with A: must be low)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data.shards import Episode, ShardStore
from training.lipsync.record import load_clips

MEMBERS = ("frames", "actions", "audio", "mouth", "mouth_box", "pose", "blink")


def _episode(frames: np.ndarray, drive: dict, video: dict, n: int, seed: int, mouth: np.ndarray) -> Episode:
    return Episode(frames=frames[:n], actions=drive["actions"][:n].astype(np.float32), seed=seed,
                   arrays={"audio": drive["audio"][:n], "mouth": mouth[:n], "pose": video["pose"][:n],
                           "blink": video["blink"][:n], "mouth_box": video["mouth_box"][:n]},
                   info={**video["info"], "driving_text": drive["info"]["text"]})


def check_clips_fit(meta: dict, session, clips_dir: str) -> None:
    """Refuse recorded clips a lip-sync session cannot be driven by: another frame size or other audio features."""
    if tuple(meta["resolution"]) != tuple(session.frame_size):
        raise ValueError(f"{clips_dir}: {meta['resolution']} frames, the bundle makes {list(session.frame_size)}")
    if meta["audio_features"] != session.audio_config.to_dict():
        raise ValueError(f"{clips_dir}: its audio features differ from the ones the bundle was trained on")


def resync(session, video: np.ndarray, features: np.ndarray, seed: int = 0) -> np.ndarray:
    """The session's output for input frames ``video`` [n, H, W, 3] driven by ``features`` [n, dim]."""
    session.reset(seed)
    return np.concatenate([session.step(audio=features[t], video=video[t]) for t in range(len(video))])


def generate_lipsync(bundle: str, clips_dir: str, out: str, max_clips: int = 0, ab: bool = True,
                     device: str = "cpu", progress: bool = True, steps: int | None = None,
                     guidance: float | None = None) -> dict:
    """Write OUT/own (and OUT/ab, OUT/ab_input, OUT/ab_truth_a); returns the counts. ``steps``: sampler
    steps per frame (None: the bundle's), so a teacher can be measured the way its students are;
    ``guidance``: CFG scale on the condition (None: the bundle's)."""
    from tqdm import tqdm

    from runtime import open_session

    session = open_session(bundle, device=device, steps=steps, guidance=guidance)
    meta, clips = load_clips(clips_dir, MEMBERS, max_clips)
    check_clips_fit(meta, session, clips_dir)
    stores = {k: ShardStore(Path(out) / k) for k in (("own", "ab", "ab_input", "ab_truth_a") if ab else ("own",))}
    for s in stores.values():
        s.write_meta({**meta, "generated_by": bundle})
    own, abs_, inputs, truth_a = [], [], [], []
    for i, c in enumerate(tqdm(clips, desc="lip-sync generate", disable=not progress)):
        n = len(c["frames"])
        own.append(_episode(resync(session, c["frames"], c["actions"], i), c, c, n, i, c["mouth"]))
        if ab and len(clips) > 1:
            b = clips[(i + 1) % len(clips)]
            m = min(n, len(b["frames"]))
            frames = resync(session, c["frames"][:m], b["actions"][:m], i)
            abs_.append(_episode(frames, b, c, m, i, b["mouth"]))
            inputs.append(_episode(c["frames"], b, c, m, i, b["mouth"]))
            truth_a.append(_episode(frames, b, c, m, i, c["mouth"]))
    stores["own"].append(own)
    if abs_:
        stores["ab"].append(abs_)
        stores["ab_input"].append(inputs)
        stores["ab_truth_a"].append(truth_a)
    return {"out": out, "clips": len(own), "ab_clips": len(abs_), "frames": int(sum(len(e.frames) for e in own))}
