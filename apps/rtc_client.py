"""A Python WebRTC client for `forcekit serve` (aiortc): what the page does, minus the page.

Used by `forcekit bench latency` for the WebRTC path and by the fast in-process tests. It
records when each decoded video frame arrives (by RTP-derived pts) and every data-channel
message, so input-to-frame latency can be measured end to end: keys sent -> the server says
which pts first carries them (`applied`) -> that frame decoded here.

It receives the way a browser does in the two places where aiortc's defaults would not: it
contacts no STUN server (loopback and LAN need none; browsers have none by default), and it
hands a video frame to the decoder as soon as its last packet (the RTP marker bit) is in,
where aiortc's own jitter buffer waits for the first packet of the next frame, a whole frame
interval later (see CompleteFrameJitterBuffer).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError


class CompleteFrameJitterBuffer(JitterBuffer):
    """A video jitter buffer that releases a frame once it is complete.

    aiortc's buffer knows a frame is over only when a packet with the next timestamp arrives,
    so every frame reaches the decoder one frame interval late. A sender marks the last packet
    of a frame with the RTP marker bit (aiortc's and browsers' senders do), so a frame whose
    packets from the buffer's start up to a marked one are all present is complete: release it
    then. A frame that ends without a marker is still released when the next one begins.
    """

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        timestamp = None
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:
                return None  # a hole: wait for the missing packet (or for NACK recovery)
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                break  # the next frame began: this one is over although unmarked
            packets.append(packet)
            if packet.marker:
                break
        else:
            return None
        self.remove(len(packets))
        return JitterFrame(data=b"".join(p._data for p in packets), timestamp=timestamp)


@dataclass
class ClientPeer:
    pc: RTCPeerConnection
    channel: object
    peer_id: str | None = None
    frames: list[tuple[int, float]] = field(default_factory=list)  # (pts, arrival time)
    images: list = field(default_factory=list)  # last decoded frames as uint8 [H, W, 3]
    messages: list[dict] = field(default_factory=list)
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> time keys were sent
    seq: int = 0
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    first_frame: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def send(self, obj: dict) -> None:
        self.channel.send(json.dumps(obj))

    def send_keys(self, keys: list[str]) -> int:
        self.seq += 1
        self.sent_at[self.seq] = time.perf_counter()
        self.send({"type": "keys", "keys": keys, "seq": self.seq})
        return self.seq

    def of_type(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]

    async def wait_for(self, predicate, timeout: float = 10.0):
        """Poll until predicate() is truthy; returns its value or raises TimeoutError."""
        deadline = time.perf_counter() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.perf_counter() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


async def _consume(peer: ClientPeer, track, keep_images: int) -> None:
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        peer.frames.append((int(frame.pts), time.perf_counter()))
        if keep_images:
            peer.images.append(frame.to_ndarray(format="rgb24"))
            del peer.images[:-keep_images]
        peer.first_frame.set()


async def connect(base_url: str, session: aiohttp.ClientSession, keep_images: int = 0,
                  offer_video: bool = True) -> tuple[ClientPeer | None, int, dict]:
    """POST an offer to base_url/offer. Returns (peer or None, HTTP status, response body)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("input")
    peer = ClientPeer(pc, channel)
    if offer_video:
        receiver = pc.addTransceiver("video", direction="recvonly").receiver
        # aiortc 1.16 offers no API to choose the receiver's jitter buffer.
        receiver._RTCRtpReceiver__jitter_buffer = CompleteFrameJitterBuffer(capacity=512, is_video=True)

    @pc.on("track")
    def on_track(track) -> None:
        peer.tasks.append(asyncio.ensure_future(_consume(peer, track, keep_images)))

    @channel.on("open")
    def on_open() -> None:
        peer.opened.set()

    @channel.on("message")
    def on_message(raw) -> None:
        msg = json.loads(raw)
        msg["_received"] = time.perf_counter()
        peer.messages.append(msg)

    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers candidates here
    async with session.post(f"{base_url}/offer", json={"sdp": pc.localDescription.sdp,
                                                       "type": pc.localDescription.type}) as res:
        body = await res.json()
        status = res.status
    if status != 200:
        await pc.close()
        return None, status, body
    peer.peer_id = body.get("peer_id")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    return peer, status, body
