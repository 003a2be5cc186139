"""SamplerConfig.reproject: a session feeds each generated frame back as the codec's encoding of what it shows."""

import numpy as np
import pytest
import torch

from runtime import Bundle, ModelConfig, SamplerConfig, StreamSession
from runtime.codec import PixelCodec


def _bundle(reproject: bool) -> Bundle:
    config = ModelConfig.tiny(stack_frames=1, frames_per_chunk=1, window_frames=3, sink_frames=0)
    return Bundle.random(config, seed=0, sampler=SamplerConfig(kind="consistency", steps=1, reproject=reproject))


def test_a_reprojecting_session_continues_from_the_encoding_of_the_frames_it_shows():
    plain, reprojected = StreamSession(_bundle(False)), StreamSession(_bundle(True))
    codec = reprojected.bundle.codec
    decodes = []
    decode = codec.decode
    codec.decode = lambda latents: decodes.append(latents.shape[0]) or decode(latents)
    shown = reprojected.step()
    assert decodes == [1]   # the frame decoded to reproject it is the frame shown, not decoded twice
    kept = reprojected._rollout._recent[0, -1]
    assert torch.equal(kept, codec.encode(torch.from_numpy(shown))[0])
    # the first frame is the same (nothing generated yet to reproject); what follows continues from another past
    first = plain.step()
    assert np.array_equal(first, shown)
    assert not torch.equal(plain._rollout._recent[0, -1], kept)
    assert not np.array_equal(plain.step(), reprojected.step())


def test_reproject_is_refused_for_a_temporal_codec_and_defaults_off_for_old_bundles(tmp_path):
    class TemporalPixels(PixelCodec):
        temporal = True

    bundle = _bundle(True)
    bundle.codec = TemporalPixels()
    with pytest.raises(ValueError, match="reproject needs a per-frame codec"):
        StreamSession(bundle)
    old = SamplerConfig(kind="consistency", steps=1).to_dict()
    del old["reproject"]
    assert SamplerConfig.from_dict(old).reproject is False


def test_ship_writes_reproject(tmp_path):
    from training.ship import ship

    _bundle(False).save(tmp_path / "b")
    assert Bundle.load(ship(tmp_path / "b", tmp_path / "on", reproject=True)).sampler.reproject is True
    assert Bundle.load(ship(tmp_path / "on", tmp_path / "kept")).sampler.reproject is True
    assert Bundle.load(ship(tmp_path / "on", tmp_path / "off", reproject=False)).sampler.reproject is False
