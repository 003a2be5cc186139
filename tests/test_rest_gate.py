"""The rest gate (``ModelConfig.rest_gate``): a learned gate of each frame's conditioning on the still residual."""

import pytest
import torch

from runtime import ChunkCondition, SamplerConfig
from runtime.config import ModelConfig
from runtime.rollout import Rollout
from tests.helpers import rollout_latents, tiny_model


def _with_residual(model):
    """Give the zero-initialised output head weights, so the residual is not trivially 0."""
    torch.manual_seed(3)
    torch.nn.init.normal_(model.proj_out.weight, std=0.05)
    torch.nn.init.normal_(model.proj_out.bias, std=0.05)
    return model


def _pair(**kw):
    plain = _with_residual(tiny_model(stack_frames=1, still_prior=0.5, frames_per_chunk=1, window_frames=3,
                                      sink_frames=0, **kw))
    gated = tiny_model(stack_frames=1, still_prior=0.5, frames_per_chunk=1, window_frames=3, sink_frames=0,
                       rest_gate=True, **kw)
    gated.load_state_dict(plain.state_dict(), strict=False)
    return plain, gated


def test_a_fresh_gate_is_the_ungated_model_and_its_scale_is_one():
    plain, gated = _pair()
    sampler = SamplerConfig(kind="consistency", steps=2)
    assert torch.allclose(rollout_latents(plain, sampler, 4, kv_cache=True),
                          rollout_latents(gated, sampler, 4, kv_cache=True), atol=1e-6)
    cfg = gated.config
    scale = gated.rest_gate_scale(torch.rand(2, 3), torch.rand(2, 3, cfg.action_condition_dim))
    assert torch.equal(scale, torch.ones(2, 3, cfg.out_channels))


def test_a_closed_gate_copies_the_previous_frame_and_the_gate_reads_the_keys_and_the_level():
    _, gated = _pair()
    cfg = gated.config
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    key = torch.zeros(1, 1, cfg.actions.dim)
    key[..., 0] = 1
    with torch.no_grad():
        gated.rest_gate[1].bias.fill_(-30.0)     # closed: the still prior alone, one step lands on the frame before
    ro = Rollout(gated, SamplerConfig(kind="consistency", steps=1), kv_cache=True, generator=gen, fuse_commit=True)
    with torch.no_grad():
        ro.add_context(ctx, ChunkCondition(action=torch.zeros_like(key)))
        for _ in range(3):
            still = ro.generate_chunk(torch.randn(ctx.shape, generator=gen), ChunkCondition(action=key))
            assert (still - ctx).abs().max() <= 1e-5
        torch.nn.init.normal_(gated.rest_gate[1].weight, std=1.0)
        gated.rest_gate[1].bias.zero_()
    t = torch.ones(1, 1)
    none = torch.zeros_like(key)
    assert not torch.allclose(gated.rest_gate_scale(t, key), gated.rest_gate_scale(t, none))
    assert not torch.allclose(gated.rest_gate_scale(t, none), gated.rest_gate_scale(0.5 * t, none))


def test_a_gated_rollout_is_the_same_cached_fused_and_recomputed():
    _, gated = _pair()
    with torch.no_grad():
        for p in gated.rest_gate.parameters():
            p.copy_(torch.randn(p.shape))
    sampler = SamplerConfig(kind="consistency", steps=2)
    cached = rollout_latents(gated, sampler, 5, kv_cache=True)
    assert (cached - rollout_latents(gated, sampler, 5, kv_cache=False)).abs().max() <= 1e-4
    assert (cached - rollout_latents(gated, sampler, 5, kv_cache=True, fuse_commit=True)).abs().max() <= 1e-4


def test_the_rest_gate_needs_the_still_prior_and_keys():
    with pytest.raises(ValueError, match="rest_gate needs still_prior"):
        ModelConfig.tiny(stack_frames=1, rest_gate=True)
    with pytest.raises(ValueError, match="no rest gate"):
        tiny_model(stack_frames=1, still_prior=0.5).rest_gate_scale(torch.ones(1, 1), None)
