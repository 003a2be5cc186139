"""Inference runtime: the causal DiT, attention dispatch, KV cache, samplers, bundles, sessions."""

from runtime.actions import ActionSpace
from runtime.bundle import Bundle, BundleError
from runtime.chunks import ChunkPattern
from runtime.config import ModelConfig, SamplerConfig
from runtime.kv_cache import KVCache
from runtime.model import CausalDiT
from runtime.rollout import ChunkCondition, Rollout
from runtime.session import StreamSession, open_session

__all__ = ["ActionSpace", "Bundle", "BundleError", "CausalDiT", "ChunkCondition", "ChunkPattern", "KVCache",
           "ModelConfig", "Rollout", "SamplerConfig", "StreamSession", "open_session"]
