"""Pure-torch masked attention: the fallback where Triton cannot run, and the kernels' oracle.

Same layout and conventions as the kernels: q ``[B, Nq, H, D]``, k and v ``[B, Nk, H, D]``,
a boolean ``visible [Nq, Nk]`` (or None for no mask), log-sum-exp ``[B, H, Nq]`` in float32
(float64 for float64 inputs). Rows that see no key output zero and have ``lse = -inf``;
nothing produces NaN, in forward, backward or JVP. Low-precision inputs are computed in
float32 and cast back, as the kernels do.

`forward` is built from differentiable torch ops, so autograd and ``torch.func.jvp`` work
through it directly. `backward` and `forward_jvp` spell out the formulas the Triton kernels
implement (FA2 backward from the saved log-sum-exp; the fused JVP with unnormalised
accumulators), so the math can be checked without Triton.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, H, Nq, Nk]`` scaled scores in the compute dtype."""
    ct = _compute_dtype(q.dtype)
    return torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * scale


def _masked(s: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    return s if visible is None else s.masked_fill(~visible, float("-inf"))


def _softmax_parts(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised probabilities, their row sums and the (finite) row maxima, for masked scores."""
    m = s.amax(-1, keepdim=True).detach()  # softmax is shift-invariant: no tangent needed
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    return p, p.sum(-1, keepdim=True), m


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention ``(out [B, Nq, H, D], lse [B, H, Nq])``; differentiable both ways."""
    s = _masked(_scores(q, k, scale), visible)
    p, l, m = _softmax_parts(s)
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    out = torch.einsum("bhqk,bkhd->bqhd", p / l_safe, v.to(p.dtype))
    lse = (m + torch.log(l)).squeeze(-1)  # -inf for rows that see nothing
    return out.to(q.dtype), lse


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             dout: torch.Tensor, visible: torch.Tensor | None, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA2 backward from the saved log-sum-exp: ``P = exp(S - lse)``, ``dS = P * (dP - rowsum(dO * O))``."""
    ct = _compute_dtype(q.dtype)
    s = _masked(_scores(q, k, scale), visible)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    p = torch.exp(s - lse_safe[..., None])  # rows that see nothing: all zeros
    do = dout.to(ct)
    delta = (do * out.to(ct)).sum(-1).transpose(1, 2)  # [B, H, Nq]
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v.to(ct))
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.to(ct)) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(ct)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def forward_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                tv: torch.Tensor, visible: torch.Tensor | None, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, its tangent (compute dtype) and lse, with the kernel's accumulators.

    ``l = sum p``, ``O = sum p v``, ``A + B = sum p v' + (p * s') v``, ``r = sum p * s'``; then
    ``out = O / l`` and ``out' = (A + B) / l - (r / l) * out``.
    """
    ct = _compute_dtype(q.dtype)
    s = _masked(_scores(q, k, scale), visible)
    s_dot = (torch.einsum("bqhd,bkhd->bhqk", tq.to(ct), k.to(ct))
             + torch.einsum("bqhd,bkhd->bhqk", q.to(ct), tk.to(ct))) * scale
    p, l, m = _softmax_parts(s)
    ps = p * s_dot
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    o = torch.einsum("bhqk,bkhd->bhqd", p, v.to(ct)) / l_safe
    ab = torch.einsum("bhqk,bkhd->bhqd", p, tv.to(ct)) + torch.einsum("bhqk,bkhd->bhqd", ps, v.to(ct))
    t_out = ab / l_safe - (ps.sum(-1, keepdim=True) / l_safe) * o
    lse = (m + torch.log(l)).squeeze(-1)
    return o.transpose(1, 2).to(q.dtype), t_out.transpose(1, 2), lse
