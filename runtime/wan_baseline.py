"""The no-cache baseline: diffusers' ``WanTransformer3DModel`` recomputing the whole context every step.

What a chunk-wise Wan student costs without a KV cache: every denoising step of every chunk
runs the transformer over the context the cache would hold (sink + window frames, clean, at
t = 0) plus the chunk itself, with diffusers' own attention (bidirectional over that
window). It carries the bundle's own weights (the parameter names are shared), samples with
the bundle's sampler and decodes with the bundle's codec, so `forcekit bench runtime
--baseline diffusers` puts the two side by side on one GPU and the speedup is a measured
ratio, not a claim. The frames differ from the cached session's (bidirectional within the
window, no block-causal mask); what is compared is time and memory.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from runtime import sampler as sampling
from runtime.bundle import Bundle
from runtime.model import CausalDiT


def diffusers_wan_from(model: CausalDiT) -> torch.nn.Module:
    """A diffusers ``WanTransformer3DModel`` holding ``model``'s weights (no action/audio/video adapters)."""
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:
        raise ImportError("the diffusers baseline needs diffusers (pip install 'forcekit[diffusers]')") from e
    cfg = model.config
    if cfg.actions.dim or cfg.audio_dim or cfg.video_channels:
        raise ValueError("the diffusers baseline runs plain Wan models: this one has action, audio or video "
                         "adapters diffusers does not have")
    p = next(model.parameters())
    with torch.device(p.device):
        wan = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            text_dim=cfg.text_dim or 0, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
    missing, unexpected = wan.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("rope.")]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto WanTransformer3DModel: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return wan.to(dtype=p.dtype).eval()


@torch.no_grad()
def measure_diffusers_baseline(bundle: Bundle, device: torch.device, frames: int, steps: int | None = None,
                               text: torch.Tensor | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
                               ) -> dict:
    """Generate ``frames`` latent frames chunk by chunk, recomputing the context at every step; timings.

    ``text``: ``[1, L, text_dim]`` (needed when the model has text cross-attention).
    """
    cfg = bundle.config
    wan = diffusers_wan_from(bundle.model.to(device)).to(device, dtype)
    decoder = bundle.codec.streaming_decoder()
    pattern = cfg.chunk_pattern
    tpf = cfg.tokens_per_frame
    gen = torch.Generator(device).manual_seed(seed)
    sink: list[torch.Tensor] = []
    window: deque[torch.Tensor] = deque(maxlen=max(cfg.window_frames, 1))
    times, counts = [], []
    text = None if text is None else text.to(device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for chunk in range(pattern.num_chunks(frames)):
        start = time.perf_counter()
        n = pattern.chunk_frames(chunk)
        x = torch.randn((1, n, cfg.in_channels, cfg.latent_height, cfg.latent_width), generator=gen, device=device)
        context = sink + (list(window) if cfg.window_frames else [])
        levels = sampling.chunk_levels(bundle.sampler, chunk, steps)
        for t, t_next in zip(levels[:-1], levels[1:]):
            latents = torch.cat(context + [x], dim=1) if context else x
            t_tokens = torch.cat([torch.zeros(len(context) * tpf, device=device),
                                  torch.full((n * tpf,), t * cfg.timestep_scale, device=device)])[None]
            v = wan(latents.transpose(1, 2).to(dtype), t_tokens.to(dtype), encoder_hidden_states=text,
                    return_dict=False)[0].transpose(1, 2)[:, -n:].float()
            x = sampling.step(bundle.sampler.kind, x, v, t, t_next, gen)
        for i in range(n):  # what the cache would hold next: the first frames in the sink, then the window
            (sink if len(sink) < cfg.sink_frames else window).append(x[:, i:i + 1])
        out = decoder.decode_chunk(x[0]).cpu()
        times.append((time.perf_counter() - start) * 1000)
        counts.append(len(out))
    steady_t, steady_f = (times[1:], counts[1:]) if len(times) > 1 else (times, counts)
    return {
        "impl": "diffusers.WanTransformer3DModel, context recomputed every step, no cache",
        "fps": sum(steady_f) / (sum(steady_t) / 1000) if sum(steady_t) > 0 else None,
        "first_frame_ms": times[0] if times else None,
        "chunk_ms_p50": float(np.percentile(times, 50)) if times else None,
        "chunk_ms_p95": float(np.percentile(times, 95)) if times else None,
        "frames": int(sum(counts)), "chunks": len(times),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    }
