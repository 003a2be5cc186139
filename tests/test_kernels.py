"""Triton attention kernels against a float64 oracle: forward, backward, JVP, every mask kind.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), fp32, fp16 and bf16
(loaded as bf16, computed in fp32: the interpreter's bf16 dot is broken), with shapes small
enough for the interpreter; the same tests run compiled on CUDA (``gpu`` marker), where bf16
runs natively, plus a test at sizes where the CUDA tiles are many. Chunk lengths (tokens per
frame 5, chunks of 1-2 frames) are not multiples of the 16-wide CPU tiles, so full, partial
and skipped tiles all occur.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from kernels import attention, attention_jvp, launch, masks, reference, schedule, triton_fwd
from kernels.masks import KeyIntervals

HEADS, DIM = 2, 16
TPF = 5  # tokens per frame: chunks of 5 or 10 tokens against 16-wide tiles


def _custom() -> KeyIntervals:
    """Empty rows (a whole empty query tile), far-away keys (skipped tiles), two disjoint intervals."""
    nq, nk = 40, 70
    rows = torch.zeros(nq, 4, dtype=torch.int32)
    rows[16:24] = torch.tensor([60, 70, 3, 9], dtype=torch.int32)
    rows[24:30] = torch.tensor([5, 5, 40, 45], dtype=torch.int32)
    rows[30:] = torch.tensor([0, 33, 33, 52], dtype=torch.int32)  # touching intervals
    rows[35] = torch.tensor([9, 2, 7, 7], dtype=torch.int32)  # lo > hi: empty
    return KeyIntervals(rows, nk)


MASKS = {
    "full": lambda: (None, 24, 40),
    "block_causal": lambda: masks.block_causal(6, TPF, 2, first_chunk_frames=1),
    "teacher_forcing": lambda: masks.teacher_forcing(4, TPF, 2, first_chunk_frames=1),
    "window_sink": lambda: masks.window_sink(8, TPF, 1, window=2, sink=1),
    "cache_decode": lambda: masks.cache_decode(2, TPF, sink_slots=1, window_slots=3,
                                               sink_valid=1, window_valid=2),
    "custom_empty_rows": _custom,
}


def _mask(kind: str) -> tuple[KeyIntervals | None, int, int]:
    m = MASKS[kind]()
    return m if isinstance(m, tuple) else (m, m.num_queries, m.num_keys)


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not launch.interpreted(), reason="needs TRITON_INTERPRET")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16 is upcast after loading there
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _device_dtypes():
    for dev in DEVICES:
        (name,), marks = dev.values, dev.marks
        for dt in CPU_DTYPES:
            yield pytest.param(name, dt, marks=marks, id=f"{name}-{str(dt).split('.')[-1]}")


DEVICE_DTYPES = list(_device_dtypes())


def _naive(q, k, v, visible, scale):
    """Independent oracle: softmax with a finite fill, empty rows zeroed afterwards."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if visible is None:
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
    p = torch.softmax(s.masked_fill(~visible, -1e30), -1) * visible
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(nq, nk, dtype, device, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, nq, HEADS, DIM), (batch, nk, HEADS, DIM), (batch, nk, HEADS, DIM)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def _close(got, want, dtype, what):
    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype] * scale * 4, f"{what}: max error {err:.3g} (scale {scale:.3g})"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind", [k for k in MASKS if k != "full"])
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (16, 64)])
def test_schedule_matches_dense_tiles(kind, bm, bn):
    mask, nq, nk = _mask(kind)
    sched = schedule.build_schedule(mask, bm, bn)
    dense = mask.to_dense()
    n_qt, n_kt = -(-nq // bm), -(-nk // bn)

    def listed(tl, i):
        return set(tl.idx[tl.ptr[i]:tl.ptr[i + 1]].tolist())

    for qt in range(n_qt):
        full, part = listed(sched.q_full, qt), listed(sched.q_partial, qt)
        for kt in range(n_kt):
            tile = dense[qt * bm:(qt + 1) * bm, kt * bn:(kt + 1) * bn]
            whole = tile.all().item() and (kt + 1) * bn <= nk
            assert (kt in full) == whole, (qt, kt)
            assert (kt in part) == (tile.any().item() and not whole), (qt, kt)
            assert (qt in listed(sched.k_full, kt)) == (kt in full)
            assert (qt in listed(sched.k_partial, kt)) == (kt in part)


def test_schedule_skips_invisible_tiles():
    mask = masks.block_causal(6, 16, 1)  # frame-causal, frames exactly one tile
    sched = schedule.build_schedule(mask, 16, 16)
    n_t = 96 // 16
    assert sched.visited_tiles == n_t * (n_t + 1) // 2  # lower triangle only
    assert sched.q_partial.idx.numel() == 0  # aligned: no element masks needed


def test_schedule_is_cached_per_mask_tensor():
    mask = masks.block_causal(4, TPF, 2)
    a = schedule.cached_schedule(mask, 16, 16, torch.device("cpu"))
    assert schedule.cached_schedule(mask, 16, 16, torch.device("cpu")) is a
    mask.intervals[0, 1] = 1  # in-place edit bumps the version: rebuilt
    assert schedule.cached_schedule(mask, 16, 16, torch.device("cpu")) is not a


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("kind", list(MASKS))
def test_reference_formulas_match_autodiff(kind):
    mask, nq, nk = _mask(kind)
    q, k, v = _inputs(nq, nk, torch.float64, "cpu")
    tq, tk, tv = _inputs(nq, nk, torch.float64, "cpu", seed=1)
    visible = None if mask is None else mask.to_dense()
    fn = lambda q, k, v: _naive(q, k, v, visible, 0.3)  # noqa: E731
    want, want_t = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
    out, t_out, lse = reference.forward_jvp(q, k, v, tq, tk, tv, visible, 0.3)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(t_out, want_t)
    do = torch.randn_like(out)
    _, vjp = torch.func.vjp(fn, q, k, v)
    for got, exp in zip(reference.backward(q, k, v, out, lse, do, visible, 0.3), vjp(do)):
        torch.testing.assert_close(got, exp)


# ---------------------------------------------------------------- Triton forward


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind", list(MASKS))
def test_forward(kind, device, dtype):
    mask, nq, nk = _mask(kind)
    q, k, v = _inputs(nq, nk, dtype, device)
    out = attention(q, k, v, mask, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    visible = None if mask is None else mask.to_dense(device)
    _close(out, _naive(q.double(), k.double(), v.double(), visible, DIM ** -0.5), dtype, "out")
    _, lse = triton_fwd.forward(q, k, v, mask or schedule.full_mask(nq, nk), DIM ** -0.5,
                                launch.config("fwd", q, block_m=32, block_n=16))
    _, want_lse = reference.forward(q.double(), k.double(), v.double(), visible, DIM ** -0.5)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # -inf exactly for rows that see nothing
    _close(lse[finite], want_lse[finite], dtype, "lse")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_strided_views(device):
    """A fused QKV projection's views (non-contiguous) go in without copies."""
    mask = masks.block_causal(4, TPF, 1)
    n = mask.num_queries
    qkv = torch.randn(1, n, 3, HEADS, DIM + 8, device=device)[..., :DIM]
    q, k, v = qkv.unbind(2)
    out = attention(q, k, v, mask, backend="triton")
    want = _naive(q.double(), k.double(), v.double(), mask.to_dense(device), DIM ** -0.5)
    _close(out, want, torch.float32, "out")


# ---------------------------------------------------------------- Triton backward


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind", list(MASKS))
def test_backward(kind, device, dtype):
    mask, nq, nk = _mask(kind)
    q, k, v = (x.requires_grad_() for x in _inputs(nq, nk, dtype, device))
    out = attention(q, k, v, mask, backend="triton")
    do = torch.randn_like(out)
    out.backward(do)
    visible = None if mask is None else mask.to_dense(device)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    _naive(q64, k64, v64, visible, DIM ** -0.5).backward(do.double())
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.dtype == dtype
        _close(got, want, dtype, name)


# ---------------------------------------------------------------- Triton JVP


def _jvp_oracle(mask, device, q, k, v, tq, tk, tv):
    visible = None if mask is None else mask.to_dense(device)
    return torch.func.jvp(lambda q, k, v: _naive(q, k, v, visible, DIM ** -0.5),
                          tuple(x.double() for x in (q, k, v)), tuple(x.double() for x in (tq, tk, tv)))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("kind", list(MASKS))
def test_fused_jvp(kind, device, dtype):
    mask, nq, nk = _mask(kind)
    q, k, v = _inputs(nq, nk, dtype, device)
    tq, tk, tv = _inputs(nq, nk, dtype, device, seed=1)
    out, t_out, lse = attention_jvp(q, k, v, tq, tk, tv, mask, backend="triton", tangent_fp32=True)
    assert t_out.dtype == torch.float32 and out.dtype == dtype and lse.shape == (2, HEADS, nq)
    want, want_t = _jvp_oracle(mask, device, q, k, v, tq, tk, tv)
    _close(out, want, dtype, "out")
    _close(t_out, want_t, dtype, "tangent")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["teacher_forcing", "custom_empty_rows"])
def test_forward_ad_paths(kind, device):
    """torch.func.jvp and dual tensors both reach the fused kernel and agree with the oracle."""
    mask, nq, nk = _mask(kind)
    q, k, v = _inputs(nq, nk, torch.float32, device)
    tq, tk, tv = _inputs(nq, nk, torch.float32, device, seed=1)
    want, want_t = _jvp_oracle(mask, device, q, k, v, tq, tk, tv)
    out, t_out = torch.func.jvp(lambda q, k, v: attention(q, k, v, mask, backend="triton"),
                                (q, k, v), (tq, tk, tv))
    _close(out, want, torch.float32, "func.jvp out")
    _close(t_out, want_t, torch.float32, "func.jvp tangent")
    with fwAD.dual_level():
        dual = attention(fwAD.make_dual(q, tq), k, fwAD.make_dual(v, tv), mask, backend="triton")
        out, t_out = fwAD.unpack_dual(dual)
    _, want_t = _jvp_oracle(mask, device, q, k, v, tq, torch.zeros_like(tk), tv)  # k carries no tangent
    _close(t_out, want_t, torch.float32, "dual tangent")


def test_tangent_is_not_differentiable_but_primal_is():
    mask, nq, nk = _mask("block_causal")
    q, k, v = (x.requires_grad_() for x in _inputs(nq, nk, torch.float32, "cpu"))
    with fwAD.dual_level():
        out, t_out = fwAD.unpack_dual(attention(fwAD.make_dual(q, torch.ones_like(q)), k, v, mask,
                                                backend="triton"))
    assert out.requires_grad and t_out.grad_fn is None
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("kind", ["block_causal", "teacher_forcing"])
def test_cuda_many_tiles_bf16(kind, dim):
    """Compiled kernels at sizes where the 128/64-wide CUDA tiles are many (the tiny shapes fit in one)."""
    build = masks.block_causal if kind == "block_causal" else masks.teacher_forcing
    mask = build(7, 130, 3, first_chunk_frames=1)  # chunks of 130 and 390 tokens
    nq, nk = mask.num_queries, mask.num_keys
    g = torch.Generator().manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(1, n, 4, dim, generator=g).to("cuda", torch.bfloat16)
                           for n in (nq, nk, nk, nq, nk, nk))
    visible = mask.to_dense("cuda")
    f64 = lambda q, k, v: _naive(q, k, v, visible, dim ** -0.5)  # noqa: E731
    want, want_t = torch.func.jvp(f64, (q.double(), k.double(), v.double()),
                                  (tq.double(), tk.double(), tv.double()))
    out, t_out, _ = attention_jvp(q, k, v, tq, tk, tv, mask, tangent_fp32=True)
    _close(out, want, torch.bfloat16, "jvp out")
    _close(t_out, want_t, torch.bfloat16, "tangent")
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = attention(qg, kg, vg, mask)
    _close(out, want, torch.bfloat16, "out")
    do = torch.randn_like(out)
    out.backward(do)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    f64(q64, k64, v64).backward(do.double())
    for name, got, exp in (("dq", qg.grad, q64.grad), ("dk", kg.grad, k64.grad), ("dv", vg.grad, v64.grad)):
        _close(got, exp, torch.bfloat16, name)


