"""Custom-mask attention kernels (Triton) and their pure-torch references.

Imports only torch and triton. The mask description every kernel consumes lives in
`kernels.masks`: two key intervals per query row.
"""

from kernels.masks import KeyIntervals

__all__ = ["KeyIntervals"]
