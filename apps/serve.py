"""`forcekit serve`: stream a session to the browser over WebRTC (aiohttp + aiortc).

One peer, one session, one pipeline. The browser POSTs an SDP offer to /offer (with a
recvonly video transceiver and a data channel), gets the answer back, plays the video track
and sends full-state key snapshots over the data channel:

    {"type": "keys", "keys": ["w", "a"], "seq": 12}   -> held keys (keyboard names)
    {"type": "ping", "t": 1234.5}                     -> {"type": "pong", "t": 1234.5}
    {"type": "reset", "seed": 3}                      -> restart the rollout
    {"type": "bye"}                                   -> the page is going away: close now

and receives `stats` (twice a second), `applied` (the first frame generated under keys `seq`
has been sent: the page turns that into an input-to-frame latency) and `error` messages.

The server never trusts the client: malformed offers get 400, bad data-channel messages get an
`error` reply with status 400, and a peer that goes away (connection failed or closed, or
silent for `idle_timeout_s`, e.g. a killed browser) has its session stopped and released.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
from aiohttp import web
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.codecs import h264, vpx
from aiortc.mediastreams import MediaStreamError

from apps.frames import upscale
from apps.pipeline import Pipeline, PipelineConfig, now

log = logging.getLogger("forcekit.serve")

STATIC = Path(__file__).resolve().parent / "static"
VIDEO_CLOCK = 90_000  # RTP video clock rate (Hz)
CODECS = {"vp8": ("video/VP8", vpx), "h264": ("video/H264", h264)}


@dataclass
class ServeConfig:
    """Server settings; every one is a `forcekit serve` flag."""

    max_sessions: int = 2
    codec: str = "vp8"
    bitrate: int = 800_000  # bits/s, the encoder's cap (receiver estimates may lower it)
    display_min: int = 256  # frames are scaled up (nearest) so the shorter side is at least this
    idle_timeout_s: float = 20.0  # close a peer that sent nothing over its data channel this long
    stats_period_s: float = 0.5
    warmup_chunks: int = 16  # chunks generated at start-up, so the first peer does not pay one-off costs
    digest_log: bool = False  # keep a per-chunk frame digest (tests replay sessions with it)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        module = CODECS[self.codec][1]
        if not module.MIN_BITRATE <= self.bitrate <= module.MAX_BITRATE:
            raise ValueError(f"{self.codec} bitrate must be in [{module.MIN_BITRATE}, {module.MAX_BITRATE}] "
                             f"bits/s, got {self.bitrate}")


class BadRequest(ValueError):
    """A client error: answered with status 400 and this message."""


# ---- codec and bitrate ---------------------------------------------------------------------


class CappedVp8Encoder(vpx.Vp8Encoder):
    """aiortc's VP8 encoder with a configured bitrate; congestion feedback may lower it, never raise it."""

    def __init__(self, bitrate: int) -> None:
        super().__init__()
        self.cap = bitrate
        self.target_bitrate = bitrate

    @property
    def target_bitrate(self) -> int:
        return vpx.Vp8Encoder.target_bitrate.fget(self)

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        vpx.Vp8Encoder.target_bitrate.fset(self, min(int(bitrate), self.cap))


class CappedH264Encoder(h264.H264Encoder):
    """aiortc's H.264 encoder with a configured bitrate cap (see CappedVp8Encoder)."""

    def __init__(self, bitrate: int) -> None:
        super().__init__()
        self.cap = bitrate
        self.target_bitrate = bitrate

    @property
    def target_bitrate(self) -> int:
        return h264.H264Encoder.target_bitrate.fget(self)

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        h264.H264Encoder.target_bitrate.fset(self, min(int(bitrate), self.cap))


def force_codec(pc: RTCPeerConnection, sender: RTCRtpSender, codec: str, bitrate: int) -> None:
    """Negotiate only `codec` on the sender's transceiver and give it an encoder at `bitrate`.

    aiortc 1.16 has no public bitrate API: its sender creates the encoder lazily when the first
    frame goes out, unless one is already there, so we place ours first (the negotiated codec is
    the only one offered, so it matches).
    """
    mime = CODECS[codec][0]
    caps = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == mime]
    transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
    transceiver.setCodecPreferences(caps)
    sender._RTCRtpSender__encoder = (CappedVp8Encoder if codec == "vp8" else CappedH264Encoder)(bitrate)


