"""Bidirectional teacher: flow-matching steps, resume, sampling, bundles, 2-process gloo DDP (issue 3)."""

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from runtime import Bundle, CausalDiT, ModelConfig, open_session
from runtime.codec import PixelCodec
from training.latents import conditioning_actions, synthetic_latents
from training.teacher import (
    TeacherTrainConfig,
    action_gap,
    flow_matching_loss,
    noise_levels,
    sample_clip,
    train_teacher,
)

SPACE = {"keys": ["left", "right", "fire"], "values": [], "bindings": {"a": "left"}}


def tiny_model_cfg(**kw):
    base = dict(in_channels=3, latent_height=4, latent_width=4, patch_size=(1, 2, 2), num_attention_heads=2,
                attention_head_dim=8, num_layers=1, ffn_dim=32, freq_dim=16, action_space=SPACE,
                window_frames=3, sink_frames=0)
    base.update(kw)
    return ModelConfig(**base)


def test_conditioning_actions_follow_the_recording_convention():
    a = torch.eye(3)[[0, 1, 2, 0]]                         # actions[t] produced frame t+1
    cond = conditioning_actions(a)
    assert torch.equal(cond[0], torch.zeros(3)) and torch.equal(cond[1:], a[:-1])


def test_noise_levels_have_a_clean_prefix_and_noisy_rest():
    cfg = TeacherTrainConfig(context_prob=1.0)
    t = noise_levels(64, 6, cfg, torch.Generator().manual_seed(0))
    assert t.shape == (64, 6) and (t[:, 0] == 0).all() and (t[:, -1] > 0).all()
    clean = t == 0
    assert (clean[:, 1:] <= clean[:, :-1]).all()             # zeros only as a prefix


def test_timestep_shift_moves_levels_toward_noise_and_keeps_the_prefix():
    plain = noise_levels(256, 6, TeacherTrainConfig(context_prob=1.0), torch.Generator().manual_seed(0))
    shifted = noise_levels(256, 6, TeacherTrainConfig(context_prob=1.0, timestep_shift=3.0),
                           torch.Generator().manual_seed(0))
    assert torch.equal(plain == 0, shifted == 0) and (shifted >= plain).all() and shifted.max() <= 1
    assert shifted[plain > 0].mean() > plain[plain > 0].mean() + 0.1


class KnowsTheTruth(torch.nn.Module):
    """Returns the true velocity of the last frame when given the true actions, noise otherwise."""

    def __init__(self, x0, cond, noise_seed):
        super().__init__()
        self.x0, self.cond = x0, cond
        self.noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(noise_seed))

    def forward(self, x_t, t, action, previous=None):
        v = self.noise - self.x0
        return v if torch.equal(action, self.cond) else torch.zeros_like(v)


def test_action_gap_is_zero_for_a_model_that_ignores_the_keys():
    clips = synthetic_latents(4, 8, (3, 4, 4), 3)
    x0, cond = clips.sample(8, 4, torch.Generator().manual_seed(0))
    deaf = lambda x_t, t, action, previous=None: torch.zeros_like(x_t)      # noqa: E731
    assert action_gap(deaf, x0, cond, 0.9, torch.Generator().manual_seed(1)) == 0
    knowing = KnowsTheTruth(x0, cond, noise_seed=1)
    assert action_gap(knowing, x0, cond, 0.9, torch.Generator().manual_seed(1)) > 0.5


def test_action_gap_report_over_seeds_tells_a_deaf_model_from_one_that_reads_the_keys():
    from training.teacher import action_gap_report

    clips = synthetic_latents(4, 8, (3, 4, 4), 3)
    deaf = lambda x_t, t, action, previous=None: torch.zeros_like(x_t)      # noqa: E731
    rep = action_gap_report(deaf, clips, 4, count=12, seeds=2, levels=(0.9,), batch=5)
    assert rep["levels"]["t0.9"] == {"gap": 0.0, "gap_seed_std": 0.0, "relative": 0.0}

    class Reader(torch.nn.Module):   # predicts the velocity's mean better when the actions are known
        def forward(self, x_t, t, action, previous=None):
            return x_t * (0.5 + 0.5 * (action.abs().sum() > 0).float())

    rep = action_gap_report(Reader(), clips, 4, count=12, seeds=2, levels=(0.5, 0.9), batch=5)
    assert rep["clips"] == 12 and set(rep["levels"]) == {"t0.5", "t0.9"}
    assert rep["levels"]["t0.9"]["gap"] > 0 and rep["levels"]["t0.9"]["relative"] > 0