# ---------------------------------------------------------------- gradcheck-style


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_style_tiny(device):
    """Forward mode, reverse mode and central finite differences agree on a tiny problem.

    ``<g, J u>`` (fused JVP kernel) must equal ``<J^T g, u>`` (backward kernels) to fp32
    rounding, and both must match ``(f(x + eps u) - f(x - eps u)) / 2 eps`` of the forward kernel.
    """
    mask = masks.window_sink(5, 3, 1, window=1, sink=1)
    n = mask.num_queries
    q, k, v = _inputs(n, n, torch.float32, device, batch=1)
    u = _inputs(n, n, torch.float32, device, seed=1, batch=1)
    f = lambda q, k, v: attention(q, k, v, mask, backend="triton")  # noqa: E731
    _, ju = torch.func.jvp(f, (q, k, v), tuple(u))
    g = torch.randn_like(q)
    _, vjp = torch.func.vjp(f, q, k, v)
    jtg = vjp(g)
    fwd_mode = (g * ju).sum().item()
    rev_mode = sum((a * b).sum() for a, b in zip(jtg, u)).item()
    assert abs(fwd_mode - rev_mode) <= 1e-4 * max(1.0, abs(fwd_mode))
    eps = 1e-2  # fp32 kernels: larger steps, second-order error is eps^2
    plus = f(*(x + eps * d for x, d in zip((q, k, v), u)))
    minus = f(*(x - eps * d for x, d in zip((q, k, v), u)))
    fd = (plus - minus) / (2 * eps)
    assert (fd - ju).abs().max().item() <= 2e-3 * max(1.0, ju.abs().max().item())


