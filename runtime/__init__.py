"""Inference runtime: the causal DiT, attention dispatch, KV cache, samplers, bundles, sessions."""
