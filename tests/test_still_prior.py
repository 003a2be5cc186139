"""The still prior (``ModelConfig.still_prior``) and the overlapping patch embedding (``patch_overlap``)."""

import math

import pytest
import torch

from runtime import ChunkCondition, SamplerConfig
from runtime.config import ModelConfig
from runtime.model import still_velocity
from runtime.rollout import Rollout
from runtime.warp import warp_frames
from tests.helpers import moving_clips, rollout_latents, tiny_model
from training.camera import calibrate_camera_motion


def _posterior_velocity(x_t, t, prev, sigma):
    """(x_t - E[x0 | x_t]) / t for x0 ~ N(prev, sigma^2), x_t = (1 - t) x0 + t eps, written the plain way."""
    s = t[:, :, None, None, None]
    q = 1 - s
    x0_mean = prev + sigma**2 * q / (sigma**2 * q**2 + s**2) * (x_t - q * prev)
    return (x_t - x0_mean) / s


def test_still_velocity_is_the_posterior_mean_velocity_of_an_unmoved_frame():
    gen = torch.Generator().manual_seed(0)
    x_t, prev = torch.randn(2, 3, 4, 5, 5, generator=gen), torch.randn(2, 3, 4, 5, 5, generator=gen)
    t = torch.rand(2, 3, generator=gen) * 0.9 + 0.05
    for sigma in (0.05, 0.5, 2.0):
        assert torch.allclose(still_velocity(x_t, t, prev, sigma), _posterior_velocity(x_t, t, prev, sigma), atol=1e-4)
    # t = 1: one Euler step from pure noise lands on the previous frame; t = 0: the clean frame stays
    ones, zeros = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.allclose(x_t - still_velocity(x_t, ones, prev, 0.5), prev, atol=1e-5)
    assert torch.allclose(still_velocity(x_t, zeros, prev, 0.5), -x_t)
    # sigma -> 0: the exact velocity of x0 = prev
    assert torch.allclose(still_velocity(x_t, t, prev, 1e-4), (x_t - prev) / t[:, :, None, None, None], atol=1e-3)


def test_a_fresh_still_prior_model_generates_a_still_world():
    """Zero residual at initialisation: a rollout from a context repeats its last frame, whatever the keys."""
    model = tiny_model(stack_frames=1, still_prior=0.5, frames_per_chunk=1, window_frames=3, sink_frames=0)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 2, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    ro = Rollout(model, SamplerConfig(kind="consistency", steps=1), kv_cache=True, generator=gen)
    with torch.no_grad():
        for f in range(ctx.shape[1]):
            ro.add_context(ctx[:, f:f + 1], ChunkCondition(action=torch.zeros(1, 1, cfg.actions.dim)))
        for _ in range(3):
            noise = torch.randn(1, 1, *ctx.shape[2:], generator=gen)
            out = ro.generate_chunk(noise, ChunkCondition(action=torch.ones(1, 1, cfg.actions.dim)))
            assert (out[0, 0] - ctx[0, -1]).abs().max() <= 1e-5


def _trained_looking(model):
    """Give the zero-initialised output head weights, so the residual is not trivially 0."""
    torch.manual_seed(3)
    torch.nn.init.normal_(model.proj_out.weight, std=0.05)
    torch.nn.init.normal_(model.proj_out.bias, std=0.05)
    return model


@pytest.mark.parametrize("pattern", [dict(frames_per_chunk=1, window_frames=3, sink_frames=1),
                                     dict(frames_per_chunk=2, first_chunk_frames=1, window_frames=4, sink_frames=1)],
                         ids=["framewise", "first1"])