# ---------------------------------------------------------------- tiles a row cannot see


@pytest.mark.parametrize("device", DEVICES)
def test_row_seeing_only_a_late_tile_with_very_negative_scores_fp16(device):
    """A row that sees nothing in the partial tiles it meets first, then only low scores.

    Row 0 sees keys 40..47 only (the last tile), with scores near -20 nats; the other rows make
    tiles 0 and 1 partial for this query tile, so row 0 walks through two tiles it cannot see.
    The running max must stay -inf there (not a finite 0), or the fp16 probabilities of the
    last tile underflow to zero and the output, and the backward built on it, come back wrong.
    """
    nq, nk = 16, 48
    rows = torch.zeros(nq, 4, dtype=torch.int32)
    rows[0] = torch.tensor([40, 48, 0, 0], dtype=torch.int32)
    rows[1:] = torch.tensor([0, 20, 0, 0], dtype=torch.int32)
    mask = KeyIntervals(rows, nk)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, nq, 1, DIM, generator=g) * 0.3
    k = torch.randn(1, nk, 1, DIM, generator=g) * 0.3
    v = torch.randn(1, nk, 1, DIM, generator=g)
    q[0, 0, 0, 0], k[0, 40:, 0, 0] = 8.0, -10.0  # row 0's scores: about -20 nats
    q, k, v = (x.to(device=device, dtype=torch.float16).requires_grad_() for x in (q, k, v))
    visible = mask.to_dense(device)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s0 = (q64[0, 0, 0] @ k64[0, 40:, 0].T) * DIM ** -0.5
    assert s0.max() < -15, s0
    want = _naive(q64, k64, v64, visible, DIM ** -0.5)
    out = attention(q, k, v, mask.to(device), backend="triton")
    _close(out, want, torch.float16, "out")
    assert (out[0, 0].double() - want[0, 0]).abs().max() <= 4e-3 * want[0, 0].abs().max()
    do = torch.randn(out.shape, generator=g).to(device=device, dtype=torch.float16)
    out.backward(do)
    want.backward(do.double())
    for name, got, exp in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        _close(got, exp, torch.float16, name)
    t = [torch.randn(x.shape, generator=g).to(device=device, dtype=torch.float16) for x in (q, k, v)]
    _, t_out, _ = attention_jvp(q.detach(), k.detach(), v.detach(), *t, mask.to(device), backend="triton",
                                tangent_fp32=True)
    _close(t_out, _jvp_oracle(mask, device, q.detach(), k.detach(), v.detach(), *t)[1], torch.float16, "tangent")


