"""A rollout runs as long as the user plays, in bounded memory: no position table, no growing buffers."""

import os

import numpy as np

from runtime import Bundle, ModelConfig, SamplerConfig, open_session


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_5000_frame_rollout_has_flat_memory():
    cfg = ModelConfig.tiny(num_layers=1, latent_height=4, latent_width=4, window_frames=8, sink_frames=2)
    bundle = Bundle.random(cfg, seed=0, sampler=SamplerConfig(steps=1))
    session = open_session(bundle)
    keys = list(session.action_space.keys)
    cache_bytes, rss = [], {}
    for i in range(5000):
        frames = session.step([keys[(i // 50) % len(keys)]])
        assert frames.shape == (1, 4, 4, 3)
        if i >= cfg.window_frames + cfg.sink_frames:
            cache_bytes.append(session.stats()["kv_cache_bytes"])
        if i in (1000, 4999):
            rss[i] = _rss_bytes()
            assert np.isfinite(frames).all()
    assert len(set(cache_bytes)) == 1
    assert session.stats()["cache_frames_held"] == cfg.window_frames + cfg.sink_frames
    assert session.stats()["frames"] == 5000
    assert rss[4999] - rss[1000] < 16 * 2**20, f"RSS grew by {(rss[4999] - rss[1000]) / 2**20:.1f} MiB"
