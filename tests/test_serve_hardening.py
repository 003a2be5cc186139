"""`forcekit serve` against careless and hostile clients: every defect found by review has a test here.

Offers that cannot be answered never take a slot or build a session, cleanup frees the slot
whatever fails, every error is JSON, other pages cannot post offers, data-channel messages are
checked field by field, and the command binds before it says where to go.
"""

import asyncio
import gzip
import json
import logging
import os
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from apps import rtc_client
from apps.pipeline import Pipeline, PipelineBusy, PipelineConfig
from apps.serve import SERVER, BadRequest, ServeConfig, create_app, ice_server, parse_message, parse_offer
from forcekit.cli import main
from runtime import Bundle, ModelConfig, open_session
from tests.helpers import client_offer_sdp, run, started

KEYS = frozenset({"w", "a", "s", "d", "space"})


@pytest.fixture(scope="module")
def bundle():
    return Bundle.random(ModelConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def offer_sdp():
    """A real offer from the Python client (recvonly video + data channel), made once."""
    return client_offer_sdp()


class CountingOpen:
    """open_session that counts how many sessions were built (the startup probe is one)."""

    def __init__(self, bundle, fail: Exception | None = None):
        self.bundle, self.fail, self.calls = bundle, fail, 0

    def __call__(self):
        self.calls += 1
        if self.fail is not None and self.calls > 1:
            raise self.fail
        return open_session(self.bundle)


# ---- offers ---------------------------------------------------------------------------------


def test_unanswerable_offers_never_take_a_slot(bundle, offer_sdp):
    """m=video turned into m=text used to get a 500 and lock a slot for good; garbage that starts
    with v=0 used to build a whole session before the SDP was looked at."""
    opener = CountingOpen(bundle)

    async def main():
        app = create_app(opener, ServeConfig(max_sessions=2, warmup_chunks=0))
        runner, base = await started(app)
        bad = {
            "m=text": offer_sdp.replace("m=video", "m=text"),
            "no fingerprint": "\r\n".join(x for x in offer_sdp.split("\r\n") if not x.startswith("a=fingerprint")),
            "bad fingerprint": offer_sdp.replace("a=fingerprint:sha-256 ", "a=fingerprint:sha-256 zz"),
            "no ice": "\r\n".join(x for x in offer_sdp.split("\r\n") if not x.startswith("a=ice-")),
            "no data channel": offer_sdp[: offer_sdp.index("m=application")],
            "h264 only": offer_sdp.replace("VP8/90000", "VP9/90000"),
            "v=0 garbage": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 X 96\r\n"
                           "a=rtpmap:96 VP8/90000\r\n",
            "sendonly video": offer_sdp.replace("a=recvonly", "a=sendonly"),
            "too many m-lines": offer_sdp + offer_sdp[offer_sdp.index("m=application"):] * 8,
        }
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(2):
                    for name, sdp in bad.items():
                        async with http.post(f"{base}/offer", json={"sdp": sdp, "type": "offer"}) as res:
                            body = await res.json()
                            assert res.status == 400, (name, res.status, body)
                            assert body["error"], name
                async with http.get(f"{base}/healthz") as res:
                    assert (await res.json())["sessions"] == 0
                assert opener.calls == 1  # only the start-up probe: nothing was built for them
                peer, status, body = await rtc_client.connect(base, http)
                assert status == 200, body
                await peer.close()
        finally:
            await runner.cleanup()

    run(main())


def test_cleanup_frees_the_slot_whatever_fails(bundle, caplog):
    """pc.close() raising inside aiortc, or pipeline.stop() raising (generation thread stuck),
    used to leave the peer in the table: the server stayed at its cap for good."""

    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(max_sessions=1, warmup_chunks=0))
        server = app[SERVER]
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                for broken in ("pc", "pipeline"):
                    peer, status, body = await rtc_client.connect(base, http)
                    assert status == 200, body
                    live = server.peers[peer.peer_id]
                    if broken == "pc":
                        real = live.pc.close

                        async def failing_close(real=real):
                            await real()
                            raise RuntimeError("aiortc blew up in close")

                        live.pc.close = failing_close
                    else:
                        real_stop = live.pipeline.stop

                        def failing_stop(real_stop=real_stop):
                            real_stop()
                            raise RuntimeError("generation thread did not stop within 10 s")

                        live.pipeline.stop = failing_stop
                    await server.close_peer(live, "test")
                    assert not server.peers, broken
                    async with http.get(f"{base}/healthz") as res:
                        assert (await res.json())["sessions"] == 0
                    await peer.close()
                # ...and the next user gets in.
                peer, status, body = await rtc_client.connect(base, http)
                assert status == 200, body
                await peer.close()
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.ERROR, logger="forcekit.serve"):
        run(main())
    assert "aiortc blew up" in caplog.text and "did not stop" in caplog.text


