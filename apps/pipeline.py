"""Three loops joined by bounded queues: input capture -> generation -> paced output.

Both front ends (the pygame window and the WebRTC server) share this. The front ends only map
devices to held keys and frames to pixels; everything about timing lives here:

- input capture: `InputState` holds the full held-key state; writers replace it, the generator
  samples it at chunk boundaries, so the latest state always wins and nothing queues up.
- generation: one thread calls `session.step` one chunk at a time. It only starts a chunk when
  the output queue has room for it, so it never runs ahead of playback (which would make the
  next input wait behind frames generated under an older one).
- paced output: `next_frame` / `next_frame_async` hand frames out at the session's playback
  rate against the wall clock. A consumer that falls behind gets the newest frames: the oldest
  queued frames are dropped instead of being shown late, so latency never grows.

Latency stamps: an input change records its time; the first chunk generated under it records
`input_to_frame` (change -> frames available) and the first of those frames handed to the
consumer records `input_to_display`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


def now() -> float:
    """The one clock every stamp uses (monotonic, seconds)."""
    return time.perf_counter()


def percentiles_ms(samples: Iterable[float]) -> dict[str, float | None]:
    """p50/p95 of durations given in seconds, in milliseconds (None when there is no sample)."""
    arr = np.asarray(list(samples), dtype=np.float64)
    if arr.size == 0:
        return {"p50": None, "p95": None}
    return {"p50": float(np.percentile(arr, 50) * 1e3), "p95": float(np.percentile(arr, 95) * 1e3)}


@dataclass(frozen=True)
class InputSnapshot:
    """The held keys at one instant; `version` grows by one on every change."""

    keys: tuple[str, ...]
    version: int
    changed_at: float


class InputState:
    """Latest-wins held-key state (keyboard key names, e.g. "w", "up", "space").

    Setting the same state again is not a change: the version only moves when the set of held
    keys does, so repeated snapshots (the browser sends them periodically) do not reset the
    latency clock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: frozenset[str] = frozenset()
        self._version = 0
        self._changed_at = now()

    def set_keys(self, keys: Iterable[str], at: float | None = None) -> bool:
        """Replace the held-key state; returns True when it changed."""
        new = frozenset(keys)
        with self._lock:
            if new == self._keys:
                return False
            self._keys = new
            self._version += 1
            self._changed_at = now() if at is None else at
            return True

    def press(self, key: str) -> bool:
        with self._lock:
            keys = self._keys | {key}
        return self.set_keys(keys)

    def release(self, key: str) -> bool:
        with self._lock:
            keys = self._keys - {key}
        return self.set_keys(keys)

    def snapshot(self) -> InputSnapshot:
        with self._lock:
            return InputSnapshot(tuple(sorted(self._keys)), self._version, self._changed_at)


@dataclass
class Frame:
    """One generated frame with the stamps the latency figures are computed from."""

    image: np.ndarray  # uint8 [H, W, 3]
    index: int  # running count of generated frames (since start or the last reset)
    chunk: int  # which chunk it belongs to
    generated_at: float  # when its chunk's step() returned
    input_version: int  # the InputState version it was generated under
    input_changed_at: float  # when that version's keys were set
    keys: tuple[str, ...]  # held keyboard keys it was generated under
    actions: tuple[str, ...]  # the action names the session received for it


class FrameQueue:
    """Bounded FIFO of frames; `put` drops the oldest frame when full (never blocks)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"FrameQueue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[Frame] = deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, frame: Frame) -> None:
        with self._cond:
            if len(self._items) >= self.capacity:
                self._items.popleft()
                self.dropped += 1
            self._items.append(frame)
            self._cond.notify_all()

    def poll(self) -> Frame | None:
        with self._cond:
            item = self._items.popleft() if self._items else None
            self._cond.notify_all()
            return item

    def drop_oldest(self, n: int, keep: int = 1) -> int:
        """Drop up to n of the oldest frames, keeping at least `keep`; returns how many went."""
        with self._cond:
            k = max(0, min(n, len(self._items) - keep))
            for _ in range(k):
                self._items.popleft()
            self.dropped += k
            if k:
                self._cond.notify_all()
            return k

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._cond.notify_all()

    def wait(self, predicate: Callable[[int], bool], timeout: float) -> bool:
        """Wait until predicate(len(queue)) holds or timeout passes; returns the predicate."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(len(self._items)), timeout=timeout)

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()


