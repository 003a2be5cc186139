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

The server never trusts the client. An offer is read (bounded), parsed and its SDP checked
(a video m-line it can answer with the configured codec, a data channel, ICE credentials and a
DTLS fingerprint) before a slot is reserved or a session built; a bad one gets a 4xx with a
JSON `{"error": ...}` body, as does every other client error. Offers from another web page
(an `Origin` that is not the page's own) get 403, and each client may start only so many
sessions per minute (429). Every field of every data-channel message is checked; a bad one
gets an `error` reply with status 400 and the session goes on. A peer that goes away
(connection failed or closed, or silent for `idle_timeout_s`, e.g. a killed browser) has its
session stopped and its slot freed, whatever fails while closing it. No STUN or TURN server
is contacted unless one is configured (`ice_servers`).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import ipaddress
import json
import logging
import math
import re
import socket
import sys
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
from aiohttp.web_protocol import RequestPayloadError
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.codecs import h264, vpx
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcicetransport import parse_stun_turn_uri
from aiortc.sdp import SessionDescription

from apps.frames import upscale
from apps.pipeline import Pipeline, PipelineBusy, PipelineConfig, now

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
    # STUN/TURN servers, "URL" or "URL,USERNAME,CREDENTIAL"; none by default: loopback and LAN
    # need none, and a local tool must not contact a third party unasked.
    ice_servers: tuple[str, ...] = ()
    # Origins (scheme://host:port) whose pages may POST /offer besides the page's own; "*": any.
    allowed_origins: tuple[str, ...] = ()
    max_offer_bytes: int = 64 * 1024  # an offer's body; a browser's is a few KiB
    max_message_bytes: int = 4096  # a data-channel message; a keys snapshot is well under 200 bytes
    max_pending_inputs: int = 64  # key changes awaiting their first frame (for `applied`), per peer
    session_rate_per_min: float = 20.0  # sessions one client (IP) may start per minute...
    session_burst: int = 5  # ...after a burst of this many
    # Python's GIL switch interval while serving (process-wide; restored at shutdown). The
    # generation thread holds the GIL for long stretches; at the default 5 ms every hop of a
    # frame between threads (encoder, network, event loop) can wait that long, and a frame
    # makes several. None leaves it alone.
    switch_interval_s: float | None = 0.001
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if not (math.isfinite(self.idle_timeout_s) and self.idle_timeout_s > 0):
            raise ValueError(f"idle_timeout_s must be a number > 0, got {self.idle_timeout_s}")
        for name in ("max_offer_bytes", "max_message_bytes", "max_pending_inputs", "session_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.switch_interval_s is not None and not (math.isfinite(self.switch_interval_s)
                                                      and self.switch_interval_s > 0):
            raise ValueError(f"switch_interval_s must be a number > 0 or None, got {self.switch_interval_s}")
        if not (math.isfinite(self.session_rate_per_min) and self.session_rate_per_min > 0):
            raise ValueError(f"session_rate_per_min must be a number > 0, got {self.session_rate_per_min}")
        self.ice_servers = tuple(self.ice_servers)
        self.allowed_origins = tuple(self.allowed_origins)
        for url in self.ice_servers:
            ice_server(url)
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        module = CODECS[self.codec][1]
        if not module.MIN_BITRATE <= self.bitrate <= module.MAX_BITRATE:
            raise ValueError(f"{self.codec} bitrate must be in [{module.MIN_BITRATE}, {module.MAX_BITRATE}] "
                             f"bits/s, got {self.bitrate}")


class BadRequest(ValueError):
    """A client error: answered with `status` (400 unless said otherwise) and this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def ice_server(spec: str) -> RTCIceServer:
    """`--ice-server` value -> RTCIceServer: "stun:HOST[:PORT]" or "turn:HOST[:PORT][?transport=udp|tcp]"
    (turns: too), with ",USERNAME,CREDENTIAL" appended for TURN. ValueError says what is wrong."""
    url, *cred = spec.split(",")
    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError as exc:
        raise ValueError(f"ICE server {url!r} is not a stun:, stuns:, turn: or turns: URL ({exc})") from None
    if parsed["scheme"].startswith("turn") and len(cred) != 2:
        raise ValueError(f"TURN server {url!r} needs credentials: '{url},USERNAME,CREDENTIAL'")
    if parsed["scheme"].startswith("stun") and cred:
        raise ValueError(f"STUN server {url!r} takes no credentials")
    return RTCIceServer(urls=url, username=cred[0] if cred else None, credential=cred[1] if cred else None)


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
        # input version -> client seq, awaiting its first frame; oldest first, at most
        # config.max_pending_inputs entries
        self.pending_seq: dict[int, int] = {}
        self.messages = 0
        self.errors = 0
        self.digests: deque[tuple[int, str]] = deque(maxlen=4096)
        self.tasks: list[asyncio.Task] = []

    def send(self, payload: dict) -> None:
        """Send a message if the channel is open; never non-standard JSON (NaN), never raises."""
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return
        try:
            ch.send(json.dumps(payload, allow_nan=False))
        except Exception:  # a channel closing under us, or a value JSON cannot carry: drop it
            log.warning("peer %s: could not send a %r message", self.id, payload.get("type"), exc_info=True)

    def on_frame_sent(self, frame, pts: int) -> None:
        seq = self.pending_seq.pop(frame.input_version, None)
        for v in [v for v in self.pending_seq if v < frame.input_version]:
            del self.pending_seq[v]  # superseded before any frame showed them
        if seq is not None:
            self.send({"type": "applied", "seq": seq, "pts": pts, "keys": list(frame.keys),
                       "actions": list(frame.actions)})

    def handle_message(self, raw) -> None:
        """Apply one data-channel message; a bad one gets an error reply, never an exception."""
        if self.closed:
            return
        self.last_seen = now()
        self.messages += 1
        try:
            self._apply(parse_message(raw, self.server.keyboard_keys, self.server.config.max_message_bytes))
        except BadRequest as exc:
            self.errors += 1
            self.send({"type": "error", "status": exc.status, "message": str(exc)})
        except Exception:  # a bug must not reach aiortc's SCTP layer, which would end the session
            self.errors += 1
            log.exception("peer %s: data-channel message failed", self.id)
            self.send({"type": "error", "status": 500, "message": "internal error (details are in the server log)"})

    def _apply(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "keys":
            if self.pipeline.inputs.set_keys(msg["keys"]) and "seq" in msg:
                self.pending_seq[self.pipeline.inputs.snapshot().version] = msg["seq"]
                while len(self.pending_seq) > self.server.config.max_pending_inputs:
                    del self.pending_seq[next(iter(self.pending_seq))]
        elif kind == "ping":
            self.send({"type": "pong", "t": msg.get("t")})
        elif kind == "reset":
            try:
                self.pipeline.reset(seed=msg.get("seed"))
            except PipelineBusy as exc:
                raise BadRequest(f"too many requests: {exc}; try again", status=429) from None
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


# ---- validation of what clients send ------------------------------------------------------

MAX_JS_INT = 2**53 - 1  # the largest integer a JavaScript page can count to exactly (seq and seed)
MESSAGE_FIELDS = {"keys": {"type", "keys", "seq"}, "ping": {"type", "t"}, "reset": {"type", "seed"},
                  "bye": {"type"}}


def _short(value: object, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _reject_constant(name: str):
    raise BadRequest(f"{name} is not a JSON number; numbers must be finite")


def load_json(text: str | bytes, what: str) -> object:
    """json.loads that turns every way a client's text can fail into BadRequest.

    NaN and Infinity are refused (they are not JSON, and browsers reject them when echoed);
    nesting too deep for the parser is a client error, not a RecursionError in our stack.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"{what} is not JSON: {exc}") from None


