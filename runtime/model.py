"""`CausalDiT`: a Wan-style video diffusion transformer that runs bidirectional, block-causal or cached.

Read top to bottom: timestep/condition embedding -> patchify -> blocks (self-attention with 3D
RoPE and qk RMSNorm, optional text cross-attention, feed-forward, all adaLN-modulated per
frame) -> output modulation -> unpatchify. Parameter names mirror diffusers'
``WanTransformer3DModel`` so its checkpoints load here; forcekit's conditioning adapters
(actions, audio) are extra embedders added to the per-frame time embedding, and video
conditioning is concatenated on the channel axis before patchify.

One module, three ways to run (DESIGN.md section 4):
  bidirectional  ``mask=None``                        teacher
  masked         ``mask=pattern.block_causal(F)`` etc. student training, teacher forcing
  cached         ``cache=KVCache(...)``, ``cache_mode`` inference, self-forcing rollouts
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.masks import KeyIntervals
from runtime.attention import attention
from runtime.config import ModelConfig
from runtime.kv_cache import CacheGeometry, KVCache
from runtime.rope import apply_rope, rope_angles, rope_cos_sin
from runtime.warp import CameraMotion, warp_frames


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[..., dim]`` as ``[cos | sin]`` (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def still_velocity(x_t: torch.Tensor, t: torch.Tensor, previous: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow velocity's posterior mean if the frame is its previous frame plus N(0, sigma^2) noise.

    ``x_t = (1 - t) x0 + t eps`` with ``x0 ~ N(previous, sigma^2)``: E[x0 | x_t] blends x_t and
    the previous frame by their precisions, and the velocity is ``(x_t - E[x0 | x_t]) / t``, here in
    a form with no division by t. At t = 1 it is ``eps - previous`` (one Euler step lands on the
    previous frame), at t = 0 it is ``-x_t``; as sigma -> 0 it is exactly ``(x_t - previous) / t``.
    ``x_t``, ``previous`` ``[B, F, C, H, W]``, ``t`` ``[B, F]``.
    """
    s = t.float()[:, :, None, None, None]
    q = 1 - s
    var = sigma * sigma
    v = (x_t.float() * (s - var * q) - s * previous.float()) / (var * q * q + s * s)
    return v.to(x_t.dtype)