def test_server_failure_is_a_generic_500_and_frees_the_slot(bundle, caplog):
    opener = CountingOpen(bundle, fail=RuntimeError("secret path /home/x/weights"))

    async def main():
        app = create_app(opener, ServeConfig(max_sessions=1, warmup_chunks=0))
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                peer, status, body = await rtc_client.connect(base, http)
                assert peer is None and status == 500
                assert "secret" not in json.dumps(body) and "server log" in body["error"]
                async with http.get(f"{base}/healthz") as res:
                    assert (await res.json())["sessions"] == 0
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.ERROR, logger="forcekit.serve"):
        run(main())
    assert "secret path" in caplog.text  # the details go to the log


def test_hostile_bodies_get_json_4xx(bundle):
    """JSON nested 1,000 deep and bodies labelled gzip/deflate that are not compressed used to
    get 500; 413s were plain text."""

    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(warmup_chunks=0, max_offer_bytes=8192))
        runner, base = await started(app)
        deep = b"[" * 1000 + b"]" * 1000
        deep_obj = b'{"sdp":' * 5000 + b"1" + b"}" * 5000
        cases = [
            (deep, {}, 400), (b'{"a": ' * 1000 + b"1" + b"}" * 1000, {}, 400), (deep_obj, {}, 413),
            (b"not gzip at all", {"Content-Encoding": "gzip"}, 400),
            (b"not deflate", {"Content-Encoding": "deflate"}, 400),
            (gzip.compress(b"x" * 100_000), {"Content-Encoding": "gzip"}, 413),  # a small bomb
            (b"x" * 9000, {}, 413),
            (b'{"sdp": NaN, "type": "offer"}', {}, 400),
            (b"\xff\xfe\x00garbage", {}, 400),
        ]
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as http:
                for body, headers, want in cases:
                    async with http.post(f"{base}/offer", data=body, headers=headers) as res:
                        assert res.status == want, (body[:30], headers, res.status, await res.text())
                        assert res.content_type == "application/json"
                        assert (await res.json())["error"]
                for method, path, want in [("GET", "/offer", 405), ("GET", "/nowhere", 404)]:
                    async with http.request(method, f"{base}{path}") as res:
                        assert res.status == want and (await res.json())["error"]
                async with http.get(f"{base}/healthz") as res:
                    assert res.status == 200 and (await res.json())["sessions"] == 0
        finally:
            await runner.cleanup()

    run(main())


def test_offers_from_other_pages_are_refused(bundle, offer_sdp):
    """Any page the user visits could POST text/plain offers cross-origin and hold the slots."""

    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(warmup_chunks=0))
        runner, base = await started(app)
        allowing = create_app(lambda: open_session(bundle),
                              ServeConfig(warmup_chunks=0, allowed_origins=("http://mybox.lan:8080",)))
        runner2, base2 = await started(allowing)
        body = json.dumps({"sdp": "hello", "type": "offer"})  # refused for its origin before it is read
        try:
            async with aiohttp.ClientSession() as http:
                for origin, host, want in [
                    ("http://evil.example", None, 403),
                    ("null", None, 403),
                    (base, None, 400),  # the page's own origin: on to the (bad) body
                    ("http://rebound.example:1234", "rebound.example:1234", 403),  # DNS rebinding
                ]:
                    headers = {"Origin": origin, "Content-Type": "text/plain"}
                    if host:
                        headers["Host"] = host
                    async with http.post(f"{base}/offer", data=body, headers=headers) as res:
                        reply = await res.json()
                        assert res.status == want, (origin, reply)
                        if want == 403:
                            assert "--allow-origin" in reply["error"]
                headers = {"Origin": "http://mybox.lan:8080", "Host": "mybox.lan:8080"}
                async with http.post(f"{base2}/offer", data=body, headers=headers) as res:
                    assert res.status == 400  # allowed by the flag: on to the body
                async with http.get(f"{base}/healthz") as res:
                    assert (await res.json())["sessions"] == 0
        finally:
            await runner.cleanup()
            await runner2.cleanup()

    run(main())


