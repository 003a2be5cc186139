"""Latent codec (runtime/autoencoder.py + training/codec.py) and image metrics (issue 3)."""

import math

import pytest
import torch

from runtime.autoencoder import ConvAEConfig, ConvAutoencoder
from training.codec import CodecTrainConfig, codec_loss, eval_codec, load_codec, train_codec
from training.metrics import horizons, mean_psnr, psnr, ssim

TINY = dict(latent_channels=4, encoder_channels=[8, 16], encoder_blocks=[0, 1],
            decoder_channels=[8, 16], decoder_blocks=[0, 1])


def _frames(n=16, size=16, seed=0):
    """Smooth random pictures (blurred noise), so a tiny codec can learn them quickly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def test_codec_interface_shapes_and_errors():
    codec = ConvAutoencoder(ConvAEConfig(**TINY))
    f = _frames(3, 16)
    z = codec.encode(f)
    assert z.shape == (3, 4, 8, 8) and codec.latent_shape(16, 16) == (4, 8, 8) and codec.spatial_factor == 2
    out = codec.decode(z)
    assert out.dtype == torch.uint8 and out.shape == f.shape
    with pytest.raises(ValueError, match="uint8"):
        codec.encode(f.float())
    with pytest.raises(ValueError, match="divisible"):
        codec.latent_shape(15, 16)
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown"):
        ConvAutoencoder.from_config({"type": "conv_ae", "bogus": 1})
    again = ConvAutoencoder.from_config(codec.config())
    assert again.config() == codec.config()


def test_normalisation_keeps_round_trip_and_whitens_latents():
    torch.manual_seed(0)
    codec = ConvAutoencoder(ConvAEConfig(**TINY)).eval()
    f = _frames(8, 16)
    with torch.no_grad():
        before = codec.decode(codec.encode(f))
        raw = codec.encoder(codec.to_unit(f))
        codec.set_normalisation(raw.mean((0, 2, 3)), raw.std((0, 2, 3)))
        z = codec.encode(f)
        after = codec.decode(z)
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=1e-3)
    assert (before.int() - after.int()).abs().max() <= 1


def test_codec_training_reduces_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    codec = ConvAutoencoder(ConvAEConfig(**TINY))
    batch = _frames(8, 16)
    opt = torch.optim.Adam(codec.parameters(), lr=3e-3)
    first = codec_loss(codec, batch, 0.2, 0.0)[1]["loss"]
    for _ in range(25):
        loss, _ = codec_loss(codec, batch, 0.2, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert codec_loss(codec, batch, 0.2, 0.0)[1]["loss"] < 0.7 * first


def test_edge_loss_adds_the_l1_of_the_pixel_difference_errors():
    torch.manual_seed(0)
    codec = ConvAutoencoder(ConvAEConfig(**TINY))
    batch = _frames(4, 16)
    plain = codec_loss(codec, batch, 0.2, 0.0)[0]
    with_edges = codec_loss(codec, batch, 0.2, 0.0, edge_weight=0.5)[0]
    x = codec.to_unit(batch)
    y = codec.decoder(codec.encoder(x))
    dx = ((y[..., 1:] - y[..., :-1]) - (x[..., 1:] - x[..., :-1])).abs().mean()
    dy = ((y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])).abs().mean()
    assert torch.allclose(with_edges, plain + 0.5 * (dx + dy), atol=1e-6)


def test_train_codec_cli_takes_the_edge_weight_and_decoder_widths(tmp_path):
    import json

    import numpy as np

    from forcekit.cli import main
    from training.data.shards import Episode, ShardStore

    store = ShardStore(tmp_path / "data")
    store.write_meta({"engine": "synthetic", "version": "0", "fps": 10.0, "resolution": [16, 16],
                      "action_space": {"keys": ["a"], "values": [], "bindings": {}}})
    store.append([Episode(_frames(16, 16).numpy(), np.zeros((16, 1), np.float32), seed=0)])
    assert main(["train", "codec", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"), "--steps", "2",
                 "--batch", "2", "--crop", "8", "--edge-weight", "0.3", "--decoder-channels", "8,8,16"]) == 0
    ckpt = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=False)
    assert ckpt["train_cfg"]["edge_weight"] == 0.3 and ckpt["model_cfg"]["decoder_channels"] == [8, 8, 16]
    assert json.loads((tmp_path / "c" / "codec.json").read_text())["decoder_channels"] == [8, 8, 16]


def test_codec_resume_continues_the_step_count(tmp_path):
    frames = _frames(32, 16)
    cfg = CodecTrainConfig(out=str(tmp_path), steps=6, batch=4, crop=8, warmup=2, log_every=2)
    first = train_codec(cfg, ConvAEConfig(**TINY), frames=frames, progress=False)
    assert first["step"] == 6
    cfg.steps = 10
    second = train_codec(cfg, frames=frames, progress=False)
    assert second["step"] == 10 and second["steps_this_run"] == 4
    codec = load_codec(tmp_path)
    assert codec.cfg.scale is not None and len(codec.cfg.scale) == 4
    report = eval_codec(codec, frames[:8], timing_runs=3)
    assert report["frames"] == 8 and report["latent_shape"] == [4, 8, 8] and report["decode_ms_per_frame"] > 0
    # Ten steps cannot reproduce the frames' fine texture: the round trip is blurrier than the real frames.
    assert 0 < report["sharpness_ratio"] < 0.9


def test_metrics_on_known_inputs():
    f = _frames(4, 16)
    assert torch.isinf(psnr(f, f)).all() and mean_psnr(psnr(f, f)) == 100.0
    assert torch.allclose(ssim(f, f), torch.ones(4))
    plus_one = (f.int() + 1).clamp(max=255)
    exact = f.clone()
    exact[f == 255] = 254                               # so every pixel differs by exactly 1
    one_off = psnr(exact, exact + 1)
    assert torch.allclose(one_off, torch.full((4,), 10 * math.log10(255.0**2)), atol=1e-4)
    shifted = torch.roll(f, shifts=3, dims=2)
    assert (psnr(shifted, f) < psnr(plus_one.to(torch.uint8), f)).all()
    assert (ssim(shifted, f) < 0.99).all()
    assert psnr(f[None], f[None]).shape == (1, 4) and ssim(f[None], f[None]).shape == (1, 4)
    assert horizons(64) == [1, 2, 4, 8, 16, 32, 64] and horizons(5) == [1, 2, 4]


def test_conv_codec_is_registered_and_travels_in_a_bundle(tmp_path):
    from runtime import Bundle, ModelConfig, open_session
    from runtime.codec import build_codec

    torch.manual_seed(0)
    codec = ConvAutoencoder(ConvAEConfig(**TINY))
    codec.set_normalisation(torch.full((4,), 0.1), torch.full((4,), 2.0))
    assert isinstance(build_codec(codec.config()), ConvAutoencoder)
    cfg = ModelConfig.tiny(in_channels=4, latent_height=8, latent_width=8)
    Bundle.random(cfg, codec=codec).save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.codec.config() == codec.config() and loaded.frame_size == (16, 16)
    f = _frames(2, 16)
    assert torch.equal(loaded.codec.decode(loaded.codec.encode(f)), codec.eval().decode(codec.encode(f)))
    session = open_session(loaded)
    session.reset(0, context=f.numpy())
    assert session.step(["forward"]).shape == (1, 16, 16, 3)


def test_codec_arg_reads_a_bundles_codec_and_names_a_bad_dir(tmp_path):
    from runtime import Bundle, ModelConfig
    from training.commands import load_codec_arg

    torch.manual_seed(0)
    codec = ConvAutoencoder(ConvAEConfig(**TINY))
    cfg = ModelConfig.tiny(in_channels=4, latent_height=8, latent_width=8)
    Bundle.random(cfg, codec=codec).save(tmp_path / "b")
    got = load_codec_arg(str(tmp_path / "b"))
    f = _frames(2, 16)
    assert isinstance(got, ConvAutoencoder) and torch.equal(got.encode(f), codec.eval().encode(f))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no codec.json"):
        load_codec_arg(str(tmp_path / "empty"))
