"""`forcekit serve --lipsync`: the browser sends its webcam and microphone over WebRTC, the server sends the
face back re-synced to the voice; a data channel carries fps and the audio-to-mouth latency to the page.

Per peer: the video track's frames go into a `LatestFrame` (latest wins), the audio track's frames
into a bounded queue read by `apps.lipsync.LipsyncLoop` (streaming features at whatever rate the
browser sends, usually 48 kHz), which runs in its own thread and hands each re-synced frame to the
outgoing video track (a queue of 2: the oldest is dropped when the browser reads slowly). The
latency shown is measured on the server: from the arrival of a frame's audio to its re-synced
frame (feature lookahead and generation; the network and the browser's jitter buffer come on top).
The voice comes back too (`VoiceTrack`): the loop's playback, delayed as the local app delays it (lookahead
+ one frame + one block), so the returned mouth and voice match. Kept apart from apps/serve.py (the world
model's server) on purpose; it shares its codec settings and its `ServerThread`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from apps import timecode
from apps.lipsync import LatestFrame, LipsyncLoop, LipsyncLoopConfig, drain
from apps.pipeline import now

log = logging.getLogger("forcekit.lipsync_serve")
STATIC = Path(__file__).resolve().parent / "static"
VIDEO_CLOCK = 90000
SERVER = web.AppKey("lipsync_server", object)


@dataclass
class LipsyncServeConfig:
    max_sessions: int = 1
    display: int = 288              # the returned video is scaled up to this many pixels a side
    stats_period_s: float = 0.5
    loop: LipsyncLoopConfig | None = None
    face_locator: object | None = None   # runtime.face_locator.FaceLocator; None: a fixed centre crop
    # Measuring the stream at the browser (`forcekit eval lipsync-browser`): paint each frame's audio-frame index
    # under it (apps/timecode.py) and keep the first seconds of the audio received, to align both with the voice.
    timecode: bool = False
    keep_audio_s: float = 0.0


class QueuedAudio:
    """Audio the browser sent, as `LipsyncLoop` reads a microphone: bounded, drained by `poll`."""

    def __init__(self, max_blocks: int = 500, keep_s: float = 0.0) -> None:
        self._q: deque[np.ndarray] = deque(maxlen=max_blocks)
        self.keep_s = keep_s
        self.kept: list[np.ndarray] = []   # the first keep_s seconds as received (for measuring, see the config)
        self._kept_samples = 0
        self.rate: int | None = None
        self.first_at: float | None = None
        self.ready = threading.Event()
        self.done = False

    def put(self, samples: np.ndarray, rate: int) -> None:
        if self.rate is None:
            self.rate, self.first_at = rate, now()
            self.ready.set()
        elif rate != self.rate:      # a renegotiated rate: a new stream would be needed; keep it defined
            log.warning("audio rate changed from %s to %s Hz: those frames are dropped", self.rate, rate)
            return
        if self._kept_samples < self.keep_s * rate:
            self.kept.append(samples.copy())
            self._kept_samples += len(samples)
        self._q.append(samples)

    def start(self) -> float:
        return self.first_at

    def poll(self) -> list[np.ndarray]:
        return drain(self._q)

    def close(self) -> None:
        self.done = True


def audio_frame_samples(frame) -> np.ndarray:
    """An aiortc/PyAV audio frame -> int16 or float32 samples ``[n]`` or ``[n, channels]``."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        data = data.T                                   # [channels, n] -> [n, channels]
    else:
        data = data.reshape(-1, channels)
    return data[:, 0] if channels == 1 else data