def sender_encoder(sender: RTCRtpSender):
    """The encoder a sender uses (for tests and metrics)."""
    return sender._RTCRtpSender__encoder


# ---- the video track -----------------------------------------------------------------------


class PipelineTrack(MediaStreamTrack):
    """A video track that plays a pipeline's paced frames, time-stamped by the wall clock."""

    kind = "video"

    def __init__(self, pipeline: Pipeline, display_min: int,
                 on_sent: Callable[[object, int], None] | None = None) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.display_min = display_min
        self.on_sent = on_sent
        self._t0: float | None = None
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.pipeline.next_frame_async()
        if frame is None:
            self.stop()
            raise MediaStreamError
        t = now()
        if self._t0 is None:
            self._t0 = t
        pts = int(round((t - self._t0) * VIDEO_CLOCK))
        out = av.VideoFrame.from_ndarray(upscale(frame.image, self.display_min), format="rgb24")
        out.pts = pts
        out.time_base = Fraction(1, VIDEO_CLOCK)
        self.sent += 1
        if self.on_sent is not None:
            self.on_sent(frame, pts)
        return out


# ---- peers ---------------------------------------------------------------------------------


class Peer:
    """One browser: its peer connection, session, pipeline and bookkeeping."""

    def __init__(self, server: Server, peer_id: str) -> None:
        self.server = server
        self.id = peer_id
        self.pc: RTCPeerConnection | None = None
        self.session = None
        self.pipeline: Pipeline | None = None
        self.track: PipelineTrack | None = None
        self.channel = None
        self.created = time.time()
        self.last_seen = now()
        self.closed = False
        self.close_reason: str | None = None
        self.pending_seq: dict[int, int] = {}  # input version -> client seq, awaiting its first frame
        self.messages = 0
        self.errors = 0
        self.digests: deque[tuple[int, str]] = deque(maxlen=4096)
        self.tasks: list[asyncio.Task] = []

    def send(self, payload: dict) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            ch.send(json.dumps(payload))

    def on_frame_sent(self, frame, pts: int) -> None:
        seq = self.pending_seq.pop(frame.input_version, None)
        if seq is not None:
            for v in [v for v in self.pending_seq if v < frame.input_version]:
                del self.pending_seq[v]  # superseded before any frame showed them
            self.send({"type": "applied", "seq": seq, "pts": pts, "keys": list(frame.keys),
                       "actions": list(frame.actions)})

    def handle_message(self, raw) -> None:
        """Apply one data-channel message; a bad one gets an error reply, never an exception."""
        self.last_seen = now()
        self.messages += 1
        try:
            self._apply(parse_message(raw, self.server.keyboard_keys))
        except BadRequest as exc:
            self.errors += 1
            self.send({"type": "error", "status": 400, "message": str(exc)})

    def _apply(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "keys":
            if self.pipeline.inputs.set_keys(msg["keys"]) and "seq" in msg:
                self.pending_seq[self.pipeline.inputs.snapshot().version] = msg["seq"]
        elif kind == "ping":
            self.send({"type": "pong", "t": msg.get("t")})
        elif kind == "reset":
            self.pipeline.reset(seed=msg.get("seed"))
        elif kind == "bye":
            asyncio.ensure_future(self.server.close_peer(self, "peer said bye"))

    def metrics(self, with_log: bool = False) -> dict:
        stats = self.pipeline.stats() if self.pipeline is not None else {}
        out = {
            "id": self.id,
            "state": None if self.pc is None else self.pc.connectionState,
            "age_s": time.time() - self.created,
            "keys": list(self.pipeline.inputs.snapshot().keys) if self.pipeline else [],
            "frames_sent": self.track.sent if self.track else 0,
            "messages": self.messages,
            "errors": self.errors,
            "stats": stats,
        }
        if self.pipeline is not None:
            out["last_actions"] = list(self.pipeline.action_log[-1][1]) if self.pipeline.action_log else []
        if with_log and self.pipeline is not None:
            out["action_log"] = [[c, list(a)] for c, a in list(self.pipeline.action_log)]
            out["digests"] = list(self.digests)
        return out


def parse_message(raw, keyboard_keys: frozenset[str]) -> dict:
    """Validate a data-channel message; raises BadRequest saying what is wrong."""
    if isinstance(raw, bytes):
        raise BadRequest("binary messages are not supported; send JSON text")
    try:
        msg = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"message is not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadRequest('message must be a JSON object with a string "type"')
    kind = msg["type"]
    if kind == "keys":
        keys = msg.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise BadRequest('"keys" must be a list of key names (strings)')
        unknown = sorted(set(keys) - keyboard_keys)
        if unknown:
            raise BadRequest(f"unknown key name(s) {unknown}; this bundle binds {sorted(keyboard_keys)}")
        if "seq" in msg and not isinstance(msg["seq"], int):
            raise BadRequest('"seq" must be an integer')
    elif kind == "ping":
        if "t" in msg and not isinstance(msg["t"], (int, float)):
            raise BadRequest('ping "t" must be a number')
    elif kind == "reset":
        if msg.get("seed") is not None and not isinstance(msg["seed"], int):
            raise BadRequest('reset "seed" must be an integer')
    elif kind != "bye":
        raise BadRequest(f"unknown message type {kind!r}; expected keys, ping, reset or bye")
    return msg


def parse_offer(body: bytes) -> RTCSessionDescription:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"offer is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest('offer must be a JSON object {"sdp": ..., "type": "offer"}')
    if data.get("type") != "offer":
        raise BadRequest(f'offer "type" must be "offer", got {data.get("type")!r}')
    sdp = data.get("sdp")
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise BadRequest('offer "sdp" must be an SDP string starting with "v=0"')
    return RTCSessionDescription(sdp=sdp, type="offer")


# ---- the server ----------------------------------------------------------------------------


class Server:
    """Holds the peers; `open_session()` makes a fresh session for each one."""

    def __init__(self, open_session: Callable[[], object], config: ServeConfig) -> None:
        self.open_session = open_session
        self.config = config
        self.peers: dict[str, Peer] = {}
        self.info: dict = {}
        self.keyboard_keys: frozenset[str] = frozenset()
        self.closed_total = 0

    async def startup(self, _app=None) -> None:
        """Open one session to learn the bundle's bindings, frame size and rate, then drop it."""
        loop = asyncio.get_running_loop()
        probe = await loop.run_in_executor(None, self._warm_probe)
        space = probe.action_space
        self.keyboard_keys = frozenset(space.bindings)
        self.info = {
            "bindings": dict(space.bindings),
            "actions": list(space.keys),
            "frame_size": list(probe.frame_size),
            "frames_per_chunk": int(probe.frames_per_chunk),
            "fps": float(self.config.pipeline.fps or probe.fps),
            "codec": self.config.codec,
            "bitrate": self.config.bitrate,
            "max_sessions": self.config.max_sessions,
        }
        del probe

    def _warm_probe(self):
        probe = self.open_session()
        for _ in range(self.config.warmup_chunks):
            probe.step(action=None)
        return probe

    async def shutdown(self, _app=None) -> None:
        await asyncio.gather(*(self.close_peer(p, "server shutdown") for p in list(self.peers.values())))

    # -- handlers --

    async def index(self, _request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def info_handler(self, _request: web.Request) -> web.Response:
        return web.json_response(self.info)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "sessions": len(self.peers)})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        with_log = request.query.get("log") == "1"
        return web.json_response({
            "sessions": len(self.peers),
            "max_sessions": self.config.max_sessions,
            "closed_total": self.closed_total,
            "peers": [p.metrics(with_log) for p in list(self.peers.values())],
        })

    async def offer(self, request: web.Request) -> web.Response:
        try:
            offer = parse_offer(await request.read())
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if len(self.peers) >= self.config.max_sessions:
            return web.json_response(
                {"error": f"the server is at its limit of {self.config.max_sessions} concurrent "
                          f"session(s); close another tab or try again later"}, status=503)
        peer = Peer(self, uuid.uuid4().hex[:12])
        self.peers[peer.id] = peer  # reserve the slot before awaiting anything
        try:
            answer = await self.connect(peer, offer)
        except BadRequest as exc:
            await self.close_peer(peer, f"bad offer: {exc}")
            return web.json_response({"error": str(exc)}, status=400)
        except Exception as exc:  # the server stays up whatever one peer does
            log.exception("peer %s: offer failed", peer.id)
            await self.close_peer(peer, f"offer failed: {exc!r}")
            return web.json_response({"error": f"could not start a session: {exc}"}, status=500)
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "peer_id": peer.id})

    async def connect(self, peer: Peer, offer: RTCSessionDescription) -> RTCSessionDescription:
        loop = asyncio.get_running_loop()
        cfg = self.config
        peer.pc = pc = RTCPeerConnection()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close_peer(peer, f"connection {pc.connectionState}")

        @pc.on("datachannel")
        def on_channel(channel) -> None:
            peer.channel = channel
            channel.on("message", peer.handle_message)

        peer.session = await loop.run_in_executor(None, self.open_session)
        peer.pipeline = Pipeline(peer.session, cfg.pipeline)
        if cfg.digest_log:
            peer.pipeline.on_chunk = lambda chunk, frames: peer.digests.append(
                (chunk, hashlib.sha1(frames.tobytes()).hexdigest()))
        peer.track = PipelineTrack(peer.pipeline, cfg.display_min, peer.on_frame_sent)
        # The track and codec preferences go in before the offer is applied: aiortc picks the
        # common codecs when it applies the remote description, and binds our transceiver to
        # the offer's video m-line then.
        sender = pc.addTrack(peer.track)
        force_codec(pc, sender, cfg.codec, cfg.bitrate)
        try:
            await pc.setRemoteDescription(offer)
        except Exception as exc:
            raise BadRequest(f"could not apply the offer's SDP: {exc}") from None
        transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
        if transceiver.mid is None:
            raise BadRequest("the offer has no video m-line; add a recvonly video transceiver")
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise BadRequest(f"could not answer the offer (does it accept {cfg.codec}?): {exc}") from None
        peer.pipeline.start()
        peer.tasks = [asyncio.create_task(self.watch(peer)), asyncio.create_task(self.push_stats(peer))]
        return pc.localDescription

    async def watch(self, peer: Peer) -> None:
        """Close a peer that went silent (a killed browser sends no goodbye) or whose pipeline failed."""
        while not peer.closed:
            await asyncio.sleep(min(1.0, self.config.idle_timeout_s / 4))
            if peer.pipeline.error is not None:
                await self.close_peer(peer, f"generation failed: {peer.pipeline.error!r}")
            elif now() - peer.last_seen > self.config.idle_timeout_s:
                await self.close_peer(peer, f"idle for more than {self.config.idle_timeout_s} s")

    async def push_stats(self, peer: Peer) -> None:
        while not peer.closed:
            await asyncio.sleep(self.config.stats_period_s)
            if peer.pipeline is not None:
                stats = peer.pipeline.stats()
                peer.send({"type": "stats", "stats": stats, "keys": peer.metrics()["last_actions"]})

    async def close_peer(self, peer: Peer, reason: str) -> None:
        """Stop and release everything a peer holds; safe to call more than once."""
        if peer.closed:
            return
        peer.closed = True
        peer.close_reason = reason
        log.info("peer %s closed: %s", peer.id, reason)
        current = asyncio.current_task()
        for task in peer.tasks:
            if task is not current:
                task.cancel()
        if peer.pipeline is not None:
            await asyncio.get_running_loop().run_in_executor(None, peer.pipeline.stop)
        if peer.track is not None:
            peer.track.stop()
        if peer.pc is not None:
            await peer.pc.close()
        self.peers.pop(peer.id, None)
        self.closed_total += 1
        peer.session = peer.pipeline = peer.track = peer.channel = peer.pc = None


SERVER = web.AppKey("server", Server)


def create_app(open_session: Callable[[], object], config: ServeConfig | None = None) -> web.Application:
    """The aiohttp application (tests run it in-process); `app[SERVER]` is the Server."""
    server = Server(open_session, config or ServeConfig())
    app = web.Application()
    app[SERVER] = server
    app.on_startup.append(server.startup)
    app.on_shutdown.append(server.shutdown)
    app.router.add_get("/", server.index)
    app.router.add_get("/info", server.info_handler)
    app.router.add_get("/healthz", server.healthz)
    app.router.add_get("/metrics", server.metrics_handler)
    app.router.add_post("/offer", server.offer)
    app.router.add_static("/static/", STATIC)
    return app


class ServerThread:
    """Runs an app on its own event loop in a background thread (tests, benchmarks, notebooks).

    `with ServerThread(app) as srv:` serves on 127.0.0.1 at a free port; `srv.url` is the base
    URL and `srv.call(coro_fn)` runs a coroutine function on the server's loop.
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="forcekit-serve", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def call(self, coro_fn, *args, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self.loop).result(timeout)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self._start, timeout=300)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call(self._runner.cleanup)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    @property
    def server(self) -> Server:
        return self.app[SERVER]