def test_sessions_per_client_are_rate_limited(bundle):
    async def main():
        app = create_app(lambda: open_session(bundle),
                         ServeConfig(max_sessions=4, warmup_chunks=0, session_burst=2, session_rate_per_min=1.0))
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                peers = []
                for _ in range(2):
                    peer, status, body = await rtc_client.connect(base, http)
                    assert status == 200, body
                    peers.append(peer)
                peer, status, body = await rtc_client.connect(base, http)
                assert peer is None and status == 429 and "try again in" in body["error"]
                for p in peers:
                    await p.close()
        finally:
            await runner.cleanup()

    run(main())


def test_no_ice_servers_unless_configured(bundle):
    """aiortc's default configuration contacts a public STUN server for every session."""

    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(warmup_chunks=0))
        server = app[SERVER]
        runner, base = await started(app)
        try:
            async with aiohttp.ClientSession() as http:
                peer, status, body = await rtc_client.connect(base, http)
                assert status == 200
                live = server.peers[peer.peer_id]
                gatherer = live.pc.getTransceivers()[0].sender.transport.transport.iceGatherer
                assert gatherer._connection.stun_server is None and gatherer._connection.turn_server is None
                assert "srflx" not in body["sdp"] and "relay" not in body["sdp"]
                await peer.close()
        finally:
            await runner.cleanup()

    run(main())
    assert ServeConfig().ice_servers == ()
    assert ice_server("stun:stun.example.org:3478").urls == "stun:stun.example.org:3478"
    turn = ice_server("turn:turn.example.org:3478?transport=tcp,alice,secret")
    assert (turn.username, turn.credential) == ("alice", "secret")
    for bad, msg in [("http://x", "not a stun"), ("turn:turn.example.org", "credentials"),
                     ("stun:x,u,p", "no credentials")]:
        with pytest.raises(ValueError, match=msg):
            ServeConfig(ice_servers=(bad,))


# ---- data-channel messages -----------------------------------------------------------------


@pytest.mark.parametrize("raw, msg", [
    ("[" * 20_000 + "]" * 20_000, "nested too deeply"),
    ('{"type": "reset", "seed": ' + str(2**70) + "}", "seed"),
    ('{"type": "reset", "seed": -1}', "seed"),
    ('{"type": "reset", "seed": true}', "integer"),
    ('{"type": "reset", "seed": 1.5}', "integer"),
    ('{"type": "keys", "keys": [], "seq": true}', "integer"),
    ('{"type": "keys", "keys": [], "seq": -3}', "seq"),
    ('{"type": "ping", "t": NaN}', "finite"),
    ('{"type": "ping", "t": Infinity}', "finite"),
    ('{"type": "ping", "t": 1e999}', "finite"),
    ('{"type": "ping", "t": true}', "finite number"),
    ('{"type": "ping", "t": [1]}', "finite number"),
    ('{"type": "keys", "keys": [["w"]]}', "list of key names"),
    ('{"type": "keys", "keys": ["w", "w", "w", "w", "w", "w"]}', "binds only"),
    ('{"type": "keys", "keys": ["w", "w"]}', "more than once"),
    ('{"type": "keys", "keys": ["w"], "extra": {"a": [1]}}', "unknown field"),
    ('{"type": "bye", "now": 1}', "unknown field"),
    ('{"type": ["keys"]}', "string"),
    ('{"type": "keys", "keys": ["w"], "seq": ' + "9" * 5000 + "}", "not JSON"),
])
def test_every_field_of_every_message_is_checked(raw, msg):
    with pytest.raises(BadRequest, match=msg):
        parse_message(raw, KEYS, max_bytes=10**6)
    with pytest.raises(BadRequest, match="limit is 100"):
        parse_message(raw + " " * 100, KEYS, max_bytes=100)


def test_good_messages_pass():
    assert parse_message('{"type": "keys", "keys": ["w", "space"], "seq": 9007199254740991}', KEYS)["seq"] == 2**53 - 1
    assert parse_message('{"type": "reset", "seed": 3}', KEYS)["seed"] == 3
    assert parse_message('{"type": "reset"}', KEYS)["type"] == "reset"
    assert parse_message('{"type": "ping", "t": 1234.5}', KEYS)["t"] == 1234.5
    with pytest.raises(BadRequest):
        parse_offer(b'{"sdp": "v=0", "type": "offer"}')


