"""The step a GPU runs: bf16 weights and KV cache, captured model passes, decode on a second stream.

Three pieces, each optional and each checked on a CPU where it can be:

`CudaStepModel` wraps a `CausalDiT` for a `Rollout` (``StreamSession(runner=...)``). It holds
the weights (and so the KV cache, which takes the weights' dtype) in ``dtype``, while the sampler
keeps its latents in fp32: inputs are cast on the way in, the velocity on the way out. With
``capture="graphs"`` every cached model pass (a denoising step, with or without the fused
commit of the previous chunk) is recorded once as a CUDA graph and replayed afterwards: the
launch overhead of ~30 layers x dozens of kernels disappears. A pass is determined by its
shapes, the cache's bookkeeping (sink and window fill, ring position, mode) and its sink phase
(`KVCache.sink_phase`: whether the sink is read shifted, for the committed and for the current
chunk), so graphs are keyed by exactly that; after the window fills and the sink starts to move
the ring cycles through a few positions and every pass replays. What a graph cannot hold is
Python state: the RoPE positions (the ever growing frame counter) go in through a static tensor,
the sink's shift (which grows with them) is computed from that tensor inside the graph, and the
cache's counters are advanced by hand after a replay, to the values the captured pass left them at.
``capture="compile"`` runs the model through ``torch.compile`` instead (``compile_mode``: ``default``,
``reduce-overhead``, ``max-autotune``, ...): which is faster is for a GPU to measure.

`OverlappedStream` decodes chunk n on a second CUDA stream while chunk n+1 denoises: each
`step` launches the next chunk, then hands back the frames of the one before.

On a CPU the graph-free, eager path is what `StreamSession` runs unless told otherwise.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from runtime import masks as mask_lowering
from runtime.kv_cache import KVCache
from runtime.model import CausalDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CAPTURES = ("none", "graphs", "compile")
_COND_INPUTS = ("action", "audio", "video", "previous", "text")


@dataclass(frozen=True)
class StepOptions:
    """How the model pass runs: weight (and KV cache) dtype, and how it is captured."""

    dtype: str = "fp32"
    capture: str = "none"
    compile_mode: str = "default"  # torch.compile mode, with capture="compile"
    compile_backend: str = "inductor"  # "eager" checks the compile path's logic without a compiler

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.capture not in CAPTURES:
            raise ValueError(f"capture must be one of {list(CAPTURES)}, got {self.capture!r}")


# -- the cache's Python bookkeeping, which a graph replay does not redo ------------------------------
_STATE_FIELDS = ("sink_valid", "window_valid", "ring_next", "_pending")


def cache_state(cache: KVCache) -> tuple[int, ...]:
    """The counters that decide what a cached pass does (its layout and mask), not the frame counter."""
    return tuple(getattr(cache, f) for f in _STATE_FIELDS)


def _set_cache_state(cache: KVCache, state: tuple[int, ...], next_frame: int) -> None:
    for f, v in zip(_STATE_FIELDS, state):
        setattr(cache, f, v)
    cache.next_frame = next_frame


class CudaGraphRunner:
    """Records one call as a CUDA graph and replays it (``torch.cuda.CUDAGraph``, shared memory pool)."""

    def __init__(self, pool: Any) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.output: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor | None]) -> None:
        """Run ``fn``'s Python once while recording its kernels (nothing executes on the GPU)."""
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = fn()

    def replay(self) -> torch.Tensor | None:
        self.graph.replay()
        return self.output


