"""The Wan2.1-1.3B geometry preset, its random bundles and a reduced variant that runs on a CPU."""

import pytest
import torch

from runtime import SamplerConfig, open_session
from runtime.model import CausalDiT
from runtime.presets import RANDOM_BUNDLES, random_bundle, wan21_1_3b, wan21_1_3b_reduced


def test_wan_1_3b_geometry_and_parameter_count():
    cfg = wan21_1_3b()
    assert (cfg.num_layers, cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim) == (30, 1536, 12, 128)
    assert (cfg.ffn_dim, cfg.in_channels, cfg.text_dim, cfg.patch_size) == (8960, 16, 4096, (1, 2, 2))
    assert (cfg.latent_height, cfg.latent_width, cfg.tokens_per_frame) == (60, 104, 1560)
    assert (cfg.frames_per_chunk, cfg.window_frames, cfg.sink_frames) == (3, 21, 3)
    with torch.device("meta"):  # never materialise 1.4B parameters on a CPU test machine
        params = sum(p.numel() for p in CausalDiT(cfg).parameters())
    assert 1.3e9 < params < 1.45e9
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        wan = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30)
    assert params == sum(p.numel() for n, p in wan.named_parameters() if not n.startswith("rope."))


def test_reduced_keeps_the_per_layer_geometry():
    full, small = wan21_1_3b(), wan21_1_3b_reduced()
    same = ("inner_dim", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim", "in_channels",
            "frames_per_chunk", "sink_frames", "patch_size", "freq_dim")
    assert all(getattr(full, k) == getattr(small, k) for k in same)
    assert small.num_layers == 1 and small.tokens_per_frame == 16


def test_reduced_cache_equals_recomputation_with_text():
    torch.manual_seed(0)
    model = CausalDiT(wan21_1_3b_reduced()).eval()
    text = torch.randn(1, 6, 4096)
    cond_text = {"text": text}
    sampler = SamplerConfig(steps=2)
    chunks = 4  # 12 frames > sink 3 + window 6: eviction happens
    cached = _rollout(model, sampler, chunks, True, cond_text)
    recomputed = _rollout(model, sampler, chunks, False, cond_text)
    assert cached.shape[1] == 12
    assert (cached - recomputed).abs().max().item() <= 1e-4


def _rollout(model, sampler, chunks, kv_cache, cond):
    from runtime import ChunkCondition, Rollout

    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ro = Rollout(model, sampler, kv_cache=kv_cache, generator=gen, fuse_commit=True)
    out = []
    with torch.no_grad():
        for _ in range(chunks):
            n = ro.next_chunk_frames()
            noise = torch.randn(1, n, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
            out.append(ro.generate_chunk(noise, ChunkCondition(**cond)))
    return torch.cat(out, dim=1)


def test_random_bundles_resolve_by_name():
    assert {"random-tiny", "random-wan1.3b", "random-wan1.3b-reduced"} <= set(RANDOM_BUNDLES)
    with pytest.raises(ValueError, match="unknown random bundle 'random-wan7b'"):
        random_bundle("random-wan7b")
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="text cross-attention: pass text"):
        open_session("random-wan1.3b-reduced")
    s = open_session("random-wan1.3b-reduced", steps=1, text=torch.randn(4, 4096))
    assert s.bundle.name == "random-wan1.3b-reduced" and s.frame_size == (64, 64)
    assert [s.step().shape for _ in range(2)] == [(9, 64, 64, 3), (12, 64, 64, 3)]
    with pytest.raises(ValueError, match="text must have shape \\[L, 4096\\]"):
        open_session(s.bundle, text=torch.randn(4, 32))
