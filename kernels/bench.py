"""`forcekit bench kernels`: our Triton kernels against SDPA, FlexAttention and flash-attn.

For each geometry (heads x head dim) and mask (block-causal, teacher-forcing) it times the
forward, the backward and the fused forward + JVP, side by side with the baselines on the same
mask: SDPA with a dense boolean mask, compiled FlexAttention with a block mask built from the
same interval description, and flash-attn (when installed) on the full unmasked problem, the
nearest dense problem it can express (it does more work than the mask asks for).

TFLOP/s count only unmasked work (visible query-key pairs), for every implementation, so the
numbers compare time-to-solution on the masked problem. Matmul FLOPs per visible pair and head
dim D: forward 4D (QK^T, PV), backward 10D (QK^T again, dV, dP, dQ, dK), forward + JVP 12D
(QK^T, two for S', PV, PV', (P*S')V). flash-attn rows report its own (dense) FLOPs separately.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from kernels import masks
from kernels.masks import KeyIntervals

FLOPS_PER_PAIR_PER_DIM = {"fwd": 4, "bwd": 10, "jvp": 12}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BenchConfig:
    """Geometry defaults: Wan2.1-1.3B (12 heads x 128, 1560 tokens per latent frame, 21 frames)."""

    heads: int = 12
    head_dim: int = 128
    extra_head_dims: tuple[int, ...] = (64,)  # more geometries at the same width (heads * head_dim)
    tokens_per_frame: int = 1560
    frames: int = 21
    frames_per_chunk: int = 3
    first_chunk_frames: int | None = None
    batch: int = 1
    dtype: str = "bf16"
    masks: tuple[str, ...] = ("block_causal", "teacher_forcing")
    passes: tuple[str, ...] = ("fwd", "bwd", "jvp")
    baselines: tuple[str, ...] = ("sdpa", "flex", "flash")
    warmup: int = 3
    iters: int = 10
    seed: int = 0
    geometries: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        width = self.heads * self.head_dim
        self.geometries = [(self.heads, self.head_dim)]
        for d in self.extra_head_dims:
            if width % d:
                raise ValueError(f"extra head dim {d} does not divide the model width {width}")
            self.geometries.append((width // d, d))


def build_mask(kind: str, cfg: BenchConfig) -> KeyIntervals:
    args = (cfg.frames, cfg.tokens_per_frame, cfg.frames_per_chunk, cfg.first_chunk_frames)
    if kind == "block_causal":
        return masks.block_causal(*args)
    if kind == "teacher_forcing":
        return masks.teacher_forcing(*args)
    raise ValueError(f"unknown mask {kind!r}; choose block_causal or teacher_forcing")


def attention_flops(pairs: int, dim: int, heads: int, batch: int, pass_name: str) -> float:
    """Matmul FLOPs of one pass over ``pairs`` visible query-key pairs."""
    return float(FLOPS_PER_PAIR_PER_DIM[pass_name] * pairs * dim * heads * batch)


def visible_pairs(mask: KeyIntervals) -> int:
    """Number of (query, key) pairs the mask lets through, from the intervals alone."""
    iv = mask.intervals.to(torch.int64).clamp(0, mask.num_keys)
    a = (iv[:, 1] - iv[:, 0]).clamp(min=0)
    b = (iv[:, 3] - iv[:, 2]).clamp(min=0)
    overlap = (torch.minimum(iv[:, 1], iv[:, 3]) - torch.maximum(iv[:, 0], iv[:, 2])).clamp(min=0)
    return int((a + b - overlap).sum())


def time_ms(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _to_bhnd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _impls(mask: KeyIntervals, baselines: tuple[str, ...], device: torch.device
           ) -> dict[str, tuple[Callable, str]]:
    """name -> (forward fn on [B, N, H, D] tensors, what it computes)."""
    import kernels

    impls: dict[str, tuple[Callable, str]] = {
        "forcekit": (lambda q, k, v: kernels.attention(q, k, v, mask, backend="triton"), "mask"),
    }
    if "sdpa" in baselines:
        dense = mask.to_dense(device)
        impls["sdpa_dense_mask"] = (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            _to_bhnd(q), _to_bhnd(k), _to_bhnd(v), attn_mask=dense).transpose(1, 2), "mask")
    if "flex" in baselines:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        iv = mask.intervals.to(device)
        a_lo, a_hi, b_lo, b_hi = iv.unbind(1)

        def mask_mod(b, h, q_idx, kv_idx):
            return ((kv_idx >= a_lo[q_idx]) & (kv_idx < a_hi[q_idx])) | (
                (kv_idx >= b_lo[q_idx]) & (kv_idx < b_hi[q_idx]))

        block_mask = create_block_mask(mask_mod, None, None, mask.num_queries, mask.num_keys, device=device)
        flex = torch.compile(flex_attention)
        impls["flex_compiled"] = (lambda q, k, v: flex(_to_bhnd(q), _to_bhnd(k), _to_bhnd(v),
                                                       block_mask=block_mask).transpose(1, 2), "mask")
    if "flash" in baselines:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            pass
        else:
            impls["flash_attn_full"] = (lambda q, k, v: flash_attn_func(q, k, v), "full (dense superset)")
    return impls


def _measure(fn: Callable, pass_name: str, q, k, v, mask: KeyIntervals, cfg: BenchConfig,
             device: torch.device) -> float:
    """Milliseconds for one pass of one implementation (the jvp pass: forcekit's Triton JVP)."""
    import kernels

    if pass_name == "fwd":
        with torch.no_grad():
            return time_ms(lambda: fn(q, k, v), cfg.warmup, cfg.iters, device)
    if pass_name == "bwd":
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        out = fn(qg, kg, vg)
        do = torch.randn_like(out)
        return time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True),
                       cfg.warmup, cfg.iters, device)
    if pass_name == "jvp":
        tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
        return time_ms(lambda: kernels.attention_jvp(q, k, v, tq, tk, tv, mask, backend="triton"),
                       cfg.warmup, cfg.iters, device)
    raise ValueError(f"unknown pass {pass_name!r}")


