"""`Rollout`: chunk-by-chunk generation in latent space, shared by inference and self-forcing training.

A rollout owns the context the next chunk sees. With ``kv_cache=True`` that is a `KVCache`;
with ``kv_cache=False`` it is the history of context latents, their noise levels and
conditions, of which every call re-runs what the chunk depends on (the sink's chunks and the
last ``num_layers`` windows, `runtime.context.recompute_plan`) under the window + sink mask and
the cache's positions: slower, bounded per chunk, and exactly what the cache must reproduce, so
it is the reference the tests compare against. Only that much history is kept.

What enters the context follows the bundle's recipe (``SamplerConfig.cache_from``):
``clean`` re-runs the denoised chunk at t = 0 (teacher-forcing style); ``last_step`` keeps
the keys of the last denoising step, whose input is still noisy at that step's level.

``fuse_commit=True`` (inference) defers the ``clean`` commit of a finished chunk to the first
denoising step of the next one, which then runs both in one model pass
(``CausalDiT(..., commit_frames=)``): the same numbers, one pass per chunk fewer. Training
leaves it off so that snapshots and replays see a committed context.

Frame stacking (``ModelConfig.stack_frames``): the rollout also keeps the newest clean
latents and hands each pass the previous frames its frames may see (`runtime.stacking`):
a chunk being denoised sees the frames before it, a committed chunk each frame's own past.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from runtime import sampler as sampling
from runtime.config import SamplerConfig
from runtime.context import receptive_start, recompute_plan, sink_chunks_end
from runtime.model import CausalDiT
from runtime.stacking import next_previous, noised_at, previous_frames


@dataclass
class ChunkCondition:
    """Per-frame conditions of one chunk (``[B, n, ...]``) and the clip-level text (``[B, L, D]``).

    ``previous`` (frame stacking) is filled in by the `Rollout`, which owns the context.
    """

    action: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    video: torch.Tensor | None = None
    text: torch.Tensor | None = None
    previous: torch.Tensor | None = None

    def unconditional(self) -> ChunkCondition:
        """The same chunk with actions and audio dropped (zeros), as condition dropout trained it for CFG
        (`training.conditions.null`); the video condition and the stacked frames stay."""
        action = None if self.action is None else torch.zeros_like(self.action)
        audio = None if self.audio is None else torch.zeros_like(self.audio)
        return ChunkCondition(action, audio, self.video, self.text, self.previous)

    def per_frame(self) -> tuple[torch.Tensor | None, ...]:
        """The fields with a frame axis, in constructor order (text is per clip)."""
        return self.action, self.audio, self.video, self.previous


def _doubled(cond: ChunkCondition) -> ChunkCondition:
    """``[conditional; unconditional]`` along the batch, as guided model calls take it."""
    unc = cond.unconditional()
    a, u = cond.per_frame() + (cond.text,), unc.per_frame() + (unc.text,)
    action, audio, video, previous, text = (_cat([c, d], 0) for c, d in zip(a, u))
    return ChunkCondition(action, audio, video, text, previous)


def _cat_frames(conds: list[ChunkCondition], text: torch.Tensor | None) -> ChunkCondition:
    """Consecutive chunks' conditions as one (frame axis 1)."""
    action, audio, video, previous = (_cat(list(parts), 1) for parts in zip(*(c.per_frame() for c in conds)))
    return ChunkCondition(action, audio, video, text, previous)


def _cat(parts: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts, dim=dim)


