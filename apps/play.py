"""`forcekit play`: a local pygame window on a session, through the shared three-loop pipeline.

Held keys (KEYDOWN/KEYUP) go through the bundle's bindings; frames are scaled up to the window;
a HUD shows fps, input-to-frame latency and the sampling steps. Control keys (never sent to
the model, shown in the HUD):

    Esc quit · F1 pause · F2 reset (new seed) · F3 / F4 fewer / more steps · F5 record mp4

Runs headless with SDL_VIDEODRIVER=dummy (the tests inject key events).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apps.frames import upscale
from apps.pipeline import Frame, Pipeline, PipelineConfig

CONTROLS = {"escape": "quit", "f1": "pause", "f2": "reset", "f3": "fewer steps", "f4": "more steps",
            "f5": "record"}

# pygame key names -> the keyboard names bindings use (the same ones the web page sends).
_PYGAME_NAMES = {"return": "enter", "left shift": "shift", "right shift": "shift", "left ctrl": "ctrl",
                 "right ctrl": "ctrl", "left alt": "alt", "right alt": "alt"}


def keyboard_name(pygame_name: str) -> str:
    """Normalise a pygame key name ("left shift", "W") to a binding name ("shift", "w")."""
    name = pygame_name.lower()
    return _PYGAME_NAMES.get(name, name)


@dataclass
class PlayConfig:
    """Window and recording settings; each is a `forcekit play` flag."""

    window_min: int = 512  # frames are scaled up so the shorter side is at least this many pixels
    hud: bool = True
    record_dir: Path = Path("recordings")
    max_steps: int = 64  # upper bound for F4


class Mp4Recorder:
    """Writes frames to an H.264 mp4 with PyAV (upscaled to even sizes the encoder accepts)."""

    def __init__(self, path: Path, fps: float, min_side: int = 256) -> None:
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.min_side = min_side
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=round(fps))
        self._stream.pix_fmt = "yuv420p"
        self._av = av
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        image = upscale(image, self.min_side)
        if self.frames == 0:
            self._stream.height, self._stream.width = image.shape[:2]
        frame = self._av.VideoFrame.from_ndarray(image, format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


class Player:
    """The pygame front end: events -> InputState / controls, paced frames -> window."""

    def __init__(self, session, config: PlayConfig | None = None,
                 pipeline_config: PipelineConfig | None = None) -> None:
        import pygame

        self.pg = pygame
        self.session = session
        self.config = config or PlayConfig()
        self.pipeline = Pipeline(session, pipeline_config)
        self.bindings = dict(session.action_space.bindings)
        clash = sorted(set(self.bindings) & set(CONTROLS))
        if clash:
            print(f"note: keys {clash} are bound by the bundle but are player controls here")
        self.recorder: Mp4Recorder | None = None
        self.recordings: list[Path] = []
        self.running = False
        self.frames_shown = 0
        self.last_frame: Frame | None = None
        self.message = ""

    # ---- events ----------------------------------------------------------------------------

    def handle_event(self, event) -> None:
        pg = self.pg
        if event.type == pg.QUIT:
            self.running = False
        elif event.type in (pg.KEYDOWN, pg.KEYUP):
            name = keyboard_name(pg.key.name(event.key))
            down = event.type == pg.KEYDOWN
            if name in CONTROLS:
                if down:
                    self.control(CONTROLS[name])
            elif name in self.bindings:
                (self.pipeline.inputs.press if down else self.pipeline.inputs.release)(name)
        elif event.type in (pg.WINDOWFOCUSLOST,):
            self.pipeline.inputs.set_keys(())  # no stuck keys after alt-tab

    def control(self, what: str) -> None:
        pipe = self.pipeline
        if what == "quit":
            self.running = False
        elif what == "pause":
            pipe.resume() if pipe.paused else pipe.pause()
            self.message = "paused" if pipe.paused else ""
        elif what == "reset":
            seed = pipe.reset()
            self.message = f"reset (seed {seed})"
        elif what in ("fewer steps", "more steps"):
            current = self.steps()
            new = max(1, min(self.config.max_steps, current + (1 if what == "more steps" else -1)))
            pipe.call_between_chunks(lambda: setattr(self.session, "steps", new))
            self.message = f"steps {new}"
        elif what == "record":
            self.toggle_recording()

    def steps(self) -> int:
        return int(self.session.stats().get("steps") or self.session.steps or 1)

    def toggle_recording(self) -> None:
        if self.recorder is None:
            path = self.config.record_dir / time.strftime("forcekit-%Y%m%d-%H%M%S.mp4")
            self.recorder = Mp4Recorder(path, self.pipeline.fps)
            self.message = f"recording {path}"
        else:
            self.recorder.close()
            self.recordings.append(self.recorder.path)
            self.message = f"saved {self.recorder.path} ({self.recorder.frames} frames)"
            self.recorder = None

    # ---- drawing ---------------------------------------------------------------------------

    def hud_lines(self) -> list[str]:
        s = self.pipeline.stats()

        def ms(v):
            return "-" if v is None else f"{v:.0f}"

        fps = "-" if s["fps"] is None else f"{s['fps']:.1f}"
        held = ",".join(self.pipeline.inputs.snapshot().keys) or "-"
        return [
            f"fps {fps}/{s['target_fps']:.0f}  input->frame {ms(s['input_to_frame_ms']['p50'])}/"
            f"{ms(s['input_to_frame_ms']['p95'])} ms  steps {self.steps()}  keys {held}",
            "Esc quit  F1 pause  F2 reset  F3/F4 steps  F5 record" + (f"   {self.message}" if self.message else ""),
        ]

    def draw(self, frame: Frame) -> None:
        pg = self.pg
        image = upscale(frame.image, self.config.window_min)
        surface = pg.surfarray.make_surface(np.ascontiguousarray(image.transpose(1, 0, 2)))
        self.screen.fill((0, 0, 0))
        self.screen.blit(surface, (0, 0))
        if self.config.hud:
            y = image.shape[0] + 4
            for line in self.hud_lines():
                self.screen.blit(self.font.render(line, True, (220, 220, 220)), (6, y))
                y += self.font.get_linesize()
        pg.display.flip()

    # ---- main loop -------------------------------------------------------------------------

    def run(self, max_frames: int | None = None, on_frame: Callable[[Player, Frame], None] | None = None) -> dict:
        """Play until quit (or max_frames shown); returns the pipeline's stats."""
        pg = self.pg
        pg.display.init()  # no audio device needed
        pg.font.init()
        h, w = self.session.frame_size
        sample = upscale(np.zeros((h, w, 3), np.uint8), self.config.window_min)
        self.font = pg.font.Font(None, 20)
        hud_h = 2 * self.font.get_linesize() + 8 if self.config.hud else 0
        self.screen = pg.display.set_mode((max(sample.shape[1], 480), sample.shape[0] + hud_h))
        pg.display.set_caption("forcekit play")
        self.running = True
        self.pipeline.start()
        try:
            while self.running:
                for event in pg.event.get():
                    self.handle_event(event)
                if not self.running:
                    break
                frame = self.pipeline.next_frame(timeout=0.05)
                if frame is None:
                    continue
                self.last_frame = frame
                self.frames_shown += 1
                self.draw(frame)
                if self.recorder is not None:
                    self.recorder.write(frame.image)
                if on_frame is not None:
                    on_frame(self, frame)
                if max_frames is not None and self.frames_shown >= max_frames:
                    break
        finally:
            self.pipeline.stop()
            if self.recorder is not None:
                self.toggle_recording()
            pg.quit()
        return self.pipeline.stats()