def _int_field(msg: dict, name: str, lo: int, hi: int) -> None:
    value = msg[name]
    if type(value) is not int:  # bool is a subclass of int, and not a number here
        raise BadRequest(f'"{name}" must be an integer, got {_short(value)}')
    if not lo <= value <= hi:
        raise BadRequest(f'"{name}" must be in [{lo}, {hi}], got {_short(value)}')


def parse_message(raw, keyboard_keys: frozenset[str], max_bytes: int = 4096) -> dict:
    """Validate a data-channel message; raises BadRequest saying what is wrong.

    Every field is checked (type, range, finiteness) and unknown fields are refused, so
    nothing the server did not expect reaches the session.
    """
    if not isinstance(raw, str):
        raise BadRequest("binary messages are not supported; send JSON text")
    if len(raw) > max_bytes:
        raise BadRequest(f"message is {len(raw)} characters; the limit is {max_bytes}")
    msg = load_json(raw, "message")
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadRequest('message must be a JSON object with a string "type"')
    kind = msg["type"]
    if kind not in MESSAGE_FIELDS:
        raise BadRequest(f"unknown message type {_short(kind)}; expected keys, ping, reset or bye")
    extra = sorted(set(msg) - MESSAGE_FIELDS[kind])
    if extra:
        raise BadRequest(f"unknown field(s) {_short(extra)} in a {kind} message; "
                         f"it takes {sorted(MESSAGE_FIELDS[kind] - {'type'})}")
    if kind == "keys":
        keys = msg.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise BadRequest('"keys" must be a list of key names (strings)')
        if len(keys) > len(keyboard_keys):
            raise BadRequest(f'"keys" holds {len(keys)} names; this bundle binds only {len(keyboard_keys)}')
        if len(set(keys)) != len(keys):
            raise BadRequest('"keys" names a key more than once; send each held key once')
        unknown = sorted(set(keys) - keyboard_keys)
        if unknown:
            raise BadRequest(f"unknown key name(s) {_short(unknown)}; this bundle binds {sorted(keyboard_keys)}")
        if "seq" in msg:
            _int_field(msg, "seq", 0, MAX_JS_INT)
    elif kind == "ping":
        if "t" in msg:
            t = msg["t"]
            if type(t) not in (int, float) or not math.isfinite(t):
                raise BadRequest(f'ping "t" must be a finite number, got {_short(t)}')
    elif kind == "reset":
        if msg.get("seed") is not None:
            _int_field(msg, "seed", 0, MAX_JS_INT)
    return msg


