"""The adversarial decoder fine-tune (training/discriminator.py, `train codec --init --freeze-encoder
--adversarial-weight`) and shipping a bundle with the new decoder (`ship --decoder`)."""

import pytest
import torch

from runtime import Bundle, ModelConfig
from runtime.autoencoder import ConvAEConfig, ConvAutoencoder
from tests.test_worlds_codec import TINY, _frames
from training.codec import CodecTrainConfig, blur_latents, load_codec, train_codec
from training.discriminator import PatchDiscriminator, adaptive_weight, hinge_discriminator_loss


def test_blur_latents_mixes_toward_the_local_average_by_chance():
    torch.manual_seed(0)
    z = torch.randn(64, 2, 6, 6)
    assert torch.equal(blur_latents(z, 0.0), z)
    flat = torch.ones(4, 2, 6, 6)
    assert torch.allclose(blur_latents(flat, 1.0), flat)          # an average of a constant is the constant
    soft = torch.nn.functional.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
    out = blur_latents(z, 1.0)
    amount = ((out - z).flatten(1) @ (soft - z).flatten(1).T).diagonal() / (soft - z).flatten(1).pow(2).sum(1)
    assert ((amount >= 0) & (amount <= 1)).all() and amount.std() > 0.1
    assert torch.allclose(out, z + amount.view(-1, 1, 1, 1) * (soft - z), atol=1e-5)
    changed = (blur_latents(z, 0.5) != z).flatten(1).any(1).float().mean()
    assert 0.25 < changed < 0.75


def test_adaptive_weight_matches_the_two_gradients_at_the_last_layer():
    w = torch.randn(3, 3, requires_grad=True)
    rec = 4.0 * w.sum()
    adv = (2.0 * w).sum()
    assert torch.isclose(adaptive_weight(rec, adv, w), torch.tensor(2.0), rtol=1e-3)


def test_patch_discriminator_learns_to_tell_sharp_from_blurred():
    torch.manual_seed(0)
    disc = PatchDiscriminator((8, 16))
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3)
    real = torch.rand(8, 3, 16, 16) * 2 - 1
    fake = torch.nn.functional.avg_pool2d(real, 5, stride=1, padding=2)
    first = hinge_discriminator_loss(disc(real), disc(fake)).item()
    for _ in range(60):
        loss = hinge_discriminator_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert disc(real).shape == (8, 1, 8, 8)          # one stride-2 layer: a logit per 2x2 patch
    assert hinge_discriminator_loss(disc(real), disc(fake)).item() < 0.5 * first
    assert disc(real).mean() > disc(fake).mean()


def _trained_codec(tmp_path, frames):
    cfg = CodecTrainConfig(out=str(tmp_path / "base"), steps=4, batch=4, crop=8, warmup=1)
    train_codec(cfg, ConvAEConfig(**TINY), frames=frames, progress=False)
    return load_codec(tmp_path / "base")


def test_frozen_encoder_fine_tune_trains_the_decoder_only_and_resumes(tmp_path):
    frames = _frames(32, 16)
    base = _trained_codec(tmp_path, frames)
    cfg = CodecTrainConfig(out=str(tmp_path / "gan"), steps=3, batch=4, crop=8, warmup=1, init="base",
                           freeze_encoder=True, adversarial_weight=0.5, latent_blur=0.5)
    first = train_codec(cfg, frames=frames, progress=False, init=base)
    assert {"d_loss", "g_loss", "adv_scale"} <= set(first) and first["adv_scale"] > 0
    ckpt = torch.load(tmp_path / "gan" / "ckpt.pt", weights_only=False)
    assert "disc" in ckpt and ckpt["train_cfg"]["freeze_encoder"]
    cfg.steps = 5
    assert train_codec(cfg, frames=frames, progress=False)["steps_this_run"] == 2
    tuned = load_codec(tmp_path / "gan")
    assert tuned.config() == base.config()                       # the same latent normalisation
    for name, t in base.encoder.state_dict().items():
        assert torch.equal(t, tuned.encoder.state_dict()[name]), name
    assert any(not torch.equal(t, tuned.decoder.state_dict()[n]) for n, t in base.decoder.state_dict().items())
    with pytest.raises(ValueError, match="init"):
        train_codec(CodecTrainConfig(out=str(tmp_path / "x"), steps=1, freeze_encoder=True), frames=frames,
                    progress=False)


