"""`forcekit lipsync`: a face (webcam or video file) and a voice (microphone or audio file) in, the face
re-synced to the voice out, in a pygame window, with the voice played back delayed to match.

The loop (DESIGN.md section 6, for audio-driven video):
- capture: the camera thread keeps the newest frame (latest wins); microphone blocks queue up
  (bounded) and are turned into per-frame features by `runtime.audio_features.StreamingAudioFeatures`
  as soon as each frame's lookahead has arrived;
- generation: each ready audio frame is re-synced with the newest camera frame (one chunk, one
  frame); if generation falls behind, the oldest pending audio frames are dropped, so the
  audio-to-mouth latency stays bounded (``max_pending``);
- output: the frame is shown at once; the voice goes through `DelayedAudio`, delayed by the
  expected audio-to-mouth latency, so what is heard matches the mouth that is seen.

Audio-to-mouth latency of frame t = the time its frame is ready minus the time the audio at
t / fps arrived (the time the block holding that sample was taken in, not a clock started with
the source: a browser or a busy machine delivers audio in bursts, some of it before the loop
starts); it contains the feature lookahead (about 83 ms), the block size of the source and
the generation of the frame.

Input: with a face locator (runtime/face_locator.py, `--face-locator`), `FaceCropper` cuts the face
out of the camera frame framed as the model's training renders and re-syncs it; with none, a fixed
centre crop (resized to the bundle's frame size) is re-synced, whatever it holds. Defined behaviour
for awkward input, never a crash: no face passes the centre crop through unchanged and says "no
face"; a face partly out of the picture passes its crop through and says "face leaving the frame";
two or more faces re-sync the largest and say how many there are; when a face comes back after
any of these the stream restarts on it (it becomes the identity reference). A camera with no
frame yet shows a grey frame and says "no video"; a camera
that stops keeps its last frame; silence gives zero features (a mouth at rest); clipping is counted
and shown; any sample rate is resampled; blocks with NaN or inf become silence and are counted;
a video file shorter than the audio holds its last frame.
"""

from __future__ import annotations

import threading
import time
import wave
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apps.pipeline import now, percentiles_ms


