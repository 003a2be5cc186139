"""The Wan VAE as a forcekit codec, decoded chunk by chunk for streaming (``{"type": "wan_vae"}``).

Wan-class video models (Wan2.1, Self-Forcing, LongLive, CausVid) generate latents of diffusers'
``AutoencoderKLWan``: a causal 3D VAE, 8x spatial and 4x temporal compression. Its decoder is
causal in time: every causal convolution keeps the last frames of its input (the "feature
cache") and reads them when the next latent frame comes. The first latent frame decodes to one
video frame, every later one to four. diffusers' own ``decode`` runs that loop over a whole clip
and clears the cache at the end; a stream cannot wait for the whole clip, so
`WanStreamingDecoder` owns the cache and carries it from one chunk to the next: the frames of
a chunk appear as soon as its latents exist, and they are the frames the whole-clip decode gives.

The cache holds at most two frames per causal convolution, replaced (not appended) on every
call, so its memory is flat however long the stream runs.

diffusers is imported only when a codec is built: ``runtime`` imports without it, and a bundle
naming this codec says clearly that it needs diffusers when diffusers is missing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from runtime.codec import Codec, StreamingDecoder, float_to_frames, frames_to_float, register_codec
from runtime.warp import CameraMotion

# Wan2.1's VAE (diffusers' AutoencoderKLWan defaults, spelled out so a bundle's config is explicit).
WAN21_VAE: dict[str, Any] = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
}


def _autoencoder_kl_wan():
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as e:
        raise ImportError("the 'wan_vae' codec needs diffusers (pip install 'forcekit[diffusers]')") from e
    return AutoencoderKLWan


class WanVAECodec(Codec):
    """diffusers' ``AutoencoderKLWan`` behind the codec interface, latents normalised as Wan's pipelines do.

    The transformer sees normalised latents ``(mu - mean) / std`` (Wan's ``latents_mean`` /
    ``latents_std``); decoding undoes that. Temporal: ``encode`` takes ``1 + 4k`` frames and gives
    ``1 + k`` latent frames, ``decode`` the way back for a whole clip; streams use
    `streaming_decoder`.
    """

    type_name = "wan_vae"
    temporal = True

    def __init__(self, vae_config: dict[str, Any] | None = None, vae: torch.nn.Module | None = None) -> None:
        super().__init__()
        if vae is None:
            vae = _autoencoder_kl_wan()(**(WAN21_VAE if vae_config is None else vae_config))
        self.vae = vae.eval()
        cfg = self.vae.config
        self._vae_config = {k: (list(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in dict(cfg).items() if not k.startswith("_")}
        self.z_dim = int(cfg.z_dim)
        patch = cfg.get("patch_size") or 1
        self._spatial = 2 ** (len(cfg.dim_mult) - 1) * patch
        self.temporal_factor = 2 ** sum(bool(x) for x in cfg.temperal_downsample)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32)[:self.z_dim],
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32)[:self.z_dim],
                             persistent=False)
        if self.latents_mean.numel() != self.z_dim or self.latents_std.numel() != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} entries")

    @classmethod
    def from_vae(cls, vae: torch.nn.Module) -> WanVAECodec:
        """Wrap an existing ``AutoencoderKLWan`` (e.g. loaded from a Wan checkpoint)."""
        return cls(vae=vae)

    # -- the codec interface -------------------------------------------------------------------------
    @property
    def spatial_factor(self) -> int:
        return self._spatial

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.z_dim, height // self._spatial, width // self._spatial

    def video_frames(self, latent_frames: int, first: bool) -> int:
        """Video frames that ``latent_frames`` decode to: the stream's first latent frame gives one."""
        if latent_frames <= 0:
            return 0
        return self.temporal_factor * latent_frames - (self.temporal_factor - 1 if first else 0)

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _scale(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        return self.latents_mean.view(shape).to(latents), self.latents_std.view(shape).to(latents)

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``[n, C, h, w]`` -> the VAE's raw latents ``[1, C, n, h, w]``."""
        if latents.ndim != 4 or latents.shape[1] != self.z_dim:
            raise ValueError(f"wan_vae latents must be [n, {self.z_dim}, h, w], got {list(latents.shape)}")
        z = latents.transpose(0, 1)[None].float()
        mean, std = self._scale(z)
        return (z * std + mean).to(self._dtype())

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        n = frames.shape[0] if frames.ndim == 4 else 0
        if n < 1 or (n - 1) % self.temporal_factor:
            raise ValueError(f"wan_vae encodes clips of 1 + {self.temporal_factor}k frames, got {n}")
        x = frames_to_float(frames).to(self.latents_mean.device, self._dtype()).transpose(0, 1)[None]
        mu = self.vae.encode(x).latent_dist.mode().float()
        mean, std = self._scale(mu)
        return ((mu - mean) / std)[0].transpose(0, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole clip, as diffusers decodes it: ``[n, C, h, w]`` -> ``[1 + 4(n - 1), H, W, 3]``."""
        return float_to_frames(self.decode_pixels(latents))

    @torch.no_grad()
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` before quantisation: float ``[m, 3, H, W]`` in [-1, 1] (diffusers' ``decode``)."""
        video = self.vae.decode(self.to_vae_latents(latents), return_dict=False)[0]
        return video[0].transpose(0, 1).float()

    def config(self) -> dict[str, Any]:
        return {"type": self.type_name, "vae": dict(self._vae_config)}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> WanVAECodec:
        vae = cfg.get("vae", WAN21_VAE)
        if not isinstance(vae, dict):
            raise ValueError(f"wan_vae codec: 'vae' must be a dict of AutoencoderKLWan arguments, got {vae!r}")
        return cls(vae_config=vae)

    def streaming_decoder(self) -> WanStreamingDecoder:
        return WanStreamingDecoder(self)


class WanStreamingDecoder(StreamingDecoder):
    """One stream's Wan decode: the causal feature cache carried across chunks.

    diffusers' decoder takes the cache as a list (one slot per causal convolution) and an index
    it advances; this object owns both, where diffusers' ``_decode`` would clear them after one clip.
    """

    def __init__(self, codec: WanVAECodec) -> None:
        self.codec = codec
        self._slots = sum(type(m).__name__ == "WanCausalConv3d" for m in codec.vae.decoder.modules())
        self.reset()

    def reset(self, last_frame: np.ndarray | None = None) -> None:
        self._feat_cache: list[Any] = [None] * self._slots
        self._first = True
        self.latent_frames = 0  # latent frames decoded since the reset

    def decode_chunk(self, latents: torch.Tensor, motion: CameraMotion | None = None) -> torch.Tensor:
        return float_to_frames(self.decode_pixels(latents))

    @torch.no_grad()
    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode_chunk` before quantisation: float ``[m, 3, H, W]`` in [-1, 1]."""
        codec = self.codec
        vae = codec.vae
        x = vae.post_quant_conv(codec.to_vae_latents(latents))  # a 1x1x1 conv: no temporal state
        outs = []
        for i in range(x.shape[2]):
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=self._first)
            self._first = False
            outs.append(out)
        self.latent_frames += x.shape[2]
        video = torch.cat(outs, dim=2)
        patch = vae.config.get("patch_size")
        if patch is not None and patch > 1:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=patch)
        return video.clamp(-1, 1)[0].transpose(0, 1).float()

    @property
    def state_bytes(self) -> int:
        return sum(math.prod(t.shape) * t.element_size() for t in self._feat_cache if isinstance(t, torch.Tensor))


register_codec(WanVAECodec.type_name, WanVAECodec)