@dataclass
class PipelineConfig:
    """Queue and pacing settings. fps=None plays at the session's nominal rate.

    A chunk is started `lead_steps` smoothed step times plus `lead_frames` frame intervals
    before its first frame is due: late enough that the input it samples is fresh, early enough
    that the chunk is ready in time although step times vary.
    """

    buffer_chunks: int = 2  # output queue capacity, in chunks
    fps: float | None = None
    stats_window: int = 512  # how many recent samples each statistic keeps
    action_log: int = 256  # how many recent chunks' actions are kept for inspection
    lead_steps: float = 1.2
    lead_frames: float = 0.1
    max_controls: int = 64  # control calls waiting for the next chunk boundary; more are refused

    def __post_init__(self) -> None:
        if self.buffer_chunks < 1:
            raise ValueError(f"buffer_chunks must be >= 1, got {self.buffer_chunks}")
        if not (self.lead_steps >= 0 and self.lead_frames >= 0):
            raise ValueError(f"lead_steps and lead_frames must be >= 0, got {self.lead_steps}, {self.lead_frames}")
        if self.max_controls < 1:
            raise ValueError(f"max_controls must be >= 1, got {self.max_controls}")


class PipelineError(RuntimeError):
    """The generation thread failed; the original exception is the __cause__."""


class PipelineBusy(RuntimeError):
    """Too many control calls are waiting for the next chunk boundary (see PipelineConfig.max_controls)."""


MAX_SEED = 2**63 - 1  # the largest seed every session accepts (torch.Generator.manual_seed's signed range)


def check_seed(seed: object) -> int:
    """`seed` as a session seed, or ValueError saying why it is not one (bools are not integers here)."""
    if type(seed) is not int and not isinstance(seed, np.integer):
        raise ValueError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {seed}")
    return int(seed)


