"""`serve --lipsync` over real WebRTC on loopback: a client sends a face and a voice, gets re-synced frames back."""

import asyncio
import json
import time
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("aiortc")

import av  # noqa: E402
from aiohttp import ClientSession  # noqa: E402
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import VideoStreamTrack  # noqa: E402

from apps.lipsync_bench import speechlike  # noqa: E402
from apps.lipsync_serve import LipsyncServeConfig, create_lipsync_app  # noqa: E402
from apps.serve import ServerThread  # noqa: E402
from runtime.presets import random_bundle  # noqa: E402


class Face(VideoStreamTrack):
    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 160, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


class Voice(MediaStreamTrack):
    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.samples = (speechlike(48000, 10.0) * 32767).astype(np.int16)
        self.sent, self.start = 0, None
        self.log: list[tuple[float, np.ndarray]] = []     # (wall time sent, samples)

    async def recv(self):
        n = 960                                          # 20 ms at 48 kHz, paced by the wall clock
        self.start = self.start or time.perf_counter()
        await asyncio.sleep(max(0.0, self.start + (self.sent + n) / 48000 - time.perf_counter()))
        frame = av.AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(self.samples[self.sent:self.sent + n].tobytes())
        frame.sample_rate, frame.pts, frame.time_base = 48000, self.sent, Fraction(1, 48000)
        self.log.append((time.perf_counter(), self.samples[self.sent:self.sent + n]))
        self.sent += n
        return frame


async def client(url: str, seconds: float, heard: list | None = None, voice: Voice | None = None
                 ) -> tuple[list, list]:
    """Frames and stats that come back; the audio that comes back goes to ``heard`` as (wall time, samples)."""
    pc = RTCPeerConnection()
    pc.addTrack(Face())
    pc.addTrack(voice or Voice())
    channel = pc.createDataChannel("stats")
    stats, frames = [], []
    channel.on("message", lambda m: stats.append(json.loads(m)["stats"]))

    @pc.on("track")
    def on_track(track):
        async def read():
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    frames.append(frame.to_ndarray(format="rgb24"))
                elif heard is not None:
                    a = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]
                    heard.append((time.perf_counter(), a.astype(np.float32) / 32768, frame.sample_rate))
        asyncio.ensure_future(read())

    await pc.setLocalDescription(await pc.createOffer())
    async with ClientSession() as http:
        async with http.post(f"{url}/offer", json={"sdp": pc.localDescription.sdp,
                                                   "type": pc.localDescription.type}) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    await asyncio.sleep(seconds)
    await pc.close()
    return frames, stats


def test_serve_lipsync_returns_resynced_frames_and_stats():
    app = create_lipsync_app(random_bundle("random-lipsync-tiny"), LipsyncServeConfig(display=64))
    with ServerThread(app) as srv:
        frames, stats = asyncio.run(client(srv.url, 4.0))
    assert len(frames) >= 20 and frames[-1].shape == (64, 64, 3)
    last = [s for s in stats if s.get("fps")][-1]
    assert last["video"] == "ok" and last["audio_rate"] == 48000 and last["error"] is None
    assert last["fps"] > 0 and last["audio_to_mouth_ms_p50"] > 0   # how fast and how late: bench lipsync


def envelope(samples: np.ndarray, rate: int, step: float = 0.02) -> np.ndarray:
    """RMS per ``step`` seconds of a stream's samples."""
    n = int(rate * step)
    x = samples[:len(samples) // n * n].astype(np.float64).reshape(-1, n)
    return np.sqrt(np.mean(np.square(x), 1))


def test_serve_lipsync_returns_the_voice_delayed_to_the_mouth():
    """The audio track that comes back is the client's own voice: its loudness, frame by frame, follows what
    was sent, later by at least the loop's playback delay (lookahead + one frame + one block) that makes the
    voice match the re-synced mouth (the network and both jitter buffers come on top)."""
    heard, voice = [], Voice()
    app = create_lipsync_app(random_bundle("random-lipsync-tiny"), LipsyncServeConfig(display=64))
    with ServerThread(app) as srv:
        _, stats = asyncio.run(client(srv.url, 5.0, heard, voice))
    delay_ms = [s for s in stats if s.get("fps")][-1]["audio_delay_ms"]
    assert 80 < delay_ms < 200
    assert heard and {rate for _, _, rate in heard} == {48000}
    sent = envelope(np.concatenate([x for _, x in voice.log]) / 32768, 48000)
    got = envelope(np.concatenate([x for _, x, _ in heard]), 48000)
    sent, got = sent - sent.mean(), got - got.mean()
    n = min(len(sent), len(got)) - 50
    corr = [float(np.dot(sent[:n], got[k:k + n]) / (np.linalg.norm(sent[:n]) * np.linalg.norm(got[k:k + n]) + 1e-9))
            for k in range(50)]                            # lags of 0-1 s in 20 ms steps
    best = int(np.argmax(corr))
    assert corr[best] > 0.8, corr                          # the voice, not silence or noise
    assert best * 20 >= delay_ms - 20                      # not sooner than the mouth can follow it


def test_serve_lipsync_refuses_a_world_model_and_a_bad_offer():
    with pytest.raises(ValueError, match="not a lip-sync bundle"):
        create_lipsync_app(random_bundle("random-tiny"))

    async def bad(url):
        async with ClientSession() as http, http.post(f"{url}/offer", data=b"nope") as resp:
            return resp.status, await resp.json()

    with ServerThread(create_lipsync_app(random_bundle("random-lipsync-tiny"))) as srv:
        status, body = asyncio.run(bad(srv.url))
    assert status == 400 and "expected JSON" in body["error"]
