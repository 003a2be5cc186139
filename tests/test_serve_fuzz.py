"""Fuzz and fault checks on `forcekit serve` that stay in the suite (in-process, loopback, bounded).

- 1,000 malformed POST /offer bodies and 1,000 malformed data-channel messages: each answered
  with a 4xx / an error message, none with a 5xx, none left hanging; /healthz fine afterwards.
- 100 abrupt peer disconnects (client processes killed, so no goodbye): no session left behind,
  alive (no peer, pipeline, session or aiortc transport object), and the server's open file
  descriptors and RSS level off after warm-up.
- A flood of garbage offers from one client does not keep a real peer out.
"""

import asyncio
import ctypes
import gc
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import aiohttp
import aiortc
import pytest

from apps import rtc_client
from apps.pipeline import Pipeline
from apps.serve import SERVER, Peer, PipelineTrack, ServeConfig, create_app
from runtime import Bundle, ModelConfig, open_session
from runtime.session import StreamSession
from tests.helpers import client_offer_sdp, run, started, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle():
    return Bundle.random(ModelConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def offer_sdp():
    return client_offer_sdp()


def spoil(sdp: str, rng: random.Random) -> str:
    """A copy of a real offer with one defect that makes it unanswerable, plus random noise."""
    lines = sdp.split("\r\n")
    how = rng.randrange(9)
    if how == 0:
        lines = [x for x in lines if not x.startswith("a=fingerprint")]
    elif how == 1:
        lines = [x.replace("m=video", rng.choice(["m=text", "m=message", "m=vide0", "m="])) for x in lines]
    elif how == 2:
        lines = [x for x in lines if not x.startswith("a=ice-pwd")]
    elif how == 3:
        lines = [x.replace("VP8/90000", "VP9/90000") for x in lines]
    elif how == 4:
        lines = lines[: next(i for i, x in enumerate(lines) if x.startswith("m=application"))]
    elif how == 5:
        lines = [x.replace("a=recvonly", rng.choice(["a=sendonly", "a=inactive"])) for x in lines]
    elif how == 6:
        lines = [x.replace("a=fingerprint:sha-256 ", "a=fingerprint:sha-256 " + rng.choice(["zz:", "00", "1"]))
                 for x in lines]
    elif how == 7:
        lines = ["v=0"] + [rng.choice(["m=video 9 X", "a=rtpmap:x", "c=IN", "\x00\x01", "a=" * 50, "m=x y z"])
                           for _ in range(rng.randrange(1, 20))]
    else:  # the video m-line rejected (port 0)
        lines = [re.sub(r"^m=video \d+", "m=video 0", x) for x in lines]
    for _ in range(rng.randrange(3)):  # noise that an SDP parser must survive
        i = rng.randrange(len(lines))
        lines.insert(i, rng.choice(["a=" + "x" * rng.randrange(200), "b=AS:-1", "a=ssrc:abc", "zzz", "a=mid:"]))
    return "\r\n".join(lines)


def malformed_bodies(sdp: str, n: int, seed: int = 0) -> list[tuple[bytes, dict]]:
    """n request bodies (with headers) that no server should accept as an offer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 10
        headers = {}
        if kind < 4:
            body = json.dumps({"sdp": spoil(sdp, rng), "type": "offer"}).encode()
        elif kind == 4:
            good = json.dumps({"sdp": sdp, "type": "offer"}).encode()
            cut = rng.randrange(1, len(good) - 1)
            body = good[:cut]  # truncated JSON
        elif kind == 5:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif kind == 6:
            depth = rng.randrange(500, 3000)
            body = (b"[" * depth + b"]" * depth) if rng.random() < 0.5 else (b'{"a":' * depth + b"1" + b"}" * depth)
        elif kind == 7:
            body = json.dumps(rng.choice([
                {"sdp": sdp, "type": "answer"}, {"sdp": 42, "type": "offer"}, {"sdp": None}, [sdp], sdp,
                {"sdp": sdp, "type": ["offer"]}, {"type": "offer"}, 1e308, None,
            ])).encode()
        elif kind == 8:
            body = rng.choice([b"not gzip", b"\x1f\x8b\x08garbage", b"x" * 50])
            headers = {"Content-Encoding": rng.choice(["gzip", "deflate"])}
        else:
            body = b'{"sdp": "' + b"v=0\\r\\n" * rng.randrange(10, 20_000) + b'", "type": "offer"}'  # up to 13x the cap
        out.append((body, headers))
    return out


def test_fuzz_offers_get_4xx_and_server_survives(bundle, offer_sdp):
    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(max_sessions=2, warmup_chunks=0))
        server = app[SERVER]
        runner, base = await started(app)
        statuses = {}
        try:
            conn = aiohttp.TCPConnector(limit=8)
            async with aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=10)) as http:
                queue = list(enumerate(malformed_bodies(offer_sdp, 1000)))

                async def worker():
                    while queue:
                        i, (body, headers) = queue.pop()
                        async with http.post(f"{base}/offer", data=body, headers=headers) as res:
                            reply = await res.json()  # every error is JSON
                            statuses[i] = res.status
                            assert 400 <= res.status < 500, (i, res.status, reply, body[:200])
                            assert isinstance(reply.get("error"), str) and reply["error"]

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(8)))
                elapsed = time.perf_counter() - t0
                async with http.get(f"{base}/healthz") as res:
                    assert res.status == 200 and (await res.json()) == {"ok": True, "sessions": 0}
                assert not server.peers
                # ...and a real peer still gets in.
                peer, status, body = await rtc_client.connect(base, http)
                assert status == 200, body
                await peer.close()
        finally:
            await runner.cleanup()
        assert len(statuses) == 1000
        assert elapsed < 30, elapsed
        return statuses

    statuses = run(main())
    assert {400, 413} <= set(statuses.values())


def malformed_messages(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    templates = [
        lambda: "[" * rng.randrange(1000, 2000) + "]" * 10,
        lambda: '{"type": "reset", "seed": ' + str(2 ** rng.randrange(54, 200)) + "}",
        lambda: '{"type": "reset", "seed": ' + rng.choice(["true", "false", "-1", "1.5", '"3"', "[]", "NaN"]) + "}",
        lambda: '{"type": "ping", "t": ' + rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "true", '"x"']) + "}",
        lambda: '{"type": "keys", "keys": ' + rng.choice(['"w"', "[1]", '[["w"]]', '["f13"]', "null", '["w"]']) +
                ', "seq": ' + rng.choice(["true", "-1", "1e3", '"1"', str(2**60)]) + "}",
        lambda: json.dumps({"type": rng.choice(["dance", "", "KEYS", "keys ", "ping\u0000"])}),
        lambda: json.dumps({"type": "bye", rng.choice(["x", "seq", "keys"]): 1}),
        lambda: "".join(rng.choice('{}[]":,x1 ') for _ in range(rng.randrange(1, 200))),
        lambda: json.dumps({"type": "keys", "keys": ["w"] * rng.randrange(6, 50)}),
        lambda: "x" * rng.randrange(4097, 10_000),
    ]
    msgs = [templates[i % len(templates)]() for i in range(n)]
    assert all(m for m in msgs)
    return msgs


def test_fuzz_messages_get_errors_and_session_survives(bundle):
    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(warmup_chunks=0))
        server = app[SERVER]
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                peer, status, _ = await rtc_client.connect(base, http)
                assert status == 200
                await asyncio.wait_for(peer.opened.wait(), 20)
                await asyncio.wait_for(peer.first_frame.wait(), 30)
                msgs = malformed_messages(1000)
                for i, raw in enumerate(msgs):
                    peer.channel.send(raw)
                    if i % 50 == 49:
                        await asyncio.sleep(0.01)  # let the channel drain
                errors = await peer.wait_for(lambda: len(peer.of_type("error")) >= 1000 and peer.of_type("error"), 30)
                assert len(errors) == 1000 and all(e["status"] == 400 for e in errors)
                live = server.peers[peer.peer_id]
                assert live.errors == 1000 and live.pipeline.error is None
                # The session is alive: keys still apply and frames keep coming.
                seq = peer.send_keys(["w"])
                applied = await peer.wait_for(lambda: [m for m in peer.of_type("applied") if m["seq"] == seq], 20)
                assert applied[0]["actions"] == ["forward"]
                async with http.get(f"{base}/healthz") as res:
                    assert (await res.json()) == {"ok": True, "sessions": 1}
                await peer.close()
        finally:
            await runner.cleanup()

    run(main())


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


CLIENTS = """
import asyncio, sys
import aiohttp
from apps import rtc_client

async def main(base, n):
    async with aiohttp.ClientSession() as http:
        peers = await asyncio.gather(*(rtc_client.connect(base, http) for _ in range(n)))
        for peer, status, body in peers:
            assert status == 200, body

        async def talk(peer):
            await asyncio.wait_for(peer.opened.wait(), 30)
            peer.send_keys(["w"])  # at once (the server's idle timeout is short): it knows it as a live peer

        await asyncio.gather(*(talk(peer) for peer, _, _ in peers))
        print("ready", flush=True)
        await asyncio.Event().wait()  # until killed

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _clients_killed(base: str, n: int) -> None:
    """n peers in a child process that connect, talk, and are then killed (SIGKILL: no goodbye)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENTS, base, str(n),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                cwd=ROOT)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            proc.kill()
            err = (await proc.stderr.read()).decode()
            pytest.fail(f"the clients failed: {err[err.find('Traceback'):][:3000]}")  # the cause, not the teardown
    finally:
        proc.kill()
        await proc.wait()


# What one browser's session holds alive; a leaked session leaves one of each behind per client.
PER_PEER_TYPES = (Peer, PipelineTrack, Pipeline, StreamSession, aiortc.RTCPeerConnection, aiortc.RTCDataChannel,
                  aiortc.RTCSctpTransport, aiortc.RTCDtlsTransport, aiortc.RTCIceTransport, aiortc.RTCRtpSender)


def _live_per_peer_objects() -> dict[str, int]:
    counts = {cls: 0 for cls in PER_PEER_TYPES}
    for obj in gc.get_objects():
        if type(obj) in counts:
            counts[type(obj)] += 1
    return {cls.__name__: n for cls, n in counts.items()}


def test_abrupt_disconnects_leave_nothing_behind(bundle):
    async def main():
        # The idle timeout also bounds connection set-up: 25 at once on a busy 2-core machine need > 1 s.
        config = ServeConfig(max_sessions=25, warmup_chunks=0, idle_timeout_s=2.0, session_burst=1000)
        app = create_app(lambda: open_session(bundle), config)
        server = app[SERVER]
        runner, base = await started(app)
        samples = []
        gc.collect()
        before = _live_per_peer_objects()  # other tests in this process may keep a session of their own
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(4):
                    await _clients_killed(base, 25)
                    await wait_until(lambda: not server.peers, 15)
                    gc.collect()
                    ctypes.CDLL(None).malloc_trim(0)  # freed heap back to the OS: RSS is what is live
                    samples.append((_rss_kib(), _fds(), _live_per_peer_objects()))
                async with http.get(f"{base}/metrics") as res:
                    metrics = await res.json()
                assert metrics["sessions"] == 0 and metrics["peers"] == [] and metrics["closed_total"] == 100
        finally:
            await runner.cleanup()
        return before, samples

    t0 = time.perf_counter()
    before, samples = run(main(), timeout=180)
    assert time.perf_counter() - t0 < 120
    print("live per-peer objects before:", before)
    print("server RSS KiB, open fds, live per-peer objects after each 25 killed clients:", samples)
    # Nothing of a killed client's session is still alive: no peer, track, pipeline or session of the
    # server's more than before the clients came. Of aiortc's objects, one or two connections (with
    # their transports) sometimes outlive the server's peer for over 45 s when the browser tests ran
    # first in this process (seen 2026-12-04, about 1 run in 3, in any of the four batches; held through
    # aiortc's own listeners, not root-caused; up to 4 that did not grow from batch to batch when the suite ran
    # next to two training jobs): a leak of the killed clients would leave 25 a batch, 100 by the end.
    own = ("Peer", "PipelineTrack", "Pipeline", "StreamSession")
    for _, _, live in samples:
        assert {k: live[k] for k in own} == {k: before[k] for k in own}, (live, before)
        assert all(live[k] - before[k] <= 5 for k in live), (live, before)
    # After warm-up (the first 50 disconnects) open fds do not grow beyond a few of jitter, and RSS
    # stays within 64 MiB: a gross bound for leaks outside Python (codec contexts, threads). The
    # allocator's arenas wander by ~20 MiB on a busy machine (a 16 MiB bound failed in CI with
    # nothing alive), so the object counts above are the exact check.
    fds = [f for _, f, _ in samples]
    rss = [r for r, _, _ in samples]
    assert max(fds[2:]) <= fds[1] + 4, fds
    assert max(rss[2:]) <= rss[1] + 64 * 1024, rss


def test_garbage_flood_does_not_keep_a_real_peer_out(bundle, offer_sdp):
    """Two loops posting v=0 garbage used to make a real peer get 503 in 29 of 30 attempts."""

    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(max_sessions=2, warmup_chunks=0))
        server = app[SERVER]
        runner, base = await started(app)
        garbage = [json.dumps({"sdp": spoil(offer_sdp, random.Random(i)), "type": "offer"}) for i in range(50)]
        stop = asyncio.Event()
        sent = [0]

        async def flood(http):
            i = 0
            while not stop.is_set():
                async with http.post(f"{base}/offer", data=garbage[i % len(garbage)]) as res:
                    assert res.status == 400
                    sent[0] += 1
                i += 1

        try:
            async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as http2:
                floods = [asyncio.create_task(flood(http2)) for _ in range(2)]
                await asyncio.sleep(0.3)
                for _ in range(5):
                    peer, status, body = await rtc_client.connect(base, http)
                    assert status == 200, body
                    await asyncio.wait_for(peer.opened.wait(), 20)
                    await peer.close()
                    await wait_until(lambda: not server.peers, 10)
                stop.set()
                await asyncio.gather(*floods)
        finally:
            await runner.cleanup()
        assert sent[0] > 50

    run(main())
