"""A Python WebRTC client for `forcekit serve` (aiortc): what the page does, minus the page.

Used by `forcekit bench latency` for the WebRTC path and by the fast in-process tests. It
records when each decoded video frame arrives (by RTP-derived pts) and every data-channel
message, so input-to-frame latency can be measured end to end: keys sent -> the server says
which pts first carries them (`applied`) -> that frame decoded here.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


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
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("input")
    peer = ClientPeer(pc, channel)
    if offer_video:
        pc.addTransceiver("video", direction="recvonly")

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
