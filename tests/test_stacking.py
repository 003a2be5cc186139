"""Frame stacking: previous clean latents on the channel axis, the same in training and in a session."""

import pytest
import torch

from runtime import ChunkCondition, ModelConfig, SamplerConfig
from runtime.rollout import Rollout
from runtime.stacking import chunk_previous, next_previous, noised, noised_at, previous_frames
from tests.helpers import rollout_latents, tiny_model
from training.students.common import tf_velocity
from training.teacher import sample_clip


def _frames(n: int, c: int = 1) -> torch.Tensor:
    """[1, n, c, 1, 1] whose frame f holds the value f + 1 (0 is the zero padding)."""
    return (torch.arange(n, dtype=torch.float32) + 1).view(1, n, 1, 1, 1).expand(1, n, c, 1, 1).contiguous()


def test_previous_frames_are_the_frames_before_newest_first_zeros_before_the_first():
    prev = previous_frames(_frames(4), 2)  # [1, 4, 2, 1, 1]
    assert prev[0, :, :, 0, 0].tolist() == [[0, 0], [1, 0], [2, 1], [3, 2]]
    before = torch.full((1, 1, 1, 1, 1), 9.0)
    assert previous_frames(_frames(2), 2, before)[0, :, :, 0, 0].tolist() == [[9, 0], [1, 9]]
    assert next_previous(_frames(3), 2)[0, 0, :, 0, 0].tolist() == [3, 2]


def test_chunk_previous_gives_every_frame_of_a_chunk_the_frames_before_the_chunk():
    model = tiny_model(frames_per_chunk=2, first_chunk_frames=1)
    prev = chunk_previous(previous_frames(_frames(5), 1), model.config.chunk_pattern)
    assert prev[0, :, 0, 0, 0].tolist() == [0, 1, 1, 3, 3]  # chunks [0] [1 2] [3 4]


def test_noised_mixes_each_clip_with_noise_up_to_the_level():
    prev = torch.ones(64, 2, 3, 4, 4)
    out, level = noised(prev, 0.5, torch.Generator().manual_seed(0))
    levels = 1 - out.mean(dim=(1, 2, 3, 4))   # noise has mean ~0: the clean share is 1 - level
    assert levels.min() > -0.1 and levels.max() < 0.6 and levels.std() > 0.05
    assert level.shape == (64,) and 0 <= level.min() and level.max() <= 0.5
    assert (levels - level).abs().max() < 0.1   # the level it reports is the level it mixed in
    same, zero = noised(prev, 0.0, torch.Generator())
    assert torch.equal(same, prev) and not zero.any()


def test_added_stack_noise_keeps_the_frame_as_its_mean_where_mixed_noise_shrinks_it():
    prev = torch.full((256, 1, 3, 8, 8), 2.0)
    added, _ = noised(prev, 0.5, torch.Generator().manual_seed(0), "add")
    mixed, _ = noised(prev, 0.5, torch.Generator().manual_seed(0), "mix")
    assert abs(added.mean().item() - 2.0) < 0.02          # unbiased: nothing to learn that scales the frame up
    assert mixed.mean().item() < 1.7                       # shrunk by about 1 - E[level] = 0.75
    assert (added - prev).std() > 0.1
    at = noised_at(prev, 0.3, torch.Generator().manual_seed(1), "add")
    assert abs(at.mean().item() - 2.0) < 0.02 and abs((at - prev).std().item() - 0.3) < 0.02
    with pytest.raises(ValueError, match="stack_noise_form"):
        ModelConfig(stack_frames=1, stack_noise_form="multiply")


