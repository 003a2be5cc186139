"""Named geometries and the random-weight bundles built from them (``random-tiny``, ``random-wan1.3b``).

Wan2.1-1.3B is the geometry the anchors (Self-Forcing, LongLive, Causal-rCM) report their
speeds at: 30 layers of width 1536 (12 heads of 128), ffn 8960, text cross-attention from
4096-d T5 features, 16 latent channels of the Wan VAE at 60x104 for 832x480 video, patch
1x2x2 (1560 tokens per latent frame). forcekit runs it chunk-wise (3 latent frames a chunk)
with a sink of one chunk and a window of 21 latent frames, the context Self-Forcing uses.

``random-wan1.3b`` is that geometry with random weights and a random Wan2.1 VAE: it measures
speed and memory on a GPU without downloading a checkpoint. `wan21_1_3b_reduced` keeps the
width, heads, ffn and text width but cuts depth and latent size, so the CPU tests exercise the
exact per-layer shapes (cache == recompute, diffusers parity) in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from runtime.bundle import Bundle
from runtime.config import ModelConfig, SamplerConfig
from runtime.model import CausalDiT

WAN21_1_3B: dict[str, Any] = {
    "in_channels": 16, "latent_height": 60, "latent_width": 104, "patch_size": (1, 2, 2),
    "num_attention_heads": 12, "attention_head_dim": 128, "num_layers": 30, "ffn_dim": 8960, "freq_dim": 256,
    "text_dim": 4096, "cross_attn_norm": True, "eps": 1e-6,
    "frames_per_chunk": 3, "window_frames": 21, "sink_frames": 3,
}
WAN_TEXT_TOKENS = 512  # Wan's T5 prompt length: what a text-conditioned step attends to


def wan21_1_3b(**overrides: Any) -> ModelConfig:
    """Wan2.1-1.3B's transformer geometry, chunk-wise with a KV cache window (see the module docstring)."""
    return ModelConfig(**{**WAN21_1_3B, **overrides})


def wan21_1_3b_reduced(**overrides: Any) -> ModelConfig:
    """The same per-layer geometry (width 1536, 12x128 heads, ffn 8960, text 4096) at CPU-test size:
    one layer, 8x8 latents (16 tokens a frame), a window of 6 frames and a sink of 3."""
    base = {"num_layers": 1, "latent_height": 8, "latent_width": 8, "window_frames": 6, "sink_frames": 3}
    return wan21_1_3b(**{**base, **overrides})


def tiny_wan_vae_config(z_dim: int = 16) -> dict[str, Any]:
    """A tiny random ``AutoencoderKLWan`` with Wan2.1's structure (8x spatial, 4x temporal, causal cache)."""
    return {"base_dim": 8, "z_dim": z_dim, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_scales": [],
            "temperal_downsample": [False, True, True], "latents_mean": [0.0] * z_dim, "latents_std": [1.0] * z_dim}


def _random_wan_bundle(config: ModelConfig, vae_config: dict[str, Any] | None, name: str,
                       device: torch.device | str, seed: int) -> Bundle:
    """A random-weight Wan-geometry bundle, built directly on ``device`` (1.3B parameters initialise
    in seconds on a GPU, far longer on a CPU) with a random Wan VAE as its codec."""
    from runtime.wan_vae import WanVAECodec

    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(seed)
        model = CausalDiT(config).eval()
        codec = WanVAECodec(vae_config).eval()
    card = (f"# {name}\n\nUntrained: random weights (seed {seed}) at Wan2.1-1.3B geometry with a random Wan VAE. "
            "It measures speed and memory; its frames are noise.\n")
    bundle = Bundle(config, model, codec, SamplerConfig(steps=2), fps=16.0, name=name, card=card)
    c, h, w = codec.latent_shape(*bundle.frame_size)
    if (c, h, w) != (config.in_channels, config.latent_height, config.latent_width):
        raise ValueError(f"codec latents {c}x{h}x{w} do not match the model's "
                         f"{config.in_channels}x{config.latent_height}x{config.latent_width}")
    return bundle


def random_wan_1_3b(device: torch.device | str = "cpu", seed: int = 0) -> Bundle:
    """``random-wan1.3b``: Wan2.1-1.3B geometry, random weights, random full-size Wan2.1 VAE (832x480)."""
    return _random_wan_bundle(wan21_1_3b(), None, "random-wan1.3b", device, seed)


def random_wan_1_3b_reduced(device: torch.device | str = "cpu", seed: int = 0) -> Bundle:
    """``random-wan1.3b-reduced``: the reduced geometry with a tiny Wan VAE (64x64 frames): CPU dry runs."""
    return _random_wan_bundle(wan21_1_3b_reduced(), tiny_wan_vae_config(), "random-wan1.3b-reduced", device, seed)


def random_tiny(device: torch.device | str = "cpu", seed: int = 0) -> Bundle:
    """``random-tiny``: `ModelConfig.tiny` with the pixel codec (what the runtime tests use)."""
    return Bundle.random(seed=seed, name="random-tiny").to(device)


def random_lipsync(device: torch.device | str = "cpu", seed: int = 0) -> Bundle:
    """``random-lipsync``: the shipped lip-sync geometry with random weights (`runtime.lipsync.shipped_geometry`)."""
    from runtime.lipsync import shipped_geometry

    return shipped_geometry(seed).to(device)


def random_lipsync_tiny(device: torch.device | str = "cpu", seed: int = 0) -> Bundle:
    """``random-lipsync-tiny``: a tiny lip-sync bundle (32x32, `runtime.lipsync.tiny_geometry`) for tests."""
    from runtime.lipsync import tiny_geometry

    return tiny_geometry(seed).to(device)


RANDOM_BUNDLES: dict[str, Callable[..., Bundle]] = {
    "random-tiny": random_tiny,
    "random-lipsync": random_lipsync,
    "random-lipsync-tiny": random_lipsync_tiny,
    "random-wan1.3b": random_wan_1_3b,
    "random-wan1.3b-reduced": random_wan_1_3b_reduced,
}


def random_bundle(name: str, device: torch.device | str = "cpu", seed: int = 0) -> Bundle:
    """The random-weight bundle called ``name`` (one of `RANDOM_BUNDLES`), built on ``device``."""
    if name not in RANDOM_BUNDLES:
        raise ValueError(f"unknown random bundle {name!r}; known: {sorted(RANDOM_BUNDLES)}")
    return RANDOM_BUNDLES[name](device=device, seed=seed)