def test_ship_swaps_in_a_decoder_that_shares_the_encoder_and_refuses_another(tmp_path):
    from training.ship import ship

    frames = _frames(32, 16)
    base = _trained_codec(tmp_path, frames)
    Bundle.random(ModelConfig.tiny(in_channels=4, latent_height=8, latent_width=8), codec=base).save(tmp_path / "b")
    cfg = CodecTrainConfig(out=str(tmp_path / "gan"), steps=3, batch=4, crop=8, warmup=1, freeze_encoder=True,
                           adversarial_weight=0.5)
    train_codec(cfg, frames=frames, progress=False, init=base)
    tuned = load_codec(tmp_path / "gan")
    shipped = Bundle.load(ship(tmp_path / "b", tmp_path / "shipped", decoder=str(tmp_path / "gan")))
    z = base.encode(frames[:2])
    assert torch.equal(shipped.codec.encode(frames[:2]), z)
    assert torch.equal(shipped.codec.decode(z), tuned.decode(z)) and not torch.equal(tuned.decode(z), base.decode(z))
    assert shipped.extra["decoder"] == str(tmp_path / "gan")
    # a bundle dir gives its own decoder: a retrained student of the same codec keeps a shipped one's
    again = Bundle.load(ship(tmp_path / "b", tmp_path / "again", decoder=str(tmp_path / "shipped")))
    assert torch.equal(again.codec.decode(z), tuned.decode(z))
    other = CodecTrainConfig(out=str(tmp_path / "other"), steps=2, batch=4, crop=8, warmup=1, seed=1)
    train_codec(other, ConvAEConfig(**TINY), frames=frames, progress=False)
    with pytest.raises(ValueError, match="differs from the bundle"):
        ship(tmp_path / "b", tmp_path / "bad", decoder=str(tmp_path / "other"))
    assert not (tmp_path / "bad").exists()


def test_train_codec_cli_refuses_a_frozen_encoder_without_init(tmp_path, capsys):
    from forcekit.cli import main

    assert main(["train", "codec", "--data", str(tmp_path), "--out", str(tmp_path / "c"), "--freeze-encoder"]) != 0
    assert "--freeze-encoder needs --init" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _store(tmp_path, frames):
    import numpy as np

    from training.data.shards import Episode, ShardStore

    store = ShardStore(tmp_path / "data")
    store.write_meta({"engine": "synthetic", "version": "0", "fps": 10.0, "resolution": [16, 16],
                      "action_space": {"keys": ["forward", "back", "left", "right", "attack"], "values": [],
                                       "bindings": {}}})
    actions = (np.arange(len(frames) * 5).reshape(-1, 5) % 3 == 0).astype(np.float32)
    store.append([Episode(frames.numpy(), actions, seed=0)])
    return str(tmp_path / "data")


