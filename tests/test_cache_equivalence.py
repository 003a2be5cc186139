"""Cached generation must equal recomputation, also after the window + sink starts evicting."""

import pytest
import torch

from runtime import ChunkCondition, SamplerConfig
from runtime.rollout import Rollout
from tests.helpers import rollout_latents, tiny_model

PATTERNS = [
    dict(frames_per_chunk=1, window_frames=3, sink_frames=1),  # frame-wise
    dict(frames_per_chunk=3, window_frames=6, sink_frames=3),  # chunk-wise
    dict(frames_per_chunk=2, first_chunk_frames=1, window_frames=4, sink_frames=1),  # short first chunk
    dict(frames_per_chunk=2, window_frames=3, sink_frames=0),  # window only, not chunk-aligned
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=["framewise", "chunkwise", "first1", "nosink"])
@pytest.mark.parametrize("cache_from", ["clean", "last_step"])
def test_cached_rollout_equals_recomputation(pattern, cache_from):
    model = tiny_model(**pattern)
    sampler = SamplerConfig(kind="consistency", steps=2, cache_from=cache_from)
    chunks = 7  # well past the point where sink + window evicts
    frames = pattern.get("first_chunk_frames", pattern["frames_per_chunk"]) + (chunks - 1) * pattern["frames_per_chunk"]
    assert frames > pattern["window_frames"] + pattern["sink_frames"]
    cached = rollout_latents(model, sampler, chunks, kv_cache=True)
    recomputed = rollout_latents(model, sampler, chunks, kv_cache=False)
    assert cached.shape[1] == frames
    assert (cached - recomputed).abs().max().item() <= 1e-4


def test_cached_equals_recomputation_with_euler_and_guidance():
    model = tiny_model(frames_per_chunk=2, window_frames=2, sink_frames=2)
    sampler = SamplerConfig(kind="euler", steps=3, shift=3.0, guidance_scale=2.5)
    cached = rollout_latents(model, sampler, 5, kv_cache=True)
    recomputed = rollout_latents(model, sampler, 5, kv_cache=False)
    assert (cached - recomputed).abs().max().item() <= 1e-4


