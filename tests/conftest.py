"""Shared test set-up: Triton runs interpreted on machines without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before the first @triton.jit executes (see shared FACTS).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tests use tiny models: one thread is faster for them, and far faster when other processes
# share the cores (OpenMP threads spin against each other).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