# ---------------------------------------------------------------- empty rows, API


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_keys_are_zero_everywhere(device):
    mask, nq, nk = _mask("custom_empty_rows")
    empty = ~mask.to_dense().any(1)
    assert empty.sum() >= 17
    q, k, v = (x.requires_grad_() for x in _inputs(nq, nk, torch.float16, device))
    t = _inputs(nq, nk, torch.float16, device, seed=1)
    out = attention(q, k, v, mask, backend="triton")
    out.float().pow(2).sum().backward()
    _, t_out, lse = attention_jvp(q.detach(), k.detach(), v.detach(), *t, mask, backend="triton")
    for x in (out, t_out, q.grad, k.grad, v.grad):
        assert torch.isfinite(x).all()
    assert (out[:, empty.to(device)] == 0).all() and (t_out[:, empty.to(device)] == 0).all()
    assert (q.grad[:, empty.to(device)] == 0).all()
    assert torch.isneginf(lse[:, :, empty.to(device)]).all()


@pytest.mark.parametrize("transform", [torch.func.jacfwd, torch.func.jacrev], ids=["jacfwd", "jacrev"])
def test_jacobians_through_the_triton_backend_are_refused_with_the_way_out(transform):
    """vmapped tangents or cotangents have no per-sample meaning to the kernels: a clear error, not a
    wrong Jacobian; the reference backend computes it."""
    q, k, v = _inputs(TPF, TPF, torch.float32, "cpu", batch=1)
    with pytest.raises(launch.UnsupportedTransform, match="backend='reference'"):
        transform(lambda q: attention(q, k, v, None, backend="triton"))(q)
    jac = transform(lambda q: attention(q, k, v, None, backend="reference"))(q)
    assert jac.shape == (*q.shape, *q.shape) and torch.isfinite(jac).all()


