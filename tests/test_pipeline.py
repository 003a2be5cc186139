"""The three-loop pipeline's queue behaviour, against a small fake session (a test double for timing).

Real sessions are exercised by test_play.py, test_serve.py and test_browser.py.
"""

import threading
import time

import numpy as np
import pytest

from apps.pipeline import FrameQueue, InputState, Pipeline, PipelineConfig, PipelineError


class FakeActionSpace:
    bindings = {"w": "forward", "a": "left", "d": "right"}

    def from_keyboard(self, pressed):
        return sorted({self.bindings[k] for k in pressed if k in self.bindings})


class FakeSession:
    """Chunks of `fpc` frames filled with the chunk number; records the actions it receives."""

    def __init__(self, fpc=2, fps=50.0, step_s=0.005, size=(4, 4)):
        self.frames_per_chunk = fpc
        self.fps = fps
        self.step_s = step_s
        self.size = size
        self.action_space = FakeActionSpace()
        self.received = []
        self.threads = set()
        self.gate = threading.Event()
        self.gate.set()
        self.in_step = threading.Event()
        self.fail = False
        self.resets = []

    def step(self, action=None):
        self.threads.add(threading.current_thread().name)
        self.in_step.set()
        self.gate.wait()
        time.sleep(self.step_s)
        if self.fail:
            raise RuntimeError("boom")
        self.received.append(tuple(action))
        value = len(self.received) % 256
        return np.full((self.frames_per_chunk, *self.size, 3), value, np.uint8)

    def reset(self, seed=None, context=None):
        self.threads.add(threading.current_thread().name)
        self.resets.append(seed)


def test_frame_queue_drops_oldest_when_full():
    q = FrameQueue(3)
    for i in range(5):
        q.put(i)
    assert len(q) == 3 and q.dropped == 2
    assert [q.poll() for _ in range(3)] == [2, 3, 4]
    assert q.poll() is None
    with pytest.raises(ValueError, match="capacity"):
        FrameQueue(0)


def test_input_state_versions_only_on_change():
    s = InputState()
    assert s.set_keys(["w"]) and not s.set_keys(["w"])
    assert s.press("a") and not s.press("a")
    assert s.snapshot().keys == ("a", "w") and s.snapshot().version == 2
    assert s.release("w") and s.snapshot().keys == ("a",)


def test_latest_input_wins():
    session = FakeSession()
    pipe = Pipeline(session, PipelineConfig(buffer_chunks=1))
    session.gate.clear()
    with pipe:
        assert session.in_step.wait(5)
        # While a chunk is being generated, the state changes three times; only the last counts.
        for keys in (["w"], ["a"], ["d"]):
            pipe.inputs.set_keys(keys)
        session.gate.set()
        deadline = time.time() + 5
        while len(session.received) < 3 and time.time() < deadline:
            pipe.next_frame(timeout=1)
    assert session.received[0] == ()
    assert all(a == ("right",) for a in session.received[1:])
    assert ("forward",) not in session.received and ("left",) not in session.received
    assert session.threads == {"forcekit-generate"}
    assert pipe.stats()["input_to_frame_ms"]["p50"] is not None


def test_slow_consumer_latency_does_not_grow():
    session = FakeSession(fpc=2, fps=100.0, step_s=0.002)
    pipe = Pipeline(session, PipelineConfig(buffer_chunks=2))
    ages, depths = [], []
    with pipe:
        t_end = time.perf_counter() + 1.2
        while time.perf_counter() < t_end:
            frame = pipe.next_frame(timeout=1)
            assert frame is not None
            ages.append(time.perf_counter() - frame.generated_at)
            depths.append(len(pipe.queue))
            time.sleep(4 * pipe.interval)  # the consumer is four times slower than playback
    stats = pipe.stats()
    assert max(depths) <= pipe.queue.capacity
    assert stats["dropped"] > 0  # the pacer threw stale frames away instead of showing them late
    half = len(ages) // 2
    # Bounded staleness: a frame is never older than a full queue at the consumer's pace plus slack,
    # and the second half of the run is no staler than the first.
    bound = (pipe.queue.capacity + 1) * 5 * pipe.interval + 0.25
    assert max(ages) < bound, (max(ages), bound)
    assert np.median(ages[half:]) <= np.median(ages[:half]) + 0.05
    # Backpressure: generation did not run far ahead of what was consumed.
    assert stats["frames_generated"] <= stats["frames_shown"] + stats["dropped"] + pipe.queue.capacity


def test_paced_output_matches_playback_rate():
    session = FakeSession(fpc=3, fps=25.0, step_s=0.003)
    pipe = Pipeline(session)
    with pipe:
        for _ in range(30):
            assert pipe.next_frame(timeout=1) is not None
    stats = pipe.stats()
    # Never faster than playback; slower only by scheduling delays (generous: CI machines are busy).
    assert 0.9 * 40.0 <= stats["frame_interval_ms"]["p50"] <= 1.5 * 40.0
    assert 25.0 / 1.5 <= stats["fps"] <= 25.0 * 1.1
    assert stats["first_frame_ms"] is not None and stats["first_frame_ms"] < 1000


def test_clean_shutdown_and_errors():
    session = FakeSession()
    pipe = Pipeline(session)
    session.gate.clear()
    pipe.start()
    assert session.in_step.wait(5)
    session.gate.set()
    pipe.stop(timeout=5)
    assert not pipe._thread.is_alive()
    assert pipe.next_frame(timeout=0.1) is None

    failing = FakeSession()
    failing.fail = True
    pipe = Pipeline(failing).start()
    with pytest.raises(PipelineError, match="boom"):
        pipe.next_frame(timeout=5)
    pipe.stop()


def test_controls_run_in_generation_thread_and_pause():
    session = FakeSession()
    pipe = Pipeline(session)
    with pipe:
        pipe.next_frame(timeout=2)
        pipe.pause()
        time.sleep(0.05)
        pipe.reset(seed=7)
        deadline = time.time() + 2
        while not session.resets and time.time() < deadline:
            time.sleep(0.01)
        n = len(session.received)
        time.sleep(0.1)
        assert len(session.received) == n  # paused: no new chunks
        pipe.resume()
        assert pipe.next_frame(timeout=2) is not None
    assert session.resets == [7]
    assert session.threads == {"forcekit-generate"}
