"""`forcekit serve` in-process with a real aiortc peer: signalling, data channel, limits, release."""

import asyncio
import gc
import hashlib
import json
import weakref

import aiohttp
import pytest

from apps import rtc_client
from apps.serve import SERVER, CappedVp8Encoder, ServeConfig, create_app, parse_message, sender_encoder
from runtime import Bundle, ModelConfig, open_session
from tests.helpers import run, started, wait_until


@pytest.fixture(scope="module")
def bundle():
    return Bundle.random(ModelConfig.tiny(), seed=0)


def test_parse_message_rejects_bad_input():
    keys = frozenset({"w", "a"})
    assert parse_message('{"type": "keys", "keys": ["w"], "seq": 3}', keys)["keys"] == ["w"]
    for raw, msg in [("not json", "not JSON"), ("[1]", "JSON object"), (b"\x00", "binary"),
                     ('{"type": "keys", "keys": "w"}', "list"), ('{"type": "keys", "keys": ["q"]}', "unknown key"),
                     ('{"type": "dance"}', "unknown message type"), ('{"type": "ping", "t": "x"}', "number"),
                     ('{"type": "keys", "keys": [], "seq": "1"}', "seq")]:
        with pytest.raises(ValueError, match=msg):
            parse_message(raw, keys)


def test_malformed_offers_get_400_and_server_survives(bundle):
    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(max_sessions=1, warmup_chunks=0))
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                bad = [b"nonsense", b"[]", json.dumps({"sdp": "v=0", "type": "answer"}).encode(),
                       json.dumps({"sdp": "hello", "type": "offer"}).encode(),
                       json.dumps({"sdp": "v=0\r\nthis is not sdp\r\n", "type": "offer"}).encode()]
                for body in bad:
                    async with http.post(f"{base}/offer", data=body) as res:
                        assert res.status == 400, body
                        assert (await res.json())["error"]
                # A well-formed offer without a video m-line is refused with a reason too.
                peer, status, body = await rtc_client.connect(base, http, offer_video=False)
                assert peer is None and status == 400 and "video" in body["error"]
                async with http.get(f"{base}/healthz") as res:
                    assert res.status == 200 and (await res.json()) == {"ok": True, "sessions": 0}
                async with http.get(f"{base}/") as res:
                    assert res.status == 200 and "<video" in await res.text()
                async with http.get(f"{base}/info") as res:
                    info = await res.json()
                assert info["bindings"]["w"] == "forward" and info["codec"] == "vp8"
        finally:
            await runner.cleanup()

    run(main())


def test_peer_session_end_to_end(bundle):
    """Signalling, video, data channel (keys/ping/errors), codec and bitrate, 503, release."""

    async def main():
        config = ServeConfig(max_sessions=1, bitrate=600_000, warmup_chunks=4, digest_log=True)
        app = create_app(lambda: open_session(bundle), config)
        server = app[SERVER]
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                peer, status, body = await rtc_client.connect(base, http, keep_images=4)
                assert status == 200, body
                assert "VP8" in body["sdp"] and "H264" not in body["sdp"]
                await asyncio.wait_for(peer.opened.wait(), 20)
                await asyncio.wait_for(peer.first_frame.wait(), 30)
                assert peer.images[-1].shape[0] >= config.display_min  # scaled up, decoded by the peer

                # Past the limit: 503 with a message the page shows.
                other, status, refused = await rtc_client.connect(base, http)
                assert other is None and status == 503 and "limit of 1" in refused["error"]

                peer.send({"type": "ping", "t": 12.5})
                seq = peer.send_keys(["w", "space"])
                applied = await peer.wait_for(lambda: [m for m in peer.of_type("applied") if m["seq"] == seq], 20)
                assert sorted(applied[0]["actions"]) == ["attack", "forward"]
                assert any(m["t"] == 12.5 for m in peer.of_type("pong"))

                # Bad messages get a 400 error reply and the stream goes on.
                for raw in ["{oops", json.dumps({"type": "keys", "keys": ["f13"]}), json.dumps({"type": "fly"})]:
                    peer.channel.send(raw)
                errors = await peer.wait_for(lambda: len(peer.of_type("error")) >= 3 and peer.of_type("error"))
                assert all(e["status"] == 400 for e in errors) and "f13" in errors[1]["message"]
                n = len(peer.frames)
                await peer.wait_for(lambda: len(peer.frames) > n + 3, 20)

                async with http.get(f"{base}/metrics?log=1") as res:
                    metrics = await res.json()
                (m,) = metrics["peers"]
                assert metrics["sessions"] == 1 and m["keys"] == ["space", "w"]
                assert sorted(m["last_actions"]) == ["attack", "forward"] and m["errors"] == 3
                assert m["stats"]["fps"] and m["stats"]["input_to_frame_ms"]["p50"] is not None

                live = server.peers[peer.peer_id]
                encoder = sender_encoder(live.pc.getSenders()[0])
                assert isinstance(encoder, CappedVp8Encoder) and encoder.target_bitrate <= 600_000
                encoder.target_bitrate = 5_000_000  # congestion feedback cannot raise it past the cap
                assert encoder.target_bitrate == 600_000

                # The keys changed the frames: replaying the logged actions reproduces the served
                # chunks exactly; replaying them without the keys does not.
                log = dict(m["digests"])
                actions = m["action_log"]
                assert actions[0][0] == 0 and any(a for _, a in actions)
                replay, noop = open_session(bundle), open_session(bundle)
                same, differ = 0, 0
                for chunk, acts in actions:
                    served = log[chunk]
                    assert hashlib.sha1(replay.step(action=acts).tobytes()).hexdigest() == served
                    same += 1
                    differ += hashlib.sha1(noop.step(action=[]).tobytes()).hexdigest() != served
                assert same == len(actions) and differ > 0

                session_ref = weakref.ref(live.session)
                del live, encoder
                await peer.close()
                await wait_until(lambda: not server.peers, 10)
                gc.collect()
                assert session_ref() is None  # the session's memory is released
                async with http.get(f"{base}/metrics") as res:
                    assert (await res.json())["sessions"] == 0
        finally:
            await runner.cleanup()

    run(main())


def test_silent_peer_is_closed(bundle):
    """A peer that stops talking (a killed browser sends no goodbye) is closed after the idle timeout."""

    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(idle_timeout_s=1.0, warmup_chunks=0))
        server = app[SERVER]
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                peer, status, _ = await rtc_client.connect(base, http)
                assert status == 200
                await asyncio.wait_for(peer.opened.wait(), 20)
                assert len(server.peers) == 1
                await wait_until(lambda: not server.peers, 10)
                assert server.closed_total == 1
                await peer.close()
        finally:
            await runner.cleanup()

    run(main())


def test_h264_is_negotiated_when_asked(bundle):
    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(codec="h264", bitrate=1_000_000, warmup_chunks=0))
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                peer, status, body = await rtc_client.connect(base, http, keep_images=1)
                assert status == 200 and "H264" in body["sdp"] and "VP8" not in body["sdp"]
                await asyncio.wait_for(peer.first_frame.wait(), 30)
                assert peer.images[-1].shape[0] >= 256
                await peer.close()
        finally:
            await runner.cleanup()

    run(main())
    with pytest.raises(ValueError, match="bitrate"):
        ServeConfig(codec="h264", bitrate=10)
    with pytest.raises(ValueError, match="codec"):
        ServeConfig(codec="av1")