def test_auto_backend_on_cpu_is_the_reference_and_supports_func_jvp():
    mask, nq, nk = _mask("teacher_forcing")
    q, k, v = _inputs(nq, nk, torch.float64, "cpu")
    t = _inputs(nq, nk, torch.float64, "cpu", seed=1)
    out, t_out = torch.func.jvp(lambda q, k, v: attention(q, k, v, mask), (q, k, v), tuple(t))
    want, want_t = _jvp_oracle(mask, "cpu", q, k, v, *t)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(t_out, want_t)
    ref = attention_jvp(q, k, v, *t, mask, backend="reference")
    torch.testing.assert_close(ref[1], want_t)


def test_bad_inputs_are_named():
    mask, nq, nk = _mask("block_causal")
    q, k, v = _inputs(nq, nk, torch.float32, "cpu")
    with pytest.raises(ValueError, match="mask is 30x30"):
        attention(q[:, :10], k, v, mask)
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, k, v, mask, backend="flash")
    with pytest.raises(ValueError, match=r"\[B, N, H, D\]"):
        attention(q[0], k, v, mask)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q.half(), k, v, mask)
    for bad in (mask.intervals, mask.to_dense()):
        with pytest.raises(TypeError, match="mask must be a kernels.KeyIntervals.*KeyIntervals\\("):
            attention(q, k, v, bad)
        with pytest.raises(TypeError, match="mask must be a kernels.KeyIntervals"):
            attention_jvp(q, k, v, q, k, v, bad)


