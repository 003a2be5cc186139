"""The student recipe on a tiny model and tiny synthetic latents: causal teacher, dCM, sCM, SF-DMD."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

import runtime.rollout
from runtime import Bundle, ChunkCondition, ModelConfig, open_session
from runtime.chunks import ChunkPattern
from training.latents import synthetic_latents
from training.students.causal import CausalConfig, train_causal
from training.students.common import check_clip, tf_velocity
from training.students.dcm import DCMConfig, dcm_loss, train_dcm
from training.students.dmd import (
    DMDConfig,
    critic_loss,
    dmd_gradient,
    dmd_surrogate,
    replay_exit_step,
    score_window_start,
    score_x0,
    self_forcing_rollout,
    train_dmd,
)
from training.students.scm import SCMConfig, train_scm, velocity_and_time_derivative

CLIP = 4
FAST = dict(batch=4, clip_frames=CLIP, log_every=2, eval_every=10, warmup=2)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.tiny(**{"window_frames": 3, "sink_frames": 0, **overrides})


def losses(out, key="loss"):
    return [r[key] for r in json.loads((out / "metrics.json").read_text())["train"]]


def mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def clips():
    return synthetic_latents(6, 12, (3, 8, 8), tiny_config().actions.dim, seed=0)


@pytest.fixture(scope="module")
def teacher():
    """A bidirectional 'teacher' bundle (random weights: the recipe's mechanics do not need a good one)."""
    b = Bundle.random(tiny_config(), seed=0)
    b.sampler.guidance_scale = 1.5
    return b


@pytest.fixture(scope="module")
def causal(tmp_path_factory, teacher, clips):
    out = tmp_path_factory.mktemp("causal")
    summary = train_causal(teacher, clips, CausalConfig(out=str(out), steps=60, lr=2e-3, **FAST), progress=False)
    return out, summary, Bundle.load(summary["bundle"])


@pytest.fixture(scope="module")
def dcm(tmp_path_factory, causal, clips):
    out = tmp_path_factory.mktemp("dcm")
    summary = train_dcm(causal[2], clips, DCMConfig(out=str(out), steps=30, lr=1e-3, intervals=8, **FAST),
                        progress=False)
    return out, summary, Bundle.load(summary["bundle"])


def test_check_clip_rejects_teacher_forcing_contexts_a_session_never_shows():
    """Noisy chunk c sees every clean frame before it; a session shows it sink + window of them."""
    from runtime.model import CausalDiT

    # first chunk 3, then 1, window 2, no sink: the last noisy frame (4) would see clean 0..3, a session
    # shows it frames 2..3 only (the old bound, sink + window + longest chunk = 5, let it pass)
    model = CausalDiT(tiny_config(frames_per_chunk=1, first_chunk_frames=3, window_frames=2, sink_frames=0))
    with pytest.raises(ValueError, match="clip_frames 5: its last chunk .* sees 4 clean frames"):
        check_clip(model, 5)
    with pytest.raises(ValueError, match="clip_frames 4: its last chunk .* sees 3 clean frames"):
        check_clip(model, 4)
    check_clip(model, 3)  # the first chunk alone sees no context
    model = CausalDiT(tiny_config(frames_per_chunk=2, window_frames=2, sink_frames=1))
    check_clip(model, 4)  # chunk 1 starts at frame 2: 2 clean frames <= sink 1 + window 2
    with pytest.raises(ValueError, match="clip_frames 6"):
        check_clip(model, 6)  # chunk 2 starts at frame 4: 4 clean frames, a session holds 3
    with pytest.raises(ValueError, match="chunk boundary"):
        check_clip(model, 3)


# -- stage 1 ----------------------------------------------------------------------------------------
def test_causal_teacher_loss_decreases(causal):
    out, summary, _ = causal
    first, last = losses(out)[:3], losses(out)[-3:]
    assert mean(last) < 0.9 * mean(first)
    assert summary["step"] == 60


def test_tf_forward_is_the_runtime_mask_and_equals_cached_inference(monkeypatch):
    """tf_velocity asks the model's ChunkPattern for its teacher-forcing mask, and equals a session-style
    chunk-by-chunk cached pass: denoise chunk c after committing the clean chunks before it."""
    calls = []
    original = ChunkPattern.teacher_forcing

    def counting(self, frames):
        calls.append(frames)
        return original(self, frames)

    monkeypatch.setattr(ChunkPattern, "teacher_forcing", counting)
    torch.manual_seed(0)
    from runtime.model import CausalDiT

    model = CausalDiT(tiny_config(frames_per_chunk=2, window_frames=8)).eval()
    f = 6
    clean, noisy = torch.randn(2, f, 3, 8, 8), torch.randn(2, f, 3, 8, 8)
    t, action = torch.rand(2, f), torch.rand(2, f, model.config.actions.dim)
    with torch.no_grad():
        v = tf_velocity(model, clean, noisy, t, action)
        ro = runtime.rollout.Rollout(model, __import__("runtime").SamplerConfig(), batch=2)
        for c in range(3):
            sl = slice(2 * c, 2 * c + 2)
            ref = ro.velocity(noisy[:, sl], t[:, sl], ChunkCondition(action=action[:, sl]))
            assert (v[:, sl] - ref).abs().max() < 1e-4
            ro.add_context(clean[:, sl], ChunkCondition(action=action[:, sl]))
    assert calls == [f]


def test_diffusion_forcing_draws_a_level_per_chunk(teacher):
    from runtime.model import CausalDiT
    from training.students.common import chunk_noise_levels

    model = CausalDiT(tiny_config(frames_per_chunk=2))
    t = chunk_noise_levels(model, 3, 6, torch.Generator().manual_seed(0), independent=True)
    assert torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 2], t[:, 3])
    assert not torch.equal(t[:, 1], t[:, 2])
    shared = chunk_noise_levels(model, 3, 6, torch.Generator().manual_seed(0), independent=False)
    assert torch.equal(shared, shared[:, :1].expand(3, 6))