SDP_MEDIA = {"audio", "video", "application"}
FINGERPRINT = re.compile(r"(sha-256|sha-384|sha-512) ([0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+)")
FINGERPRINT_BYTES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
MAX_MEDIA = 8


def check_offer_sdp(sdp: str, codec: str) -> None:
    """Check that an offer's SDP is one this server can answer, before anything is built for it.

    It must parse, have at most MAX_MEDIA m-lines of known kinds, a video m-line that accepts
    video from us in `codec`, a data channel (the keys come over it), and ICE credentials and
    a well-formed DTLS fingerprint for every m-line in use. Raises BadRequest naming the problem.
    """
    if not sdp.startswith("v=0"):
        raise BadRequest('offer "sdp" must be an SDP string starting with "v=0"')
    try:
        desc = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the malformed line triggers
        raise BadRequest(f"offer SDP does not parse: {type(exc).__name__}: {_short(str(exc), 80)}") from None
    if not desc.media:
        raise BadRequest("offer SDP has no m-lines; add a recvonly video transceiver and a data channel")
    if len(desc.media) > MAX_MEDIA:
        raise BadRequest(f"offer SDP has {len(desc.media)} m-lines; at most {MAX_MEDIA} are accepted")
    mime = CODECS[codec][0].lower()
    video = data = False
    for media in desc.media:
        if media.kind not in SDP_MEDIA:
            raise BadRequest(f"offer SDP has an m={_short(media.kind, 20)} line; only audio, video and "
                             f"application are understood")
        if media.port == 0:
            continue  # a rejected m-line
        if media.kind == "video" and media.direction in (None, "sendrecv", "recvonly"):
            if not any(c.mimeType.lower() == mime for c in media.rtp.codecs):
                raise BadRequest(f"the offer's video m-line does not accept {codec}, the codec this server sends")
            video = True
        if media.kind == "application":
            if media.sctp_port is None or "SCTP" not in media.profile.upper():
                raise BadRequest("the offer's application m-line is not an SCTP data channel")
            data = True
        if not (media.ice and media.ice.usernameFragment and media.ice.password):
            raise BadRequest(f"the offer's m={media.kind} line has no ICE credentials (a=ice-ufrag, a=ice-pwd)")
        prints = media.dtls.fingerprints if media.dtls else []
        if not prints:
            raise BadRequest(f"the offer's m={media.kind} line has no DTLS fingerprint (a=fingerprint)")
        for fp in prints:
            text = f"{fp.algorithm} {fp.value}"
            m = FINGERPRINT.fullmatch(text)
            if m is None or len(fp.value.split(":")) != FINGERPRINT_BYTES[m.group(1)]:
                raise BadRequest(f"malformed DTLS fingerprint {_short(text)}; expected sha-256/384/512 and hex bytes")
    if not video:
        raise BadRequest("the offer has no video m-line this server can send on; add a recvonly video transceiver")
    if not data:
        raise BadRequest("the offer has no data channel (m=application); the keys come over one")


def parse_offer(body: bytes, codec: str = "vp8") -> RTCSessionDescription:
    """Validate a POST /offer body; raises BadRequest saying what is wrong."""
    data = load_json(body, "offer")
    if not isinstance(data, dict):
        raise BadRequest('offer must be a JSON object {"sdp": ..., "type": "offer"}')
    if data.get("type") != "offer":
        raise BadRequest(f'offer "type" must be "offer", got {_short(data.get("type"))}')
    sdp = data.get("sdp")
    if not isinstance(sdp, str):
        raise BadRequest('offer "sdp" must be an SDP string starting with "v=0"')
    check_offer_sdp(sdp, codec)
    return RTCSessionDescription(sdp=sdp, type="offer")


