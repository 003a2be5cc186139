"""Small builders shared by the runtime tests."""

import torch

from runtime import ChunkCondition, ModelConfig, Rollout, SamplerConfig
from runtime.model import CausalDiT


def tiny_model(seed: int = 0, **overrides) -> CausalDiT:
    torch.manual_seed(seed)
    return CausalDiT(ModelConfig.tiny(**overrides)).eval()


def rollout_latents(model: CausalDiT, sampler: SamplerConfig, chunks: int, kv_cache: bool, seed: int = 0,
                    actions_seed: int = 1, fuse_commit: bool = False) -> torch.Tensor:
    """Generate ``chunks`` chunks with fixed noise and random actions; return all x0 latents."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    act_gen = torch.Generator().manual_seed(actions_seed)
    ro = Rollout(model, sampler, batch=1, kv_cache=kv_cache, generator=gen, fuse_commit=fuse_commit)
    out = []
    with torch.no_grad():
        for _ in range(chunks):
            n = ro.next_chunk_frames()
            action = (torch.rand(1, n, cfg.actions.dim, generator=act_gen) > 0.5).float()
            noise = torch.randn(1, n, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
            out.append(ro.generate_chunk(noise, ChunkCondition(action=action)))
    return torch.cat(out, dim=1)
