"""Attention dispatch: one call site in the model, several backends behind it.

Backends (all take ``q, k, v`` as ``[B, N, H, D]`` and an optional interval mask):
  reference  plain softmax(QK^T)V in torch ops; supports ``torch.func.jvp`` (sCM/MeanFlow)
  sdpa       ``scaled_dot_product_attention`` with a dense boolean mask
  flex       FlexAttention with a block mask from the same description (compiled on CUDA)
  flash      flash-attn, when installed, for masks it can express (no mask); else SDPA
  kernels    forcekit's Triton kernels (`kernels.attention`), fused JVP included; on CPU
             interpreted when ``TRITON_INTERPRET=1``, else the kernels package's reference

Choice, first match wins: the ``backend`` argument, `use_backend(...)`, the
``FORCEKIT_ATTENTION`` environment variable, then ``auto``: SDPA, or the reference whenever
forward-mode AD is active (SDPA and FlexAttention have no JVP). On CUDA ``auto`` only picks a
backend listed in `CUDA_VERIFIED`, the ones that have passed their tests on a GPU; the Triton
kernels have not run on one yet, so they are opt-in (``FORCEKIT_ATTENTION=kernels``) until
``scripts/gpu_check.sh`` has run them green and they are added there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernels.masks import KeyIntervals
from runtime.masks import covers_all_keys, dense_bias, dense_mask, flex_block_mask

BACKENDS = ("auto", "reference", "sdpa", "flex", "flash", "kernels")
# Backends `auto` may choose on CUDA, best first: only those whose tests passed on a GPU (SDPA is
# PyTorch's own). Add "kernels" in front once tests/test_kernels.py's gpu tests pass on one.
CUDA_VERIFIED: tuple[str, ...] = ("sdpa",)
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("forcekit_attention", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force an attention backend inside a ``with`` block (e.g. ``reference`` for a JVP)."""
    _check_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKENDS)}")


def selected_backend(explicit: str | None = None) -> str:
    name = explicit or _override.get() or os.environ.get("FORCEKIT_ATTENTION") or "auto"
    _check_name(name)
    return name


def _forward_ad_active(t: torch.Tensor) -> bool:
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return True
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


@functools.lru_cache(maxsize=1)
def _kernels_attention():
    import kernels

    return getattr(kernels, "attention", None)


def auto_backend(is_cuda: bool, forward_ad: bool, verified: tuple[str, ...] = CUDA_VERIFIED) -> str:
    """What ``auto`` runs: a GPU-verified backend on CUDA, SDPA elsewhere; under forward-mode AD
    the fused-JVP kernels if verified on this GPU, else the reference (the others have no JVP)."""
    if is_cuda:
        if forward_ad:
            return "kernels" if "kernels" in verified and _kernels_attention() is not None else "reference"
        for name in verified:
            if name != "kernels" or _kernels_attention() is not None:
                return name
    return "reference" if forward_ad else "sdpa"


def _resolve(name: str, q: torch.Tensor) -> str:
    if name != "auto":
        return name
    return auto_backend(q.is_cuda, _forward_ad_active(q))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyIntervals | None = None,
              scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Masked multi-head attention over ``[B, N, H, D]`` tensors; returns ``[B, Nq, H, D]``."""
    if mask is not None and (mask.num_queries != q.shape[1] or mask.num_keys != k.shape[1]):
        raise ValueError(f"mask is {mask.num_queries}x{mask.num_keys} but q has {q.shape[1]} and k "
                         f"{k.shape[1]} tokens")
    if mask is not None and covers_all_keys(mask):
        mask = None
    name = _resolve(selected_backend(backend), q)
    return _BACKEND_FNS[name](q, k, v, mask, scale)


def reference_attention(q, k, v, mask: KeyIntervals | None, scale: float | None) -> torch.Tensor:
    """Softmax attention in plain torch ops, computed in fp32; rows with no visible key give zero."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        allowed = dense_mask(mask, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def _sdpa(q, k, v, mask: KeyIntervals | None, scale: float | None) -> torch.Tensor:
    attn_mask = None if mask is None else dense_bias(mask, q.device, q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=2)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _flex(q, k, v, mask: KeyIntervals | None, scale: float | None) -> torch.Tensor:
    compiled = q.is_cuda or os.environ.get("FORCEKIT_FLEX_COMPILE") == "1"
    block_mask = None if mask is None else flex_block_mask(mask, q.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        out = _flex_fn(compiled)(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def _flash(q, k, v, mask: KeyIntervals | None, scale: float | None) -> torch.Tensor:
    if mask is not None or not flash_available() or q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v, mask, scale)  # flash-attn cannot express interval masks
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale)


def _kernels(q, k, v, mask: KeyIntervals | None, scale: float | None) -> torch.Tensor:
    """The Triton kernels on CUDA, and on CPU when ``TRITON_INTERPRET=1`` (the tests' setting);
    elsewhere on CPU the kernels package's pure-torch reference (the interpreter is no speed path)."""
    fn = _kernels_attention()
    if fn is None:
        raise RuntimeError("attention backend 'kernels' requested but kernels.attention is not available")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    triton = importlib.util.find_spec("triton") is not None and (q.is_cuda or interpreted)
    return fn(q, k, v, mask=mask, scale=scale, backend="triton" if triton else "auto")


_BACKEND_FNS = {"reference": reference_attention, "sdpa": _sdpa, "flex": _flex, "flash": _flash,
                "kernels": _kernels}