def test_hostile_messages_keep_the_session_alive(bundle):
    """A deep message used to raise RecursionError into aiortc's SCTP layer, and seed 2**70 killed
    the generation thread: both ended the session. NaN pings were echoed as invalid JSON."""

    async def main():
        app = create_app(lambda: open_session(bundle), ServeConfig(warmup_chunks=0, max_pending_inputs=8))
        server = app[SERVER]
        runner, base = await started(app)
        raw_replies = []
        try:
            async with aiohttp.ClientSession() as http:
                peer, status, _ = await rtc_client.connect(base, http)
                assert status == 200
                await asyncio.wait_for(peer.opened.wait(), 20)
                peer.channel.on("message", raw_replies.append)
                await asyncio.wait_for(peer.first_frame.wait(), 30)
                hostile = ["[" * 2000 + "]" * 2000, "[" * 20_000 + "]" * 20_000,
                           '{"type": "reset", "seed": ' + str(2**70) + "}", '{"type": "reset", "seed": true}',
                           '{"type": "ping", "t": NaN}', '{"type": "keys", "keys": ["w"], "seq": false}']
                for raw in hostile:
                    peer.channel.send(raw)
                errors = await peer.wait_for(
                    lambda: len(peer.of_type("error")) >= len(hostile) and peer.of_type("error"))
                assert all(e["status"] == 400 for e in errors)
                # Keys with and without seq, many times over: the pending table stays bounded.
                live = server.peers[peer.peer_id]
                for i in range(200):
                    msg = {"type": "keys", "keys": ["w"] if i % 2 else []}
                    if i % 4 < 2:
                        msg["seq"] = i
                    peer.send(msg)
                # A flood of resets is coalesced: far fewer restarts than requests, and frames go on.
                resets = []
                real_reset = live.session.reset
                live.session.reset = lambda **kw: resets.append(kw["seed"]) or real_reset(**kw)
                for i in range(300):
                    peer.send({"type": "reset", "seed": i})
                n = len(peer.frames)
                await peer.wait_for(lambda: len(peer.frames) > n + 5, 20)
                await peer.wait_for(lambda: resets and resets[-1] == 299, 10)
                assert len(resets) < 30, len(resets)
                assert len(live.pending_seq) <= 8
                assert peer.peer_id in server.peers and live.pipeline.error is None
                await peer.close()
        finally:
            await runner.cleanup()
        for raw in raw_replies:  # every reply is standard JSON
            json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    run(main())


def test_pipeline_bounds_controls_and_coalesces_resets(bundle):
    session = open_session(bundle)
    seen = []
    session.reset = lambda seed, context=None: seen.append(seed)
    pipe = Pipeline(session, PipelineConfig(max_controls=4))
    for _ in range(4):
        pipe.call_between_chunks(lambda: None)
    with pytest.raises(PipelineBusy):
        pipe.call_between_chunks(lambda: None)
    pipe._run_controls()  # what the generation thread does at the next chunk boundary
    for seed in range(100):
        pipe.reset(seed=seed)  # coalesced into one pending reset: never busy
    pipe.call_between_chunks(lambda: None)  # room is left for other controls
    with pytest.raises(ValueError, match="seed"):
        pipe.reset(seed=2**70)
    with pytest.raises(ValueError, match="integer"):
        pipe.reset(seed=True)
    pipe._run_controls()
    assert seen == [99]


# ---- the command ---------------------------------------------------------------------------


def test_serve_port_in_use_is_a_one_line_error(capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        t0 = time.time()
        assert main(["serve", "--bundle", "random-tiny", "--port", str(port), "--warmup", "0"]) == 1
        assert time.time() - t0 < 30
    finally:
        taken.close()
    out = capsys.readouterr()
    assert "open http" not in out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "Traceback" not in out.err


@pytest.mark.parametrize("args", [["--port", "99999"], ["--port", "-1"], ["--max-sessions", "0"],
                                  ["--idle-timeout", "-1"], ["--idle-timeout", "nan"],
                                  ["--ice-server", "http://x"]])
def test_serve_rejects_bad_options(args, capsys):
    assert main(["serve", "--bundle", "random-tiny", *args]) == 2   # a usage error, reported in one line
    err = capsys.readouterr().err
    assert "Traceback" not in err and args[0] in err


def test_serve_prints_the_url_only_once_listening(tmp_path):
    """The "open http://..." line used to come before binding."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "forcekit", "serve", "--bundle", "random-tiny", "--port", "0",
                             "--warmup", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        line, seen = "", []
        while "open http" not in line:
            line = proc.stdout.readline()
            seen.append(line)
            assert line or proc.poll() is None, f"serve exited before printing its URL: {seen[-20:]}"
            assert time.time() < deadline, f"no URL within 120 s; serve printed: {seen[-20:]}"
        url = line.split("open ", 1)[1].split()[0]
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/"))), timeout=5):
            pass  # listening the moment it says so
    finally:   # what this test checks is above; a slow Ctrl-C shutdown on a loaded machine is not its failure
        proc.send_signal(2)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
