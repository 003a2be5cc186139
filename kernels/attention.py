"""Public API: `attention` (differentiable both ways) and `attention_jvp` (fused forward + tangent).

Layout ``[B, N, H, D]`` for q, k, v (Nq may differ from Nk); the mask is a `KeyIntervals`
description or None. ``backend``: ``"triton"`` runs the Triton kernels (compiled on CUDA,
interpreted on CPU when ``TRITON_INTERPRET=1``), ``"reference"`` the pure-torch version,
``"auto"`` Triton on CUDA and the reference elsewhere (the interpreter is for tests, not speed).

Under reverse-mode autograd the Triton path runs the FA2 backward kernels. Under forward-mode
AD (``torch.func.jvp`` or ``torch.autograd.forward_ad`` dual tensors) it returns the tangent of
the fused forward + JVP kernel; that tangent carries no graph (sCM and MeanFlow stop-gradient
it).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from kernels import reference
from kernels.masks import KeyIntervals

BACKENDS = ("auto", "triton", "reference")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyIntervals | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, N, H, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and not isinstance(mask, KeyIntervals):
        raise TypeError(f"mask must be a kernels.KeyIntervals or None, got {type(mask).__name__}; build one "
                        "with kernels.masks (block_causal, teacher_forcing, window_sink, cache_decode) or "
                        "KeyIntervals(int32 [Nq, 4] rows of (a_lo, a_hi, b_lo, b_hi), num_keys)")
    if mask is not None and (mask.num_queries != q.shape[1] or mask.num_keys != k.shape[1]):
        raise ValueError(f"mask is {mask.num_queries}x{mask.num_keys} (queries x keys) but q has "
                         f"{q.shape[1]} queries and k has {k.shape[1]} keys")


def _resolve(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "reference"
    if backend == "triton":
        from kernels.launch import interpreted

        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if not q.is_cuda and not interpreted():
            raise RuntimeError(
                "backend='triton' on CPU needs TRITON_INTERPRET=1 set before triton is imported")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"the Triton kernels take fp16, bf16 or fp32, got {q.dtype}")
    return backend


def _mask_or_full(mask: KeyIntervals | None, nq: int, nk: int) -> KeyIntervals:
    from kernels.schedule import full_mask

    return full_mask(nq, nk) if mask is None else mask


def _dense(mask: KeyIntervals | None, device: torch.device) -> torch.Tensor | None:
    return None if mask is None else mask.to_dense(device)


class _TritonAttention(torch.autograd.Function):
    """Triton forward / FA2 backward / fused JVP behind one differentiable op."""

    @staticmethod
    def forward(q, k, v, mask, scale):
        from kernels import launch, triton_fwd

        return triton_fwd.forward(q, k, v, mask, scale, launch.config("fwd", q))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mask, ctx.scale = mask, scale

    @staticmethod
    def backward(ctx, dout, _dlse):
        from kernels import launch, triton_bwd

        q, k, v, out, lse, dout = map(launch.unwrap, (*ctx.saved_tensors, dout))
        with launch.plain_tensors():
            dq, dk, dv = triton_bwd.backward(q, k, v, out, lse, dout, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tmask, _tscale):
        from kernels import launch, triton_fwd

        q, k, v = map(launch.unwrap, ctx.saved_tensors)
        with launch.plain_tensors(), torch.no_grad():
            tq, tk, tv = (torch.zeros_like(x) if t is None else launch.unwrap(t)
                          for x, t in ((q, tq), (k, tk), (v, tv)))
            _, t_out, _ = triton_fwd.forward_jvp(q, k, v, tq, tk, tv, ctx.mask, ctx.scale,
                                                 launch.config("jvp", q), q.dtype)
        return t_out, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, scale):
        """Fold the vmapped dimension into the batch: attention is independent per batch row."""
        size = info.batch_size

        def fold(x, dim):
            x = x.unsqueeze(0).expand(size, *x.shape) if dim is None else x.movedim(dim, 0)
            return x.reshape(size * x.shape[1], *x.shape[2:])

        out, lse = _TritonAttention.apply(fold(q, in_dims[0]), fold(k, in_dims[1]), fold(v, in_dims[2]),
                                          mask, scale)
        return (out.view(size, -1, *out.shape[1:]), lse.view(size, -1, *lse.shape[1:])), (0, 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyIntervals | None = None,
              scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Masked softmax attention, ``[B, Nq, H, D]`` out. Rows that see no key output zero."""
    _check(q, k, v, mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _resolve(backend, q) == "reference":
        return reference.forward(q, k, v, _dense(mask, q.device), scale)[0]
    out, _ = _TritonAttention.apply(q, k, v, _mask_or_full(mask, q.shape[1], k.shape[1]), scale)
    return out


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                  tv: torch.Tensor, mask: KeyIntervals | None = None, scale: float | None = None,
                  backend: str = "auto", tangent_fp32: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward + forward-mode JVP: ``(out, tangent_out, lse [B, H, Nq] float32)``.

    ``tangent_out`` is in q's dtype, or float32 with ``tangent_fp32`` (sCM wants it: the
    tangent is a small difference of large terms). Nothing here records an autograd graph.
    """
    _check(q, k, v, mask)
    for name, t, x in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, its primal {tuple(x.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    tangent_dtype = torch.float32 if tangent_fp32 and q.dtype != torch.float64 else q.dtype
    with torch.no_grad():
        if _resolve(backend, q) == "reference":
            out, t_out, lse = reference.forward_jvp(q, k, v, tq, tk, tv, _dense(mask, q.device), scale)
            return out, t_out.to(tangent_dtype), lse
        from kernels import launch, triton_fwd

        mask = _mask_or_full(mask, q.shape[1], k.shape[1])
        return triton_fwd.forward_jvp(q, k, v, tq.to(q.dtype), tk.to(k.dtype), tv.to(v.dtype), mask, scale,
                                      launch.config("jvp", q), tangent_dtype)
