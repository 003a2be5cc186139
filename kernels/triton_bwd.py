"""Triton backward kernels, FA2-style: recompute probabilities from the saved log-sum-exp.

``delta = rowsum(dO * O)`` first (one torch reduction), then two kernels that each own their
output and need no atomics:

* `_dkdv_kernel`: one program per key tile; it walks the query tiles that see this key tile
  (the transposed schedule) and accumulates ``dV = P^T dO`` and ``dK = scale * dS^T Q``.
* `_dq_kernel`: one program per query tile; it walks the forward schedule and accumulates
  ``dQ = scale * dS K`` with ``dS = P * (dP - delta)``, ``dP = dO V^T``.

As in the forward, fully visible tiles run without element masks and invisible tiles are
never visited. Rows that saw no key have ``lse = -inf``; the kernels treat it as ``+inf`` so
their probabilities, and hence all their gradient contributions, are exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import LaunchConfig, config, strides
from kernels.masks import KeyIntervals
from kernels.schedule import cached_schedule
from kernels.triton_fwd import visible

LOG2E = 1.4426950408889634


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, IV, q_tile, b, h, pid_bh, offs_k, offs_d, d_valid,
               sq_b, sq_n, sq_h, sq_d, sdo_b, sdo_n, sdo_h, sdo_d, NQ, NK, qk_scale,
               BLOCK_M: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < NQ
    row_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=row_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :] * sdo_d,
                 mask=row_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh * NQ + offs_m, mask=m_valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # log2 units
    delta = tl.load(DELTA + pid_bh * NQ + offs_m, mask=m_valid, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M], log2 units
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        a_lo = tl.load(IV + offs_m * 4 + 0, mask=m_valid, other=0)
        a_hi = tl.load(IV + offs_m * 4 + 1, mask=m_valid, other=0)
        b_lo = tl.load(IV + offs_m * 4 + 2, mask=m_valid, other=0)
        b_hi = tl.load(IV + offs_m * 4 + 3, mask=m_valid, other=0)
        p_t = tl.where(visible(offs_k[:, None], a_lo[None, :], a_hi[None, :], b_lo[None, :], b_hi[None, :], NK),
                       p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, IV, FULL_PTR, FULL_IDX, PART_PTR, PART_IDX,
                 sq_b, sq_n, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d,
                 sdo_b, sdo_n, sdo_h, sdo_d, sdk_b, sdk_n, sdk_h, sdk_d, sdv_b, sdv_n, sdv_h, sdv_d,
                 NQ, NK, H, qk_scale, scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    kv_mask = (offs_k < NK)[:, None] & d_valid[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + offs_k[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_k[:, None] * sv_n + offs_d[None, :] * sv_d,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start = tl.load(FULL_PTR + pid_n)
    end = tl.load(FULL_PTR + pid_n + 1)
    for i in range(start, end):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, IV, tl.load(FULL_IDX + i), b, h, pid_bh,
                            offs_k, offs_d, d_valid, sq_b, sq_n, sq_h, sq_d, sdo_b, sdo_n, sdo_h, sdo_d,
                            NQ, NK, qk_scale,
                            BLOCK_M=BLOCK_M, MASKED=False, UPCAST=UPCAST, PRECISION=PRECISION)
    start = tl.load(PART_PTR + pid_n)
    end = tl.load(PART_PTR + pid_n + 1)
    for i in range(start, end):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, LSE, DELTA, IV, tl.load(PART_IDX + i), b, h, pid_bh,
                            offs_k, offs_d, d_valid, sq_b, sq_n, sq_h, sq_d, sdo_b, sdo_n, sdo_h, sdo_d,
                            NQ, NK, qk_scale,
                            BLOCK_M=BLOCK_M, MASKED=True, UPCAST=UPCAST, PRECISION=PRECISION)
    dk = dk * scale
    tl.store(DK + b * sdk_b + h * sdk_h + offs_k[:, None] * sdk_n + offs_d[None, :] * sdk_d,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdv_b + h * sdv_h + offs_k[:, None] * sdv_n + offs_d[None, :] * sdv_d,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, k_tile, b, h, offs_m, offs_d, d_valid, a_lo, a_hi, b_lo, b_hi,
             sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, NK, qk_scale,
             BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_k = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_mask = (offs_k < NK)[:, None] & d_valid[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + offs_k[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_k[:, None] * sv_n + offs_d[None, :] * sv_d,
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(visible(offs_k[None, :], a_lo[:, None], a_hi[:, None], b_lo[:, None], b_hi[:, None], NK),
                     p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IV, FULL_PTR, FULL_IDX, PART_PTR, PART_IDX,
               sq_b, sq_n, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d,
               sdo_b, sdo_n, sdo_h, sdo_d, sdq_b, sdq_n, sdq_h, sdq_d,
               NQ, NK, H, qk_scale, scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < NQ
    d_valid = offs_d < HEAD_DIM
    row_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=row_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :] * sdo_d,
                 mask=row_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh * NQ + offs_m, mask=m_valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * NQ + offs_m, mask=m_valid, other=0.0)
    a_lo = tl.load(IV + offs_m * 4 + 0, mask=m_valid, other=0)
    a_hi = tl.load(IV + offs_m * 4 + 1, mask=m_valid, other=0)
    b_lo = tl.load(IV + offs_m * 4 + 2, mask=m_valid, other=0)
    b_hi = tl.load(IV + offs_m * 4 + 3, mask=m_valid, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = tl.load(FULL_PTR + pid_m)
    end = tl.load(FULL_PTR + pid_m + 1)
    for i in range(start, end):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, tl.load(FULL_IDX + i), b, h, offs_m, offs_d, d_valid,
                      a_lo, a_hi, b_lo, b_hi, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, NK, qk_scale,
                      BLOCK_N=BLOCK_N, MASKED=False, UPCAST=UPCAST, PRECISION=PRECISION)
    start = tl.load(PART_PTR + pid_m)
    end = tl.load(PART_PTR + pid_m + 1)
    for i in range(start, end):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, tl.load(PART_IDX + i), b, h, offs_m, offs_d, d_valid,
                      a_lo, a_hi, b_lo, b_hi, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, NK, qk_scale,
                      BLOCK_N=BLOCK_N, MASKED=True, UPCAST=UPCAST, PRECISION=PRECISION)
    dq = dq * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=row_mask)


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             dout: torch.Tensor, mask: KeyIntervals, scale: float,
             dkdv_cfg: LaunchConfig | None = None, dq_cfg: LaunchConfig | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtypes and ``[B, N, H, D]`` layout."""
    bsz, nq, heads, dim = q.shape
    nk = k.shape[1]
    dkdv_cfg = dkdv_cfg or config("dkdv", q)
    dq_cfg = dq_cfg or config("dq", q)
    lse = lse.contiguous()
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Nq]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    qk_scale = scale * LOG2E

    sched = cached_schedule(mask, dkdv_cfg.block_m, dkdv_cfg.block_n, q.device)
    _dkdv_kernel[(triton.cdiv(nk, sched.block_n), bsz * heads)](
        q, k, v, dout, dk, dv, lse, delta, sched.intervals,
        sched.k_full.ptr, sched.k_full.idx, sched.k_partial.ptr, sched.k_partial.idx,
        *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dk), *strides(dv),
        nq, nk, heads, qk_scale, scale,
        HEAD_DIM=dim, BLOCK_D=dkdv_cfg.block_d, BLOCK_M=sched.block_m, BLOCK_N=sched.block_n,
        UPCAST=dkdv_cfg.upcast, PRECISION=dkdv_cfg.precision,
        num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages,
    )
    sched = cached_schedule(mask, dq_cfg.block_m, dq_cfg.block_n, q.device)
    _dq_kernel[(triton.cdiv(nq, sched.block_m), bsz * heads)](
        q, k, v, dout, dq, lse, delta, sched.intervals,
        sched.q_full.ptr, sched.q_full.idx, sched.q_partial.ptr, sched.q_partial.idx,
        *strides(q), *strides(k), *strides(v), *strides(dout), *strides(dq),
        nq, nk, heads, qk_scale, scale,
        HEAD_DIM=dim, BLOCK_D=dq_cfg.block_d, BLOCK_M=sched.block_m, BLOCK_N=sched.block_n,
        UPCAST=dq_cfg.upcast, PRECISION=dq_cfg.precision,
        num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages,
    )
    return dq, dk, dv