class Rollout:
    def __init__(self, model: CausalDiT, sampler: SamplerConfig, batch: int = 1, kv_cache: bool = True,
                 generator: torch.Generator | None = None, fuse_commit: bool = False,
                 reproject: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``reproject``: applied to each generated chunk's clean latents ``[B, n, C, H, W]`` before they enter
        the context (`SamplerConfig.reproject`: the session passes decode-then-encode)."""
        self.model = model
        self.reproject = reproject
        self.sampler = sampler
        self.batch = batch
        self.use_cache = kv_cache
        self.generator = generator
        # CFG on what condition dropout zeroes: the keys, and a lip-sync model's audio (or mouth) features
        self.guided = sampler.guidance_scale != 1.0 and (model.config.actions.dim > 0 or model.config.audio_dim > 0)
        p = next(model.parameters())
        self.cache = model.new_cache(batch * (2 if self.guided else 1), p.device, p.dtype) if kv_cache else None
        cfg = model.config
        # Fusing needs the committed chunk to stay in the window (a window smaller than a chunk would
        # drop it before the next chunk reads it) and a clean commit (last_step commits mid-denoising).
        self.fuse_commit = (fuse_commit and kv_cache and sampler.cache_from == "clean"
                            and cfg.window_frames >= cfg.chunk_pattern.max_chunk_frames)
        self.reset()

    def reset(self) -> None:
        self.chunk = 0
        self.frames = 0
        cfg = self.model.config
        p = next(self.model.parameters())
        # the newest clean latents, oldest first (frame stacking; None without it)
        self._recent = torch.zeros((self.batch, cfg.stack_frames, cfg.in_channels, cfg.latent_height,
                                    cfg.latent_width), dtype=p.dtype, device=p.device) if cfg.stack_frames else None
        if self.cache is not None:
            self.cache.reset()
        self._history: list[tuple[int, torch.Tensor, torch.Tensor, ChunkCondition]] = []  # (first frame, ...)
        self.exit_input: tuple[torch.Tensor, float] | None = None  # last denoising step's (input, level)
        self._deferred: tuple[torch.Tensor, ChunkCondition] | None = None  # finished chunk not yet in the cache

    @property
    def pattern(self):
        return self.model.config.chunk_pattern

    def next_chunk_frames(self) -> int:
        return self.pattern.chunk_frames(self.chunk)

    # -- one model evaluation of the current chunk -------------------------------------------------
    def velocity(self, x: torch.Tensor, t: float | torch.Tensor, cond: ChunkCondition, cache_mode: str = "transient"
                 ) -> torch.Tensor:
        """Velocity for the current chunk ``x`` ``[B, n, C, H, W]`` at level ``t``, given the context."""
        self.flush()
        return self._velocity(x, t, self._denoising(cond, x.shape[1]), cache_mode)

    # -- frame stacking ------------------------------------------------------------------------------
    def _denoising(self, cond: ChunkCondition, n: int) -> ChunkCondition:
        """``cond`` with the previous frames that the ``n`` frames of the chunk being denoised see."""
        if self._recent is None:
            return cond
        cfg = self.model.config
        newest = noised_at(next_previous(self._recent, cfg.stack_frames), self.sampler.stack_noise, self.generator,
                           cfg.stack_noise_form)
        return replace(cond, previous=newest.expand(-1, n, *newest.shape[2:]))

    def _committing(self, cond: ChunkCondition, latents: torch.Tensor) -> ChunkCondition:
        """``cond`` with each frame's own previous frames, for clean ``latents`` entering the context."""
        if self._recent is None:
            return cond
        previous = previous_frames(latents, self.model.config.stack_frames, self._recent)
        return replace(cond, previous=noised_at(previous, self.sampler.stack_noise, self.generator,
                                                self.model.config.stack_noise_form))

    def _push_recent(self, latents: torch.Tensor) -> None:
        """Keep the newest ``stack_frames`` clean latents (zeros before the first frame)."""
        if self._recent is not None:
            self._recent = torch.cat([self._recent, latents.detach()], 1)[:, -self.model.config.stack_frames:]

    def _velocity(self, x: torch.Tensor, t: float | torch.Tensor, cond: ChunkCondition, cache_mode: str,
                  commit_frames: int = 0) -> torch.Tensor:
        b, n = x.shape[:2]
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tt = tt.expand(b, n) if tt.ndim == 0 else tt
        if commit_frames:  # a finished chunk at level 0 in front, committed in the same pass
            ctx, ctx_cond = self._deferred  # cleared only once the pass succeeded: a retry still commits it
            x = torch.cat([ctx, x], dim=1)
            tt = torch.cat([torch.zeros(ctx.shape[:2], dtype=x.dtype, device=x.device), tt], dim=1)
            cond = _cat_frames([ctx_cond, cond], cond.text)
        if self.guided:
            v = self._run(torch.cat([x, x]), torch.cat([tt, tt]), _doubled(cond), cache_mode,
                          commit_frames=commit_frames)
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + self.sampler.guidance_scale * (v_cond - v_uncond)
        else:
            v = self._run(x, tt, cond, cache_mode, commit_frames=commit_frames)
        if commit_frames:
            self._deferred = None
        return v

    def _run(self, x, t, cond: ChunkCondition, cache_mode: str, cache_only: bool = False,
             commit_frames: int = 0) -> torch.Tensor | None:
        if self.cache is not None:
            return self.model(x, t, action=cond.action, audio=cond.audio, video=cond.video,
                              previous=cond.previous, stack_level=self.sampler.stack_noise, text=cond.text,
                              cache=self.cache, cache_mode=cache_mode,
                              cache_only=cache_only, commit_frames=commit_frames)
        return self._recompute(x, t, cond)

    def _recompute(self, x, t, cond: ChunkCondition) -> torch.Tensor:
        """No cache: re-run what this chunk depends on, from the kept history, under the window + sink
        mask at the cache's positions (`runtime.context.recompute_plan`)."""
        cfg = self.model.config
        history = self._history
        if self.guided:  # x holds [conditional; unconditional]: replay the history for both branches
            history = [(f, torch.cat([h, h]), torch.cat([lv, lv]), _doubled(c)) for f, h, lv, c in history]
        parts = history + [(self.frames, x, t, cond)]
        column, at = {}, 0  # absolute frame -> its column in the concatenation of parts
        for f, h, _, _ in parts:
            column.update({f + i: at + i for i in range(h.shape[1])})
            at += h.shape[1]
        order, positions, mask = recompute_plan(self.pattern, self.frames, x.shape[1], cfg.window_frames,
                                                cfg.sink_frames, cfg.num_layers)
        index = torch.tensor([column[f] for f in order], device=x.device)

        def gather(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts, dim=1).index_select(1, index)

        conds = [p[3] for p in parts]
        out = self.model(gather([p[1] for p in parts]), gather([p[2] for p in parts]),
                         action=gather([c.action for c in conds]), audio=gather([c.audio for c in conds]),
                         video=gather([c.video for c in conds]), previous=gather([c.previous for c in conds]),
                         stack_level=self.sampler.stack_noise, text=cond.text, mask=mask,
                         frame_positions=torch.tensor(positions, device=x.device))
        return out[:, len(order) - x.shape[1]:]

    def _commit(self, x: torch.Tensor, t: torch.Tensor, cond: ChunkCondition) -> None:
        """Record what enters the context for the no-cache path (the cache commits inside the model)."""
        if self.cache is None:
            self._history.append((self.frames, x.detach(), t.detach(), cond))
        self.frames += x.shape[1]
        self.chunk += 1
        if self.cache is None:  # keep what the next chunk depends on: the sink's chunks and the last windows
            cfg = self.model.config
            lo = receptive_start(self.pattern, self.frames, cfg.window_frames, cfg.num_layers)
            sink_end = sink_chunks_end(self.pattern, cfg.sink_frames)
            self._history = [h for h in self._history if h[0] < sink_end or h[0] + h[1].shape[1] > lo]

    # -- whole chunks -------------------------------------------------------------------------------
    def add_context(self, latents: torch.Tensor, cond: ChunkCondition) -> None:
        """Commit known clean latents (e.g. real frames) as the next chunk, at level 0."""
        self.flush()
        cond = self._committing(cond, latents)
        self._append(latents, cond)
        self._commit(latents, torch.zeros(latents.shape[:2], dtype=latents.dtype, device=latents.device), cond)
        self._push_recent(latents)

    def _append(self, latents: torch.Tensor, cond: ChunkCondition) -> None:
        """Write clean latents into the cache; only the keys and values matter, so skip the velocity."""
        if self.cache is None:
            return
        t0 = torch.zeros(latents.shape[:2], dtype=latents.dtype, device=latents.device)
        if self.guided:
            self._run(torch.cat([latents, latents]), torch.cat([t0, t0]), _doubled(cond), "append", True)
        else:
            self._run(latents, t0, cond, "append", True)

    def flush(self) -> None:
        """Commit a finished chunk whose commit was deferred (``fuse_commit``) with its own pass."""
        if self._deferred is not None:
            latents, cond = self._deferred
            self._append(latents, cond)
            self._deferred = None  # only now: a pass that raised leaves the chunk to commit for the retry

    def generate_chunk(self, noise: torch.Tensor, cond: ChunkCondition, steps: int | None = None,
                       exit_step: int | None = None) -> torch.Tensor:
        """Denoise one chunk from ``noise`` ``[B, n, C, H, W]``, commit it to the context, return x0.

        ``exit_step`` (self-forcing training): stop at that step and take its x0 prediction as the
        chunk. Either way ``exit_input`` then holds the last step's input and level, so training
        can replay that step with gradients (`snapshot` / `restore`, ``cache_mode="readonly"``).
        """
        levels = sampling.chunk_levels(self.sampler, self.chunk, steps)
        if exit_step is not None:
            if not 0 <= exit_step < len(levels) - 1:
                raise ValueError(f"exit_step must be in [0, {len(levels) - 2}] for {len(levels) - 1} steps, "
                                 f"got {exit_step}")
            levels = levels[:exit_step + 1] + [0.0]
        last_step = self.sampler.cache_from == "last_step"
        if last_step and len(levels) == 2:  # the one step that writes the cache would write the noise input
            raise ValueError("cache_from='last_step' needs the chunk to stop after step >= 1 (exit_step >= 1 "
                             "and steps >= 2): at step 0 the keys kept would be those of pure noise")
        given, cond = cond, self._denoising(cond, noise.shape[1])
        x = noise * self.sampler.noise_scale if self.sampler.noise_scale != 1.0 else noise
        for i, (t, t_next) in enumerate(zip(levels[:-1], levels[1:])):
            writes = last_step and i == len(levels) - 2
            mode = "append" if writes else "transient"
            self.exit_input = (x, t)
            # first step after a deferred commit: commit the previous chunk in the same pass
            deferred = self._deferred[0].shape[1] if self._deferred is not None else 0
            v = self._velocity(x, t, cond, mode, commit_frames=deferred)
            if writes:
                ctx_latent, ctx_level = x, torch.full(x.shape[:2], t, dtype=x.dtype, device=x.device)
            x = sampling.step(self.sampler.kind, x, v, t, t_next, self.generator)
        if self.reproject is not None:
            x = self.reproject(x)
        if last_step:  # the cache holds the last step's keys: its input saw the denoising-time previous frames
            self._commit(ctx_latent, ctx_level, cond)
            self._push_recent(x)
        elif self.fuse_commit:
            committed = self._committing(given, x)
            self._deferred = (x, committed)
            self._commit(x, torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device), committed)
            self._push_recent(x)
        else:
            self.add_context(x, given)
        return x

    # -- training support ---------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The context as it stands (cache contents or history, and counters), for `restore`."""
        return {"chunk": self.chunk, "frames": self.frames, "history": list(self._history),
                "deferred": self._deferred, "recent": self._recent,
                "cache": self.cache.snapshot() if self.cache is not None else None}

    def restore(self, snap: dict) -> None:
        self.chunk, self.frames, self._history = snap["chunk"], snap["frames"], list(snap["history"])
        self._deferred, self._recent = snap["deferred"], snap["recent"]
        if self.cache is not None:
            self.cache.restore(snap["cache"])
