"""Custom-mask attention kernels (Triton) and their pure-torch references.

Imports only torch and triton, and triton only when a Triton backend actually runs, so
``import kernels`` works on a machine without it (the reference is used there). The mask
description every kernel consumes lives in `kernels.masks`: two key intervals per query row.
"""

from kernels.attention import attention, attention_jvp
from kernels.masks import KeyIntervals

__all__ = ["KeyIntervals", "attention", "attention_jvp"]