class MLPEmbedder(nn.Module):
    """linear_1 -> activation -> linear_2 (diffusers' TimestepEmbedding / text projection layout)."""

    def __init__(self, in_dim: int, dim: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Per-frame time embedding plus action and audio embeddings; the text projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLPEmbedder(cfg.freq_dim, d, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embedder = MLPEmbedder(cfg.text_dim, d, nn.GELU(approximate="tanh")) if cfg.text_dim else None
        action_dim = cfg.action_condition_dim
        self.action_embedder = MLPEmbedder(action_dim, d, nn.SiLU()) if action_dim else None
        self.audio_embedder = MLPEmbedder(cfg.audio_dim, d, nn.SiLU()) if cfg.audio_dim else None
        # stack_noise_condition: the stacked frames' noise level, embedded like a timestep; its output layer
        # starts at zero, so a fresh model starts level-blind and learns what the level changes
        self.stack_level_embedder = MLPEmbedder(cfg.freq_dim, d, nn.SiLU()) if cfg.stack_noise_condition else None
        if self.stack_level_embedder is not None:
            nn.init.zeros_(self.stack_level_embedder.linear_2.weight)
            nn.init.zeros_(self.stack_level_embedder.linear_2.bias)

    def forward(self, t: torch.Tensor, action: torch.Tensor | None, audio: torch.Tensor | None,
                stack_level: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` and ``stack_level`` ``[B, F]`` (already scaled) -> temb ``[B, F, D]``, modulation ``[B, F, 6, D]``."""
        # features in the embedder's dtype: a bf16 model takes fp32 timesteps (levels stay exact)
        dtype = self.time_embedder.linear_1.weight.dtype
        temb = self.time_embedder(timestep_features(t, self.freq_dim).to(dtype))
        if self.stack_level_embedder is not None:
            level = torch.zeros_like(t) if stack_level is None else stack_level
            temb = temb + self.stack_level_embedder(timestep_features(level, self.freq_dim).to(dtype))
        if self.action_embedder is not None and action is not None:
            temb = temb + self.action_embedder(action.to(temb.dtype))
        if self.audio_embedder is not None and audio is not None:
            temb = temb + self.audio_embedder(audio.to(temb.dtype))
        return temb, self.time_proj(self.act_fn(temb)).unflatten(-1, (6, -1))


class Attention(nn.Module):
    """Multi-head attention with RMSNorm over all heads on q and k (Wan's "across heads")."""

    def __init__(self, dim: int, heads: int, eps: float, kv_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim or dim, dim)
        self.to_v = nn.Linear(kv_dim or dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.heads, -1))
        v = self.to_v(context).unflatten(-1, (self.heads, -1))
        return q, k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x, context)
        return self.to_out[0](attention(q, k, v).flatten(-2))


class FeedForward(nn.Module):
    """diffusers' FeedForward layout: net.0.proj (GELU tanh), net.2 (output)."""

    class _GeluProj(nn.Module):
        def __init__(self, dim: int, inner: int) -> None:
            super().__init__()
            self.proj = nn.Linear(dim, inner)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(self.proj(x), approximate="tanh")

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([self._GeluProj(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.eps = cfg.eps
        self.attn1 = Attention(d, cfg.num_attention_heads, cfg.eps)
        self.attn2 = Attention(d, cfg.num_attention_heads, cfg.eps) if cfg.text_dim else None
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps) if (cfg.text_dim and cfg.cross_attn_norm) else None
        self.ffn = FeedForward(d, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                text: torch.Tensor | None, mask: KeyIntervals | None, cache: KVCache | None,
                cache_mode: str, layer: int, kv_only: bool = False, commit_frames: int = 0,
                frame_positions: torch.Tensor | None = None) -> torch.Tensor:
        """``kv_only``: stop once this layer's keys and values are in the cache (returns ``x`` as is).
        ``frame_positions`` (with a ``cache``): the frames' RoPE positions, from which the cache reads
        the sink's shift on the device (`KVCache.keys_values`)."""
        b, n, d = x.shape
        nf = mod.shape[1]
        per_frame = (self.scale_shift_table.unsqueeze(0) + mod.float()).unsqueeze(3)  # [B, F, 6, 1, D]
        shift, scale, gate, c_shift, c_scale, c_gate = per_frame.unbind(2)

        def modulate(h, sc, sh):
            return (h.view(b, nf, -1, d) * (1 + sc) + sh).view(b, n, d)

        def gated(h, g):
            return (h.float().view(b, nf, -1, d) * g).view(b, n, d)

        h = modulate(_layer_norm(x, self.eps), scale, shift).to(x.dtype)
        q, k, v = self.attn1.project(h, h)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v, mask = cache.keys_values(layer, k, v, cache_mode, frame_positions, commit_frames)
            if kv_only:
                return x
        a = self.attn1.to_out[0](attention(q, k, v, mask).flatten(-2))
        x = (x.float() + gated(a, gate)).to(x.dtype)
        if self.attn2 is not None:
            h = x
            if self.norm2 is not None:
                h = _layer_norm(x, self.eps, self.norm2.weight.float(), self.norm2.bias.float()).to(x.dtype)
            x = x + self.attn2(h, text)
        h = modulate(_layer_norm(x, self.eps), c_scale, c_shift).to(x.dtype)
        return (x.float() + gated(self.ffn(h), c_gate)).to(x.dtype)


class CausalDiT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        channels = cfg.in_channels + cfg.video_channels + cfg.stack_frames * cfg.in_channels
        o = cfg.patch_overlap
        pt, ph, pw = cfg.patch_size
        self.patch_embedding = nn.Conv3d(channels, d, kernel_size=(pt, ph + 2 * o, pw + 2 * o),
                                         stride=cfg.patch_size, padding=(0, o, o))
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.proj_out = nn.Linear(d, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        # camera_warp: row a is how key a moves the view per frame (warp_frames units), measured from the
        # training data before training (training.camera), not learned by gradient: bilinear resampling
        # blurs, and a blur lowers the loss whichever way it moves, so descent from 0 finds no direction.
        if cfg.camera_warp:
            self.register_buffer("camera_motion", torch.zeros(cfg.actions.dim, 3))
        else:
            self.camera_motion = None
        # camera_flow: channel a is how a unit of key a's running average (action_momentum) moves each latent
        # pixel per frame, right and down in warp_frames units; measured from the data too (training.camera).
        if cfg.camera_flow:
            self.register_buffer("camera_flow", torch.zeros(cfg.actions.dim, 2, cfg.latent_height, cfg.latent_width))
        else:
            self.camera_flow = None
        if cfg.audio_region is not None:
            self.audio_token_embedder = MLPEmbedder(cfg.audio_dim, d, nn.SiLU())
            self.register_buffer("audio_tokens", self._region_tokens(cfg), persistent=False)
        else:
            self.audio_token_embedder = None
        # rest_gate: the residual on top of the still prior is scaled per channel by 2 sigmoid(g(temb)), g a linear
        # read of each frame's conditioning embedding (its level, keys, their running averages) whose output starts
        # at 0 (scale 1). With no key held and no speed left the engine's frame does not change, and at level 1 the
        # still prior alone already lands on the previous frame: the gate can learn to close there, so a one-step
        # student copies a still view as it is instead of adding its small errors frame after frame.
        self.rest_gate = nn.Sequential(nn.SiLU(), nn.Linear(d, cfg.out_channels)) if cfg.rest_gate else None
        if self.rest_gate is not None:
            nn.init.zeros_(self.rest_gate[1].weight)
            nn.init.zeros_(self.rest_gate[1].bias)
        if cfg.still_prior:  # a fresh model starts as the still world: its residual velocity is 0
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)
        self.gradient_checkpointing = False

    @staticmethod
    def _region_tokens(cfg: ModelConfig) -> torch.Tensor:
        """``[tokens_per_frame, 1]``: 1 for the patches that overlap ``cfg.audio_region``, else 0."""
        _, ph, pw = cfg.patch_size
        y0, x0, y1, x1 = cfg.audio_region
        pixels = torch.zeros(cfg.latent_height, cfg.latent_width)
        pixels[y0:y1, x0:x1] = 1.0
        return F.max_pool2d(pixels[None, None], (ph, pw)).flatten()[:, None]

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache sized by this model's config: sink + window + one chunk, per layer."""
        cfg = self.config
        p = next(self.parameters())
        geometry = CacheGeometry(cfg.num_layers, batch, cfg.num_attention_heads, cfg.attention_head_dim,
                                 cfg.tokens_per_frame, cfg.sink_frames, cfg.window_frames,
                                 cfg.chunk_pattern.max_chunk_frames, cfg.rope_theta)
        return KVCache(geometry, device=device or p.device, dtype=dtype or p.dtype)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *, action: torch.Tensor | None = None,
                audio: torch.Tensor | None = None, video: torch.Tensor | None = None,
                previous: torch.Tensor | None = None, stack_level: torch.Tensor | float | None = None,
                text: torch.Tensor | None = None, mask: KeyIntervals | None = None,
                frame_positions: torch.Tensor | None = None, cache: KVCache | None = None,
                cache_mode: str = "transient", cache_only: bool = False, commit_frames: int = 0
                ) -> torch.Tensor | None:
        """Predict the flow velocity for latents ``x`` ``[B, F, C, H, W]`` at per-frame ``timestep`` ``[B, F]``.

        ``action`` ``[B, F, A]``, ``audio`` ``[B, F, audio_dim]``, ``video`` ``[B, F, Cv, H, W]``,
        ``previous`` ``[B, F, stack_frames*C, H, W]`` (frame stacking: the clean latents each frame
        may see, `runtime.stacking`), ``stack_level`` the noise level mixed into them (a number, ``[B]`` or
        ``[B, F]``; None: 0, clean; read only by a ``stack_noise_condition`` model), ``text``
        ``[B, L, text_dim]``. ``frame_positions`` ``[F]`` are the frames' RoPE indices (default:
        consecutive from the cache's next frame, or from 0; with a cache, a tensor of those same values,
        so that a captured pass reads them, and the sink's shift, from it).
        With a ``cache``, the chunk attends to the cache (``mask`` is then derived from it) and ``append`` commits it.
        ``cache_only`` (with ``append``): only fill the cache and return None, skipping the work
        whose result nobody reads (the last block after its keys and values, the output head):
        committing a finished chunk as context needs its keys, not its velocity.
        ``commit_frames`` (with ``transient``): the first that many frames of ``x`` are a finished
        chunk (at level 0) entering the context in this same pass; they see only the cache and
        themselves, and the velocity is returned for the frames after them only. This fuses the
        commit of one chunk with the first denoising step of the next (`KVCache.keys_values`).
        """
        if cache_only and (cache is None or cache_mode != "append"):
            raise ValueError("cache_only needs a cache and cache_mode='append'")
        if commit_frames and (cache is None or cache_mode != "transient" or not 0 < commit_frames < x.shape[1]):
            raise ValueError(f"commit_frames needs a cache, cache_mode='transient' and fewer frames than x "
                             f"({x.shape[1]}), got {commit_frames}")
        cfg = self.config
        b, nf, c, hgt, wid = x.shape
        x_t = x
        if c != cfg.in_channels or (hgt, wid) != (cfg.latent_height, cfg.latent_width):
            raise ValueError(f"latents must be [B, F, {cfg.in_channels}, {cfg.latent_height}, "
                             f"{cfg.latent_width}], got {list(x.shape)}")
        if timestep.shape != (b, nf):
            raise ValueError(f"timestep must be [B, F] = [{b}, {nf}], got {list(timestep.shape)}")
        if cfg.video_channels:
            if video is None:
                raise ValueError(f"this model is video-conditioned: pass video [B, F, {cfg.video_channels}, H, W]")
            x = torch.cat([x, video.to(x.dtype)], dim=2)
        if cfg.stack_frames:
            want = (b, nf, cfg.stack_frames * cfg.in_channels, hgt, wid)
            if previous is None or tuple(previous.shape) != want:
                got = None if previous is None else list(previous.shape)
                raise ValueError(f"this model stacks {cfg.stack_frames} previous frame(s): pass previous "
                                 f"{list(want)} (runtime.stacking.previous_frames), got {got}")
            move = self.camera_move(action)
            if move is not None:
                previous = warp_frames(previous, move.shift, move.flow, cfg.warp_mode, fov=cfg.camera_fov)
            x = torch.cat([x, previous.to(x.dtype)], dim=2)
        if cfg.text_dim and text is None:
            raise ValueError(f"this model has text cross-attention: pass text [B, L, {cfg.text_dim}]")
        _, ph, pw = cfg.patch_size
        gh, gw = hgt // ph, wid // pw

        if frame_positions is None:
            start = cache.next_frame if cache is not None else 0
            frame_positions = torch.arange(start, start + nf, device=x.device)
        rope = rope_cos_sin(rope_angles(frame_positions, gh, gw, cfg.attention_head_dim, cfg.rope_theta))

        if stack_level is not None and cfg.stack_noise_condition:
            stack_level = torch.as_tensor(stack_level, dtype=timestep.dtype, device=timestep.device)
            stack_level = (stack_level.view(b, 1) if stack_level.ndim == 1 else stack_level).expand(b, nf)
            stack_level = stack_level * cfg.timestep_scale
        temb, mod = self.condition_embedder(timestep * cfg.timestep_scale, action, audio, stack_level)
        text_ctx = self.condition_embedder.text_embedder(text) if cfg.text_dim else None
        h = self.patch_embedding(x.transpose(1, 2)).flatten(2).transpose(1, 2).contiguous()  # [B, F*gh*gw, D]
        if self.audio_token_embedder is not None and audio is not None:
            local = self.audio_token_embedder(audio.to(h.dtype))[:, :, None] * self.audio_tokens.to(h.dtype)
            h = h + local.flatten(1, 2)

        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            args = (h, mod, rope, text_ctx, mask, cache, cache_mode, i, cache_only and i == last, commit_frames,
                    frame_positions)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        if cache is not None and (cache_mode == "append" or commit_frames):
            cache.commit()
        if cache_only:
            return None
        if commit_frames:  # the committed chunk's velocity is not wanted
            nf -= commit_frames
            h, temb = h[:, commit_frames * gh * gw:], temb[:, commit_frames:]
            x_t, timestep, previous = x_t[:, commit_frames:], timestep[:, commit_frames:], (
                None if previous is None else previous[:, commit_frames:])

        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(3).unbind(2)
        d = h.shape[-1]
        h = (_layer_norm(h, cfg.eps).view(b, nf, -1, d) * (1 + scale) + shift).view(b, -1, d).to(h.dtype)
        out = self.proj_out(h)  # [B, F*gh*gw, ph*pw*C], channel last as in Wan
        out = out.view(b, nf, gh, gw, ph, pw, cfg.out_channels).permute(0, 1, 6, 2, 4, 3, 5)
        out = out.reshape(b, nf, cfg.out_channels, hgt, wid)
        if self.rest_gate is not None:
            out = out * (2 * torch.sigmoid(self.rest_gate(temb).to(out.dtype)))[..., None, None]
        if cfg.still_prior:
            out = out + still_velocity(x_t, timestep, previous[:, :, :c], cfg.still_prior)
        return out

    def camera_move(self, action: torch.Tensor | None) -> CameraMotion | None:
        """How the view moves under each frame's action condition ``[B, F, A]`` (keys, then their running
        averages): the held keys by ``camera_motion``, their averages by ``camera_flow``; shift ``[B, F, 3]``,
        flow ``[B, F, 2, h, w]``. None for a model without a camera warp (or without actions)."""
        if self.camera_motion is None or action is None:
            return None
        a = self.config.actions.dim
        shift = action[..., :a].to(self.camera_motion.dtype) @ self.camera_motion
        flow = None
        if self.camera_flow is not None:
            flow = torch.einsum("bfa,aqhw->bfqhw", action[..., a:].to(self.camera_flow.dtype), self.camera_flow)
        return CameraMotion(shift, flow)

    @torch.no_grad()
    def rest_gate_scale(self, timestep: torch.Tensor, action: torch.Tensor | None) -> torch.Tensor:
        """The rest gate's per-channel scale ``[B, F, C]`` of the residual at ``timestep`` ``[B, F]`` under ``action``
        ``[B, F, A]`` (stacked frames clean)."""
        if self.rest_gate is None:
            raise ValueError("this model has no rest gate (ModelConfig.rest_gate)")
        temb, _ = self.condition_embedder(timestep * self.config.timestep_scale, action, None)
        return 2 * torch.sigmoid(self.rest_gate(temb).float())
