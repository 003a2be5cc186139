"""The Wan VAE codec decodes a stream chunk by chunk exactly as a whole clip, in flat memory."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime import Bundle, ModelConfig, open_session
from runtime.codec import FrameDecoder, PixelCodec, build_codec
from runtime.presets import tiny_wan_vae_config

pytest.importorskip("diffusers", reason="the wan_vae codec needs the 'diffusers' extra")

from runtime.wan_vae import WanVAECodec  # noqa: E402


def tiny_codec(seed: int = 0, **overrides) -> WanVAECodec:
    torch.manual_seed(seed)
    cfg = {**tiny_wan_vae_config(z_dim=4), "latents_mean": [0.1, -0.2, 0.3, 0.0],
           "latents_std": [1.5, 0.5, 2.0, 1.0], **overrides}
    return WanVAECodec(cfg).eval()


def stream(decoder, latents: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, list[int]]:
    outs, start = [], 0
    for n in sizes:
        outs.append(decoder.decode_pixels(latents[start:start + n]))
        start += n
    return torch.cat(outs), [o.shape[0] for o in outs]


def test_streaming_decode_equals_whole_clip_decode():
    codec = tiny_codec()
    latents = torch.randn(10, 4, 2, 3)
    whole = codec.decode_pixels(latents)
    assert whole.shape == (1 + 4 * 9, 3, 16, 24)
    streamed, counts = stream(codec.streaming_decoder(), latents, [3, 3, 1, 3])
    assert counts == [9, 12, 4, 12]  # the first latent frame gives one video frame, later ones four
    assert counts == [codec.video_frames(n, first=i == 0) for i, n in enumerate([3, 3, 1, 3])]
    assert (streamed - whole).abs().max().item() <= 1e-4
    # uint8 frames agree too, and the chunk boundaries matter: decoding chunks alone would differ
    assert torch.equal(torch.cat([codec.streaming_decoder().decode_chunk(latents)]), codec.decode(latents))
    alone = torch.cat([codec.streaming_decoder().decode_pixels(latents[i:i + 3]) for i in (0, 3)])
    assert (alone - whole[:alone.shape[0]]).abs().max().item() > 1e-3


def test_streaming_state_memory_is_flat_and_reset_clears_it():
    codec = tiny_codec()
    decoder = codec.streaming_decoder()
    latents = torch.randn(3, 4, 2, 3)
    sizes = []
    for _ in range(10):
        decoder.decode_chunk(latents)
        sizes.append(decoder.state_bytes)
    assert sizes[0] > 0 and len(set(sizes)) == 1  # whole chunks: the cache is replaced, never appended
    first = decoder.decode_pixels(latents[:1])
    assert first.shape[0] == 4
    decoder.reset()
    assert decoder.state_bytes == 0 and decoder.latent_frames == 0
    again = decoder.decode_pixels(latents)
    assert torch.equal(again, codec.streaming_decoder().decode_pixels(latents))  # a new stream, as fresh


def test_codec_interface_and_bad_input():
    codec = tiny_codec()
    assert codec.temporal and codec.spatial_factor == 8 and codec.latent_shape(64, 48) == (4, 8, 6)
    assert not PixelCodec.temporal and isinstance(PixelCodec().streaming_decoder(), FrameDecoder)
    frames = torch.randint(0, 256, (5, 16, 24, 3), dtype=torch.uint8)
    latents = codec.encode(frames)
    assert latents.shape == (2, 4, 2, 3)
    assert codec.decode(latents).shape == (5, 16, 24, 3)
    with pytest.raises(ValueError, match="clips of 1 \\+ 4k frames"):
        codec.encode(frames[:4])
    with pytest.raises(ValueError, match="latents must be \\[n, 4, h, w\\]"):
        codec.decode(torch.randn(2, 3, 2, 3))
    with pytest.raises(ValueError, match="'vae' must be a dict"):
        build_codec({"type": "wan_vae", "vae": 3})


def test_a_bundle_names_the_wan_vae_as_its_codec(tmp_path):
    codec = tiny_codec()
    cfg = ModelConfig.tiny(in_channels=4, latent_height=2, latent_width=4, frames_per_chunk=3, window_frames=3,
                           sink_frames=3, action_space={})
    bundle = Bundle.random(cfg, codec=codec, name="wan-codec")
    assert bundle.frame_size == (16, 32)
    loaded = Bundle.load(bundle.save(tmp_path / "b"))
    assert isinstance(loaded.codec, WanVAECodec) and loaded.codec.config() == codec.config()
    latents = torch.randn(4, 4, 2, 4)
    assert torch.equal(loaded.codec.decode(latents), codec.decode(latents))

    session = open_session(loaded, steps=1)
    counts = [session.step().shape[0] for _ in range(3)]
    assert counts == [9, 12, 12]
    stats = session.stats()
    assert stats["frames"] == 33 and stats["decoder_state_bytes"] > 0
    session.reset(1)
    assert session.decoder.state_bytes == 0 and session.step().shape[0] == 9
    with pytest.raises(ValueError, match="context frames need a per-frame codec"):
        session.reset(0, context=np.zeros((9, 16, 32, 3), dtype=np.uint8))


def test_runtime_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import runtime, runtime.wan_vae, runtime.presets, runtime.codec\n"
            "try:\n    runtime.codec.build_codec({'type': 'wan_vae'})\n"
            "except ImportError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: the 'wan_vae' codec needs diffusers" in out.stdout
