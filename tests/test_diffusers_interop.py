"""A tiny random diffusers Wan transformer loads into CausalDiT and gives the same output."""

import pytest
import torch

from runtime.interop import from_diffusers_wan

diffusers = pytest.importorskip("diffusers", reason="diffusers interop needs the 'diffusers' extra")


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_wan_weights_load_and_outputs_match(cross_attn_norm):
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64, cross_attn_norm=cross_attn_norm,
    ).eval()
    frames, height, width = 3, 8, 6
    model = from_diffusers_wan(wan, latent_height=height, latent_width=width).eval()
    assert set(model.state_dict()) == {k for k in wan.state_dict() if not k.startswith("rope.")}

    x = torch.randn(2, frames, 4, height, width)
    text = torch.randn(2, 7, 32)
    t = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.3, 0.3]])  # a different level per frame
    tokens_per_frame = (height // 2) * (width // 2)
    with torch.no_grad():
        ours = model(x, t, text=text)
        theirs = wan(x.transpose(1, 2), (t * 1000).repeat_interleave(tokens_per_frame, dim=1),
                     encoder_hidden_states=text, return_dict=False)[0].transpose(1, 2)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_outputs_match_at_wan_1_3b_width():
    """The reduced Wan2.1-1.3B preset (width 1536, 12x128 heads, ffn 8960, text 4096, one layer)."""
    from runtime.presets import wan21_1_3b_reduced

    cfg = wan21_1_3b_reduced(latent_height=4, latent_width=6)
    torch.manual_seed(0)
    wan = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
    ).eval()
    model = from_diffusers_wan(wan, latent_height=4, latent_width=6).eval()
    assert model.config.inner_dim == 1536 and model.config.ffn_dim == 8960
    x = torch.randn(1, 3, 16, 4, 6)
    text = torch.randn(1, 5, 4096)
    t = torch.tensor([[0.8, 0.4, 0.0]])
    with torch.no_grad():
        ours = model(x, t, text=text)
        theirs = wan(x.transpose(1, 2), (t * 1000).repeat_interleave(6, dim=1), encoder_hidden_states=text,
                     return_dict=False)[0].transpose(1, 2)
    assert (ours - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())


def test_unsupported_wan_variants_are_refused():
    from runtime.interop import config_from_wan

    with pytest.raises(ValueError, match="image-conditioned"):
        config_from_wan({"image_dim": 1280}, 8, 8)
