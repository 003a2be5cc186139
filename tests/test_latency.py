"""`forcekit bench latency` on the real tiny random bundle: both paths report sane figures."""

import json

from forcekit.cli import main


def test_bench_latency_json(capsys):
    assert main(["bench", "latency", "--bundle", "random-tiny", "--seconds", "2", "--toggle", "0.4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["startup"]["frame_size"] == [8, 8] and report["toggled_key"]
    local, rtc = report["local"], report["webrtc"]
    for path in (local, rtc):
        assert path["time_to_first_frame_ms"] > 0
        lat = path["input_to_frame_ms"]
        assert lat["p50"] is not None and lat["p95"] >= lat["p50"] > 0
        assert path["frame_interval_ms"]["p50"] > 0 and path["frame_jitter_ms"] is not None
    assert local["input_changes"] >= 2 and local["frames_shown"] > 10
    # Over WebRTC every input change was matched to a decoded frame by its pts.
    assert rtc["first_pts"] == 0 and rtc["matched"] >= 2 and rtc["frames_received"] > 10
    assert rtc["ping_rtt_ms"]["p50"] is not None
    # A frame cannot be decoded at the peer before the server generated it.
    assert rtc["input_to_frame_ms"]["p50"] >= rtc["server_input_to_frame_ms"]["p50"] * 0.5