def test_a_world_models_own_latents_join_the_decoders_adversarial_training(tmp_path):
    from training.codec import student_latents

    frames = _frames(32, 16)
    data = _store(tmp_path, frames)
    base = _trained_codec(tmp_path, frames)
    Bundle.random(ModelConfig.tiny(in_channels=4, latent_height=8, latent_width=8), codec=base).save(tmp_path / "b")
    fakes = student_latents(str(tmp_path / "b"), data, rollouts=3, frames=2)
    assert fakes.shape == (6, 4, 8, 8)
    session_z = Bundle.load(tmp_path / "b").codec.encoder(base.to_unit(frames[:1]))
    assert fakes.shape[1:] == session_z.shape[1:]              # raw latents, what the decoder reads
    cfg = CodecTrainConfig(data=data, out=str(tmp_path / "gan"), steps=2, batch=4, crop=8, warmup=1,
                           freeze_encoder=True, adversarial_weight=0.5, fake_bundle=str(tmp_path / "b"),
                           fake_rollouts=2, fake_frames=2)
    result = train_codec(cfg, progress=False, init=base)
    assert result["layout_l1"] >= 0 and result["adv_scale"] > 0
    other = ConvAutoencoder(ConvAEConfig(**{**TINY, "decoder_channels": [8, 8]}))
    cfg.out, cfg.steps = str(tmp_path / "mismatch"), 1
    with pytest.raises(ValueError, match="not the one trained here"):
        train_codec(cfg, progress=False, init=other)
    cfg.out, cfg.adversarial_weight = str(tmp_path / "no_disc"), 0.0
    with pytest.raises(ValueError, match="adversarial"):
        train_codec(cfg, progress=False, init=base)


def test_pairs_stay_inside_episodes_and_are_cropped_alike():
    from training.codec import join_pairs, pair_starts, paired, split_pairs

    assert pair_starts([3, 1, 2]).tolist() == [0, 1, 4]      # an episode of one frame has no pair
    x = torch.arange(5 * 2 * 3 * 3, dtype=torch.float32).view(5, 2, 3, 3)
    both = paired(x, torch.tensor([0, 3]), 1)
    assert both.shape == (2, 4, 3, 3) and torch.equal(both[1, 2:], x[4])
    assert torch.equal(join_pairs(split_pairs(both)), both)
    assert torch.equal(split_pairs(both)[:2], x[[0, 3]])      # first frames, then the second ones


def test_a_pair_discriminator_sees_a_texture_that_does_not_move_with_the_view():
    """Real pairs: a texture and the same texture moved a pixel (the view turns); fake pairs: the texture twice
    (a texture fixed to the grid). Each frame alone is the same kind of texture, so only the pair tells them apart."""
    torch.manual_seed(0)
    tex = torch.rand(16, 3, 16, 16) * 2 - 1
    real, fake = torch.cat([tex, tex.roll(1, -1)], 1), torch.cat([tex, tex], 1)
    disc = PatchDiscriminator((8, 16), in_channels=6)
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3)
    for _ in range(80):
        loss = hinge_discriminator_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = torch.rand(8, 3, 16, 16) * 2 - 1                   # textures it never saw
    assert disc(torch.cat([held, held.roll(1, -1)], 1)).mean() > disc(torch.cat([held, held], 1)).mean() + 0.5


def test_the_decoder_fine_tune_judges_consecutive_frames(tmp_path):
    frames = _frames(32, 16)
    data = _store(tmp_path, frames)
    base = _trained_codec(tmp_path, frames)
    Bundle.random(ModelConfig.tiny(in_channels=4, latent_height=8, latent_width=8), codec=base).save(tmp_path / "b")
    cfg = CodecTrainConfig(data=data, out=str(tmp_path / "pairs"), steps=2, batch=4, crop=8, warmup=1,
                           freeze_encoder=True, adversarial_weight=0.5, adversarial_pairs=True,
                           fake_bundle=str(tmp_path / "b"), fake_rollouts=2, fake_frames=3)
    result = train_codec(cfg, progress=False, init=base)
    assert result["adv_scale"] > 0 and result["layout_l1"] >= 0
    disc = torch.load(tmp_path / "pairs" / "ckpt.pt", weights_only=False)["disc"]
    assert next(iter(disc.values())).shape[1] == 6              # it reads a frame and the next one
    cfg.out, cfg.adversarial_weight, cfg.fake_bundle = str(tmp_path / "no_disc"), 0.0, ""
    with pytest.raises(ValueError, match="adversarial_pairs needs adversarial_weight"):
        train_codec(cfg, progress=False, init=base)
