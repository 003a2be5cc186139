"""`forcekit serve` end to end in a real headless Chromium (Debian's package, driven by playwright).

`make test` installs /usr/bin/chromium when it is missing; without it (no apt), these tests are
skipped with that reason. Never `playwright install`: the system browser is the one tested.
"""

import hashlib
import json
import os
import time
import urllib.request

import pytest

from apps.serve import ServeConfig, ServerThread, create_app
from runtime import Bundle, ModelConfig, open_session

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (make test installs it via apt)"),
]
sync_api = pytest.importorskip("playwright.sync_api")


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as res:
        return json.loads(res.read())


def wait_for(predicate, timeout=20.0, what="condition"):
    end = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def bundle():
    return Bundle.random(ModelConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def served(bundle):
    config = ServeConfig(max_sessions=1, idle_timeout_s=4.0, warmup_chunks=8, digest_log=True)
    with ServerThread(create_app(lambda: open_session(bundle), config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


CANVAS_GRAB = """() => {
  const v = document.getElementById('video');
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d');
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let min = 255, max = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) { const y = d[i] + d[i+1] + d[i+2]; sum += y;
    if (d[i] < min) min = d[i]; if (d[i] > max) max = d[i]; }
  return {w: c.width, h: c.height, min, max, mean: sum / (3 * d.length / 4)};
}"""


def test_page_plays_video_and_held_key_drives_the_session(served, browser, bundle):
    page = browser.new_page()
    try:
        page.goto(served.url + "/")
        page.wait_for_function("window.forcekit && window.forcekit.connected", timeout=30_000)
        # The video element plays: currentTime advances and a canvas grab of it is not blank.
        page.wait_for_function("document.getElementById('video').currentTime > 0.2", timeout=30_000)
        t1 = page.evaluate("document.getElementById('video').currentTime")
        time.sleep(1.0)
        t2 = page.evaluate("document.getElementById('video').currentTime")
        assert t2 > t1 + 0.3, (t1, t2)
        grab = page.evaluate(CANVAS_GRAB)
        assert grab["w"] >= 256 and grab["h"] >= 256
        assert grab["max"] - grab["min"] > 20, grab  # a noise-like frame, not a flat or black one
        assert "w" in page.inner_text("#keys") and "forward" in page.inner_text("#keys")
        # The page asks Chromium for the smallest jitter buffer (a game: latency over smoothness).
        assert page.evaluate("window.forcekit.jitterBufferTarget") == 0

        (peer_id,) = [p["id"] for p in get_json(served.url + "/metrics")["peers"]]
        peer = served.server.peers[peer_id]
        assert peer.pipeline.action_log and all(a == () for _, a in peer.pipeline.action_log)

        # Hold "w" in the page: the session receives "forward" and the page hears it was applied.
        page.keyboard.down("w")
        wait_for(lambda: get_json(served.url + "/metrics")["peers"][0]["last_actions"] == ["forward"],
                 what="the session to receive forward")
        page.wait_for_function("window.forcekit.applied.some(a => a.actions.includes('forward'))", timeout=20_000)
        time.sleep(0.5)
        page.keyboard.up("w")
        wait_for(lambda: get_json(served.url + "/metrics")["peers"][0]["last_actions"] == [],
                 what="the key release to reach the session")
        rtt = page.evaluate("window.forcekit.rtt")
        assert rtt is not None and 0 < rtt < 1000

        # ...and it changed the frames generated: replaying the logged actions reproduces every
        # served chunk; replaying them with no keys diverges once "forward" came in.
        m = get_json(served.url + "/metrics?log=1")["peers"][0]
        digests = dict(m["digests"])
        replay, noop = open_session(bundle), open_session(bundle)
        diverged = None
        for chunk, actions in m["action_log"]:
            assert hashlib.sha1(replay.step(action=actions).tobytes()).hexdigest() == digests[chunk]
            if hashlib.sha1(noop.step(action=[]).tobytes()).hexdigest() != digests[chunk] and diverged is None:
                diverged = chunk
        first_forward = next(c for c, a in m["action_log"] if a == ["forward"])
        assert diverged == first_forward
    finally:
        page.close()
    # Closing the tab frees the session.
    wait_for(lambda: get_json(served.url + "/healthz")["sessions"] == 0, timeout=30, what="the session to close")


def test_limit_503_malformed_400_and_crashed_tab(served, browser):
    wait_for(lambda: get_json(served.url + "/healthz")["sessions"] == 0, what="a free slot")
    first = browser.new_page()
    second = browser.new_page()
    try:
        first.goto(served.url + "/")
        first.wait_for_function("window.forcekit && window.forcekit.connected", timeout=30_000)
        second.goto(served.url + "/")
        second.wait_for_function("window.forcekit && window.forcekit.error", timeout=30_000)
        status = second.inner_text("#status")
        assert "503" in status and "limit of 1" in status
        res = second.evaluate("""async () => {
            const r = await fetch('/offer', {method: 'POST', body: '{"sdp": 42'});
            return {status: r.status, body: await r.json()};
        }""")
        assert res["status"] == 400 and "not JSON" in res["body"]["error"]
        assert get_json(served.url + "/healthz")["sessions"] == 1
        # An abrupt end: the tab's renderer crashes, so the page says no goodbye. The server
        # notices the silence (idle timeout 4 s here) and frees the session.
        closed_before = served.server.closed_total
        try:
            first.goto("chrome://crash", timeout=5_000)
        except sync_api.Error:
            pass  # navigation to a crashing page reports an error; the crash is what we want
        t0 = time.time()
        wait_for(lambda: get_json(served.url + "/healthz")["sessions"] == 0, timeout=20, what="the session to close")
        assert served.server.closed_total == closed_before + 1 and time.time() - t0 < 15
    finally:
        second.close()
        first.close()
