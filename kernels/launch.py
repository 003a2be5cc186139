"""Launch configurations: tile sizes and compiler knobs per pass, dtype and device.

Fixed tables rather than autotuning: the tile schedule depends on the tile sizes, and the
interpreter (CPU) cannot autotune at all. The CUDA numbers were picked without a GPU, from
register use reported by ptxas (see docs/kernels.md); they have not been timed yet.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch
import triton


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    block_d: int  # head dim padded to a power of two (>= 16 for tl.dot)
    num_warps: int = 4
    num_stages: int = 2
    upcast: bool = False  # load low precision, compute in fp32 (bf16 in the interpreter)
    precision: str = "tf32"  # tl.dot input precision: "ieee" for fp32 inputs (exact fp32 products)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config(pass_name: str, q: torch.Tensor, block_m: int | None = None,
           block_n: int | None = None) -> LaunchConfig:
    """The launch config of ``pass_name`` in {"fwd", "jvp", "dkdv", "dq"} for tensors like ``q``."""
    cfg = config_for(pass_name, q.device.type, q.dtype, q.shape[-1])
    if block_m is not None:
        cfg = replace(cfg, block_m=block_m)
    if block_n is not None:
        cfg = replace(cfg, block_n=block_n)
    return cfg


def config_for(pass_name: str, device_type: str, dtype: torch.dtype, head_dim: int) -> LaunchConfig:
    """Tile sizes per pass. CUDA: chosen offline with ``ptxas -v`` for sm_90a (bf16) as the
    largest tiles without register spills (the JVP at head dim 128 spills ~200 bytes in every
    config tried; 128x32 spilled least). Not timed on a GPU yet."""
    if pass_name not in ("fwd", "jvp", "dkdv", "dq"):
        raise ValueError(f"unknown pass {pass_name!r}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device_type != "cuda":  # interpreter: small tiles keep test shapes multi-tile
        cfg = LaunchConfig(16, 16, block_d, upcast=dtype == torch.bfloat16)
    else:
        big = block_d > 64
        cfg = {
            "fwd": LaunchConfig(128, 64, block_d, num_warps=8, num_stages=3),
            "jvp": LaunchConfig(128, 32, block_d, num_warps=8, num_stages=3 if big else 2),
            "dkdv": LaunchConfig(64, 64 if big else 128, block_d, num_warps=8, num_stages=2),
            "dq": LaunchConfig(128, 64, block_d, num_warps=8, num_stages=2),
        }[pass_name]
    if dtype == torch.float32:
        cfg = replace(cfg, precision="ieee")
    return cfg


def strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    if t.ndim != 4:
        raise ValueError(f"expected a [B, N, H, D] tensor, got shape {tuple(t.shape)}")
    return tuple(t.stride())



@contextlib.contextmanager
def plain_tensors():
    """Run a launch on plain tensors, outside any ``torch.func`` transform.

    Inside ``torch.func.jvp`` / ``grad`` the tensors reaching an autograd.Function's `jvp` and
    `backward`, and any tensor created there, are functorch wrappers, which a Triton launch
    cannot read. Unwrap the inputs with `unwrap` and launch inside this context: the kernels
    then compute on, and allocate, ordinary tensors, which functorch takes back as the
    transform level's tangents or gradients.
    """
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    with temporarily_clear_interpreter_stack():
        yield


class UnsupportedTransform(RuntimeError):
    """A ``torch.func`` transform the Triton kernels refuse: vmap over tangents or cotangents."""


def unwrap(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under (possibly nested) functorch grad/jvp wrappers; a plain tensor unchanged.

    A vmapped tangent or cotangent (``jacfwd``, ``jacrev``) has no per-sample meaning to the
    kernels: that case fails loudly instead of computing on the stacked batch.
    """
    from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor

    while is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            raise UnsupportedTransform(
                "vmap over the tangents or cotangents of kernels.attention (jacfwd, jacrev) is not "
                "supported by the Triton backend; use backend='reference' for Jacobians")
        t = get_unwrapped(t)
    return t