def test_teacher_training_reduces_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    from runtime import CausalDiT

    model = CausalDiT(tiny_model_cfg())
    clips = synthetic_latents(4, 8, (3, 4, 4), 3)
    x0, cond = clips.sample(4, 4, torch.Generator().manual_seed(0))
    cfg = TeacherTrainConfig(action_dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at(seed):
        return flow_matching_loss(model, x0, cond, cfg, torch.Generator().manual_seed(seed))[0]

    def held_out_loss():                                   # fixed noise draws, averaged
        with torch.no_grad():
            return sum(float(loss_at(1000 + s)) for s in range(8)) / 8

    first = held_out_loss()
    for i in range(60):
        loss = loss_at(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.75 * first


def test_teacher_resume_continues_and_bundle_plays(tmp_path):
    clips = synthetic_latents(3, 10, (3, 4, 4), 3)
    cfg = TeacherTrainConfig(out=str(tmp_path), steps=3, batch=2, clip_frames=4, log_every=1, sample_steps=2)
    assert train_teacher(cfg, tiny_model_cfg(), clips, PixelCodec(2), progress=False)["step"] == 3
    cfg.steps = 10                                           # step 10 also logs the action gap
    again = train_teacher(cfg, tiny_model_cfg(), clips, PixelCodec(2), progress=False)
    assert again["step"] == 10 and again["steps_this_run"] == 7
    assert list((tmp_path / "tb").iterdir())                 # TensorBoard scalars were written
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.sampler.kind == "euler" and bundle.sampler.steps == 2 and bundle.sampler.guidance_scale == 1.5
    session = open_session(bundle)
    session.reset(0, context=torch.zeros(2, 8, 8, 3, dtype=torch.uint8).numpy(), context_actions=[None, ["left"]])
    assert session.step(["right"]).shape == (1, 8, 8, 3)
    ctx = clips.latents[None, :2].float()
    out = sample_clip(bundle.model, ctx, clips.cond[None, :4], steps=3, guidance=2.0,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 2, 3, 4, 4) and torch.isfinite(out).all()


def test_clip_must_cover_the_session_window(tmp_path):
    cfg = TeacherTrainConfig(out=str(tmp_path), steps=1, clip_frames=3)
    with pytest.raises(ValueError, match="clip_frames"):
        train_teacher(cfg, tiny_model_cfg(window_frames=3), synthetic_latents(1, 5, (3, 4, 4), 3), PixelCodec(2),
                      progress=False)


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    data = tmp_path / "rec"
    rec = subprocess.run([sys.executable, "-m", "forcekit", "record", "--env", "atari:breakout", "--episodes", "2",
                          "--max-frames", "10", "--size", "16", "--out", str(data)], capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    out = tmp_path / "run"
    with socket.socket() as sock:                           # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", port,
           "-m", "forcekit", "train", "teacher", "--data", str(data), "--codec", "pixel:2", "--out", str(out),
           "--steps", "3", "--batch", "2", "--clip-frames", "4", "--layers", "1", "--heads", "2", "--head-dim", "8",
           "--ffn", "16", "--freq-dim", "16", "--patch", "1", "--threads", "1", "--save-rank-states"]
    # Own process group: on a timeout the launcher and both workers are killed together.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in 180 s: {err[-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["step"] == r1["step"] == 3
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    assert not torch.equal(r0["first_noise"], r1["first_noise"])    # every rank draws its own noise
    torch.manual_seed(0)
    from runtime import CausalDiT

    init = CausalDiT(Bundle.load(out / "bundle").config).state_dict()
    assert any(not torch.equal(init[k], r0["model"][k]) for k in init)   # the steps did change the weights


def test_ema_warms_up_so_a_short_run_does_not_ship_its_random_init(tmp_path):
    """A constant 0.999 would keep 37 % of the random initial weights in a 1,000-step teacher's bundle; the
    ramped decay keeps almost none, and the bundle of a 3-step run is already near the trained weights."""
    from training.teacher import ema_decay

    share = 1.0
    for s in range(1000):
        share *= ema_decay(0.999, s)
    assert share < 1e-12 and ema_decay(0.999, 10**6) == 0.999
    clips = synthetic_latents(3, 10, (3, 4, 4), 3)
    cfg = TeacherTrainConfig(out=str(tmp_path), steps=3, batch=2, clip_frames=4, sample_steps=1, lr=1e-2, warmup=1)
    torch.manual_seed(cfg.seed)
    init = {k: v.clone() for k, v in CausalDiT(tiny_model_cfg()).state_dict().items()}
    train_teacher(cfg, tiny_model_cfg(), clips, PixelCodec(2), progress=False)
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    ema = Bundle.load(tmp_path / "bundle").model.state_dict()
    moved = [k for k in raw if k in init and not torch.equal(raw[k], init[k])]
    assert moved
    to_raw = sum(float((ema[k] - raw[k]).norm()) for k in moved)
    to_init = sum(float((ema[k] - init[k]).norm()) for k in moved)
    assert to_raw < to_init