def test_import_kernels_does_not_import_triton():
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------- benchmark


def test_visible_pairs_counts_the_dense_mask():
    from kernels.bench import visible_pairs

    for kind in MASKS:
        mask, _, _ = _mask(kind)
        if mask is not None:
            assert visible_pairs(mask) == int(mask.to_dense().sum())


@pytest.mark.skipif(not launch.interpreted(), reason="needs TRITON_INTERPRET")
def test_benchmark_runs_end_to_end_on_a_tiny_geometry():
    """The GPU benchmark's code path, on CPU: every pass, SDPA baseline, goals, table."""
    from kernels.bench import BenchConfig, format_table, run_benchmark

    cfg = BenchConfig(heads=2, head_dim=32, extra_head_dims=(16,), tokens_per_frame=4, frames=4,
                      frames_per_chunk=2, dtype="fp32", baselines=("sdpa",), warmup=0, iters=1)
    report = run_benchmark(cfg, "cpu")
    rows = report["results"]
    assert {(r["mask"], r["head_dim"], r["pass"], r["impl"]) for r in rows} == {
        (m, d, p, impl) for m in cfg.masks for d in (32, 16) for p in ("fwd", "bwd", "jvp")
        for impl in ("forcekit", "sdpa_dense_mask") if not (p == "jvp" and impl != "forcekit")}
    assert all("ms" in r and r["tflops"] >= 0 for r in rows), [r for r in rows if "error" in r]
    assert {g["goal"] for g in report["goals"]} == {"fwd+jvp within 3x of fwd"}
    assert "forcekit" in format_table(report)


def test_bench_command_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from forcekit.cli import main

    assert main(["bench", "kernels", "--json"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


_AOT_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import launch, triton_bwd, triton_fwd

KERNELS = {"fwd": triton_fwd._fwd_kernel, "jvp": triton_fwd._fwd_kernel,
           "dkdv": triton_bwd._dkdv_kernel, "dq": triton_bwd._dq_kernel}
FLOAT_PTRS = ("Q", "K", "V", "TQ", "TK", "TV", "O", "TO", "DO", "DQ", "DK", "DV")
for dtype, name, pass_name in [(torch.bfloat16, "bf16", p) for p in KERNELS] + [(torch.float32, "fp32", "fwd")]:
    cfg = launch.config_for(pass_name, "cuda", dtype, 128)
    fn = KERNELS[pass_name]
    ce = dict(HEAD_DIM=128, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
              UPCAST=cfg.upcast, PRECISION=cfg.precision)
    if pass_name in ("fwd", "jvp"):
        ce["JVP"] = pass_name == "jvp"
    sig = {}
    for arg in fn.arg_names:
        if arg in ce:
            sig[arg] = "constexpr"
        elif arg in FLOAT_PTRS:
            sig[arg] = "*" + name
        elif arg in ("LSE", "DELTA"):
            sig[arg] = "*fp32"
        elif arg.isupper():
            sig[arg] = "*i32" if arg in ("IV", "FULL_PTR", "FULL_IDX", "PART_PTR", "PART_IDX") else "i32"
        else:
            sig[arg] = "fp32" if arg in ("qk_scale", "scale") else "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    assert k.asm["cubin"], pass_name
    print(name, pass_name, "ok")
"""


def test_kernels_compile_for_sm90():
    """The CUDA launch configs lower through Triton's NVIDIA backend to a cubin for sm_90 (H100).

    The interpreter never runs that pipeline (layouts, wgmma, register allocation), so without a
    GPU this is the check that the compiled path builds at all.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(" ok") == 5