def run_benchmark(cfg: BenchConfig, device: torch.device | str = "cuda") -> dict:
    """All geometries x masks x passes x implementations; a JSON-ready dict."""
    device = torch.device(device)
    dtype = DTYPES[cfg.dtype]
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    report: dict = {"config": {k: v for k, v in asdict(cfg).items() if k != "geometries"},
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                    "torch": torch.__version__, "results": [], "goals": []}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    for mask_kind in cfg.masks:
        mask = build_mask(mask_kind, cfg)
        pairs = visible_pairs(mask)
        density = pairs / (mask.num_queries * mask.num_keys)
        impls = _impls(mask, cfg.baselines, device)
        for heads, dim in cfg.geometries:
            shape_q = (cfg.batch, mask.num_queries, heads, dim)
            shape_k = (cfg.batch, mask.num_keys, heads, dim)
            q = torch.randn(shape_q, generator=g).to(device, dtype)
            k, v = (torch.randn(shape_k, generator=g).to(device, dtype) for _ in range(2))
            ms: dict[tuple[str, str], float] = {}
            for pass_name in cfg.passes:
                for name, (fn, computes) in impls.items():
                    if pass_name == "jvp" and name != "forcekit":
                        continue  # SDPA, Flex and flash-attn have no forward-mode AD: no row
                    row = {"mask": mask_kind, "heads": heads, "head_dim": dim, "queries": mask.num_queries,
                           "keys": mask.num_keys, "density": round(density, 4), "impl": name,
                           "computes": computes, "pass": pass_name}
                    try:
                        t = _measure(fn, pass_name, q, k, v, mask, cfg, device)
                    except Exception as e:  # a baseline failing (OOM, unsupported) must not end the run
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    else:
                        flops = attention_flops(pairs, dim, heads, cfg.batch, pass_name)
                        row.update(ms=round(t, 4), tflops=round(flops / (t * 1e-3) / 1e12, 2))
                        if computes != "mask":  # what it actually computed, for honesty
                            full = attention_flops(mask.num_queries * mask.num_keys, dim, heads, cfg.batch,
                                                   pass_name)
                            row["own_tflops"] = round(full / (t * 1e-3) / 1e12, 2)
                        ms[(name, pass_name)] = t
                    report["results"].append(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            report["goals"].extend(_goals(ms, mask_kind, heads, dim))
    return report


def _goals(ms: dict[tuple[str, str], float], mask_kind: str, heads: int, dim: int) -> list[dict]:
    """The issue's targets as ratios (>= 1 means met)."""
    checks = [
        ("fwd >= flex fwd", ("flex_compiled", "fwd"), ("forcekit", "fwd"), 1.0),
        ("fwd+jvp within 3x of fwd", ("forcekit", "fwd"), ("forcekit", "jvp"), 1 / 3.0),
        ("bwd >= 0.8x flex bwd", ("flex_compiled", "bwd"), ("forcekit", "bwd"), 0.8),
    ]
    out = []
    for goal, ref, ours, need in checks:
        if ref in ms and ours in ms:
            speed = ms[ref] / ms[ours]  # > 1: ours faster than the reference time
            out.append({"mask": mask_kind, "heads": heads, "head_dim": dim, "goal": goal,
                        "ratio": round(speed / need, 3), "met": speed >= need})
    return out


def format_table(report: dict) -> str:
    lines = [f"device: {report['device']}  torch {report['torch']}  triton {report['triton']}",
             f"{'mask':16} {'HxD':>7} {'pass':4} {'impl':18} {'ms':>9} {'TFLOP/s':>8}"]
    for r in report["results"]:
        val = f"{r['ms']:9.3f} {r['tflops']:8.1f}" if "ms" in r else f"  error: {r['error'][:60]}"
        lines.append(f"{r['mask']:16} {r['heads']:>3}x{r['head_dim']:<3} {r['pass']:4} {r['impl']:18} {val}")
    for g in report["goals"]:
        lines.append(f"goal {g['goal']:28} {g['mask']:16} {g['heads']}x{g['head_dim']}: "
                     f"{'met' if g['met'] else 'NOT met'} (ratio {g['ratio']})")
    return "\n".join(lines)

