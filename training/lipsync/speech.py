"""Speech with phoneme timings from espeak-ng, and the mouth track those timings imply.

espeak-ng is driven through its C library with ctypes (no subprocess, no files): in
synchronous mode with phoneme events on, the synthesis callback receives the samples and
`espeakEVENT_PHONEME` events whose `audio_position` is the phoneme's start in ms. The library
comes from the `espeakng-loader` wheel (library + voice data bundled; the `lipsync` extra) or
from the system (`apt-get install espeak-ng`). Without either, `SpeechUnavailable` says so.

Phonemes become visemes (mouth-shape classes) through `PHONEME_VISEMES`; each viseme has a
target (open, width, round) and a dominance. The mouth track is coarticulated: every phoneme
puts a key at its centre (a diphthong two keys, at a third and two thirds of it), a
low-dominance phoneme (t, k, h, ...) takes part of its shape from its neighbours, and the track
between keys is a smoothstep interpolation. Pauses and the time before the first and after the
last phoneme are silence, whose target is the closed, relaxed mouth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass

import numpy as np

# -- visemes ---------------------------------------------------------------------------------------
# target (open, width, round) and dominance (1: the phoneme's own shape; lower: borrowed from
# its neighbours, as the tongue-only consonants are in real speech).
VISEMES: dict[str, tuple[tuple[float, float, float], float]] = {
    "sil": ((0.0, 0.45, 0.1), 1.0),
    "PP": ((0.0, 0.45, 0.15), 1.0),    # p b m: lips pressed together
    "FF": ((0.12, 0.55, 0.0), 0.9),    # f v: lower lip to the teeth
    "TH": ((0.25, 0.55, 0.0), 0.6),    # T D
    "DD": ((0.22, 0.55, 0.0), 0.4),    # t d
    "kk": ((0.3, 0.5, 0.0), 0.3),      # k g N
    "CH": ((0.25, 0.35, 0.65), 0.8),   # tS dZ S Z: rounded, protruded
    "SS": ((0.12, 0.75, 0.0), 0.7),    # s z: teeth close, spread
    "nn": ((0.2, 0.55, 0.0), 0.4),     # n l
    "RR": ((0.25, 0.35, 0.55), 0.7),   # r
    "hh": ((0.35, 0.5, 0.0), 0.2),     # h
    "aa": ((0.95, 0.6, 0.0), 1.0),     # a A
    "E": ((0.6, 0.75, 0.0), 1.0),      # e E
    "ih": ((0.35, 0.95, 0.0), 1.0),    # i I (spread)
    "oh": ((0.7, 0.3, 0.8), 1.0),      # o O
    "ou": ((0.3, 0.15, 1.0), 1.0),     # u U w (rounded)
    "@": ((0.45, 0.5, 0.1), 0.8),      # schwa, strut, nurse
}

# espeak-ng's English phoneme mnemonics (stress marks stripped) -> one or two visemes.
PHONEME_VISEMES: dict[str, tuple[str, ...]] = {
    "p": ("PP",), "b": ("PP",), "m": ("PP",),
    "f": ("FF",), "v": ("FF",), "T": ("TH",), "D": ("TH",),
    "t": ("DD",), "d": ("DD",), "t#": ("DD",), "d#": ("DD",), "?": ("DD",),
    "k": ("kk",), "g": ("kk",), "N": ("kk",), "x": ("kk",),
    "tS": ("CH",), "dZ": ("CH",), "S": ("CH",), "Z": ("CH",),
    "s": ("SS",), "z": ("SS",), "n": ("nn",), "l": ("nn",), "n-": ("nn",), "l-": ("nn",),
    "r": ("RR",), "r-": ("RR",), "j": ("ih",), "w": ("ou",), "h": ("hh",),
    "a": ("aa",), "a#": ("aa",), "A:": ("aa",), "A@": ("aa", "@"), "aa": ("aa",), "A": ("aa",),
    "e": ("E",), "E": ("E",), "e@": ("E", "@"), "eI": ("E", "ih"), "E2": ("E",),
    "i": ("ih",), "i:": ("ih",), "I": ("ih",), "I2": ("ih",), "I#": ("ih",), "i@": ("ih", "@"), "i@3": ("ih", "@"),
    "aI": ("aa", "ih"), "aI@": ("aa", "ih"), "aU": ("aa", "ou"), "OI": ("oh", "ih"),
    "0": ("oh",), "O": ("oh",), "O:": ("oh",), "O@": ("oh", "@"), "o@": ("oh", "@"), "oU": ("oh", "ou"),
    "u": ("ou",), "u:": ("ou",), "U": ("ou",), "U@": ("ou", "@"),
    "@": ("@",), "@-": ("@",), "@2": ("@",), "@5": ("@",), "@L": ("@", "nn"), "3": ("@",), "3:": ("@",),
    "V": ("@",), "a@": ("aa", "@"),
}
PAUSES = {"_", "_:", "_!", "_|", "||", "|", ""}
VOWEL_LETTERS = set("aAeEiIoOuUV03@")


def phoneme_visemes(name: str) -> tuple[str, ...]:
    """Visemes of one espeak phoneme mnemonic; unknown ones fall back by their first letter."""
    core = name.strip().lstrip("',%=").rstrip(";")
    if core in PAUSES or core.startswith("_"):
        return ("sil",)
    if core in PHONEME_VISEMES:
        return PHONEME_VISEMES[core]
    for n in range(len(core) - 1, 0, -1):          # longest known prefix ("aI3" -> "aI")
        if core[:n] in PHONEME_VISEMES:
            return PHONEME_VISEMES[core[:n]]
    return ("@",) if core[:1] in VOWEL_LETTERS else ("nn",)


@dataclass
class Phoneme:
    name: str
    start: float    # seconds
    end: float


@dataclass
class Utterance:
    """Mono float32 audio in [-1, 1] at `sample_rate`, and its phonemes (seconds from the start)."""

    audio: np.ndarray
    sample_rate: int
    phonemes: list[Phoneme]
    text: str = ""
    voice: str = ""
    rate: int = 0

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate

    def padded(self, lead: float, tail: float) -> Utterance:
        """The same utterance with `lead` / `tail` seconds of silence around it (timings shifted)."""
        a, b = int(round(lead * self.sample_rate)), int(round(tail * self.sample_rate))
        audio = np.concatenate([np.zeros(a, np.float32), self.audio, np.zeros(b, np.float32)])
        shift = a / self.sample_rate
        return Utterance(audio, self.sample_rate, [Phoneme(p.name, p.start + shift, p.end + shift)
                                                   for p in self.phonemes], self.text, self.voice, self.rate)


def mouth_track(phonemes: list[Phoneme], fps: float, frames: int) -> np.ndarray:
    """Mouth (open, width, round) [frames, 3] at times t / fps, coarticulated (see module docstring)."""
    if frames < 0 or fps <= 0:
        raise ValueError(f"need frames >= 0 and fps > 0, got {frames}, {fps}")
    sil = np.array(VISEMES["sil"][0], np.float64)
    keys: list[tuple[float, np.ndarray, float]] = []       # (time, target, dominance)
    for p in sorted(phonemes, key=lambda p: p.start):
        if p.end < p.start:
            raise ValueError(f"phoneme {p.name!r} ends ({p.end}) before it starts ({p.start})")
        vis = phoneme_visemes(p.name)
        if vis == ("sil",):
            # A pause is closed over its whole length, not only at its centre.
            keys += [(p.start, sil, 1.0), (p.end, sil, 1.0)]
            continue
        for i, v in enumerate(vis):
            target, dom = VISEMES[v]
            keys.append((p.start + (p.end - p.start) * (i + 1) / (len(vis) + 1), np.array(target), dom))
    if not keys:
        return np.tile(sil, (frames, 1)).astype(np.float32)
    first, last = keys[0][0], keys[-1][0]
    keys = [(min(0.0, first - 0.12), sil, 1.0), (first - 0.1, sil, 1.0)] + keys + \
        [(last + 0.1, sil, 1.0), (max(last + 0.12, frames / fps), sil, 1.0)]
    times = np.array([k[0] for k in keys])
    raw = np.stack([k[1] for k in keys])
    dom = np.array([k[2] for k in keys])[:, None]
    neighbours = raw.copy()
    neighbours[1:-1] = 0.5 * (raw[:-2] + raw[2:])
    values = dom * raw + (1 - dom) * neighbours
    order = np.argsort(times, kind="stable")
    times, values = times[order], values[order]
    t = np.arange(frames) / fps
    idx = np.clip(np.searchsorted(times, t, side="right"), 1, len(times) - 1)
    t0, t1 = times[idx - 1], times[idx]
    s = np.clip((t - t0) / np.maximum(t1 - t0, 1e-6), 0, 1)
    s = s * s * (3 - 2 * s)
    out = values[idx - 1] * (1 - s[:, None]) + values[idx] * s[:, None]
    return np.clip(out, 0, 1).astype(np.float32)


# -- espeak-ng through ctypes ----------------------------------------------------------------------
class SpeechUnavailable(RuntimeError):
    """espeak-ng's library could not be found or initialised."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 1
