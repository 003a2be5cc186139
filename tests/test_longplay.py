import numpy as np

from runtime import Bundle, ModelConfig, SamplerConfig, open_session
from training.longplay import LongPlayConfig, high_frequency_ratio, long_play, plot_long_play


def test_high_frequency_ratio_separates_noise_from_smooth_images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (4, 32, 32, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.repeat(((np.sin(xx / 6) + np.cos(yy / 5)) * 60 + 128)[None, :, :, None], 3, -1)
    smooth = np.repeat(smooth, 4, 0).astype(np.uint8)
    assert high_frequency_ratio(noise) > 1.5
    assert high_frequency_ratio(smooth) < 0.2


def test_long_play_tracks_memory_and_frames(tmp_path):
    cfg = ModelConfig.tiny(num_layers=1, latent_height=4, latent_width=4, window_frames=4, sink_frames=1)
    session = open_session(Bundle.random(cfg, sampler=SamplerConfig(steps=1)))
    result = long_play(session, LongPlayConfig(frames=300, policy="random", window=50), progress=False)
    assert result["frames"] == 300 and len(result["points"]) == 6
    assert result["kv_cache_bytes_constant"]
    assert all(p["spatial_var"] > 0 for p in result["points"])
    plot_long_play([result], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
