"""Load diffusers ``WanTransformer3DModel`` weights into `CausalDiT`.

Parameter names are mirrored, so a Wan state dict loads as is; only the config needs
translating (and the latent frame size, which diffusers leaves to the pipeline). diffusers
is not imported here: pass its model, its config dict, or a state dict plus config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from runtime.config import ModelConfig
from runtime.model import CausalDiT

_SHARED_FIELDS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                  "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps")


def config_from_wan(wan_config: Mapping[str, Any], latent_height: int, latent_width: int,
                    **overrides: Any) -> ModelConfig:
    """A `ModelConfig` equivalent to a diffusers Wan config (bidirectional, no action/audio adapters)."""
    if wan_config.get("image_dim") is not None or wan_config.get("added_kv_proj_dim") is not None:
        raise ValueError("image-conditioned Wan (image_dim / added_kv_proj_dim) is not supported")
    if wan_config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(f"only qk_norm='rms_norm_across_heads' is supported, got {wan_config.get('qk_norm')!r}")
    fields = {k: wan_config[k] for k in _SHARED_FIELDS if k in wan_config}
    fields.update(latent_height=latent_height, latent_width=latent_width)
    fields.update(overrides)
    return ModelConfig(**fields)


def from_diffusers_wan(wan_model: torch.nn.Module, latent_height: int, latent_width: int,
                       **overrides: Any) -> CausalDiT:
    """Build a `CausalDiT` holding the weights of a diffusers ``WanTransformer3DModel``."""
    cfg = config_from_wan(dict(wan_model.config), latent_height, latent_width, **overrides)
    model = CausalDiT(cfg)
    state = {k: v for k, v in wan_model.state_dict().items() if not k.startswith("rope.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    adapters = ("condition_embedder.action_embedder.", "condition_embedder.audio_embedder.")
    missing = [k for k in missing if not k.startswith(adapters)]
    if missing or unexpected:
        raise ValueError(f"Wan weights do not map onto CausalDiT: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
