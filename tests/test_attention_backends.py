"""Every attention backend agrees with the reference on every mask kind."""

import os

import pytest
import torch

from kernels import masks
from runtime.attention import BACKENDS, attention, flash_available, reference_attention, use_backend

T = 5  # tokens per frame: chunk lengths not a multiple of any tile size

MASKS = {
    "none": lambda: None,
    "block_causal": lambda: masks.block_causal(6, T, 2, 1),
    "teacher_forcing": lambda: masks.teacher_forcing(4, T, 2),
    "window_sink": lambda: masks.window_sink(8, T, 1, 1, window=3, sink=1),
    "cache_decode_filling": lambda: masks.cache_decode(2, T, 1, 4, 1, 2),
    "cache_decode_full": lambda: masks.cache_decode(2, T, 1, 4, 1, 4),
    "cache_decode_sink_filling": lambda: masks.cache_decode(1, T, 2, 3, 1, 0),
    "commit_decode": lambda: masks.commit_decode(2, 1, T, 4, 1),
}


def _qkv(mask, heads=2, dim=16, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    nq = mask.num_queries if mask is not None else 23
    nk = mask.num_keys if mask is not None else 31
    q = torch.randn(2, nq, heads, dim, generator=gen)
    k = torch.randn(2, nk, heads, dim, generator=gen)
    v = torch.randn(2, nk, heads, dim, generator=gen)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


def _dense_reference(q, k, v, mask):
    """Independent of runtime.masks: float64 softmax over the dense mask."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask.to_dense(), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())


CPU_BACKENDS = ["reference", "sdpa", "flex", "flash"]


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backend_matches_reference(backend, mask_name):
    mask = MASKS[mask_name]()
    q, k, v = _qkv(mask)
    out = attention(q, k, v, mask, backend=backend)
    assert out.shape == q.shape
    assert (out.double() - _dense_reference(q, k, v, mask)).abs().max() < 1e-4


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU case runs the Triton kernels interpreted (conftest sets TRITON_INTERPRET)")
@pytest.mark.parametrize("mask_name", ["block_causal", "teacher_forcing"])
def test_kernels_backend_runs_triton_interpreted_and_matches_reference(mask_name, monkeypatch):
    from kernels import triton_bwd, triton_fwd

    calls = []

    def spy(module, name):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)

    spy(triton_fwd, "forward")
    spy(triton_bwd, "backward")
    mask = MASKS[mask_name]()
    q, k, v = (x.requires_grad_() for x in _qkv(mask))
    out = attention(q, k, v, mask, backend="kernels")
    assert calls == ["forward"], "the kernels backend did not run the Triton forward"
    assert (out.double() - _dense_reference(q, k, v, mask)).abs().max() < 1e-4
    do = torch.randn_like(out)
    out.backward(do)
    assert calls == ["forward", "backward"]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    _dense_reference(q64, k64, v64, mask).backward(do.double())
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert (got.double() - want).abs().max() < 1e-4


def test_env_variable_and_context_select_backend(monkeypatch):
    mask = MASKS["block_causal"]()
    q, k, v = _qkv(mask)
    monkeypatch.setenv("FORCEKIT_ATTENTION", "nonsense")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, mask)
    monkeypatch.setenv("FORCEKIT_ATTENTION", "reference")
    with use_backend("sdpa"):
        out = attention(q, k, v, mask)
    assert (out.double() - _dense_reference(q, k, v, mask)).abs().max() < 1e-4
    assert set(CPU_BACKENDS) < set(BACKENDS)


def test_reference_supports_forward_mode_jvp():
    mask = MASKS["teacher_forcing"]()
    q, k, v = _qkv(mask)
    tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
    eps = 1e-3

    def f(q, k, v):
        return attention(q, k, v, mask)  # auto: the reference under forward-mode AD

    _, tangent = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    fd = (reference_attention(q + eps * tq, k + eps * tk, v + eps * tv, mask, None)
          - reference_attention(q - eps * tq, k - eps * tk, v - eps * tv, mask, None)) / (2 * eps)
    assert (tangent - fd).abs().max() < 1e-2


def test_empty_rows_give_zero_not_nan():
    iv = torch.tensor([[0, 0, 0, 0], [0, 2, 0, 0]], dtype=torch.int32)
    mask = masks.KeyIntervals(iv, 3)
    q, k, v = (torch.randn(1, n, 1, 8) for n in (2, 3, 3))
    out = reference_attention(q, k, v, mask, None)
    assert torch.isfinite(out).all() and out[0, 0].abs().max() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("backend", ["sdpa", "flex", "kernels"] + (["flash"] if flash_available() else []))
def test_cuda_backend_matches_reference(backend, mask_name):
    mask = MASKS[mask_name]()
    q, k, v = _qkv(mask, device="cuda", dtype=torch.float16)
    out = attention(q, k, v, None if mask is None else mask.to("cuda"), backend=backend)
    ref = _dense_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), mask)
    assert (out.cpu().double() - ref).abs().max() < 2e-2


def test_covers_all_keys_sees_unions():
    from runtime.masks import covers_all_keys

    full_by_union = masks.cache_decode(1, T, 1, 2, 1, 2)  # ring full: sink + ring + chunk is everything
    assert covers_all_keys(full_by_union) and full_by_union.to_dense().all()
    filling = masks.cache_decode(1, T, 1, 2, 1, 1)
    assert not covers_all_keys(filling) and not filling.to_dense().all()
    assert not covers_all_keys(masks.block_causal(3, T, 1))


def test_auto_uses_only_gpu_verified_backends_on_cuda(monkeypatch):
    """On CUDA, ``auto`` never runs a backend that has not passed its tests on a GPU (the kernels
    are opt-in until then); under forward-mode AD it falls back to the reference."""
    from runtime import attention as attn

    assert "kernels" not in attn.CUDA_VERIFIED
    assert attn.auto_backend(is_cuda=True, forward_ad=False) == "sdpa"
    assert attn.auto_backend(is_cuda=True, forward_ad=True) == "reference"
    assert attn.auto_backend(is_cuda=False, forward_ad=False) == "sdpa"
    assert attn.auto_backend(is_cuda=False, forward_ad=True) == "reference"
    # once the kernels are verified they lead, JVP included
    assert attn.auto_backend(True, False, verified=("kernels", "sdpa")) == "kernels"
    assert attn.auto_backend(True, True, verified=("kernels", "sdpa")) == "kernels"
    assert attn.auto_backend(True, False, verified=("flex", "sdpa")) == "flex"
    monkeypatch.setenv("FORCEKIT_ATTENTION", "kernels")
    assert attn.selected_backend() == "kernels"  # opt-in still works


@pytest.mark.gpu
def test_auto_on_cuda_matches_reference():
    mask = MASKS["commit_decode"]().to("cuda")
    q, k, v = _qkv(mask, device="cuda", dtype=torch.bfloat16)
    out = attention(q, k, v, mask)
    ref = _dense_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), MASKS["commit_decode"]())
    assert (out.cpu().double() - ref).abs().max() < 5e-2