class ResyncedTrack(MediaStreamTrack):
    """The outgoing video: re-synced frames as the loop makes them, time-stamped by the wall clock
    (``timecode``: each with its audio-frame index painted under it, apps/timecode.py)."""

    kind = "video"

    def __init__(self, display: int, timecode: bool = False) -> None:
        super().__init__()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=2)
        self.display = display
        self.timecode = timecode
        self._t0: float | None = None

    def offer(self, frame: np.ndarray | None, index: int = 0) -> None:
        """Called on the event loop: the newest frame wins when the browser reads slowly."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None if frame is None else (frame, index))

    async def recv(self):
        import av
        import cv2

        if self.readyState != "live":
            raise MediaStreamError
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        frame, index = item
        t = now()
        self._t0 = t if self._t0 is None else self._t0
        big = cv2.resize(frame, (self.display, self.display), interpolation=cv2.INTER_NEAREST)
        if self.timecode:
            big = timecode.stamp(big, index)
        out = av.VideoFrame.from_ndarray(big, format="rgb24")
        out.pts = int(round((t - self._t0) * VIDEO_CLOCK))
        out.time_base = Fraction(1, VIDEO_CLOCK)
        return out


class VoiceTrack(MediaStreamTrack):
    """The outgoing audio: the browser's own voice, delayed to match the re-synced mouth.

    Paced by the wall clock in 20 ms frames. Until the loop starts (at the first audio), and whenever the
    delayed playback has nothing yet, it sends silence; from the loop's start it reads `DelayedAudio`, whose
    first ``delay`` samples are silence, so the voice leaves ``delay`` after it arrived."""

    kind = "audio"
    FRAME_S = 0.02

    def __init__(self, peer: LipsyncPeer) -> None:
        super().__init__()
        self.peer = peer
        self._start: float | None = None
        self._sent_s = 0.0          # seconds of audio sent (the pts, whatever the rate)

    async def recv(self):
        import av

        if self.readyState != "live":
            raise MediaStreamError
        loop = self.peer.loop
        rate = loop.playback.rate if loop is not None else 48000
        n = int(round(rate * self.FRAME_S))
        self._start = now() if self._start is None else self._start
        await asyncio.sleep(max(0.0, self._start + self._sent_s + n / rate - now()))
        samples = loop.playback.read(n) if loop is not None else np.zeros(n, np.float32)
        frame = av.AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update((np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16).tobytes())
        frame.sample_rate, frame.time_base = rate, Fraction(1, rate)
        frame.pts = int(round(self._sent_s * rate))
        self._sent_s += n / rate
        return frame


class LipsyncPeer:
    def __init__(self, server: LipsyncServer) -> None:
        self.server, self.id = server, uuid.uuid4().hex[:12]
        self.pc = RTCPeerConnection()
        self.frames, self.audio = LatestFrame(), QueuedAudio(keep_s=server.config.keep_audio_s)
        self.track = ResyncedTrack(server.config.display, server.config.timecode)
        self.voice = VoiceTrack(self)
        self.loop: LipsyncLoop | None = None
        self.channel = None
        self.tasks: list[asyncio.Task] = []
        self.thread: threading.Thread | None = None
        self.closed = False
        self.error: str | None = None

    def run(self, session, event_loop: asyncio.AbstractEventLoop) -> None:
        """The generation thread: waits for the first audio, then runs the loop until the peer closes."""
        while not self.audio.ready.wait(0.2):
            if self.closed:
                return
        try:
            self.loop = LipsyncLoop(session, self.audio, self.frames, self.server.config.loop or LipsyncLoopConfig(),
                                    on_frame=lambda f, loop: self._hand_over(event_loop, f, loop.frame_index),
                                    face_locator=self.server.config.face_locator)
            self.loop.run()
        except Exception as exc:   # reported to the page; the server stays up
            log.exception("peer %s: lip-sync loop failed", self.id)
            self.error = repr(exc)

    def _hand_over(self, event_loop: asyncio.AbstractEventLoop, frame: np.ndarray, index: int) -> None:
        """A re-synced frame to the outgoing track, on the event loop; none once the server's loop has closed
        (a frame finished during shutdown has nowhere to go)."""
        try:
            event_loop.call_soon_threadsafe(self.track.offer, frame, index)
        except RuntimeError:
            if not event_loop.is_closed():
                raise
            self.loop.stop = True

    def stats(self) -> dict:
        s = self.loop.stats() if self.loop is not None else {"video": "waiting for audio"}
        if self.frames.frames_in == 0:
            s["video"] = "no video"
        return {**s, "error": self.error, "audio_rate": self.audio.rate}


class LipsyncServer:
    def __init__(self, bundle, config: LipsyncServeConfig) -> None:
        self.bundle, self.config = bundle, config
        self.peers: dict[str, LipsyncPeer] = {}

    async def index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "lipsync.html")

    async def offer(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            offer = RTCSessionDescription(sdp=body["sdp"], type=body["type"])
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"expected JSON {{sdp, type}}: {exc}"}, status=400)
        if len(self.peers) >= self.config.max_sessions:
            return web.json_response({"error": f"the server is at its limit of {self.config.max_sessions} "
                                               "session(s); try again later"}, status=503)
        peer = LipsyncPeer(self)
        self.peers[peer.id] = peer
        try:
            answer = await self.connect(peer, offer)
        except Exception as exc:
            log.exception("peer %s: offer failed", peer.id)
            await self.close_peer(peer)
            return web.json_response({"error": f"could not start a session: {exc}"}, status=400)
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "peer_id": peer.id})

    async def connect(self, peer: LipsyncPeer, offer: RTCSessionDescription) -> RTCSessionDescription:
        from runtime import open_session

        pc = peer.pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close_peer(peer)

        @pc.on("datachannel")
        def on_channel(channel) -> None:
            peer.channel = channel

        @pc.on("track")
        def on_track(track) -> None:
            peer.tasks.append(asyncio.create_task(self.consume(peer, track)))

        pc.addTrack(peer.track)   # before the offer is applied: they bind to the offer's video and audio m-lines
        pc.addTrack(peer.voice)
        await pc.setRemoteDescription(offer)
        await pc.setLocalDescription(await pc.createAnswer())
        session = open_session(self.bundle)
        peer.thread = threading.Thread(target=peer.run, args=(session, asyncio.get_running_loop()), daemon=True,
                                       name=f"lipsync-{peer.id}")
        peer.thread.start()
        peer.tasks.append(asyncio.create_task(self.push_stats(peer)))
        return pc.localDescription

    async def consume(self, peer: LipsyncPeer, track) -> None:
        """Read one incoming track until it ends: video frames into the latest frame, audio into the queue."""
        try:
            while not peer.closed:
                frame = await track.recv()
                if track.kind == "video":
                    peer.frames.put(frame.to_ndarray(format="rgb24"))
                else:
                    peer.audio.put(audio_frame_samples(frame), frame.sample_rate)
        except MediaStreamError:
            return

    async def push_stats(self, peer: LipsyncPeer) -> None:
        while not peer.closed:
            await asyncio.sleep(self.config.stats_period_s)
            if peer.channel is not None and peer.channel.readyState == "open":
                peer.channel.send(json.dumps({"type": "stats", "stats": peer.stats()}))

    async def close_peer(self, peer: LipsyncPeer) -> None:
        if peer.closed:
            return
        peer.closed = True
        self.peers.pop(peer.id, None)
        if peer.loop is not None:
            peer.loop.stop = True
        peer.audio.close()
        for task in peer.tasks:
            task.cancel()
        await peer.pc.close()
        if peer.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, peer.thread.join, 5)

    async def shutdown(self, _app=None) -> None:
        for peer in list(self.peers.values()):
            await self.close_peer(peer)


def create_lipsync_app(bundle, config: LipsyncServeConfig | None = None) -> web.Application:
    """The lip-sync web app: the page at /, POST /offer (webcam + microphone in, re-synced video out)."""
    if "lipsync" not in bundle.extra:
        raise ValueError(f"bundle {bundle.name!r} is not a lip-sync bundle (serve it without --lipsync)")
    server = LipsyncServer(bundle, config or LipsyncServeConfig())
    app = web.Application()
    app[SERVER] = server
    app.router.add_get("/", server.index)
    app.router.add_post("/offer", server.offer)
    app.on_shutdown.append(server.shutdown)
    return app
