"""`forcekit record --env lipsync:train` / `lipsync:heldout`: speaking-face clips as shards.

One clip = one episode: a sentence (drawn from a small grammar) spoken by an espeak-ng voice
at a random rate, with silence before and after; its phoneme timings give the mouth track;
a fresh identity speaks it with its own head motion and blinks. Stored like the game worlds
(training/data/shards.py), so `forcekit data check` verifies it:

    frames     uint8 [N, H, W, 3]
    actions    float32 [N, window * n_mels]: the log-mel window around frame t (alignment:
               actions[t] belongs to frames[t], at time t / fps, not to frames[t + 1])
    audio      int16 [N, samples_per_frame]: the speech at the feature sample rate, frame by frame
    mouth      float32 [N, 3] (open, width, round); pose float32 [N, 5]; blink float32 [N]
    mouth_box  int32 [N, 4] (y0, x0, y1, x1): the pixels a mouth change can touch
    episode_info  JSON per clip: identity, voice, rate, text, phonemes, split

The split is by construction, not by luck: held-out identities come from their own seed range,
held-out voices are never used for training, and a sentence belongs to the held-out split
exactly when a hash of its text says so, so no held-out sentence is ever spoken in training.
Resumable as the game recorder is: clip i always uses the same seeds.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from runtime.audio_features import AudioFeatureConfig, as_mono_float, frame_features, resample
from training.data.shards import Episode, ShardStore
from training.lipsync.renderer import MOUTH_PARAMS, POSE_PARAMS, FaceIdentity, RenderConfig, render_clip
from training.lipsync.speech import Espeak, mouth_track

SPLITS = ("train", "heldout")
TRAIN_VOICES = ("en+m1", "en+m2", "en+m3", "en+f1", "en+f2", "en-us+m4", "en-us+f3", "en-us+m5")
HELDOUT_VOICES = ("en+m6", "en-us+f4", "en+m7", "en-us+f5")
HELDOUT_IDENTITY_BASE = 1_000_000    # held-out identity seeds start here; training seeds stay below
HELDOUT_SENTENCE_BUCKETS = 5         # one sentence in five (by hash) is held out

SUBJECTS = ("the old man", "my sister", "a small dog", "the teacher", "our neighbour", "the pilot", "a young girl",
            "the farmer", "his brother", "the baker", "every student", "the quiet boy", "a tall woman", "the chef",
            "my father", "the doctor", "a happy child", "the king", "her cousin", "the captain")
VERBS = ("opened", "painted", "watched", "carried", "bought", "fixed", "pushed", "found", "washed", "moved",
         "visited", "chose", "fetched", "shared", "measured", "cooked", "pulled", "checked", "lifted", "showed")
OBJECTS = ("the blue window", "a heavy box", "the morning paper", "three yellow apples", "the broken chair",
           "a shiny coin", "the back door", "some fresh bread", "the map of the city", "a wooden spoon",
           "the garden fence", "two paper boats", "the big red truck", "a cup of tea", "the silver key",
           "a pile of books", "the tiny boat", "four white sheep", "the thick rope", "a bowl of soup")
ENDINGS = ("before lunch", "in the rain", "after school", "with great care", "near the river", "on monday",
           "at the park", "without a word", "by the fire", "under the bridge", "for the party", "at noon",
           "every evening", "very slowly", "in the kitchen", "on the beach", "just in time", "too quickly")


def sentence_split(text: str) -> str:
    """The split a sentence belongs to, decided by its text alone."""
    held = zlib.crc32(text.strip().lower().encode()) % HELDOUT_SENTENCE_BUCKETS == 0
    return "heldout" if held else "train"


def draw_sentence(rng: np.random.Generator, split: str) -> str:
    """A grammatical sentence of the given split (drawn until the hash agrees)."""
    while True:
        parts = [SUBJECTS[rng.integers(len(SUBJECTS))], VERBS[rng.integers(len(VERBS))],
                 OBJECTS[rng.integers(len(OBJECTS))]]
        if rng.uniform() < 0.7:
            parts.append(ENDINGS[rng.integers(len(ENDINGS))])
        text = " ".join(parts).capitalize() + "."
        if sentence_split(text) == split:
            return text


@dataclass
class LipsyncConfig:
    """What a lip-sync recording is made of; `meta.json` records all of it (resume guard)."""

    split: str = "train"
    size: tuple[int, int] = (96, 96)
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    rate_range: tuple[int, int] = (130, 220)       # words per minute
    silence_range: tuple[float, float] = (0.15, 0.5)   # seconds before and after the speech
    motion: float = 1.0
    blink_rate_hz: float = 0.3
    max_frames: int = 1000

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown lip-sync split {self.split!r}; expected one of {SPLITS}")

    @property
    def voices(self) -> tuple[str, ...]:
        return TRAIN_VOICES if self.split == "train" else HELDOUT_VOICES

    def identity_seed(self, seed: int, i: int) -> int:
        s = seed + i
        if s < 0 or s >= HELDOUT_IDENTITY_BASE:
            raise ValueError(f"identity seed {s} outside 0..{HELDOUT_IDENTITY_BASE - 1}; lower --seed")
        return s + (HELDOUT_IDENTITY_BASE if self.split == "heldout" else 0)

    def meta(self) -> dict:
        a = self.audio
        return {
            "engine": "lipsync", "version": "1", "env": f"lipsync:{self.split}", "split": self.split,
            "resolution": list(self.size), "fps": a.fps,
            "action_space": {"keys": [], "values": a.value_names(), "bindings": {}},
            "alignment": "actions[t] is the audio window around frame t's time t / fps",
            "audio_features": a.to_dict(), "voices": list(self.voices), "rate_range": list(self.rate_range),
            "silence_range": list(self.silence_range), "motion": self.motion, "blink_rate_hz": self.blink_rate_hz,
            "max_frames": self.max_frames, "mouth_params": list(MOUTH_PARAMS), "pose_params": list(POSE_PARAMS),
            "frame_arrays": {
                "audio": {"shape": [a.samples_per_frame], "dtype": "int16"},
                "mouth": {"shape": [3], "dtype": "float32"},
                "pose": {"shape": [5], "dtype": "float32"},
                "blink": {"shape": [], "dtype": "float32"},
                "mouth_box": {"shape": [4], "dtype": "int32"},
            },
        }


def make_clip(cfg: LipsyncConfig, seed: int, i: int) -> Episode:
    """Clip i of a recording: speech, mouth track, rendered frames and features, as one Episode."""
    rng = np.random.default_rng([0x11B5, SPLITS.index(cfg.split), seed, i])
    a = cfg.audio
    text = draw_sentence(rng, cfg.split)
    voice = cfg.voices[rng.integers(len(cfg.voices))]
    rate = int(rng.integers(cfg.rate_range[0], cfg.rate_range[1] + 1))
    utt = Espeak.get().synthesize(text, voice, rate)
    utt = utt.padded(*rng.uniform(*cfg.silence_range, size=2))
    speech = resample(as_mono_float(utt.audio), utt.sample_rate, a.sample_rate).numpy()
    frames = min(int(np.ceil(len(speech) / a.samples_per_frame)), cfg.max_frames)
    speech = np.pad(speech, (0, max(0, frames * a.samples_per_frame - len(speech))))[: frames * a.samples_per_frame]
    mouth = mouth_track(utt.phonemes, a.fps, frames)
    identity = FaceIdentity.sample(cfg.identity_seed(seed, i))
    clip = render_clip(identity, mouth, a.fps, motion_seed=identity.seed,
                       cfg=RenderConfig(size=cfg.size, motion=cfg.motion, blink_rate_hz=cfg.blink_rate_hz))
    audio16 = np.round(np.clip(speech, -1, 1) * 32767).astype(np.int16).reshape(frames, a.samples_per_frame)
    info = {"split": cfg.split, "text": text, "voice": voice, "rate": rate, "identity": identity.to_dict(),
            "phonemes": [[p.name, round(p.start, 4), round(p.end, 4)] for p in utt.phonemes]}
    return Episode(frames=clip.frames, actions=frame_features(speech, a.sample_rate, a, frames), seed=identity.seed,
                   arrays={"audio": audio16, "mouth": clip.mouth, "pose": clip.pose, "blink": clip.blink,
                           "mouth_box": clip.mouth_box.astype(np.int32)}, info=info)


def record_lipsync(cfg: LipsyncConfig, out: str, clips: int, seed: int = 0, clips_per_shard: int = 16,
                   progress: bool = True) -> dict:
    """Record until `clips` clips are stored in `out` (a rerun continues); returns a summary."""
    from tqdm import tqdm

    from training.data.record import episodes_done

    store = ShardStore(out)
    store.write_meta({**cfg.meta(), "seed": seed})
    store.remove_stale_temps()
    start = episodes_done(store)
    t0, pending = time.time(), []
    bar = tqdm(total=clips, initial=min(start, clips), desc=f"record lipsync:{cfg.split}", unit="clip",
               disable=not progress)
    for i in range(start, clips):
        pending.append(make_clip(cfg, seed, i))
        bar.update(1)
        if len(pending) == clips_per_shard or i == clips - 1:
            store.append(pending)
            pending = []
    bar.close()
    made = max(clips - start, 0)
    return {"out": str(store.root), "episodes": episodes_done(store), "shards": len(store.shard_paths()),
            "clips_this_run": made, "seconds_per_clip": round((time.time() - t0) / made, 3) if made else None}


def load_clips(root: str, members: tuple[str, ...] = ("frames", "audio", "mouth", "mouth_box"),
               max_clips: int = 0) -> tuple[dict, list[dict]]:
    """(meta, clips) of a lip-sync data dir; each clip a dict of its per-frame arrays plus `info`."""
    from training.data.shards import open_shard

    store = ShardStore(root)
    meta = store.read_meta()
    if meta.get("engine") != "lipsync":
        raise ValueError(f"{root}: not a lip-sync recording (engine {meta.get('engine')!r})")
    clips: list[dict] = []
    for path in store.shard_paths():
        arr = open_shard(path, (*members, "episode_lengths", "episode_info"))
        offsets = np.concatenate([[0], np.cumsum(arr["episode_lengths"])])
        for e, info in enumerate(arr["episode_info"]):
            sl = slice(int(offsets[e]), int(offsets[e + 1]))
            clips.append({**{m: arr[m][sl] for m in members}, "info": json.loads(str(info))})
            if max_clips and len(clips) >= max_clips:
                return meta, clips
    if not clips:
        raise FileNotFoundError(f"{root}: no clips")
    return meta, clips
