"""Triton forward kernel: masked attention with log-sum-exp, and the same kernel fused with the JVP.

One program owns ``BLOCK_M`` query rows of one (batch, head) and walks the key tiles its
`TileSchedule` lists: first the fully visible tiles without any element mask, then the partly
visible ones with the per-row intervals applied element-wise. Tiles nobody sees never appear.
Online softmax in base 2 (FA2): running max ``m``, unnormalised sum ``l`` and output ``O``.

With ``JVP`` set, the same loop also carries the forward-mode tangent with unnormalised
accumulators (DESIGN.md section 7): ``s' = scale * (q' k + q k')``, ``T = sum p v' + (p s') v``,
``r = sum p s'``, all rescaled with ``O``; at the end ``out = O / l`` and
``out' = T / l - (r / l) * out``. ``lse`` is the natural-log log-sum-exp, ``-inf`` for rows
that see no key (their output and tangent are zero).

Tensors keep the ``[B, N, H, D]`` layout and arbitrary strides: raw pointer arithmetic, no
block pointers (the interpreter dropped them), so views from a fused QKV projection need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import LaunchConfig, strides
from kernels.masks import KeyIntervals
from kernels.schedule import cached_schedule

LOG2E = 1.4426950408889634


@triton.jit
def visible(kk, a_lo, a_hi, b_lo, b_hi, NK):
    """Element mask of a partial tile: key index ``kk`` inside either interval and inside ``[0, NK)``.

    Arguments arrive broadcast by the caller (keys along one axis, rows' intervals along the other).
    """
    return (((kk >= a_lo) & (kk < a_hi)) | ((kk >= b_lo) & (kk < b_hi))) & (kk < NK)


@triton.jit
def _fwd_tile(acc, acc_t, m_i, l_i, r_i, q, tq, k_ptrs, v_ptrs, tk_ptrs, tv_ptrs, offs_k, k_valid,
              d_valid, a_lo, a_hi, b_lo, b_hi, NK, qk_scale, scale,
              MASKED: tl.constexpr, JVP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax (and of the tangent when ``JVP``)."""
    kt_mask = k_valid[None, :] & d_valid[:, None]
    v_mask = k_valid[:, None] & d_valid[None, :]
    k = tl.load(k_ptrs, mask=kt_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2 units
    if MASKED:
        vis = visible(offs_k[None, :], a_lo[:, None], a_hi[:, None], b_lo[:, None], b_hi[:, None], NK)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    shift = m_new
    if MASKED:
        # A row may still have seen nothing: shift by a finite 0 in this tile (its p and alpha
        # are 0 either way) but carry -inf on, so the first tile it does see sets the true max.
        # Carrying the 0 would leave fp16 p = exp2(s - 0) to underflow for low scores.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - shift)
    p = tl.math.exp2(s - shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=PRECISION)
    if JVP:
        tk = tl.load(tk_ptrs, mask=kt_mask, other=0.0)
        tv = tl.load(tv_ptrs, mask=v_mask, other=0.0)
        if UPCAST:
            tk = tk.to(tl.float32)
            tv = tv.to(tl.float32)
        # Chained accumulation (acc=) keeps one live accumulator per product: fewer registers.
        s_dot = tl.dot(q, tk, acc=tl.dot(tq, k, input_precision=PRECISION), input_precision=PRECISION) * scale
        ps = p * s_dot
        r_i = r_i * alpha + tl.sum(ps, 1)
        acc_t = tl.dot(p.to(tv.dtype), tv, acc=acc_t * alpha[:, None], input_precision=PRECISION)
        acc_t = tl.dot(ps.to(v.dtype), v, acc=acc_t, input_precision=PRECISION)
    return acc, acc_t, m_new, l_i, r_i


@triton.jit
def _fwd_kernel(Q, K, V, TQ, TK, TV, O, TO, LSE, IV, FULL_PTR, FULL_IDX, PART_PTR, PART_IDX,
                sq_b, sq_n, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d,
                stq_b, stq_n, stq_h, stq_d, stk_b, stk_n, stk_h, stk_d, stv_b, stv_n, stv_h, stv_d,
                so_b, so_n, so_h, so_d, sto_b, sto_n, sto_h, sto_d,
                NQ, NK, H, qk_scale, scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                JVP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: batch * batch-stride can pass 2^31
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < NQ
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    tq = q
    if JVP:
        tq = tl.load(TQ + b * stq_b + h * stq_h + offs_m[:, None] * stq_n + offs_d[None, :] * stq_d,
                     mask=q_mask, other=0.0)
        if UPCAST:
            tq = tq.to(tl.float32)
    k_base = K + b * sk_b + h * sk_h + offs_d[:, None] * sk_d
    v_base = V + b * sv_b + h * sv_h + offs_d[None, :] * sv_d
    tk_base = TK + b * stk_b + h * stk_h + offs_d[:, None] * stk_d
    tv_base = TV + b * stv_b + h * stv_h + offs_d[None, :] * stv_d

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a_lo = tl.load(IV + offs_m * 4 + 0, mask=m_valid, other=0)
    a_hi = tl.load(IV + offs_m * 4 + 1, mask=m_valid, other=0)
    b_lo = tl.load(IV + offs_m * 4 + 2, mask=m_valid, other=0)
    b_hi = tl.load(IV + offs_m * 4 + 3, mask=m_valid, other=0)

    start = tl.load(FULL_PTR + pid_m)
    end = tl.load(FULL_PTR + pid_m + 1)
    for i in range(start, end):
        offs_k = tl.load(FULL_IDX + i) * BLOCK_N + offs_n
        k_valid = offs_k < NK
        acc, acc_t, m_i, l_i, r_i = _fwd_tile(
            acc, acc_t, m_i, l_i, r_i, q, tq,
            k_base + offs_k[None, :] * sk_n, v_base + offs_k[:, None] * sv_n,
            tk_base + offs_k[None, :] * stk_n, tv_base + offs_k[:, None] * stv_n,
            offs_k, k_valid, d_valid, a_lo, a_hi, b_lo, b_hi, NK, qk_scale, scale,
            MASKED=False, JVP=JVP, UPCAST=UPCAST, PRECISION=PRECISION)
    start = tl.load(PART_PTR + pid_m)
    end = tl.load(PART_PTR + pid_m + 1)
    for i in range(start, end):
        offs_k = tl.load(PART_IDX + i) * BLOCK_N + offs_n
        k_valid = offs_k < NK
        acc, acc_t, m_i, l_i, r_i = _fwd_tile(
            acc, acc_t, m_i, l_i, r_i, q, tq,
            k_base + offs_k[None, :] * sk_n, v_base + offs_k[:, None] * sv_n,
            tk_base + offs_k[None, :] * stk_n, tv_base + offs_k[:, None] * stv_n,
            offs_k, k_valid, d_valid, a_lo, a_hi, b_lo, b_hi, NK, qk_scale, scale,
            MASKED=True, JVP=JVP, UPCAST=UPCAST, PRECISION=PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=q_mask)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln 2
    tl.store(LSE + pid_bh * NQ + offs_m, lse, mask=m_valid)
    if JVP:
        t_out = acc_t / l_safe[:, None] - (r_i / l_safe)[:, None] * out
        tl.store(TO + b * sto_b + h * sto_h + offs_m[:, None] * sto_n + offs_d[None, :] * sto_d,
                 t_out.to(TO.dtype.element_ty), mask=q_mask)


def _launch(q, k, v, tangents, mask: KeyIntervals, scale: float, cfg: LaunchConfig, tangent_dtype):
    bsz, nq, heads, dim = q.shape
    sched = cached_schedule(mask, cfg.block_m, cfg.block_n, q.device)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(bsz, heads, nq, device=q.device, dtype=torch.float32)
    jvp = tangents is not None
    if jvp:
        tq, tk, tv = tangents
        t_out = torch.empty(q.shape, device=q.device, dtype=tangent_dtype)
    else:  # placeholders, never read: the JVP branch is compiled out
        tq, tk, tv, t_out = q, k, v, out
    grid = (triton.cdiv(nq, sched.block_m), bsz * heads)
    _fwd_kernel[grid](
        q, k, v, tq, tk, tv, out, t_out, lse, sched.intervals,
        sched.q_full.ptr, sched.q_full.idx, sched.q_partial.ptr, sched.q_partial.idx,
        *strides(q), *strides(k), *strides(v), *strides(tq), *strides(tk), *strides(tv),
        *strides(out), *strides(t_out),
        nq, k.shape[1], heads, scale * LOG2E, scale,
        HEAD_DIM=dim, BLOCK_D=cfg.block_d, BLOCK_M=sched.block_m, BLOCK_N=sched.block_n,
        JVP=jvp, UPCAST=cfg.upcast, PRECISION=cfg.precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, (t_out if jvp else None), lse


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: KeyIntervals, scale: float,
            cfg: LaunchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Nq, H, D] in q's dtype, lse [B, H, Nq] float32)``."""
    out, _, lse = _launch(q, k, v, None, mask, scale, cfg, None)
    return out, lse


def forward_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
                tv: torch.Tensor, mask: KeyIntervals, scale: float, cfg: LaunchConfig,
                tangent_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward + JVP: ``(out, tangent_out in tangent_dtype, lse)`` in one pass."""
    return _launch(q, k, v, (tq, tk, tv), mask, scale, cfg, tangent_dtype)