class EagerGraphRunner:
    """Stands in for `CudaGraphRunner` where there is no GPU, with the same contract: ``capture`` runs
    ``fn``'s Python but leaves no trace in the cache (a snapshot is restored, as a real capture
    executes nothing), ``replay`` re-runs ``fn``, which re-applies the cache state of the capture,
    as a real graph replays the decisions made at capture time. So a test on a CPU sees whatever
    a wrapper forgets: a stale static input, a wrong key, a counter not advanced after a replay."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.fn: Callable[[], torch.Tensor | None] | None = None

    def capture(self, fn: Callable[[], torch.Tensor | None]) -> None:
        snap = self.cache.snapshot()
        fn()
        after = (cache_state(self.cache), self.cache.next_frame)
        self.cache.restore(snap)
        _set_cache_state(self.cache, *after)  # Python ran: its counters advanced, the buffers did not
        self.fn = fn

    def replay(self) -> torch.Tensor | None:
        return self.fn()


@dataclass
class _Captured:
    runner: Any
    statics: dict[str, torch.Tensor]
    positions: torch.Tensor
    after: tuple[int, ...]
    frames_advanced: int
    keepalive: list  # lowered masks the graph reads by address


class CudaStepModel(nn.Module):
    """A `CausalDiT` in ``options.dtype``, its cached passes captured (see the module docstring).

    It stands where a `Rollout` expects the model: ``config``, ``new_cache`` and ``forward`` with
    the model's arguments. ``graph_runner(cache)`` makes the object that captures one pass:
    `CudaGraphRunner` on CUDA (the default), `EagerGraphRunner` to test the logic on a CPU.
    """

    def __init__(self, model: CausalDiT, options: StepOptions | None = None,
                 graph_runner: Callable[[KVCache], Any] | None = None) -> None:
        super().__init__()
        self.options = options or StepOptions()
        self.dtype = DTYPES[self.options.dtype]
        self.model = model.to(self.dtype)
        self.config = model.config
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._graph_runner = graph_runner
        self.captures = 0
        self.replays = 0
        self._compiled = None
        if self.options.capture == "compile":
            import torch._dynamo

            # one compiled graph per cache layout (fill levels, ring positions): allow them all
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self._compiled = torch.compile(self.model, mode=self.options.compile_mode,
                                           backend=self.options.compile_backend, dynamic=False)

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        cache = self.model.new_cache(batch, device, dtype or self.dtype)
        if self._compiled is not None:
            # The cache's bookkeeping stays eager: compiled code then does not specialise on (and
            # recompile for) every fill level and ring position, only the layers' math is compiled.
            cache.keys_values = torch.compiler.disable(cache.keys_values)
            cache.commit = torch.compiler.disable(cache.commit)
            torch._dynamo.mark_static_address(cache._buf)  # written in place: keep its address for cudagraphs
        return cache

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        out_dtype = x.dtype
        x = x.to(self.dtype)
        for name in _COND_INPUTS:
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name].to(self.dtype)
        if self.options.capture == "graphs" and kwargs.get("cache") is not None and kwargs.get("mask") is None:
            if not x.is_cuda and self._graph_runner is None:
                raise ValueError(f"capture='graphs' records CUDA graphs: it needs a CUDA device, not {x.device}")
            out = self._graphed(x, timestep, kwargs)
        elif self._compiled is not None:
            cache = kwargs.get("cache")
            if cache is not None and kwargs.get("frame_positions") is None:  # a tensor, not a constant to guard on
                kwargs["frame_positions"] = torch.arange(cache.next_frame, cache.next_frame + x.shape[1],
                                                         device=x.device)
            out = self._compiled(x, timestep, **kwargs)
        else:
            out = self.model(x, timestep, **kwargs)
        return None if out is None else out.to(out_dtype)

    # -- CUDA graphs ----------------------------------------------------------------------------------
    def _graphed(self, x: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        cache: KVCache = kwargs.pop("cache")
        inputs = {"x": x, "timestep": timestep, **{k: kwargs.pop(k) for k in _COND_INPUTS
                                                   if kwargs.get(k) is not None}}
        for k in _COND_INPUTS:
            kwargs.pop(k, None)
        if kwargs.get("frame_positions") is not None:
            raise ValueError("captured passes take their frame positions from the cache")
        flags = tuple(sorted(kwargs.items()))  # cache_mode, cache_only, commit_frames
        key = (flags, cache_state(cache), cache.sink_phase(kwargs.get("commit_frames", 0)),
               tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()))
        entry = self._graphs.get(key)
        if entry is None:
            # First time this layout: run it for real (the result, and the warm-up the capture needs:
            # masks lowered and memoised, kernels chosen), then record it from the same state.
            before, frame = cache_state(cache), cache.next_frame
            out = self.model(inputs.pop("x"), inputs.pop("timestep"), cache=cache, **inputs, **kwargs)
            self._graphs[key] = self._capture(cache, key, before, frame, {"x": x, "timestep": timestep, **inputs},
                                              kwargs)
            return out
        for k, v in inputs.items():
            entry.statics[k].copy_(v)
        frame = cache.next_frame
        entry.positions.copy_(torch.arange(frame, frame + entry.positions.numel()))
        out = entry.runner.replay()
        _set_cache_state(cache, entry.after, frame + entry.frames_advanced)
        self.replays += 1
        return None if out is None else out.clone()

    def _capture(self, cache: KVCache, key: tuple, before: tuple[int, ...], frame: int,
                 inputs: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> _Captured:
        after, frame_after = cache_state(cache), cache.next_frame
        statics = {k: v.detach().clone() for k, v in inputs.items()}
        nf = inputs["x"].shape[1]
        positions = torch.arange(frame, frame + nf, device=inputs["x"].device)
        conds = {k: v for k, v in statics.items() if k not in ("x", "timestep")}

        def run() -> torch.Tensor | None:
            _set_cache_state(cache, before, frame)
            return self.model(statics["x"], statics["timestep"], cache=cache, frame_positions=positions, **conds,
                              **kwargs)

        if self._graph_runner is not None:
            runner = self._graph_runner(cache)
        else:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            runner = CudaGraphRunner(self._pool)
        runner.capture(run)
        if (cache_state(cache), cache.next_frame) != (after, frame_after):
            raise RuntimeError(f"a captured pass left the cache at {cache_state(cache)}, the eager pass at {after}: "
                               "the pass depends on state the capture key does not hold")
        self.captures += 1
        return _Captured(runner, statics, positions, after, frame_after - frame, mask_lowering.memoised_tensors())


class OverlappedStream:
    """Decodes chunk n on a second CUDA stream while chunk n+1 denoises on the first.

    `step` launches the next chunk's denoising and its decode (queued behind it on the decode
    stream), then returns the frames of the chunk launched by the previous call: one chunk of
    delay buys the overlap. The first call of a stream waits for its own chunk (there is nothing
    to overlap yet, and the first frames should come as soon as they can), so the second call
    returns no frames; `flush` collects the last chunk. Timing goes into the session's `stats`.
    Without CUDA the decode runs after the denoising on the same device: same frames, no overlap.
    """

    def __init__(self, session) -> None:
        self.session = session
        self._cuda = session.device.type == "cuda"
        self._stream = torch.cuda.Stream(session.device) if self._cuda else None
        self._pending: tuple[torch.Tensor, Any] | None = None
        self._started = False

    def reset(self, seed: int = 0, **kwargs: Any) -> None:
        self._sync()
        self._pending = None
        self._started = False
        self.session.reset(seed, **kwargs)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.session.device)

    def _launch_decode(self, x0: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if not self._cuda:
            return self.session.decode(x0), None
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            x0.record_stream(self._stream)  # allocated on the main stream, read on this one
            frames = self.session.decode(x0)
            host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        return host, done

    @staticmethod
    def _collect(pending: tuple[torch.Tensor, Any]) -> np.ndarray:
        frames, done = pending
        if done is not None:
            done.synchronize()
        return frames.numpy()

    @torch.no_grad()
    def step(self, action: Any = None, audio: Any = None, video: Any = None) -> np.ndarray:
        """Launch the next chunk; return the frames finished since the last call (uint8 ``[m, H, W, 3]``)."""
        start = time.perf_counter()
        launched = self._launch_decode(self.session.generate_latents(action, audio, video))
        if not self._started:  # the stream's first chunk: nothing to overlap with, deliver it now
            self._started = True
            frames = self._collect(launched)
        else:
            previous, self._pending = self._pending, launched
            frames = self._collect(previous) if previous is not None else self._empty()
        self.session.record_chunk((time.perf_counter() - start) * 1000, len(frames))
        return frames

    def _empty(self) -> np.ndarray:
        return np.zeros((0, *self.session.frame_size, 3), dtype=np.uint8)

    def flush(self) -> np.ndarray:
        """The frames of the last launched chunk (waits for them); empty when none is pending."""
        if self._pending is None:
            return self._empty()
        start = time.perf_counter()
        frames, self._pending = self._collect(self._pending), None
        self.session.record_chunk((time.perf_counter() - start) * 1000, len(frames))
        return frames


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Any:
    """Peak CUDA memory allocated inside the block, in bytes (``result["bytes"]``; None on a CPU)."""
    result: dict[str, int | None] = {"bytes": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            result["bytes"] = int(torch.cuda.max_memory_allocated(device))