def test_still_prior_rollout_cached_fused_and_recomputed_agree(pattern):
    model = _trained_looking(tiny_model(stack_frames=1, still_prior=0.5, patch_overlap=1, camera_warp=True,
                                        **pattern))
    with torch.no_grad():
        model.camera_motion.copy_(0.2 * torch.randn(model.camera_motion.shape))
    sampler = SamplerConfig(kind="consistency", steps=2)
    cached = rollout_latents(model, sampler, 5, kv_cache=True)
    assert (cached - rollout_latents(model, sampler, 5, kv_cache=False)).abs().max() <= 1e-4
    assert (cached - rollout_latents(model, sampler, 5, kv_cache=True, fuse_commit=True)).abs().max() <= 1e-4


@pytest.mark.parametrize("overlap", [0, 1])
def test_patch_overlap_lets_a_token_see_the_columns_beyond_its_patch(overlap):
    model = tiny_model(patch_overlap=overlap)
    cfg = model.config
    x = torch.zeros(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    moved = x.clone()
    moved[..., :, 2] = 1.0  # the first column of the second patch column
    with torch.no_grad():
        tokens = [model.patch_embedding(v.transpose(1, 2)).flatten(2) for v in (x, moved)]
    gw = cfg.latent_width // cfg.patch_size[2]
    first_patch_column = (tokens[0] - tokens[1]).abs().view(model.config.inner_dim, -1, gw)[:, :, 0]
    assert (first_patch_column.max() > 1e-6) == bool(overlap)


def test_still_prior_needs_stacking_and_sizes_are_checked():
    with pytest.raises(ValueError, match="still_prior"):
        ModelConfig.tiny(still_prior=0.5)
    with pytest.raises(ValueError, match="patch_overlap"):
        ModelConfig.tiny(patch_overlap=-1)
    cfg = ModelConfig.tiny(stack_frames=1, still_prior=0.5, patch_overlap=1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# -- camera warp: the keys move the stacked frames -------------------------------------------------
def test_warp_frames_moves_by_whole_pixels_exactly_and_repeats_the_uncovered_edge():
    frames = torch.randn(2, 3, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(2, 3, 3)
    assert torch.allclose(warp_frames(frames, none), frames, atol=1e-6)
    right = none.clone()
    right[..., 0] = 2 / 8  # one pixel of 8 to the right
    moved = warp_frames(frames, right)
    assert torch.allclose(moved[..., 1:], frames[..., :-1], atol=1e-5)
    assert torch.allclose(moved[..., 0], frames[..., 0], atol=1e-5)  # the uncovered column: the edge repeated
    zoom = none.clone()
    zoom[..., 2] = 0.3
    assert not torch.allclose(warp_frames(frames, zoom), frames, atol=1e-3)


def test_a_bicubic_warp_keeps_more_of_a_frame_moved_by_half_a_pixel():
    """Moved half a latent pixel and back, bilinear averages neighbours twice; bicubic keeps more of the edges."""
    frames = torch.randn(1, 1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    half = torch.zeros(1, 1, 3)
    half[..., 0] = 1 / 16   # half a pixel of 16
    inner = (..., slice(2, -2))

    def there_and_back(mode):
        return warp_frames(warp_frames(frames, half, mode=mode), -half, mode=mode)

    errors = {m: float((there_and_back(m) - frames)[inner].abs().mean()) for m in ("bilinear", "bicubic")}
    assert errors["bicubic"] < 0.8 * errors["bilinear"]
    assert torch.allclose(warp_frames(frames, torch.zeros(1, 1, 3), mode="bicubic"), frames, atol=1e-5)
    with pytest.raises(ValueError, match="warp_mode"):
        ModelConfig.tiny(warp_mode="nearest")


def test_calibration_finds_how_far_and_which_way_each_key_moves_the_view():
    clips = moving_clips({0: 1, 1: -2})
    motion, report = calibrate_camera_motion(clips, 3)
    assert report[0]["right_px"] == pytest.approx(1, abs=0.1) and report[1]["right_px"] == pytest.approx(-2, abs=0.1)
    assert abs(report[0]["down_px"]) < 0.1
    assert report[0]["shifted_mse"] < report[0]["copy_mse"] / 10
    assert report[2] == {"frames": 0} and motion[2].abs().max() == 0  # never held alone: no motion
    assert float(motion[0, 0]) * 12 / 2 == pytest.approx(report[0]["right_px"], abs=1e-3)


def _fresh_turn(**config) -> tuple:
    """A fresh still-prior camera-warp model whose key 0 moves the view's centre one latent pixel right per frame:
    the model, its context frame, the frame generated with key 0 held and the frame after it with no key."""
    model = tiny_model(stack_frames=1, still_prior=0.5, camera_warp=True, frames_per_chunk=1, window_frames=3,
                       sink_frames=0, **config)
    cfg = model.config
    with torch.no_grad():
        model.camera_motion[0, 0] = 2 / cfg.latent_width
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    ro = Rollout(model, SamplerConfig(kind="consistency", steps=1), kv_cache=True, generator=gen)
    key, none = torch.zeros(1, 1, cfg.actions.dim), torch.zeros(1, 1, cfg.actions.dim)
    key[..., 0] = 1
    with torch.no_grad():
        ro.add_context(ctx, ChunkCondition(action=none))
        turned = ro.generate_chunk(torch.randn(ctx.shape, generator=gen), ChunkCondition(action=key))
        still = ro.generate_chunk(torch.randn(ctx.shape, generator=gen), ChunkCondition(action=none))
    return model, ctx, turned, still


def test_a_fresh_camera_warp_model_turns_while_the_key_is_held_and_stands_still_without_it():
    _, ctx, turned, still = _fresh_turn()
    assert torch.allclose(turned[0, 0, ..., 1:], ctx[0, 0, ..., :-1], atol=1e-5)
    assert torch.allclose(still, turned, atol=1e-5)


def test_a_pinhole_warp_turns_a_frame_as_a_pinhole_camera_turns_and_fov_0_translates():
    h = w = 32
    f, centre_shift = 16.0, 2.0                           # a 90-degree view; its centre column moves 2 px right
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    where = torch.stack([rows, cols])[None, None]        # each pixel holds where it was: bilinear keeps it exact
    motion = torch.tensor([[[2 * centre_shift / w, 0.0, 0.0]]])
    moved = warp_frames(where, motion, fov=90.0)[0, 0]
    # the turn, from the pinhole camera's rays: the view pixel (u, v) shows what was at (us, vs)
    u, v = cols + 0.5 - w / 2, rows + 0.5 - h / 2
    turn = math.atan(centre_shift / f)
    us, vs = f * torch.tan(torch.atan(u / f) - turn), v / (u / f * math.sin(turn) + math.cos(turn))
    inside = (us.abs() < w / 2 - 1) & (vs.abs() < h / 2 - 1)   # not where the uncovered edge is repeated
    assert inside.float().mean() > 0.8
    assert torch.allclose(moved[1][inside], (us + w / 2 - 0.5)[inside], atol=1e-3)
    assert torch.allclose(moved[0][inside], (vs + h / 2 - 0.5)[inside], atol=1e-3)
    middle = h // 2
    assert moved[1, middle, w // 2] == pytest.approx(w // 2 - centre_shift, abs=0.01)     # the centre moves 2 px
    assert moved[1, middle, -2] < w - 2 - 3                                            # the edge more than 3
    flat = warp_frames(where, motion)[0, 0]
    assert torch.allclose(flat[1, :, 2:], cols[:, :-2], atol=1e-4)                      # fov 0: a translation
    assert torch.allclose(warp_frames(where, torch.zeros(1, 1, 3), fov=90.0), where, atol=1e-4)


def test_a_camera_warp_model_turns_its_stacked_frame_by_its_field_of_view():
    for bad in (-1.0, 180.0):
        with pytest.raises(ValueError, match="camera_fov"):
            ModelConfig.tiny(stack_frames=1, camera_warp=True, camera_fov=bad)
    with pytest.raises(ValueError, match="camera_fov needs camera_warp"):
        ModelConfig.tiny(stack_frames=1, camera_fov=90.0)
    turned = {}
    for fov in (0.0, 90.0):
        model, ctx, turned[fov], _ = _fresh_turn(camera_fov=fov)
        assert ModelConfig.from_dict(model.config.to_dict()).camera_fov == fov
        key = torch.zeros(1, 1, model.config.actions.dim)
        key[..., 0] = 1
        # a fresh still-prior model draws its stacked frame as the warp moved it
        assert torch.allclose(turned[fov], warp_frames(ctx, model.camera_move(key).shift, fov=fov), atol=1e-5)
    assert not torch.allclose(turned[0.0], turned[90.0], atol=1e-3)


def test_camera_warp_needs_stacking_and_its_motion_travels_with_the_weights():
    with pytest.raises(ValueError, match="camera_warp"):
        ModelConfig.tiny(camera_warp=True)
    model = tiny_model(stack_frames=1, camera_warp=True)
    assert "camera_motion" in model.state_dict()
    assert all(p is not model.camera_motion for p in model.parameters())  # measured, not trained


def test_a_camera_warp_teacher_measures_the_motion_before_it_trains_and_keeps_it(tmp_path):
    from runtime import Bundle
    from runtime.codec import PixelCodec
    from training.teacher import TeacherTrainConfig, train_teacher

    clips = moving_clips({0: 1, 1: -2}, frames=200, action_dim=5)
    cfg = ModelConfig.tiny(in_channels=3, latent_height=8, latent_width=12, stack_frames=1, still_prior=0.5,
                           camera_warp=True, window_frames=3, sink_frames=0)
    train = TeacherTrainConfig(out=str(tmp_path), steps=2, batch=2, clip_frames=4, sample_steps=2)
    train_teacher(train, cfg, clips, PixelCodec(1), progress=False)
    bundle = Bundle.load(tmp_path / "bundle")
    assert float(bundle.model.camera_motion[0, 0]) * 12 / 2 == pytest.approx(1, abs=0.1)
    assert float(bundle.model.camera_motion[1, 0]) * 12 / 2 == pytest.approx(-2, abs=0.1)
    assert bundle.extra["camera_motion"]["forward"]["right_px"] == pytest.approx(1, abs=0.1)


def test_ship_sets_a_camera_warp_bundles_resampling_and_the_model_uses_it(tmp_path):
    from runtime import Bundle
    from training.ship import ship

    Bundle.random(ModelConfig.tiny(stack_frames=1), seed=0).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="warps no frames"):
        ship(tmp_path / "plain", tmp_path / "x", warp_mode="bicubic")
    warp = Bundle.random(ModelConfig.tiny(stack_frames=1, camera_warp=True, frames_per_chunk=1, window_frames=3,
                                          sink_frames=0), seed=0)
    with torch.no_grad():
        warp.model.camera_motion[0, 0] = 1 / warp.config.latent_width   # half a latent pixel per frame
    warp.save(tmp_path / "warp")
    shipped = Bundle.load(ship(tmp_path / "warp", tmp_path / "bicubic", warp_mode="bicubic"))
    assert shipped.config.warp_mode == "bicubic" == shipped.model.config.warp_mode
    before = Bundle.load(tmp_path / "warp")
    key = torch.zeros(1, 1, before.config.actions.dim)
    key[..., 0] = 1
    gen = torch.Generator().manual_seed(0)
    cfg = before.config
    x = torch.randn(1, 1, cfg.in_channels, cfg.latent_height, cfg.latent_width, generator=gen)
    prev = torch.randn(x.shape, generator=gen)
    t = torch.ones(1, 1)
    with torch.no_grad():
        a, b = (m.model(x, t, action=key, previous=prev) for m in (before, shipped))
    assert not torch.allclose(a, b, atol=1e-4)