class RateLimit:
    """A token bucket per client: `burst` at once, then `per_min` a minute."""

    def __init__(self, per_min: float, burst: int, max_clients: int = 4096) -> None:
        self.rate = per_min / 60.0
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def take(self, client: str, t: float | None = None) -> float:
        """Take a token for `client`: 0 when allowed, else the seconds until one is free."""
        t = now() if t is None else t
        tokens, at = self._buckets.get(client, (float(self.burst), t))
        tokens = min(float(self.burst), tokens + (t - at) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, t)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, t)
        if len(self._buckets) > self.max_clients:  # forget clients whose bucket has refilled
            full = [c for c, (k, a) in self._buckets.items() if k + (t - a) * self.rate >= self.burst]
            for c in full:
                del self._buckets[c]
        return 0.0


# ---- the server ----------------------------------------------------------------------------

INTERNAL_ERROR = "internal server error (the details are in the server log)"


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    """The one shape every error reply has: `{"error": message}` with the status."""
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error the app answers is JSON: aiohttp's own (404, 405, 413...) and unexpected
    exceptions, which are logged and answered with a generic message (never their text)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return error_response(exc.status, exc.text or exc.reason, keep)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, INTERNAL_ERROR)


def _is_local_host(host: str) -> bool:
    """localhost or an IP address: names a DNS-rebinding page cannot take over."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class Server:
    """Holds the peers; `open_session()` makes a fresh session for each one."""

    def __init__(self, open_session: Callable[[], object], config: ServeConfig) -> None:
        self.open_session = open_session
        self.config = config
        self.peers: dict[str, Peer] = {}
        self.info: dict = {}
        self.keyboard_keys: frozenset[str] = frozenset()
        self.closed_total = 0
        self.offers_refused = 0
        self.rate = RateLimit(config.session_rate_per_min, config.session_burst)
        self.ice_servers = [ice_server(url) for url in config.ice_servers]
        self._switch_interval: float | None = None  # the process's own, while ours is set

    async def startup(self, _app=None) -> None:
        """Open one session to learn the bundle's bindings, frame size and rate, then drop it."""
        if self.config.switch_interval_s is not None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(self.config.switch_interval_s)
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
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

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
            "offers_refused": self.offers_refused,
            "peers": [p.metrics(with_log) for p in list(self.peers.values())],
        })

    def origin_refusal(self, request: web.Request) -> str | None:
        """Why an offer's Origin is refused, or None when it is accepted.

        Browsers send Origin with every POST from a page; a request without one does not come
        from a web page (curl, the Python client) and is accepted. A page is accepted when it
        is this server's own page, reached by localhost or an IP address (a page on a
        rebinding DNS name has a matching Host too), or when its origin was allowed.
        """
        origin = request.headers.get("Origin")
        allowed = self.config.allowed_origins
        if origin is None or "*" in allowed or origin in allowed:
            return None
        own = f"{request.scheme}://{request.host}"
        if origin == own and _is_local_host(request.url.host or ""):
            return None
        return (f"offers from pages at {_short(origin, 80)} are refused: this server accepts its own page on "
                f"localhost or an IP address; start it with --allow-origin {_short(origin, 80)} to allow that page")

    async def offer(self, request: web.Request) -> web.Response:
        refusal = self.origin_refusal(request)
        if refusal is not None:
            self.offers_refused += 1
            return error_response(403, refusal)
        try:
            body = await request.read()
        except RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on a body that is not
            self.offers_refused += 1
            # The rest of the body cannot be read either: close the connection after the reply
            # instead of letting aiohttp drain it (which raises again and logs a traceback).
            request.protocol._lingering_time = 0.0
            reply = error_response(400, f"could not read the offer body: {_short(str(exc).strip(), 120)}")
            reply.force_close()
            return reply
        try:
            offer = parse_offer(body, self.config.codec)
        except BadRequest as exc:
            self.offers_refused += 1
            return error_response(exc.status, str(exc))
        if len(self.peers) >= self.config.max_sessions:
            return error_response(503, f"the server is at its limit of {self.config.max_sessions} concurrent "
                                       f"session(s); close another tab or try again later")
        client = request.remote or "unknown"
        wait = self.rate.take(client)
        if wait > 0:
            self.offers_refused += 1
            return error_response(429, f"too many sessions started from {client}; try again in {math.ceil(wait)} s",
                                  {"Retry-After": str(math.ceil(wait))})
        peer = Peer(self, uuid.uuid4().hex[:12])
        self.peers[peer.id] = peer  # reserve the slot before awaiting anything
        try:
            answer = await self.connect(peer, offer)
        except BadRequest as exc:
            await self.close_peer(peer, f"bad offer: {exc}")
            return error_response(exc.status, str(exc))
        except Exception:  # the server stays up whatever one peer does
            log.exception("peer %s: offer failed", peer.id)
            await self.close_peer(peer, "offer failed")
            return error_response(500, INTERNAL_ERROR)
        except BaseException:  # cancelled: still free the slot
            asyncio.ensure_future(self.close_peer(peer, "offer cancelled"))
            raise
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "peer_id": peer.id})

    async def connect(self, peer: Peer, offer: RTCSessionDescription) -> RTCSessionDescription:
        loop = asyncio.get_running_loop()
        cfg = self.config
        peer.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=list(self.ice_servers)))

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
            raise BadRequest(f"could not apply the offer's SDP: {_short(str(exc), 120)}") from None
        transceiver = next(t for t in pc.getTransceivers() if t.sender is sender)
        if transceiver.mid is None:
            raise BadRequest("the offer has no video m-line; add a recvonly video transceiver")
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            raise BadRequest(f"could not answer the offer (does it accept {cfg.codec}?): {_short(str(exc), 120)}") \
                from None
        peer.pipeline.start()
        peer.tasks = [asyncio.create_task(self.watch(peer)), asyncio.create_task(self.push_stats(peer))]
        return pc.localDescription

    async def watch(self, peer: Peer) -> None:
        """Close a peer that went silent (a killed browser sends no goodbye) or whose pipeline failed."""
        while True:
            await asyncio.sleep(min(1.0, self.config.idle_timeout_s / 4))
            if peer.closed:
                return
            if peer.pipeline.error is not None:
                await self.close_peer(peer, f"generation failed: {peer.pipeline.error!r}")
                return  # at once: a closed peer's tasks end with it, holding nothing of it
            if now() - peer.last_seen > self.config.idle_timeout_s:
                await self.close_peer(peer, f"idle for more than {self.config.idle_timeout_s} s")
                return

    async def push_stats(self, peer: Peer) -> None:
        while True:
            await asyncio.sleep(self.config.stats_period_s)
            if peer.closed:
                return
            stats = peer.pipeline.stats()
            peer.send({"type": "stats", "stats": stats, "keys": peer.metrics()["last_actions"]})

    async def close_peer(self, peer: Peer, reason: str) -> None:
        """Stop and release everything a peer holds; safe to call more than once.

        Each step may fail (the generation thread not stopping in time, aiortc raising inside
        `pc.close()`): the failure is logged and the next step runs, and the slot is freed
        whatever happened.
        """
        if peer.closed:
            return
        peer.closed = True
        peer.close_reason = reason
        log.info("peer %s closed: %s", peer.id, reason)
        try:
            others = [t for t in peer.tasks if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)  # gone before the loop may close
            loop = asyncio.get_running_loop()
            if peer.pipeline is not None:
                stop = peer.pipeline.stop
                await self._quietly(peer, "stopping the pipeline", lambda: loop.run_in_executor(None, stop))
            if peer.track is not None:
                await self._quietly(peer, "stopping the track", peer.track.stop)
            if peer.pc is not None:
                await self._quietly(peer, "closing the peer connection", peer.pc.close)
        finally:
            self.peers.pop(peer.id, None)
            self.closed_total += 1
            peer.session = peer.pipeline = peer.track = peer.channel = peer.pc = None

    @staticmethod
    async def _quietly(peer: Peer, what: str, fn: Callable[[], object]) -> None:
        try:
            result = fn()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("peer %s: %s failed; its slot is freed anyway", peer.id, what)


SERVER = web.AppKey("server", Server)


def create_app(open_session: Callable[[], object], config: ServeConfig | None = None) -> web.Application:
    """The aiohttp application (tests run it in-process); `app[SERVER]` is the Server."""
    config = config or ServeConfig()
    server = Server(open_session, config)
    app = web.Application(middlewares=[json_errors], client_max_size=config.max_offer_bytes)
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


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening; OSError when the port is taken."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp does; a live listener still conflicts
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_forever(app: web.Application, sock: socket.socket, ready: Callable[[int], None]) -> None:
    """Start the app (its start-up warms the model), listen on the bound socket, call
    ready(port), and serve until interrupted (Ctrl-C)."""

    async def main() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
            ready(sock.getsockname()[1])
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


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