_EVENT_LIST_TERMINATED, _EVENT_PHONEME = 0, 7
_PARAM_RATE, _PARAM_PITCH = 1, 3
_CHARS_UTF8 = 1
_POS_CHARACTER = 1


def _find_library() -> tuple[str, str | None]:
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except ImportError:
        pass
    for path in (ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1"):
        if path:
            try:
                ctypes.CDLL(path)
                return path, None
            except OSError:
                continue
    raise SpeechUnavailable("espeak-ng not found: pip install espeakng-loader (the `lipsync` extra) "
                            "or apt-get install espeak-ng")


class Espeak:
    """The process-wide espeak-ng synthesiser (the C library keeps global state: one instance, locked)."""

    _instance: Espeak | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        path, data = _find_library()
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as e:
            raise SpeechUnavailable(f"cannot load espeak-ng from {path}: {e}") from e
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode() if data else None,
                                           _INITIALIZE_PHONEME_EVENTS)
        if rate <= 0:
            raise SpeechUnavailable(f"espeak_Initialize failed ({rate}) with library {path}")
        self.sample_rate = int(rate)
        self._samples: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._callback = _CALLBACK(self._on_synth)   # kept referenced: the library calls it later
        self._lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> Espeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_synth(self, wav, n: int, events) -> int:
        if n > 0:
            self._samples.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_PHONEME:
                self._events.append((events[i].id.string.decode("utf-8", "replace"), events[i].audio_position))
            i += 1
        return 0

    def synthesize(self, text: str, voice: str = "en", rate: int = 175, pitch: int | None = None) -> Utterance:
        """Speak `text` with an espeak voice name (e.g. "en-us+f2") at `rate` words per minute."""
        if not text.strip():
            raise ValueError("cannot synthesise empty text")
        if not 80 <= rate <= 450:
            raise ValueError(f"speaking rate {rate} words/min outside espeak's 80..450")
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self._lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            if pitch is not None:
                self._lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            self._samples, self._events = [], []
            raw = text.encode("utf-8") + b"\0"
            err = self._lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self._lib.espeak_Synchronize()
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
            samples, events = self._samples, self._events
        audio = (np.concatenate(samples).astype(np.float32) / 32768.0) if samples else np.zeros(0, np.float32)
        duration = len(audio) / self.sample_rate
        starts = [ms / 1000.0 for _, ms in events]
        phonemes = [Phoneme(name, s, min(e, duration) if e >= s else s)
                    for (name, _), s, e in zip(events, starts, starts[1:] + [duration])]
        return Utterance(audio, self.sample_rate, phonemes, text=text, voice=voice, rate=int(rate))


def speech_available() -> str | None:
    """None when espeak-ng works here, else the reason it does not (for skips and messages)."""
    try:
        Espeak.get()
    except SpeechUnavailable as e:
        return str(e)
    return None
