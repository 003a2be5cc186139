"""The rest gate (``ModelConfig.rest_gate``): a learned gate of the action condition on the still prior's residual."""

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
    assert torch.equal(gated.rest_gate_scale(torch.rand(5, cfg.action_condition_dim)), torch.ones(5, cfg.out_channels))


def test_a_gate_closed_at_rest_copies_the_still_frame_and_opens_when_a_key_is_held():
    _, gated = _pair()
    cfg = gated.config
    with torch.no_grad():   # closed for the null action, open (scale ~2) for any key held
        gated.rest_gate[2].bias.fill_(-30.0)
        gated.rest_gate[0].weight.fill_(0.0)
        gated.rest_gate[0].bias.fill_(0.0)
        gated.rest_gate[0].weight[0, :].fill_(100.0)
        gated.rest_gate[2].weight[:, 0].fill_(1.0)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    none, key = torch.zeros(1, 1, cfg.actions.dim), torch.zeros(1, 1, cfg.actions.dim)
    key[..., 0] = 1
    ro = Rollout(gated, SamplerConfig(kind="consistency", steps=1), kv_cache=True, generator=gen, fuse_commit=True)
    with torch.no_grad():
        ro.add_context(ctx, ChunkCondition(action=none))
        for _ in range(3):   # no key: the frame is copied exactly, frame after frame
            still = ro.generate_chunk(torch.randn(ctx.shape, generator=gen), ChunkCondition(action=none))
            assert (still - ctx).abs().max() <= 1e-5
        moved = ro.generate_chunk(torch.randn(ctx.shape, generator=gen), ChunkCondition(action=key))
    assert (moved - ctx).abs().max() > 1e-2
    assert float(gated.rest_gate_scale(none).max()) < 1e-6 and float(gated.rest_gate_scale(key).min()) > 1.9


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
        tiny_model(stack_frames=1, still_prior=0.5).rest_gate_scale(torch.zeros(1, 4))