def test_stage_resume_is_exact(tmp_path, teacher, clips):
    once = train_causal(teacher, clips, CausalConfig(out=str(tmp_path / "a"), steps=6, **FAST), progress=False)
    train_causal(teacher, clips, CausalConfig(out=str(tmp_path / "b"), steps=3, **FAST), progress=False)
    twice = train_causal(teacher, clips, CausalConfig(out=str(tmp_path / "b"), steps=6, **FAST), progress=False)
    assert twice["steps_this_run"] == 3 and twice["step"] == 6
    a, b = Bundle.load(once["bundle"]).model.state_dict(), Bundle.load(twice["bundle"]).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- stage 2 ----------------------------------------------------------------------------------------
def test_dcm_loss_decreases(dcm):
    out, summary, bundle = dcm
    first, last = losses(out)[:3], losses(out)[-3:]
    assert mean(last) < mean(first)
    assert bundle.sampler.kind == "consistency" and bundle.sampler.steps == 2


def test_dcm_target_is_the_teacher_step_at_the_first_interval(causal, clips):
    """At n = 1 the target is f(x_{t_0}, 0) = the teacher's one-step denoise: a student equal to the
    teacher's x0 prediction there has zero loss on that interval."""
    teacher = causal[2].model
    cfg = DCMConfig(intervals=1, guidance_scale=1.0)
    x0, action = clips.sample(2, CLIP, torch.Generator().manual_seed(0))
    loss = dcm_loss(teacher, teacher, teacher, x0, action, cfg, 1.0, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_dcm_stack_noise_reaches_every_model_of_a_stacking_student(clips):
    """With ``stack_noise`` the student, its target and the teacher all see the same noised stacked frame
    (so a student equal to the teacher still has zero loss at the first interval); without stacking it is
    a no-op."""
    stacking = Bundle.random(tiny_config(stack_frames=1), seed=0).model
    x0, action = clips.sample(2, CLIP, torch.Generator().manual_seed(0))

    def loss(model, noise, intervals=4, student=None):
        cfg = DCMConfig(intervals=intervals, guidance_scale=1.0, stack_noise=noise)
        return dcm_loss(student or model, model, model, x0, action, cfg, 1.0, torch.Generator().manual_seed(0))

    assert loss(stacking, 0.3, intervals=1).item() < 1e-8
    assert loss(stacking, 0.3).item() != loss(stacking, 0.0).item()
    plain = Bundle.random(tiny_config(), seed=0).model
    assert loss(plain, 0.3).item() == loss(plain, 0.0).item()


# -- stage 3 ----------------------------------------------------------------------------------------
def test_model_jvp_equals_finite_difference(clips):
    """torch.func.jvp through the whole model (teacher-forcing mask, attention, adaLN) against a central
    difference. timestep_scale=1 keeps the time features smooth enough for a float32 difference."""
    from runtime.model import CausalDiT

    torch.manual_seed(0)
    model = CausalDiT(tiny_config(timestep_scale=1.0)).eval()
    x0, action = clips.sample(2, CLIP, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(x0.shape, generator=gen)
    t = torch.rand(2, CLIP, generator=gen) * 0.8 + 0.1
    dx = torch.randn(x0.shape, generator=gen)
    v, dv = velocity_and_time_derivative(model, x0, x_t, t, action, dx)
    eps = 1e-3
    with torch.no_grad():
        plus = tf_velocity(model, x0, x_t + eps * dx, t + eps, action)
        minus = tf_velocity(model, x0, x_t - eps * dx, t - eps, action)
        assert torch.allclose(v, tf_velocity(model, x0, x_t, t, action), atol=1e-5)
    fd = (plus - minus) / (2 * eps)
    assert dv.norm() > 1e-2 * v.norm()  # not vacuous
    assert (dv - fd).norm() < 1e-3 * dv.norm()
    wrong = velocity_and_time_derivative(model, x0, x_t, t, action, torch.zeros_like(dx))[1]
    assert (wrong - fd).norm() > 1e-2 * dv.norm()  # the x tangent matters: the check can fail


def test_scm_reduces_the_consistency_gap(tmp_path, clips):
    """sCM's loss value is ~1 by construction (normalised tangent): what it drives down is |df/dt|, the
    limit of the discrete consistency gap |f(x_t, t) - f(x_{t-Δ}, t-Δ)|² / Δ² along the teacher's ODE,
    measured here by the dCM loss (student as its own target, Δ = 1/64) on fixed clips and noise.
    The model uses timestep_scale=1: with Wan's 1000, df/dt is dominated by the high-frequency time
    features and the continuous objective is ill-conditioned (docs/students.md shows both)."""
    base = Bundle.random(tiny_config(timestep_scale=1.0), seed=0)
    base.sampler.guidance_scale = 1.5
    teacher = Bundle.load(train_causal(base, clips, CausalConfig(out=str(tmp_path / "c"), steps=60, lr=2e-3, **FAST),
                                       progress=False)["bundle"])
    probe = DCMConfig(intervals=64)
    x0, action = clips.sample(8, CLIP, torch.Generator().manual_seed(5))

    def gap(model):
        with torch.no_grad():
            return dcm_loss(model, model, teacher.model, x0, action, probe, 1.5, torch.Generator().manual_seed(6))

    summary = train_scm(teacher, clips, SCMConfig(out=str(tmp_path / "s"), steps=30, lr=1e-3, tangent_warmup=10,
                                                  **FAST), progress=False)
    student = Bundle.load(summary["bundle"]).model
    assert gap(student).item() < 0.6 * gap(teacher.model).item()
    assert all(math.isfinite(x) for x in losses(tmp_path / "s", "tangent_rms"))


# -- stage 4 ----------------------------------------------------------------------------------------
def gaussian_x0(x_t: torch.Tensor, t: float, m: float, s: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(m, s²), x_t = (1 - t) x0 + t ε."""
    a = 1 - t
    return m + a * s**2 / (a**2 * s**2 + t**2) * (x_t - a * m)


def test_dmd_gradient_moves_a_1d_student_to_the_teacher_distribution():
    """Real data N(2, 0.5²); the student generates μ + 0.5 z, starting at μ = -1. With exact real and
    fake denoisers, descending the DMD surrogate must carry μ to 2 (and not away from it)."""
    torch.manual_seed(0)
    mu = torch.tensor(-1.0, requires_grad=True)
    opt = torch.optim.SGD([mu], lr=0.05)
    trace = []
    for _ in range(300):
        x0 = mu + 0.5 * torch.randn(256, 1)
        t = float(torch.rand(()) * 0.9 + 0.05)
        x_t = (1 - t) * x0.detach() + t * torch.randn_like(x0)
        grad = dmd_gradient(x0.detach(), gaussian_x0(x_t, t, 2.0, 0.5), gaussian_x0(x_t, t, mu.item(), 0.5))
        opt.zero_grad()
        dmd_surrogate(x0, grad, x0.numel()).backward()
        opt.step()
        trace.append(mu.item())
    assert trace[10] > -1.0  # first steps already go the right way
    assert abs(trace[-1] - 2.0) < 0.1


@pytest.mark.parametrize("cache_from", ["clean", "last_step"])
def test_self_forcing_replay_equals_the_rollout_and_carries_gradients(dcm, clips, cache_from):
    model = dcm[2].model
    sampler = __import__("runtime").SamplerConfig(kind="consistency", steps=3, cache_from=cache_from)
    ro = runtime.rollout.Rollout(model, sampler, batch=2)
    x, action = clips.sample(2, 9, torch.Generator().manual_seed(3))  # past the window: the ring evicts
    clip, records = self_forcing_rollout(ro, x[:, :1], action, 8, torch.Generator().manual_seed(4))
    assert len(records) == 8 and torch.equal(clip[:, :1], x[:, :1])
    exits = set()
    for rec in records:
        out = replay_exit_step(ro, rec)
        exits.add(rec.exit_input[1])
        assert (out - clip[:, rec.frames]).abs().max() < 1e-5
        assert out.requires_grad
        held = ro.cache.frames_held
        out.square().mean().backward()
        assert ro.cache.frames_held == held
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    assert len(exits) > 1  # random exit steps


def test_dmd_trains_through_the_runtime_rollout(tmp_path, monkeypatch, dcm, teacher, clips):
    """The rollouts are `runtime.rollout.Rollout.generate_chunk` calls (the session's code), the critic
    learns (its loss falls), and the bundle records the cache recipe trained with."""
    calls = []
    original = runtime.rollout.Rollout.generate_chunk

    def counting(self, *args, **kwargs):
        assert type(self) is runtime.rollout.Rollout
        calls.append(kwargs.get("exit_step"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(runtime.rollout.Rollout, "generate_chunk", counting)
    cfg = DMDConfig(out=str(tmp_path), steps=24, lr=1e-4, critic_lr=2e-3, critic_steps=2, cache_from="last_step",
                    **{**FAST, "eval_every": 100})
    summary = train_dmd(dcm[2], teacher, clips, cfg, progress=False)
    trained = [c for c in calls if c is not None]
    assert len(trained) == 24 * (CLIP - 1)  # one call per generated chunk, each with an exit step
    # The fake score learns the student's rollouts: its flow-matching loss on fixed rollouts of the final
    # student (fixed noise, averaged over levels) is below the loss of its initialisation, the teacher.
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    student, critic = copy.deepcopy(dcm[2].model), copy.deepcopy(teacher.model)
    student.load_state_dict(ckpt["modules"]["generator"])
    ro = runtime.rollout.Rollout(student, bundle_sampler(tmp_path), batch=8)
    x, action = clips.sample(8, CLIP, torch.Generator().manual_seed(8))
    rollout, _ = self_forcing_rollout(ro, x[:, :1], action, CLIP - 1, torch.Generator().manual_seed(9))

    def fake_score_loss(model):
        gen = torch.Generator().manual_seed(10)
        with torch.no_grad():
            return mean([critic_loss(model, rollout, 1, action, cfg, gen).item() for _ in range(8)])

    before = fake_score_loss(critic)
    critic.load_state_dict(ckpt["modules"]["critic"])
    assert fake_score_loss(critic) < 0.95 * before
    bundle = Bundle.load(summary["bundle"])
    assert bundle.sampler.cache_from == "last_step" and bundle.extra["stage"] == "dmd"


def test_long_rollouts_are_scored_in_chunk_aligned_windows(tmp_path, monkeypatch, dcm, teacher, clips):
    """Self-Forcing++-style: a rollout longer than the teacher's clip is scored on one random window;
    only the window's generated chunks are replayed, and the windows move over the rollout."""
    import training.students.dmd as dmd

    replayed, original = [], dmd.replay_exit_step

    def recording(rollout, record):
        replayed.append((record.frames.start, record.frames.stop))
        return original(rollout, record)

    monkeypatch.setattr(dmd, "replay_exit_step", recording)
    snapshots, snapshot = [], runtime.rollout.Rollout.snapshot

    def counting_snapshot(self):
        snapshots.append(1)
        return snapshot(self)

    monkeypatch.setattr(runtime.rollout.Rollout, "snapshot", counting_snapshot)
    steps, chunks = 6, 2 * CLIP - 1     # 2 * CLIP frames per rollout, windows of CLIP frames
    cfg = DMDConfig(out=str(tmp_path), steps=steps, lr=1e-4, critic_steps=1, rollout_chunks=chunks,
                    **{**FAST, "eval_every": 100})
    train_dmd(dcm[2], teacher, clips, cfg, progress=False)
    # a copy of the context is kept for the scored window's chunks only, not for every rollout chunk
    assert len(snapshots) == len(replayed) == steps * (CLIP - 1) < steps * chunks
    per_step = [replayed[i:i + CLIP - 1] for i in range(0, len(replayed), CLIP - 1)]
    assert len(per_step) == steps and all(len(s) == CLIP - 1 for s in per_step)
    firsts = set()
    for frames in per_step:   # consecutive frame-wise chunks after one context frame of the window
        assert [a for a, _ in frames] == list(range(frames[0][0], frames[0][0] + CLIP - 1))
        assert 1 <= frames[0][0] and frames[-1][1] <= 2 * CLIP
        firsts.add(frames[0][0])
    assert len(firsts) > 1
    gen = torch.Generator().manual_seed(0)
    starts = {score_window_start(ChunkPattern(frames_per_chunk=2), 10, 6, 2, gen) for _ in range(50)}
    assert starts == {0, 2, 4}   # chunk-aligned windows of 6 frames (context 2) inside 10
    ragged = ChunkPattern(frames_per_chunk=2, first_chunk_frames=1)   # boundaries 0, 1, 3, 5, 7, 9
    assert {score_window_start(ragged, 9, 5, 1, gen) for _ in range(20)} == {0}
    assert score_window_start(ChunkPattern(frames_per_chunk=1), 5, 5, 1, gen) == 0


def test_causal_real_score_is_causal_and_trains(tmp_path, dcm, causal, clips):
    """``real_score="causal"`` scores each noisy frame from the clean frames before it only (teacher
    forcing), and a DMD run with the causal teacher as real score and critic writes its bundle."""
    model = causal[2].model
    clip, action = clips.sample(2, CLIP, torch.Generator().manual_seed(1))
    t = torch.full((2, CLIP), 0.5)
    x_t = clip + 0.5 * torch.randn_like(clip)
    with torch.no_grad():
        a = score_x0(model, clip, x_t, t, action, 1.5, "causal")
        later = clip.clone()
        later[:, 2:] += 1.0          # change the clean frames from 2 on
        b = score_x0(model, later, x_t, t, action, 1.5, "causal")
        c = score_x0(model, clip, x_t, t, action, 1.5, "bidirectional")
    torch.testing.assert_close(a[:, :3], b[:, :3])          # frames 0..2 see clean frames < 2 only
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="real_score"):
        score_x0(model, clip, x_t, t, action, 1.0, "sideways")
    cfg = DMDConfig(out=str(tmp_path), steps=3, lr=1e-4, critic_steps=1, real_score="causal",
                    **{**FAST, "eval_every": 100})
    summary = train_dmd(dcm[2], causal[2], clips, cfg, progress=False)
    bundle = Bundle.load(summary["bundle"])
    assert bundle.extra["dmd_config"]["real_score"] == "causal" and "causal teacher" in bundle.card


def bundle_sampler(out):
    return Bundle.load(out / "bundle").sampler


# -- bundles ----------------------------------------------------------------------------------------
def test_every_stage_bundle_plays_in_a_session(causal, dcm):
    for _, summary, _ in (causal, dcm):
        session = open_session(summary["bundle"], steps=2)
        frames = [session.step(action=["forward"]) for _ in range(CLIP + 1)]
        assert frames[0].dtype.name == "uint8" and frames[0].shape == (1, 8, 8, 3)
        assert session.stats()["kv_cache_bytes"] > 0


def test_cache_snapshot_restore_and_exit_step_bounds(dcm):
    model = dcm[2].model
    ro = runtime.rollout.Rollout(model, __import__("runtime").SamplerConfig(steps=1), batch=1)  # no re-noising
    gen = torch.Generator().manual_seed(0)
    shape = (1, 1, 3, 8, 8)
    with torch.no_grad():
        ro.generate_chunk(torch.randn(shape, generator=gen), ChunkCondition())
        snap = ro.snapshot()
        noise = torch.randn(shape, generator=gen)
        a = ro.generate_chunk(noise, ChunkCondition())
        ro.generate_chunk(torch.randn(shape, generator=gen), ChunkCondition())
        assert ro.frames == 3
        ro.restore(snap)
        assert ro.frames == 1 and ro.cache.next_frame == 1
        b = ro.generate_chunk(noise, ChunkCondition())
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exit_step"):
        ro.generate_chunk(noise, ChunkCondition(), exit_step=1)


def test_plot_of_runs(tmp_path, causal, dcm):
    from training.students.plot import plot_runs

    finals = plot_runs({"causal": str(causal[0]), "dcm": str(dcm[0])}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert set(finals) == {"causal", "dcm"} and "tf_mse_2step" in finals["dcm"]


# -- guidance distillation --------------------------------------------------------------------------
def test_guidance_loss_is_zero_at_scale_one_and_for_noop_frames(dcm, clips):
    from training.students.guidance import guidance_loss, visited_levels

    model = dcm[2].model
    levels = visited_levels(dcm[2].sampler, 2)
    assert levels.tolist() == [0.5, 1.0]
    x0, action = clips.sample(2, CLIP, torch.Generator().manual_seed(0))
    assert guidance_loss(model, model, x0, action, levels, 1.0, torch.Generator().manual_seed(0)).item() < 1e-10
    noop = torch.zeros_like(action)
    assert guidance_loss(model, model, x0, noop, levels, 5.0, torch.Generator().manual_seed(0)).item() < 1e-10
    assert guidance_loss(model, model, x0, action, levels, 5.0, torch.Generator().manual_seed(0)).item() > 1e-6


def test_guidance_distillation_moves_the_conditional_pass_toward_the_guided_one(tmp_path, dcm, clips):
    from training.students.common import frozen_copy
    from training.students.guidance import GuidanceConfig, guidance_loss, train_guidance, visited_levels

    cfg = GuidanceConfig(out=str(tmp_path), steps=30, lr=1e-3, guidance_scale=3.0, **FAST)
    summary = train_guidance(dcm[2], clips, cfg, progress=False)
    bundle = Bundle.load(summary["bundle"])
    assert bundle.sampler.guidance_scale == 1.0 and bundle.sampler.steps == dcm[2].sampler.steps
    levels, frozen = visited_levels(dcm[2].sampler, 2), frozen_copy(dcm[2].model)

    def gap(model):   # distance of a model's conditional pass to the input student's guided pass
        x0, action = clips.sample(8, CLIP, torch.Generator().manual_seed(5))
        with torch.no_grad():
            return guidance_loss(model, frozen, x0, action, levels, 3.0, torch.Generator().manual_seed(6)).item()

    assert gap(bundle.model) < 0.5 * gap(dcm[2].model)
    assert open_session(bundle).step(["forward"]).shape == (1, 8, 8, 3)


def test_dmd_with_last_step_never_exits_at_step_0(dcm, clips):
    """Random exits under cache_from='last_step' start at step 1 (step 0 would keep pure noise as context),
    and a one-step last_step recipe is refused up front."""
    sampler = __import__("runtime").SamplerConfig(kind="consistency", steps=2, cache_from="last_step")
    ro = runtime.rollout.Rollout(dcm[2].model, sampler, batch=1)
    x, action = clips.sample(1, 9, torch.Generator().manual_seed(3))
    _, records = self_forcing_rollout(ro, x[:, :1], action, 8, torch.Generator().manual_seed(4))
    assert {rec.exit_input[1] for rec in records} == {0.5}  # always the second of the two levels (1.0, 0.5)
    with pytest.raises(ValueError, match="sample_steps >= 2"):
        train_dmd(dcm[2], dcm[2], clips, DMDConfig(out="unused", sample_steps=1, cache_from="last_step"))


@pytest.mark.parametrize("extra", [{}, dict(still_prior=0.5, patch_overlap=1, camera_warp=True)],
                         ids=["stack", "stack+still+warp"])
def test_the_recipe_runs_with_frame_stacking(tmp_path, clips, extra):
    """Every stage trains a frame-stacking model (causal with noise on the stacked frames, dCM, SF-DMD
    against a stacking teacher), the self-forcing replay still equals its rollout, and the result plays;
    a camera-warp teacher's measured motion reaches the student unchanged."""
    teacher = Bundle.random(tiny_config(stack_frames=1, **extra), seed=0)
    if extra:
        with torch.no_grad():
            teacher.model.camera_motion.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    quick = {**FAST, "eval_every": 100}
    causal = train_causal(teacher, clips, CausalConfig(out=str(tmp_path / "c"), steps=4, stack_noise=0.3, **quick),
                          progress=False)
    dcm = train_dcm(Bundle.load(causal["bundle"]), clips, DCMConfig(out=str(tmp_path / "d"), steps=4, intervals=4,
                                                                     stack_noise=0.3, **quick), progress=False)
    student = Bundle.load(dcm["bundle"])
    ro = runtime.rollout.Rollout(student.model, student.sampler, batch=2)
    x, action = clips.sample(2, 6, torch.Generator().manual_seed(3))
    clip, records = self_forcing_rollout(ro, x[:, :1], action, 5, torch.Generator().manual_seed(4))
    for rec in records:
        assert (replay_exit_step(ro, rec) - clip[:, rec.frames]).abs().max() < 1e-5
    dmd = train_dmd(student, teacher, clips, DMDConfig(out=str(tmp_path / "m"), steps=3, critic_steps=1, **quick),
                    progress=False)
    final = Bundle.load(dmd["bundle"])
    assert final.config.stack_frames == 1
    if extra:
        assert torch.equal(final.model.camera_motion, teacher.model.camera_motion)
    session = open_session(final)
    assert session.step(["forward"]).shape[0] == 1


def test_regression_gradient_is_a_unit_push_from_the_recorded_frame():
    from training.students.dmd import regression_gradient

    x0 = torch.zeros(2, 3, 4)
    truth = torch.stack([torch.full((3, 4), 0.5), torch.full((3, 4), -2.0)])
    g = regression_gradient(x0, truth)
    assert torch.allclose(g[0], torch.full((3, 4), -1.0)) and torch.allclose(g[1], torch.ones(3, 4))


def test_dmd_regression_term_pulls_the_rollout_to_the_recorded_frames(tmp_path, dcm, teacher, clips):
    """With the regression term the student's own rollouts end closer to the recorded frames than with DMD
    alone, at the same steps and noise (the still world must reproduce itself from its own frames)."""
    runs = {}
    for w in (0.0, 4.0):
        cfg = DMDConfig(out=str(tmp_path / f"w{w}"), steps=20, lr=3e-4, critic_lr=1e-3, critic_steps=1,
                        regression_weight=w, **{**FAST, "eval_every": 20})
        runs[w] = train_dmd(dcm[2], teacher, clips, cfg, progress=False)["eval"]["sf_rollout_mse"]
    assert runs[4.0] < 0.9 * runs[0.0]


def test_still_clips_hold_a_frame_at_rest_with_no_key(clips):
    """`LatentClips.rest_rows` finds the frames with no key held; `sample_still` holds one of them, unchanged."""
    cond = clips.cond.clone()
    cond[[3, 17, 40]] = 0.0
    cond[cond.abs().amax(-1) < 0.05] = 0.0
    rest_clips = replace(clips, cond=cond)
    rows = rest_clips.rest_rows()
    assert set(rows.tolist()) == set(torch.nonzero(cond.abs().amax(-1) == 0).flatten().tolist()) >= {3, 17, 40}
    lat, act = rest_clips.sample_still(5, 7, torch.Generator().manual_seed(0), rows)
    assert lat.shape == (5, 7, *clips.latents.shape[1:]) and act.shape == (5, 7, cond.shape[-1])
    assert torch.equal(lat, lat[:, :1].expand_as(lat)) and act.abs().max() == 0
    assert any(torch.equal(lat[0, 0], clips.latents[r].float()) for r in rows.tolist())
    with pytest.raises(ValueError, match="no frame at rest"):
        clips.sample_still(2, 3, torch.Generator(), torch.zeros(0, dtype=torch.long))


def test_dmd_rolls_out_still_clips_for_its_still_share(tmp_path, monkeypatch, dcm, teacher, clips):
    """``still_share``: that share of every batch's rollouts starts from a frame at rest, no key held, and is
    regressed toward the same frame (the rest of the batch: recorded clips)."""
    import training.students.dmd as dmd

    cond = clips.cond.clone()
    cond[::3] = 0.0                                            # a third of the frames at rest
    rest_clips = replace(clips, cond=cond)
    seen, real_rollout = [], dmd.self_forcing_rollout

    def spy(rollout, context, action, *args, **kwargs):
        if kwargs.get("keep") != slice(0, 0):                 # a training rollout, not the evaluation's
            seen.append((context.clone(), action.clone()))
        return real_rollout(rollout, context, action, *args, **kwargs)

    monkeypatch.setattr(dmd, "self_forcing_rollout", spy)
    cfg = DMDConfig(out=str(tmp_path), steps=2, lr=1e-4, critic_steps=1, regression_weight=1.0, still_share=0.5,
                    **{**FAST, "eval_every": 100})
    train_dmd(dcm[2], teacher, rest_clips, cfg, progress=False)
    rest = {tuple(rest_clips.latents[r].float().flatten().tolist()) for r in rest_clips.rest_rows().tolist()}
    assert len(seen) == 2
    for context, action in seen:
        still = FAST["batch"] // 2
        assert action[:still].abs().max() == 0 and action[still:].abs().max() > 0
        assert all(tuple(context[b, 0].flatten().tolist()) in rest for b in range(still))
    with pytest.raises(ValueError, match="still_share"):
        train_dmd(dcm[2], teacher, clips, DMDConfig(out="unused", still_share=1.5))