# -- frames ----------------------------------------------------------------------------------------
def centre_crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The largest centred square (or the bundle's aspect) of an RGB frame, resized to ``size`` (H, W)."""
    import cv2

    h, w = frame.shape[:2]
    th, tw = size
    scale = min(h / th, w / tw)
    ch, cw = int(round(th * scale)), int(round(tw * scale))
    y, x = (h - ch) // 2, (w - cw) // 2
    crop = np.ascontiguousarray(frame[y:y + ch, x:x + cw, :3])
    if crop.shape[:2] == (th, tw):
        return crop.astype(np.uint8, copy=False)
    return cv2.resize(crop, (tw, th), interpolation=cv2.INTER_AREA).astype(np.uint8)


@dataclass
class FaceCropConfig:
    leaving: float = 0.15   # a face whose crop lies more than this share of its side outside the frame is leaving
    smooth: float = 0.6     # weight of the previous crop box in the next (steadies the crop between frames)


DEFAULT_FACE_LOCATOR = Path(__file__).resolve().parent.parent / "models" / "face_locator"


def open_face_locator(spec: str | None):
    """The face locator a lip-sync app uses: "none" -> a fixed centre crop (None), None -> the shipped
    models/face_locator when present, else a run or bundle dir (an error naming it if it holds none)."""
    if spec == "none" or (spec is None and not (DEFAULT_FACE_LOCATOR / "locator.pt").exists()):
        return None
    from runtime.face_locator import load_face_locator

    return load_face_locator(DEFAULT_FACE_LOCATOR if spec is None else spec)


class FaceCropper:
    """A camera frame -> (the face crop to re-sync or pass through, whether to re-sync it, a status).

    The locator sees the frame padded to a square (so faces keep their aspect at any camera shape);
    the crop is a square of the located side (the renders' framing), resized to the bundle's size."""

    def __init__(self, locator, size: tuple[int, int], cfg: FaceCropConfig | None = None) -> None:
        self.locator, self.size, self.cfg = locator, size, cfg or FaceCropConfig()
        self._box: tuple[float, float, float] | None = None   # the last crop (cx, cy, side) in frame pixels

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, bool, str]:
        if self.locator is None:
            return centre_crop(frame, self.size), True, "ok"
        import cv2

        from runtime.face_locator import find_faces

        h, w = frame.shape[:2]
        side, n = max(h, w), self.locator.cfg.size
        # shrink first, then pad: resizing the padded full-size square cost ~10 ms a frame
        sh, sw = max(1, round(h * n / side)), max(1, round(w * n / side))
        square = np.full((n, n, 3), 128, np.uint8)
        y0, x0 = (n - sh) // 2, (n - sw) // 2
        square[y0:y0 + sh, x0:x0 + sw] = cv2.resize(np.ascontiguousarray(frame[..., :3]), (sw, sh),
                                                     interpolation=cv2.INTER_AREA)
        faces = find_faces(self.locator, square)
        if not faces:
            self._box = None
            return centre_crop(frame, self.size), False, "no face"
        face = max(faces, key=lambda f: f.side)
        cx, cy, s = (face.cx * n - x0) * w / sw, (face.cy * n - y0) * h / sh, face.side * n * h / sh
        if self._box is not None and abs(cx - self._box[0]) + abs(cy - self._box[1]) < 0.5 * s:
            k = self.cfg.smooth
            cx, cy, s = (k * a + (1 - k) * b for a, b in zip(self._box, (cx, cy, s)))
        self._box = (cx, cy, s)
        crop = self._cut(frame, cx, cy, s)
        outside = max(0.0, s / 2 - cx, cx + s / 2 - w, s / 2 - cy, cy + s / 2 - h) / s
        if outside > self.cfg.leaving:
            return crop, False, "face leaving the frame"
        return crop, True, "ok" if len(faces) == 1 else f"{len(faces)} faces: re-syncing the largest"

    def _cut(self, frame: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
        """The square of side s centred at (cx, cy), edge pixels repeated where it leaves the frame."""
        import cv2

        th, tw = self.size
        half = max(s, 2.0) / 2
        x0, y0 = int(round(cx - half * tw / th)), int(round(cy - half))
        x1, y1 = int(round(cx + half * tw / th)), int(round(cy + half))
        h, w = frame.shape[:2]
        pad = max(0, -x0, -y0, x1 - w, y1 - h)
        if pad:
            frame = cv2.copyMakeBorder(np.ascontiguousarray(frame[..., :3]), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        crop = np.ascontiguousarray(frame[y0 + pad:y1 + pad, x0 + pad:x1 + pad, :3])
        return cv2.resize(crop, (tw, th), interpolation=cv2.INTER_AREA).astype(np.uint8)


class LatestFrame:
    """The newest camera frame (latest wins) and when it came."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frame: np.ndarray | None = None
        self.frames_in = 0
        self.at = 0.0

    def put(self, frame: np.ndarray) -> None:
        with self._lock:
            self.frame, self.at = frame, now()
            self.frames_in += 1

    def get(self) -> np.ndarray | None:
        with self._lock:
            return self.frame


# -- audio -----------------------------------------------------------------------------------------
def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """int16 samples ``[n]`` or ``[n, channels]`` and the sample rate of a 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is read, got {8 * f.getsampwidth()}-bit")
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.int16)
        ch, rate = f.getnchannels(), f.getframerate()
    return (data.reshape(-1, ch) if ch > 1 else data), rate


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> Path:
    """Write float samples in [-1, 1] (mono) as a 16-bit PCM WAV."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(pcm.tobytes())
    return Path(path)


class DelayedAudio:
    """Mono playback delayed by ``delay_s``: `write` what was captured, `read` what to play now."""

    def __init__(self, rate: int, delay_s: float, max_s: float = 5.0) -> None:
        self.rate = rate
        self.delay = int(round(delay_s * rate))
        self._buf: deque[np.ndarray] = deque()
        self._held = 0
        self._max = int(max_s * rate)
        self._pending_zeros = self.delay   # the first `delay` samples played are silence
        self._lock = threading.Lock()

    def write(self, samples: np.ndarray) -> None:
        with self._lock:
            self._buf.append(np.asarray(samples, np.float32))
            self._held += len(samples)
            while self._held > self._max:    # a stalled player: drop the oldest, never grow
                self._held -= len(self._buf.popleft())

    def read(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.float32)
        with self._lock:
            z = min(n, self._pending_zeros)
            self._pending_zeros -= z
            i = z
            while i < n and self._buf:
                head = self._buf[0]
                k = min(n - i, len(head))
                out[i:i + k] = head[:k]
                if k == len(head):
                    self._buf.popleft()
                else:
                    self._buf[0] = head[k:]
                self._held -= k
                i += k
        return out


def mono(block: np.ndarray) -> np.ndarray:
    """Mono float32 of an int16 / float block ``[n]`` or ``[n, channels]`` (for playback)."""
    b = np.asarray(block)
    b = b.astype(np.float32) / 32768.0 if b.dtype == np.int16 else b.astype(np.float32)
    return b.mean(1) if b.ndim == 2 else b


# -- sources ---------------------------------------------------------------------------------------
class AudioClipSource:
    """Recorded audio played as if it were a microphone: blocks of ``block_s`` released in real time."""

    def __init__(self, samples: np.ndarray, rate: int, block_s: float = 0.01) -> None:
        self.samples, self.rate = samples, int(rate)
        self.block = max(1, int(round(block_s * self.rate)))
        self._start: float | None = None
        self._sent = 0

    def start(self) -> float:
        self._start = now()
        return self._start

    def poll(self) -> list[np.ndarray]:
        """The blocks whose end time has passed since the last poll."""
        due = int((now() - self._start) * self.rate) // self.block * self.block
        due = min(due, len(self.samples))
        out = [self.samples[i:i + self.block] for i in range(self._sent, due, self.block)]
        self._sent = max(self._sent, due)
        return out

    @classmethod
    def from_wav(cls, path: str | Path, block_s: float = 0.01) -> AudioClipSource:
        return cls(*read_wav(path), block_s=block_s)

    @property
    def done(self) -> bool:
        return self._sent >= len(self.samples)

    def close(self) -> None:
        """Nothing to release."""


def drain(q: deque) -> list:
    """Pop everything queued so far, oldest first, one popleft at a time: safe while another
    thread (a sound-card callback, the event loop) keeps appending."""
    out = []
    while q:
        out.append(q.popleft())
    return out


class MicSource:
    """The default microphone through sounddevice (PortAudio), imported only here."""

    def __init__(self, rate: int = 48000, block_s: float = 0.01, max_blocks: int = 200) -> None:
        try:
            import sounddevice
        except ImportError as e:   # a clear message, not a traceback, on a machine without it
            raise RuntimeError("the microphone needs the sounddevice package: pip install sounddevice "
                               "(or pass --audio FILE.wav)") from e
        self.rate = rate
        self._q: deque[np.ndarray] = deque(maxlen=max_blocks)   # bounded: a stalled loop drops the oldest
        self._stream = sounddevice.InputStream(samplerate=rate, channels=1, dtype="float32",
                                               blocksize=max(1, int(block_s * rate)),
                                               callback=lambda data, *_: self._q.append(data[:, 0].copy()))
        self.done = False

    def start(self) -> float:
        self._stream.start()
        return now()

    def poll(self) -> list[np.ndarray]:
        return drain(self._q)

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


class VideoSource:
    """Camera index or video file through OpenCV in a thread; files are paced at their own fps."""

    def __init__(self, spec: str | int, target: LatestFrame) -> None:
        import cv2

        self._cap = cv2.VideoCapture(spec)
        if not self._cap.isOpened():
            raise RuntimeError(f"cannot open video source {spec!r}")
        self._file = not isinstance(spec, int)
        fps = self._cap.get(cv2.CAP_PROP_FPS) if self._file else 0.0
        self._period = 1.0 / fps if fps and fps > 0 else 0.0
        self._target = target
        self._stop = threading.Event()
        self.ended = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="lipsync-video")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import cv2

        start, n = now(), 0
        while not self._stop.is_set():
            ok, bgr = self._cap.read()
            if not ok:              # a file ended or a camera went away: the last frame is held
                self.ended = True
                return
            self._target.put(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            n += 1
            if self._period:
                time.sleep(max(0.0, start + n * self._period - now()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._cap.release()


# -- the loop --------------------------------------------------------------------------------------
@dataclass
class LipsyncLoopConfig:
    block_s: float = 0.01        # microphone block
    max_pending: int = 3         # audio frames waiting for generation beyond which the oldest are dropped
    audio_delay_s: float | None = None   # playback delay; None: lookahead + one frame + one block
    seconds: float | None = None  # stop after this long (None: until the audio source ends / the window closes)


class LipsyncLoop:
    """Drives a `LipsyncSession` from an audio source and a `LatestFrame` (see the module docstring)."""

    def __init__(self, session, audio, frames: LatestFrame, config: LipsyncLoopConfig | None = None,
                 on_frame=None, face_locator=None) -> None:
        from runtime.audio_features import StreamingAudioFeatures

        self.session, self.audio, self.frames = session, audio, frames
        self.config = config or LipsyncLoopConfig()
        self.features = StreamingAudioFeatures(session.audio_config, audio.rate)
        self.fps = session.audio_config.fps
        delay = self.config.audio_delay_s
        if delay is None:
            delay = self.features.lookahead_s + 1.0 / self.fps + self.config.block_s
        self.playback = DelayedAudio(audio.rate, delay)
        self.on_frame = on_frame
        self._pending: deque[tuple[int, np.ndarray]] = deque()
        self.latency: deque[float] = deque(maxlen=1000)
        self._arrivals: deque[tuple[int, float]] = deque()   # (samples received after the block, its time)
        self._received = 0
        self.frame_times: deque[float] = deque(maxlen=200)
        self.dropped = self.bad_blocks = self.frames_out = 0
        self.frame_index = -1   # the audio frame (t, at t / fps of the audio received) the last frame was made for
        self.stop = False   # set by the window when it is closed
        self.t0 = 0.0
        self.status = "starting"
        self.cropper = FaceCropper(face_locator, session.frame_size)
        self.passed_through = 0   # frames shown unchanged: no face, or a face leaving the frame
        self._restart = False     # the next re-synced face starts a new stream (a new identity reference)
        h, w = session.frame_size
        self._grey = np.full((h, w, 3), 128, np.uint8)

    def _audio_in(self) -> None:
        for block in self.audio.poll():
            b = np.asarray(block)
            if b.dtype != np.int16 and not np.isfinite(b).all():   # a broken capture block: silence
                self.bad_blocks += 1
                b = np.zeros(b.shape, np.float32)
            m = mono(b)
            self.playback.write(m)
            self._received += len(m)
            self._arrivals.append((self._received, now()))
            self._queue(self.features.push(b))
        if self.audio.done and not self.features.ended:   # a file ended: its last frames, as offline
            self._queue(self.features.flush())
        while len(self._pending) > self.config.max_pending:
            self._pending.popleft()
            self.dropped += 1

    def _queue(self, feats: np.ndarray) -> None:
        first = self.features.frames - len(feats)   # features come out in frame order
        self._pending.extend((first + i, f) for i, f in enumerate(feats))

    def _arrival(self, t: int) -> float:
        """When the audio at frame t's time arrived: the intake time of the block holding that sample
        (frames are asked for in order, so the blocks before it are dropped)."""
        sample = t * self.audio.rate / self.fps
        while len(self._arrivals) > 1 and self._arrivals[0][0] <= sample:
            self._arrivals.popleft()
        return self._arrivals[0][1] if self._arrivals else self.t0

    def _face(self) -> tuple[np.ndarray, bool]:
        """The face crop of the newest camera frame and whether to re-sync it (else it passes through)."""
        frame = self.frames.get()
        if frame is None:
            self.status = "no video"
            return self._grey, True
        crop, resync, self.status = self.cropper(frame)
        return crop, resync

    def step(self) -> np.ndarray | None:
        """Take in the audio that arrived, re-sync the oldest ready frame; None if none is ready."""
        self._audio_in()
        if not self._pending:
            return None
        t, feat = self._pending.popleft()
        self.frame_index = t
        arrived = self._arrival(t)
        face, resync = self._face()
        if resync:
            if self._restart:
                self.session.reset(0)
                self._restart = False
            out = self.session.step(audio=feat, video=face)[-1]
        else:
            out, self._restart = face, True
            self.passed_through += 1
        done = now()
        self.latency.append(done - arrived)
        self.frame_times.append(done)
        self.frames_out += 1
        if self.on_frame is not None:
            self.on_frame(out, self)
        return out

    def run(self) -> dict:
        """Until the audio source ends (files), ``seconds`` pass, or ``on_frame`` returns False."""
        self.session.reset(0)
        self.t0 = self.audio.start()
        try:
            while True:
                if self.config.seconds is not None and now() - self.t0 > self.config.seconds:
                    break
                if self.stop or (self.audio.done and self.features.ended and not self._pending):
                    break
                if self.step() is None:
                    time.sleep(0.002)
        finally:
            self.audio.close()
        return self.stats()

    def stats(self) -> dict:
        times = list(self.frame_times)
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        lat = percentiles_ms(self.latency)
        return {"frames": self.frames_out, "fps": fps, "audio_to_mouth_ms_p50": lat["p50"],
                "audio_to_mouth_ms_p95": lat["p95"], "feature_lookahead_ms": self.features.lookahead_s * 1e3,
                "audio_delay_ms": self.playback.delay / self.audio.rate * 1e3, "dropped_frames": self.dropped,
                "clipped_samples": self.features.clipped_samples, "bad_audio_blocks": self.bad_blocks,
                "passed_through_frames": self.passed_through, "video": self.status}


# -- the window ------------------------------------------------------------------------------------
class Window:
    """The pygame window: the re-synced face scaled up, and a line of figures under it."""

    def __init__(self, size: int = 384) -> None:
        import pygame

        pygame.init()
        self.pygame = pygame
        self.size = size
        self.screen = pygame.display.set_mode((size, size + 24))
        pygame.display.set_caption("forcekit lipsync")
        self.font = pygame.font.Font(None, 20)
        self.closed = False

    def show(self, frame: np.ndarray, loop: LipsyncLoop) -> None:
        pg = self.pygame
        for event in pg.event.get():
            if event.type == pg.QUIT or (event.type == pg.KEYDOWN and event.key == pg.K_ESCAPE):
                self.closed = True
                loop.stop = True
        surf = pg.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))
        self.screen.fill((0, 0, 0))
        self.screen.blit(pg.transform.scale(surf, (self.size, self.size)), (0, 0))
        s = loop.stats()
        fps = f"{s['fps']:.1f}" if s["fps"] else "-"
        lat = f"{s['audio_to_mouth_ms_p50']:.0f}" if s["audio_to_mouth_ms_p50"] else "-"
        text = f"{fps} fps  audio->mouth {lat} ms  {s['video']}  clipped {s['clipped_samples']}"
        self.screen.blit(self.font.render(text, True, (230, 230, 230)), (6, self.size + 4))
        pg.display.flip()

    def close(self) -> None:
        self.pygame.quit()