class Pipeline:
    """Runs a session in a generation thread and hands frames out paced to wall-clock time.

    The session must offer `step(action=...) -> uint8 [n, H, W, 3]`, `reset(seed=...)`,
    `action_space.from_keyboard(keys)`, `frames_per_chunk` and `fps`. Only the generation
    thread touches the session; control calls (`reset`, `call_between_chunks`) are queued and
    run there between chunks.
    """

    def __init__(self, session, config: PipelineConfig | None = None,
                 inputs: InputState | None = None) -> None:
        self.session = session
        self.config = config or PipelineConfig()
        self.inputs = inputs or InputState()
        self.fps = float(self.config.fps or session.fps)
        if self.fps <= 0:
            raise ValueError(f"playback fps must be > 0, got {self.fps}")
        self.interval = 1.0 / self.fps
        self.frames_per_chunk = int(session.frames_per_chunk)
        self.queue = FrameQueue(self.config.buffer_chunks * self.frames_per_chunk)
        self.error: BaseException | None = None
        self.action_log: deque[tuple[int, tuple[str, ...]]] = deque(maxlen=self.config.action_log)
        # Called in the generation thread with (chunk index, frames) after every chunk.
        self.on_chunk: Callable[[int, np.ndarray], None] | None = None

        self._stop = threading.Event()
        self._running = threading.Event()  # cleared while paused
        self._running.set()
        self._controls: deque[Callable[[], None]] = deque()
        self._controls_lock = threading.Lock()
        self._pending_reset: tuple[int, np.ndarray | None] | None = None  # the latest reset asked for
        self._thread: threading.Thread | None = None
        self._step_ema: float | None = None  # smoothed seconds per session.step

        n = self.config.stats_window
        self._gen_latency: deque[float] = deque(maxlen=n)
        self._show_latency: deque[float] = deque(maxlen=n)
        self._intervals: deque[float] = deque(maxlen=n)
        self._shown_times: deque[float] = deque(maxlen=n)
        self._chunk_times: deque[float] = deque(maxlen=n)
        self._reset_counters()

    # ---- lifecycle -------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._started_at: float | None = None
        self._first_generated: float | None = None
        self._first_shown: float | None = None
        self._frame_index = 0
        self._chunk_index = 0
        self._last_gen_version = self.inputs.snapshot().version
        self._last_shown_version = self._last_gen_version
        self._next_due: float | None = None
        self._last_shown: float | None = None
        self.pacing_dropped = 0
        self.shown = 0

    def start(self) -> Pipeline:
        if self._thread is not None:
            raise RuntimeError("pipeline already started")
        self._started_at = now()
        self._thread = threading.Thread(target=self._generate, name="forcekit-generate", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the generation thread and wait for it (it finishes the chunk it is on)."""
        self._stop.set()
        self._running.set()
        self.queue.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"generation thread did not stop within {timeout} s")

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- control ---------------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._next_due = None  # do not count the pause as lateness
        self._running.set()

    def call_between_chunks(self, fn: Callable[[], None]) -> None:
        """Run fn in the generation thread before the next chunk (the only thread using the session).

        Raises PipelineBusy when `max_controls` calls are already waiting: a flood of controls
        must not starve generation or grow memory.
        """
        with self._controls_lock:
            self._enqueue_locked(fn)
        self.queue.notify()

    def _enqueue_locked(self, fn: Callable[[], None]) -> None:
        if len(self._controls) >= self.config.max_controls:
            raise PipelineBusy(f"{len(self._controls)} control calls are already waiting for the next chunk")
        self._controls.append(fn)

    def reset(self, seed: int | None = None, context: np.ndarray | None = None) -> int:
        """Restart the rollout (a new random seed when none is given, optional context frames)
        and throw away the frames of the old one. Returns the seed.

        Resets asked for before the generation thread gets to them coalesce: only the latest
        runs, so a burst of resets costs one restart, not one per request.
        """
        seed = int(np.random.default_rng().integers(0, 2**31 - 1)) if seed is None else check_seed(seed)
        with self._controls_lock:
            if self._pending_reset is None:
                self._enqueue_locked(self._do_reset)
            self._pending_reset = (seed, context)
        self.queue.notify()
        return seed

    def _do_reset(self) -> None:
        with self._controls_lock:
            seed, context = self._pending_reset
            self._pending_reset = None
        self.session.reset(seed=seed, context=context)
        self.queue.clear()
        self.action_log.clear()
        self._next_due = None

    # ---- generation loop -------------------------------------------------------------------

    def _run_controls(self) -> None:
        while True:
            with self._controls_lock:
                if not self._controls:
                    return
                fn = self._controls.popleft()
            fn()

    def _start_in(self, queued: int) -> float:
        """Seconds until the next chunk should start (<= 0: now; inf: it does not fit yet).

        The queued frames last `runway` seconds (until the next one is due, then one interval
        each); the chunk starts when that runway is down to the lead time, so it samples the
        input as late as it can and is still ready when its first frame is due.
        """
        if queued + self.frames_per_chunk > self.queue.capacity:
            return math.inf
        runway = self.time_until_due() + queued * self.interval
        lead = self.config.lead_steps * (self._step_ema or 0.0) + self.config.lead_frames * self.interval
        return runway - lead

    def _generate(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_controls()
                if not self._running.wait(timeout=0.05):
                    continue
                wait = self._start_in(len(self.queue))
                if wait > 0:
                    self.queue.wait(lambda n: self._start_in(n) <= 0 or self._stop.is_set() or bool(self._controls),
                                    timeout=min(wait, 0.05))
                    continue
                if self._stop.is_set() or self._controls:
                    continue
                snap = self.inputs.snapshot()
                actions = tuple(self.session.action_space.from_keyboard(snap.keys))
                started = now()
                frames = self.session.step(action=list(actions))
                done = now()
                step_s = done - started
                self._step_ema = step_s if self._step_ema is None else 0.8 * self._step_ema + 0.2 * step_s
                if frames.ndim != 4 or frames.dtype != np.uint8:
                    raise TypeError(f"session.step must return uint8 [n, H, W, 3], got "
                                    f"{frames.dtype} {tuple(frames.shape)}")
                self._chunk_times.append(done)
                if self._first_generated is None:
                    self._first_generated = done
                if snap.version != self._last_gen_version:
                    self._gen_latency.append(done - snap.changed_at)
                    self._last_gen_version = snap.version
                self.action_log.append((self._chunk_index, actions))
                if self.on_chunk is not None:
                    self.on_chunk(self._chunk_index, frames)
                for img in frames:
                    self.queue.put(Frame(img, self._frame_index, self._chunk_index, done,
                                         snap.version, snap.changed_at, snap.keys, actions))
                    self._frame_index += 1
                self._chunk_index += 1
        except BaseException as exc:  # surfaced to the consumer through next_frame
            self.error = exc
            self._stop.set()
            self.queue.notify()

    # ---- paced output ----------------------------------------------------------------------

    def _check_error(self) -> None:
        if self.error is not None:
            raise PipelineError(f"generation failed: {self.error!r}") from self.error

    def time_until_due(self, t: float | None = None) -> float:
        """Seconds until the next frame is due (0 when due now or nothing was shown yet)."""
        if self._next_due is None:
            return 0.0
        return max(0.0, self._next_due - (now() if t is None else t))

    def poll_frame(self, t: float | None = None) -> Frame | None:
        """The frame due at time t, or None (not due yet, or none generated yet). Never blocks.

        When the consumer is k whole frame intervals late, the k oldest queued frames are
        dropped (at least one frame is always kept), so what it shows stays current.
        """
        self._check_error()
        t = now() if t is None else t
        if self._next_due is not None and t < self._next_due:
            return None
        if self._next_due is not None:
            late = int((t - self._next_due) / self.interval)
            if late > 0:
                self.pacing_dropped += self.queue.drop_oldest(late)
        frame = self.queue.poll()
        if frame is None:
            return None  # underrun: generation is slower than playback; show it when it comes
        if self._next_due is None or t - self._next_due > self.interval:
            self._next_due = t + self.interval  # restart the schedule after an underrun
        else:
            self._next_due += self.interval
        if self._last_shown is not None:
            self._intervals.append(t - self._last_shown)
        self._last_shown = t
        self._shown_times.append(t)
        self.shown += 1
        if self._first_shown is None:
            self._first_shown = t
        if frame.input_version != self._last_shown_version:
            self._show_latency.append(t - frame.input_changed_at)
            self._last_shown_version = frame.input_version
        return frame

    def next_frame(self, timeout: float | None = None) -> Frame | None:
        """Block until the next frame is due and available; None on timeout or after stop()."""
        deadline = None if timeout is None else now() + timeout
        while True:
            self._check_error()
            if self._stop.is_set():
                return None
            t = now()
            if deadline is not None and t >= deadline:
                return None
            wait = self.time_until_due(t)
            if wait > 0:
                time.sleep(wait if deadline is None else min(wait, max(0.0, deadline - t)))
                continue
            frame = self.poll_frame()
            if frame is not None:
                return frame
            left = 0.05 if deadline is None else min(0.05, max(0.0, deadline - now()))
            self.queue.wait(lambda n: n > 0 or self._stop.is_set(), timeout=left)

    async def next_frame_async(self, timeout: float | None = None, poll_s: float = 0.004) -> Frame | None:
        """`next_frame` for asyncio consumers (the WebRTC track): sleeps without blocking the loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            self._check_error()
            if self._stop.is_set():
                return None
            if deadline is not None and loop.time() >= deadline:
                return None
            wait = self.time_until_due()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            frame = self.poll_frame()
            if frame is not None:
                return frame
            await asyncio.sleep(poll_s)

    # ---- statistics ------------------------------------------------------------------------

    def stats(self) -> dict:
        """Timing figures of this run so far; durations in ms, rates in frames per second."""

        def rate(times: deque[float], per: int) -> float | None:
            if len(times) < 2:
                return None
            span = times[-1] - times[0]
            return (len(times) - 1) * per / span if span > 0 else None

        intervals = np.asarray(list(self._intervals), dtype=np.float64)  # a copy: other threads append
        start = self._started_at
        return {
            "fps": rate(self._shown_times, 1),
            "generated_fps": rate(self._chunk_times, self.frames_per_chunk),
            "target_fps": self.fps,
            "first_frame_ms": None if start is None or self._first_generated is None
            else (self._first_generated - start) * 1e3,
            "first_shown_ms": None if start is None or self._first_shown is None
            else (self._first_shown - start) * 1e3,
            "input_to_frame_ms": percentiles_ms(self._gen_latency),
            "input_to_display_ms": percentiles_ms(self._show_latency),
            "frame_interval_ms": percentiles_ms(intervals),
            "frame_jitter_ms": float(intervals.std() * 1e3) if intervals.size > 1 else None,
            "frames_generated": self._frame_index,
            "frames_shown": self.shown,
            "dropped": self.queue.dropped,
            "queue_depth": len(self.queue),
            "queue_capacity": self.queue.capacity,
            "paused": self.paused,
        }
