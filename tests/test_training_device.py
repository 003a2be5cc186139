"""Training on a device (`--device cuda`): the flag, device-independent noise, clips on the device, and, with a
GPU, the recipe's teacher -> dCM -> SF-DMD chain on it (issue 14: the whole recipe in one GPU run)."""

import argparse

import pytest
import torch

from forcekit.cli import training_device
from runtime import Bundle, ModelConfig
from runtime.codec import PixelCodec
from runtime.sampler import gaussian_like
from runtime.stacking import noised_at
from training.latents import synthetic_latents
from training.students.dcm import DCMConfig, train_dcm
from training.students.dmd import DMDConfig, train_dmd
from training.teacher import TeacherTrainConfig, flow_matching_loss, train_teacher

SPACE = {"keys": ["left", "right", "fire"], "values": [], "bindings": {"a": "left"}}


def stacking_cfg() -> ModelConfig:
    """The recipe's teacher features at toy size: frame stacking, told the stacked frame's noise level."""
    return ModelConfig(in_channels=3, latent_height=4, latent_width=4, patch_size=(1, 2, 2), num_attention_heads=2,
                       attention_head_dim=8, num_layers=1, ffn_dim=32, freq_dim=16, action_space=SPACE,
                       window_frames=3, sink_frames=0, frames_per_chunk=1, stack_frames=1,
                       stack_noise_form="add", stack_noise_condition=True)


def test_device_flag_accepts_cpu_and_refuses_what_is_not_there():
    assert training_device("cpu") == "cpu"
    for bad in ("gpu", "cuda:x", "cuda0", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="cpu, cuda or cuda:N"):
            training_device(bad)
    missing = f"cuda:{torch.cuda.device_count()}"        # one past the last device this machine has
    with pytest.raises(argparse.ArgumentTypeError, match="no such CUDA device"):
        training_device(missing)


def test_noise_follows_the_generator_not_the_tensor():
    """A CPU generator's stream is the same whatever device the tensor it shapes sits on (here: the same
    values as a plain draw), so a run resumed on another device continues the same stream."""
    x = torch.zeros(2, 3, 4)
    got = gaussian_like(x, torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))
    stacked = noised_at(x, 0.5, torch.Generator().manual_seed(3), form="add")
    assert torch.allclose(stacked, 0.5 * got)


def test_clips_moved_to_a_device_sample_the_same_batches_there():
    clips = synthetic_latents(3, 10, (3, 4, 4), 3)
    moved = clips.to("cpu")
    assert moved.latents.device == torch.device("cpu") and moved.episodes == clips.episodes
    a = clips.sample(4, 5, torch.Generator().manual_seed(1))
    b = moved.sample(4, 5, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
def test_teacher_loss_on_cuda_matches_cpu():
    torch.manual_seed(0)
    from runtime.model import CausalDiT

    model = CausalDiT(stacking_cfg())
    x0, cond = synthetic_latents(3, 10, (3, 4, 4), 3).sample(4, 4, torch.Generator().manual_seed(2))
    cfg = TeacherTrainConfig(stack_noise=0.3)
    cpu = flow_matching_loss(model, x0, cond, cfg, torch.Generator().manual_seed(5))[0]
    gpu = flow_matching_loss(model.cuda(), x0.cuda(), cond.cuda(), cfg, torch.Generator().manual_seed(5))[0]
    assert abs(float(cpu) - float(gpu)) <= 1e-3 * abs(float(cpu))


@pytest.mark.gpu
def test_recipe_chain_trains_on_cuda_and_ships_cpu_bundles(tmp_path):
    clips = synthetic_latents(4, 12, (3, 4, 4), 3)
    teacher = TeacherTrainConfig(out=str(tmp_path / "teacher"), steps=3, batch=2, clip_frames=4, sample_steps=2,
                                 stack_noise=0.3, guidance_scale=1.0, device="cuda")
    train_teacher(teacher, stacking_cfg(), clips, PixelCodec(1), progress=False)
    t = Bundle.load(tmp_path / "teacher" / "bundle")
    assert next(t.model.parameters()).device.type == "cpu"
    fast = dict(batch=2, clip_frames=4, log_every=1, eval_every=2, warmup=1, device="cuda")
    dcm = train_dcm(t, clips, DCMConfig(out=str(tmp_path / "dcm"), steps=3, intervals=4, **fast), progress=False)
    student = Bundle.load(dcm["bundle"])
    dmd = train_dmd(student, t, clips, DMDConfig(out=str(tmp_path / "dmd"), steps=2, critic_steps=1, **fast),
                    progress=False)
    assert dmd["step"] == 2
    again = train_dmd(student, t, clips, DMDConfig(out=str(tmp_path / "dmd"), steps=3, critic_steps=1, **fast),
                      progress=False)                     # resumes from a checkpoint written on the GPU
    assert again["steps_this_run"] == 1
    assert next(Bundle.load(again["bundle"]).model.parameters()).device.type == "cpu"


def test_teacher_stops_at_its_wall_time_budget_with_a_bundle(tmp_path):
    """`--max-seconds`: a GPU run's teacher ends on time and still writes its bundle; a rerun without the
    budget continues from the checkpoint."""
    clips = synthetic_latents(3, 10, (3, 4, 4), 3)
    cfg = TeacherTrainConfig(out=str(tmp_path), steps=10_000, batch=2, clip_frames=4, sample_steps=1,
                             max_seconds=2.0)
    short = train_teacher(cfg, stacking_cfg(), clips, PixelCodec(1), progress=False)
    assert 0 < short["step"] < 10_000 and (tmp_path / "bundle" / "config.json").is_file()
    cfg.max_seconds, cfg.steps = 0.0, short["step"] + 2
    assert train_teacher(cfg, stacking_cfg(), clips, PixelCodec(1), progress=False)["steps_this_run"] == 2