def test_eviction_changes_the_output():
    """The comparison above is not vacuous: a bigger window gives different frames after eviction."""
    small = tiny_model(frames_per_chunk=1, window_frames=2, sink_frames=1)
    big = tiny_model(frames_per_chunk=1, window_frames=8, sink_frames=1)
    big.load_state_dict(small.state_dict())
    sampler = SamplerConfig(steps=2)
    a = rollout_latents(small, sampler, 6, kv_cache=True)
    b = rollout_latents(big, sampler, 6, kv_cache=True)
    assert (a[:, :3] - b[:, :3]).abs().max() <= 1e-5  # nothing evicted yet
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_block_causal_full_forward_equals_chunkwise_cached_forward():
    model = tiny_model(frames_per_chunk=2, first_chunk_frames=1, window_frames=16, sink_frames=0)
    cfg = model.config
    frames = 7
    torch.manual_seed(0)
    x = torch.randn(1, frames, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    t = torch.rand(1, frames)
    action = torch.rand(1, frames, cfg.actions.dim)
    with torch.no_grad():
        full = model(x, t, action=action, mask=cfg.chunk_pattern.block_causal(frames))
        cache = model.new_cache()
        outs, start, chunk = [], 0, 0
        while start < frames:
            n = cfg.chunk_pattern.chunk_frames(chunk)
            sl = slice(start, start + n)
            outs.append(model(x[:, sl], t[:, sl], action=action[:, sl], cache=cache, cache_mode="append"))
            start, chunk = start + n, chunk + 1
    assert (full - torch.cat(outs, 1)).abs().max() <= 1e-4


def test_teacher_forcing_noisy_half_equals_noisy_chunk_after_clean_prefix():
    model = tiny_model(frames_per_chunk=2, window_frames=16, sink_frames=0)
    cfg, pattern = model.config, model.config.chunk_pattern
    frames = 6
    torch.manual_seed(1)
    clean = torch.randn(1, frames, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    noisy = torch.randn_like(clean)
    t_noisy = torch.rand(1, frames)
    action = torch.rand(1, frames, cfg.actions.dim)
    positions = torch.cat([torch.arange(frames), torch.arange(frames)])
    with torch.no_grad():
        tf = model(torch.cat([clean, noisy], 1), torch.cat([torch.zeros(1, frames), t_noisy], 1),
                   action=torch.cat([action, action], 1), mask=pattern.teacher_forcing(frames),
                   frame_positions=positions)[:, frames:]
        for c in range(pattern.num_chunks(frames)):
            s, n = pattern.chunk_start(c), pattern.chunk_frames(c)
            cache = model.new_cache()
            for p in range(c):  # the clean prefix, chunk by chunk, as inference commits it
                ps = slice(pattern.chunk_start(p), pattern.chunk_start(p) + pattern.chunk_frames(p))
                model(clean[:, ps], torch.zeros(1, pattern.chunk_frames(p)), action=action[:, ps], cache=cache,
                      cache_mode="append")
            sl = slice(s, s + n)
            ref = model(noisy[:, sl], t_noisy[:, sl], action=action[:, sl], cache=cache, cache_mode="transient")
            assert (tf[:, sl] - ref).abs().max() <= 1e-4


def test_readonly_cache_mode_matches_transient_and_keeps_gradients():
    model = tiny_model(frames_per_chunk=2, window_frames=4, sink_frames=1)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    shape = (1, 2, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    cache = model.new_cache()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(shape, generator=gen), torch.zeros(1, 2), cache=cache, cache_mode="append")
    held = cache.frames_held
    x = torch.randn(shape, generator=gen, requires_grad=True)
    t = torch.full((1, 2), 0.5)
    out_ro = model(x, t, cache=cache, cache_mode="readonly")
    out_ro.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        out_tr = model(x, t, cache=cache, cache_mode="transient")
    assert (out_ro - out_tr).abs().max() <= 1e-5
    assert cache.frames_held == held  # neither mode committed anything


def test_cache_modes_commit_only_on_append():
    model = tiny_model()
    cache = model.new_cache()
    cfg = model.config
    x = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    with torch.no_grad():
        model(x, torch.ones(1, 1), cache=cache, cache_mode="transient")
        assert cache.next_frame == 0 and cache.frames_held == 0
        model(x, torch.ones(1, 1), cache=cache, cache_mode="append")
        assert cache.next_frame == 1 and cache.frames_held == 1
        with pytest.raises(ValueError, match="unknown cache mode"):
            model(x, torch.ones(1, 1), cache=cache, cache_mode="bogus")


def test_chunk_condition_unconditional_zeroes_actions_and_audio_but_keeps_video_and_stack():
    """As condition dropout trained it (`training.conditions.null`): keys and audio dropped, the rest kept."""
    c = ChunkCondition(action=torch.ones(1, 2, 3), audio=torch.ones(1, 2, 4), video=torch.ones(1, 2, 5, 2, 2),
                       previous=torch.ones(1, 2, 3, 2, 2))
    u = c.unconditional()
    assert u.action.abs().sum() == 0 and u.audio.abs().sum() == 0
    assert torch.equal(u.video, c.video) and torch.equal(u.previous, c.previous)


def test_cache_only_append_writes_the_same_cache():
    """Committing context with ``cache_only=True`` (no velocity computed) fills the cache exactly as a
    full ``append`` pass does, past eviction; it returns None and refuses modes that need the output."""
    model = tiny_model(frames_per_chunk=2, window_frames=3, sink_frames=1)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    shape = (1, 2, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    full, lean = model.new_cache(), model.new_cache()
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(shape, generator=gen)
            assert model(x, torch.zeros(1, 2), cache=full, cache_mode="append") is not None
            assert model(x, torch.zeros(1, 2), cache=lean, cache_mode="append", cache_only=True) is None
    a, b = full.snapshot(), lean.snapshot()
    assert a["state"] == b["state"]
    assert torch.equal(a["buf"], b["buf"]) and a["buf"].abs().sum() > 0
    with pytest.raises(ValueError, match="cache_only"):
        model(x, torch.zeros(1, 2), cache=full, cache_mode="transient", cache_only=True)


@pytest.mark.parametrize("pattern", PATTERNS + [dict(frames_per_chunk=2, window_frames=2, sink_frames=2)],
                         ids=["framewise", "chunkwise", "first1", "nosink", "sink_then_ring"])
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_fused_commit_equals_separate_commit_pass(pattern, guidance):
    """Committing the finished chunk inside the next chunk's first denoising pass (``fuse_commit``)
    gives the same frames as its own append pass, past eviction, also with guidance and several steps,
    and it really runs fewer model passes."""
    model = tiny_model(**pattern)
    sampler = SamplerConfig(kind="consistency", steps=2, guidance_scale=guidance)
    calls = {"n": 0}
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    separate = rollout_latents(model, sampler, 8, kv_cache=True)
    separate_calls, calls["n"] = calls["n"], 0
    fused = rollout_latents(model, sampler, 8, kv_cache=True, fuse_commit=True)
    hook.remove()
    assert (fused - separate).abs().max().item() <= 1e-5
    assert calls["n"] == separate_calls - 8  # no commit pass of its own for any chunk (the last is still deferred)


def test_fused_commit_is_flushed_before_context_and_snapshots_restore_it():
    """Real context added after a generated chunk lands after it; a snapshot taken while a commit is
    deferred restores it, so the continuation is the same."""
    model = tiny_model(frames_per_chunk=1, window_frames=3, sink_frames=1)
    cfg = model.config
    shape = (1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    outs = []
    for fuse in (False, True):
        gen = torch.Generator().manual_seed(0)
        ro = Rollout(model, SamplerConfig(steps=1), generator=gen, fuse_commit=fuse)
        cond = ChunkCondition(action=torch.ones(1, 1, cfg.actions.dim))
        with torch.no_grad():
            ro.generate_chunk(torch.randn(shape, generator=gen), cond)
            ro.add_context(torch.randn(shape, generator=gen), cond)
            ro.generate_chunk(torch.randn(shape, generator=gen), cond)
            snap = ro.snapshot()
            first = ro.generate_chunk(torch.randn(shape, generator=torch.Generator().manual_seed(5)), cond)
            ro.restore(snap)
            again = ro.generate_chunk(torch.randn(shape, generator=torch.Generator().manual_seed(5)), cond)
        assert torch.equal(first, again)
        outs.append(first)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_fused_commit_falls_back_when_the_window_cannot_hold_a_chunk():
    model = tiny_model(frames_per_chunk=3, window_frames=2, sink_frames=1)
    assert not Rollout(model, SamplerConfig(), fuse_commit=True).fuse_commit
    assert not Rollout(model, SamplerConfig(cache_from="last_step"), fuse_commit=True).fuse_commit
    assert Rollout(tiny_model(frames_per_chunk=2, window_frames=2), SamplerConfig(), fuse_commit=True).fuse_commit


def test_last_step_cache_never_keeps_the_noise_input():
    """cache_from='last_step' keeps the keys of the last step's input: at step 0 that input is pure noise,
    so a one-step chunk (steps=1, a per-call override, or an exit at step 0) is refused."""
    model = tiny_model()
    cfg = model.config
    ro = Rollout(model, SamplerConfig(steps=3, cache_from="last_step"))
    noise = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    with torch.no_grad():
        for kwargs in (dict(exit_step=0), dict(steps=1)):
            with pytest.raises(ValueError, match="last_step.*step >= 1"):
                ro.generate_chunk(noise, ChunkCondition(), **kwargs)
        assert ro.frames == 0 and ro.cache.frames_held == 0
        ro.generate_chunk(noise, ChunkCondition(), exit_step=1)
    assert ro.frames == 1


def test_fused_commit_survives_a_pass_that_raises():
    """The finished chunk waiting for the next pass is not lost when that pass raises half-way (after
    the first block wrote its keys): retrying the chunk gives what an uninterrupted rollout gives."""
    model = tiny_model(frames_per_chunk=1, window_frames=2, sink_frames=1)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    noises = [torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
              for _ in range(5)]
    cond = ChunkCondition(action=torch.ones(1, 1, cfg.actions.dim))

    def run(fail_at: int | None) -> torch.Tensor:
        ro = Rollout(model, SamplerConfig(steps=2), generator=torch.Generator().manual_seed(1), fuse_commit=True)
        block = model.blocks[1]
        out = []
        with torch.no_grad():
            for i, noise in enumerate(noises):
                if i == fail_at:
                    def broken(*args, **kwargs):
                        del block.forward  # raise once, then work again
                        raise RuntimeError("injected failure")
                    block.forward = broken
                    with pytest.raises(RuntimeError, match="injected"):
                        ro.generate_chunk(noise, cond)
                    assert ro._deferred is not None and ro.frames == i
                out.append(ro.generate_chunk(noise, cond))
        return torch.cat(out, 1)

    clean_run = run(None)
    assert (run(3) - clean_run).abs().max().item() <= 1e-6


def test_recompute_reference_keeps_bounded_history_and_work():
    """kv_cache=False keeps only what the next chunk depends on (the sink's chunk and the last
    num_layers windows) and runs a bounded number of frames per call, however long the rollout,
    while still equal to the cache long past eviction and past the point where the sink shifts."""
    model = tiny_model(frames_per_chunk=1, window_frames=2, sink_frames=1)  # 2 layers
    sampler = SamplerConfig(steps=2)
    frames_run, history = [], []
    hook = model.register_forward_pre_hook(lambda _m, args: frames_run.append(args[0].shape[1]))
    gen = torch.Generator().manual_seed(0)
    ro = Rollout(model, sampler, kv_cache=False, generator=gen)
    cfg = model.config
    with torch.no_grad():
        for _ in range(40):
            noise = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
            ro.generate_chunk(noise, ChunkCondition(action=torch.ones(1, 1, cfg.actions.dim)))
            history.append(sum(h[1].shape[1] for h in ro._history))
    hook.remove()
    # sink frame 0, then frames from receptive_start = start - 2 windows: 1 + 4 frames kept
    assert max(history) == history[-1] == 5
    # sink copies (one per shift in the tail) + tail: bounded, the same from frame 10 to frame 40
    assert max(frames_run) == frames_run[-1] == frames_run[20] <= 1 + 5 + 5
    cached = rollout_latents(model, sampler, 40, kv_cache=True)
    recomputed = rollout_latents(model, sampler, 40, kv_cache=False)
    assert (cached - recomputed).abs().max().item() <= 1e-4


def test_sink_is_seen_at_trained_distances_at_frame_10000():
    """A stream 10,000 frames in sees its sink at the same RoPE distance as one just after the window
    filled (the sink reads as if it sat just before the window), so with the same context contents the
    output is the same; before, the query-to-sink distance grew with the frame counter."""
    from runtime.context import sink_shift

    window, sink, late = 2, 1, 10_000
    assert sink_shift(6, window, sink) == 3 and sink_shift(late + 6, window, sink) == late + 3
    assert sink_shift(3, window, sink) == 0  # the window still touches the sink: true positions
    model = tiny_model(num_layers=1, frames_per_chunk=1, window_frames=window, sink_frames=sink)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    action = (torch.rand(1, 7, cfg.actions.dim, generator=gen) > 0.5).float()

    def frame6(skip: int) -> torch.Tensor:
        """Commit frame 0 (the sink), let ``skip`` frames pass, commit frames 1-5, denoise frame 6."""
        cache = model.new_cache()
        with torch.no_grad():
            for f in range(6):
                model(x[:, f:f + 1], torch.zeros(1, 1), action=action[:, f:f + 1], cache=cache, cache_mode="append")
                if f == 0:
                    cache.next_frame += skip  # frames evicted long ago: only the sink and the ring remain
            assert cache.next_frame == 6 + skip and cache.frames_held == sink + window
            return model(x[:, 6:], torch.full((1, 1), 0.7), action=action[:, 6:], cache=cache)

    short, long = frame6(0), frame6(late)
    # one layer: keys depend on their own frame and position only, so the contexts hold the same keys
    assert (short - long).abs().max().item() <= 1e-5
    assert (short - frame6(1)).abs().max().item() <= 1e-5  # any gap: the same distances