def test_a_level_conditioned_model_reads_the_stack_noise_level_and_starts_level_blind():
    with pytest.raises(ValueError, match="stack_noise_condition needs stack_frames"):
        ModelConfig(stack_noise_condition=True)
    blind = tiny_model(stack_frames=1)
    told = tiny_model(stack_frames=1, stack_noise_condition=True)
    told.load_state_dict(blind.state_dict(), strict=False)     # the same weights but the level's embedder
    cfg = told.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    prev = torch.randn(2, 3, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    t = torch.rand(2, 3, generator=gen)
    with torch.no_grad():
        ref = blind(x, t, previous=prev)
        # fresh: the level's embedding starts at zero, so the model is the level-blind one at any level
        assert (told(x, t, previous=prev, stack_level=0.3) - ref).abs().max() <= 1e-6
        torch.nn.init.normal_(told.condition_embedder.stack_level_embedder.linear_2.weight)
        at0, none = told(x, t, previous=prev, stack_level=0.0), told(x, t, previous=prev)
        per_clip = told(x, t, previous=prev, stack_level=torch.tensor([0.0, 0.3]))
        at3 = told(x, t, previous=prev, stack_level=0.3)
    assert torch.equal(at0, none)                             # None is level 0: a clean stacked frame
    assert (at0 - at3).abs().max() > 1e-3                     # trained, the level changes the prediction
    assert torch.allclose(per_clip[0], at0[0], atol=1e-6) and torch.allclose(per_clip[1], at3[1], atol=1e-6)


def test_a_session_tells_a_level_conditioned_model_the_inference_stack_noise():
    model = tiny_model(stack_frames=1, stack_noise_condition=True, frames_per_chunk=1, window_frames=3,
                       sink_frames=1)
    torch.nn.init.normal_(model.condition_embedder.stack_level_embedder.linear_2.weight)
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stack_level"))
        return forward(*args, **kwargs)

    model.forward = spy
    noisy = SamplerConfig(kind="consistency", steps=2, stack_noise=0.2)
    cached = rollout_latents(model, noisy, 4, kv_cache=True)
    assert seen and all(level == 0.2 for level in seen)
    assert (cached - rollout_latents(model, noisy, 4, kv_cache=False)).abs().max() <= 1e-4


def test_teacher_training_tells_the_model_the_level():
    from training.teacher import stacked, stacked_noised

    model = tiny_model(stack_frames=1, stack_noise_condition=True)
    cfg = model.config
    x0 = torch.randn(8, 3, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    previous, level = stacked_noised(model, x0, torch.Generator().manual_seed(0), 0.3)
    assert level.shape == (8,) and 0 <= level.min() and level.max() <= 0.3 and level.std() > 0
    assert (previous - previous_frames(x0, 1)).abs().max() > 0
    assert stacked_noised(model, x0)[1] is None
    assert torch.equal(stacked(model, x0), previous_frames(x0, 1))


def test_students_tell_a_told_model_the_stacked_frames_level():
    """dCM (and the causal stage) noise the stacked frames of a told model and tell it each clip's level
    under teacher forcing, as the teacher was trained; level 0 is the clean, untold case."""
    from training.students.dcm import DCMConfig, dcm_loss

    torch.manual_seed(0)
    model = tiny_model(stack_frames=1, stack_noise_condition=True)
    torch.nn.init.normal_(model.condition_embedder.stack_level_embedder.linear_2.weight, std=0.5)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 3, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    noisy, t = torch.randn(clean.shape, generator=gen), torch.rand(2, 3, generator=gen)
    action = torch.rand(2, 3, cfg.actions.dim, generator=gen)
    with torch.no_grad():
        untold = tf_velocity(model, clean, noisy, t, action)
        assert torch.allclose(tf_velocity(model, clean, noisy, t, action, stack_level=torch.zeros(2)), untold)
        told = tf_velocity(model, clean, noisy, t, action, stack_level=torch.full((2,), 0.3))
        assert (told - untold).abs().max() > 1e-3
    seen = []
    forward = model.forward
    model.forward = lambda *a, **k: seen.append(k.get("stack_level")) or forward(*a, **k)
    with torch.no_grad():
        dcm_loss(model, model, model, clean, action, DCMConfig(stack_noise=0.3), 1.0, gen)
    assert len(seen) == 3 and all(level is not None and level.shape == (2,) for level in seen)
    assert torch.equal(seen[0], seen[2]) and 0 < seen[0].max() <= 0.3


PATTERNS = [dict(frames_per_chunk=1, window_frames=3, sink_frames=1),
            dict(frames_per_chunk=3, window_frames=6, sink_frames=3),
            dict(frames_per_chunk=2, first_chunk_frames=1, window_frames=4, sink_frames=1)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=["framewise", "chunkwise", "first1"])
@pytest.mark.parametrize("cache_from", ["clean", "last_step"])
@pytest.mark.parametrize("stack", [1, 2])
def test_stacking_rollout_cached_fused_and_recomputed_agree(pattern, cache_from, stack):
    model = tiny_model(stack_frames=stack, **pattern)
    sampler = SamplerConfig(kind="consistency", steps=2, cache_from=cache_from)
    cached = rollout_latents(model, sampler, 6, kv_cache=True)
    assert (cached - rollout_latents(model, sampler, 6, kv_cache=False)).abs().max() <= 1e-4
    assert (cached - rollout_latents(model, sampler, 6, kv_cache=True, fuse_commit=True)).abs().max() <= 1e-4


def test_stacked_frames_change_what_the_model_generates():
    """The stacked channels are read: a rollout differs when only its previous frames differ."""
    model = tiny_model(stack_frames=1, frames_per_chunk=1, window_frames=3, sink_frames=0)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    noise = torch.randn_like(ctx)
    act = ChunkCondition(action=torch.zeros(1, 1, cfg.actions.dim))
    outs = []
    for last in (ctx, -ctx):
        ro = Rollout(model, SamplerConfig(steps=1), kv_cache=True)
        with torch.no_grad():
            ro.add_context(last, act)
            outs.append(ro.velocity(noise, 1.0, act))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", [dict(frames_per_chunk=1), dict(frames_per_chunk=2, first_chunk_frames=1)],
                         ids=["framewise", "first1"])
def test_teacher_forcing_with_stacking_equals_the_session_context(pattern):
    """Training's [clean | noisy] pass gives each noisy chunk what a rollout shows it after the clean
    chunks before it were committed: the same keys and the same stacked previous frames."""
    model = tiny_model(stack_frames=2, window_frames=16, sink_frames=0, **pattern)
    cfg, pat = model.config, model.config.chunk_pattern
    frames = 5
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(1, frames, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    noisy = torch.randn(clean.shape, generator=gen)
    t = torch.rand(1, frames, generator=gen)
    action = torch.rand(1, frames, cfg.actions.dim, generator=gen)
    with torch.no_grad():
        tf = tf_velocity(model, clean, noisy, t, action)
        for c in range(pat.num_chunks(frames)):
            s, n = pat.chunk_start(c), pat.chunk_frames(c)
            ro = Rollout(model, SamplerConfig(steps=1), kv_cache=True)
            for p in range(c):
                ps = slice(pat.chunk_start(p), pat.chunk_start(p) + pat.chunk_frames(p))
                ro.add_context(clean[:, ps], ChunkCondition(action=action[:, ps]))
            sl = slice(s, s + n)
            ref = ro.velocity(noisy[:, sl], t[:, sl], ChunkCondition(action=action[:, sl]))
            assert (tf[:, sl] - ref).abs().max() <= 1e-4


def test_model_refuses_a_missing_or_misshapen_previous():
    model = tiny_model(stack_frames=1)
    cfg = model.config
    x = torch.randn(1, 2, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    with pytest.raises(ValueError, match="stacks 1 previous frame"):
        model(x, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="stacks 1 previous frame"):
        model(x, torch.zeros(1, 2), previous=torch.zeros(1, 2, 2 * cfg.in_channels, cfg.latent_height,
                                                          cfg.latent_width))


def test_stacking_teacher_samples_frame_by_frame():
    """A frame's past must exist before it is generated: the first new frame does not depend on how
    many frames come after it (whole-clip bidirectional sampling would mix them)."""
    model = tiny_model(stack_frames=1, window_frames=8, sink_frames=0).eval()
    cfg = model.config
    ctx = torch.randn(1, 2, cfg.in_channels, cfg.latent_height, cfg.latent_width,
                      generator=torch.Generator().manual_seed(0))
    cond = torch.rand(1, 5, cfg.actions.dim, generator=torch.Generator().manual_seed(1))
    one = sample_clip(model, ctx, cond[:, :3], steps=3, generator=torch.Generator().manual_seed(2))
    three = sample_clip(model, ctx, cond, steps=3, generator=torch.Generator().manual_seed(2))
    assert one.shape[1] == 1 and three.shape[1] == 3
    assert (one[:, 0] - three[:, 0]).abs().max() <= 1e-5


def test_inference_stack_noise_is_checked_applied_and_the_same_cached_fused_or_recomputed():
    with pytest.raises(ValueError, match="stack_noise"):
        SamplerConfig(stack_noise=1.0)
    model = tiny_model(stack_frames=1, frames_per_chunk=1, window_frames=3, sink_frames=1)
    noisy = SamplerConfig(kind="consistency", steps=2, stack_noise=0.2)
    cached = rollout_latents(model, noisy, 5, kv_cache=True)
    assert (cached - rollout_latents(model, noisy, 5, kv_cache=False)).abs().max() <= 1e-4
    assert (cached - rollout_latents(model, noisy, 5, kv_cache=True, fuse_commit=True)).abs().max() <= 1e-4
    clean = rollout_latents(model, SamplerConfig(kind="consistency", steps=2), 5, kv_cache=True)
    assert (cached - clean).abs().max() > 1e-3


def test_ship_sets_the_inference_stack_noise_of_a_stacking_bundle_only(tmp_path):
    from runtime import Bundle
    from training.ship import ship

    Bundle.random(tiny_model().config, seed=0).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="stacks no frames"):
        ship(tmp_path / "plain", tmp_path / "out", stack_noise=0.1)
    from runtime.config import ModelConfig

    Bundle.random(ModelConfig.tiny(stack_frames=1), seed=0).save(tmp_path / "stacked")
    assert Bundle.load(ship(tmp_path / "stacked", tmp_path / "out", stack_noise=0.1)).sampler.stack_noise == 0.1


def test_noise_scale_is_a_sampling_temperature_that_ship_writes(tmp_path):
    from runtime import Bundle
    from training.ship import ship

    model = tiny_model()
    zero = SamplerConfig(kind="consistency", steps=1, noise_scale=0.0)
    one = SamplerConfig(kind="consistency", steps=1)
    # no noise: the stream no longer depends on the noise drawn, only on the actions and the context
    assert torch.equal(rollout_latents(model, zero, 3, kv_cache=True, seed=0),
                       rollout_latents(model, zero, 3, kv_cache=True, seed=5))
    assert not torch.equal(rollout_latents(model, one, 3, kv_cache=True, seed=0),
                           rollout_latents(model, one, 3, kv_cache=True, seed=5))
    with pytest.raises(ValueError, match="noise_scale"):
        SamplerConfig(noise_scale=1.5)
    Bundle.random(model.config, seed=0).save(tmp_path / "b")
    assert Bundle.load(ship(tmp_path / "b", tmp_path / "out", noise_scale=0.5)).sampler.noise_scale == 0.5
