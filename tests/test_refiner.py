"""The frame refiner (runtime/autoencoder.py `FrameRefiner`, `RefiningDecoder`; training/refiner.py): each
frame drawn on the one shown before it, moved by the camera, in the codec, the session, training and ship."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime import Bundle, ModelConfig
from runtime.autoencoder import ConvAEConfig, ConvAutoencoder
from runtime.canvas import ViewCanvas
from runtime.warp import CameraMotion, gaussian_blur, warp_frames
from tests.test_worlds_codec import TINY, _frames
from training.codec import save_codec

SIZE = 16   # frames SIZE x SIZE; the tiny codec halves them


def _codec(copying: bool = False, seed: int = 0) -> ConvAutoencoder:
    """A tiny refining codec; ``copying``: its refiner's mask wide open (it shows the moved previous frame)."""
    torch.manual_seed(seed)
    codec = ConvAutoencoder(ConvAEConfig(**TINY, refine_channels=8, refine_blocks=1)).eval()
    if copying:
        with torch.no_grad():
            codec.refiner.conv_out.bias[0] = 30.0
    return codec


def _shift(px: float, n: int = 1) -> CameraMotion:
    """``n`` frames each moved ``px`` pixels right (grid units: 2 = the width)."""
    return CameraMotion(torch.tensor([[2 * px / SIZE, 0.0, 0.0]]).repeat(n, 1))


def test_a_flow_at_latent_size_moves_a_full_size_frame_by_the_same_share_of_it():
    frames = torch.randn(1, 1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    flow = torch.zeros(1, 1, 2, SIZE // 4, SIZE // 4)
    flow[:, :, 0] = 2 * 4 / SIZE          # four pixels right at full size, one at a quarter
    moved = warp_frames(frames, torch.zeros(1, 1, 3), flow)
    assert torch.allclose(moved[..., 4:], frames[..., :-4], atol=1e-5)


def test_a_fresh_refiner_shows_the_decode_and_an_open_one_the_moved_previous_frame():
    frames = _frames(2, SIZE)
    fresh = _codec()
    z = fresh.encode(frames[1:])
    decoded = fresh.decode_unit(z)
    previous = fresh.to_unit(frames[:1])
    drawn = fresh.refine_unit(decoded, previous, None)
    assert (drawn - decoded).abs().max() < 0.05 * (decoded - previous).abs().max()   # mask 0.018
    copying = _codec(copying=True)
    moved = copying.refine_unit(copying.decode_unit(z), previous, _shift(2))
    assert torch.allclose(moved[..., 2:], previous[..., :-2], atol=1e-4)
    with pytest.raises(ValueError, match="no refiner"):
        ConvAutoencoder(ConvAEConfig(**TINY)).refine_unit(decoded, previous, None)
    with pytest.raises(ValueError, match="refine_warp"):
        ConvAEConfig(**TINY, refine_warp="nearest")


def test_the_refining_stream_starts_from_the_real_frame_and_keeps_a_still_view_exactly():
    frames = _frames(3, SIZE)
    codec = _codec(copying=True)
    stream = codec.streaming_decoder()
    z = codec.encode(frames[1:])
    stream.reset(last_frame=frames[0].numpy())
    still = stream.decode_chunk(z, _shift(0, 2))
    assert torch.equal(still, frames[:1].repeat(2, 1, 1, 1))          # the real frame, as it was, twice
    assert stream.state_bytes == 3 * SIZE * SIZE * 4
    turned = stream.decode_chunk(z[:1], _shift(2))
    assert torch.equal(turned[0, :, 2:], frames[0, :, :-2])           # texture travels two pixels right
    stream.reset()
    assert torch.equal(stream.decode_chunk(z[:1]), codec.decode(z[:1]))   # no frame before: the plain decode
    with pytest.raises(ValueError, match="motion holds 1 frames for 2"):
        stream.decode_chunk(z, _shift(0, 1))
    plain = ConvAutoencoder(ConvAEConfig(**TINY)).streaming_decoder()
    plain.reset(last_frame=frames[0].numpy())
    assert plain.state_bytes == 0


def test_moving_without_blur_copies_whole_pixels_and_carries_the_fraction_to_the_next_frame():
    frame = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    canvas = ViewCanvas(frame, 0)
    for _ in range(5):                                   # 0.4 px a frame: 2 px in five frames
        moved, held = canvas.move(_shift(0.4))
    assert torch.equal(moved[..., 2:], frame[..., :-2])  # every pixel copied, none averaged
    assert torch.allclose(canvas.carry, torch.zeros(1, 2), atol=1e-5)
    _, held = ViewCanvas(frame, 0).move(_shift(2.2))
    assert held[..., :2].eq(0).all() and held[..., 2:].eq(1).all()      # what the 2 px move uncovered
    blurred = frame
    for _ in range(5):                                   # the bilinear chain the refiner's input takes
        blurred = warp_frames(blurred[:, None], _shift(0.4).shift[:, None])[:, 0]
    assert (blurred - gaussian_blur(blurred, 1.0)).abs().mean() < 0.6 * (moved - gaussian_blur(moved, 1.0)).abs().mean()


def test_carried_detail_travels_with_the_view_and_leaves_a_still_view_and_uncovered_edges_alone():
    frames = _frames(2, SIZE)
    codec = _codec()                                     # a fresh refiner: it shows the smooth decode
    codec.cfg.refine_detail_sigma = 1.0
    previous = codec.to_unit(frames[:1])
    refined = codec.refine_unit(codec.decode_unit(codec.encode(frames[1:])), previous, _shift(3))
    moved, held = ViewCanvas(previous, 0).move(_shift(3))
    drawn = codec.carry_detail(refined, moved, held)
    coarse = drawn - gaussian_blur(refined, 1.0)         # what is left is the carried detail
    moved_detail = previous - gaussian_blur(previous, 1.0)
    # three pixels right; away from the blur's reach (3 px) of the uncovered edge and of the frame's right edge
    assert torch.allclose(coarse[..., 6:-3], moved_detail[..., 3:-6], atol=1e-5)
    assert torch.equal(drawn[..., :3], refined[..., :3])                          # uncovered: its own
    garbage = moved + (1 - held) * 50.0                  # what lies where nothing was shown does not leak beside it
    assert torch.allclose(codec.carry_detail(refined, garbage, held), drawn, atol=1e-5)
    still = codec.carry_detail(previous, previous, torch.ones_like(previous[:, :1]))
    assert torch.allclose(still, previous, atol=1e-6)
    with pytest.raises(ValueError, match="refine_detail_sigma"):
        ConvAEConfig(**TINY, refine_detail_sigma=-1.0)
    for margin in (-1, 2.5, "8"):                        # a hand-edited bundle config is named, not a crash later
        with pytest.raises(ValueError, match="refine_detail_margin"):
            ConvAEConfig(**TINY, refine_detail_margin=margin)


def test_the_canvas_keeps_what_a_turn_carries_out_of_the_view_and_brings_it_back():
    view = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    narrow, wide = ViewCanvas(view, 0), ViewCanvas(view, 4)
    for canvas in (narrow, wide):
        for px in (1.5, 1.5, -1.5, -1.5):               # 3 px right, whole pixels, then back
            moved, held = canvas.move(_shift(px))
    assert torch.equal(wide.view()[0], view) and held.eq(1).all()   # the columns past the edge came back
    back, known = narrow.move(_shift(0))
    assert known[..., -3:].eq(0).all() and torch.equal(back[..., :-3], view[..., :-3])    # without a margin: gone
    assert wide.state_bytes == (3 + 1) * (SIZE + 8) ** 2 * 4 + 2 * 4
    with pytest.raises(ValueError, match="margin"):
        ViewCanvas(view, -1)


def _edge_detail(x: torch.Tensor) -> torch.Tensor:
    """The 5 right-hand columns' detail finer than a blur of sigma 1."""
    return (x - gaussian_blur(x, 1.0))[..., -5:]


def test_a_stream_with_a_margin_shows_the_real_texture_again_when_the_view_turns_back():
    frames = _frames(2, SIZE)
    texture = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    real = ConvAutoencoder.to_unit(texture[None])
    z = _codec().encode(frames[1:]).repeat(2, 1, 1, 1)
    match = []
    for margin in (0, 6):
        codec = _codec()
        codec.cfg.refine_detail_sigma, codec.cfg.refine_detail_margin = 1.0, margin
        stream = codec.streaming_decoder()
        stream.reset(last_frame=texture.numpy())
        stream.decode_chunk(z, _shift(2.5, 2))                        # 5 px right: 5 columns past the edge
        shown = codec.to_unit(stream.decode_chunk(z, _shift(-2.5, 2)))[-1:]      # and back
        match.append(float(F.cosine_similarity(_edge_detail(shown).flatten(), _edge_detail(real).flatten(), 0)))
    assert match[1] > 0.9 and match[0] < 0.3


@pytest.mark.parametrize("size, fov, margin", [((16, 16), 90.0, 4), ((64, 64), 90.0, 32), ((24, 40), 110.0, 0)])
def test_a_cylinder_canvas_shows_a_still_view_exactly_as_it_was_painted(size, fov, margin):
    view = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
    canvas = ViewCanvas(view, margin, fov)
    assert canvas.map.scale >= 2                          # the view's edges are narrower on the cylinder
    for _ in range(3):
        still, known = canvas.move(CameraMotion(torch.zeros(2, 3)))
        canvas.paint(still)
    assert torch.equal(still, view) and known.eq(1).all()
    with pytest.raises(ValueError, match="field of view"):
        ViewCanvas(view, margin, 180.0)
    for bad in (-1.0, 180.0, True, "90"):                 # a hand-edited bundle config is named, not a crash later
        with pytest.raises(ValueError, match="refine_detail_fov"):
            ConvAEConfig(**TINY, refine_detail_fov=bad)


def test_a_turn_on_a_cylinder_moves_the_view_as_a_pinhole_camera_turns():
    h = w = 64
    f, centre_shift = 32.0, 4.0                           # a 90-degree view; its centre column moves 4 px right
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    canvas = ViewCanvas(torch.stack([rows, cols])[None], 8, 90.0)   # each pixel holds where it was
    moved, known = canvas.move(CameraMotion(torch.tensor([[2 * centre_shift / w, 0.0, 0.0]])))
    # the pinhole camera's turn, from its rays: the view pixel (u, v) shows what was at (us, vs)
    u, v = cols + 0.5 - w / 2, rows + 0.5 - h / 2
    turn = math.atan(centre_shift / f)
    depth = u / f * math.sin(turn) + math.cos(turn)
    us, vs = f * torch.tan(torch.atan(u / f) - turn), v / depth
    held = known[0, 0] > 0
    assert (moved[0, 1] - (us + w / 2 - 0.5))[held].abs().max() <= 1.0
    assert (moved[0, 0] - (vs + h / 2 - 0.5))[held].abs().max() <= 1.0
    middle = moved[0, 1, h // 2]
    assert middle[w // 2] == w // 2 - 4 and middle[-1] <= w - 1 - 6.5   # the centre 4 px, the edge 7 px
    assert held[h // 2].logical_not().sum() >= 6          # the view's left edge uncovered by 7 columns, not 4
    assert moved[0, 0, -1, -1] <= h - 1 - 2.5             # at the corner, the rows came from nearer the horizon
    flat, _ = ViewCanvas(torch.stack([rows, cols])[None], 8).move(CameraMotion(torch.tensor([[2 * 4 / w, 0.0, 0.0]])))
    assert torch.equal(flat[0, 1, :, 4:], cols[:, :-4])  # a flat canvas translates


def test_eval_camera_finds_the_field_of_view_of_frames_a_turning_pinhole_camera_drew():
    from training.camera import measure_turns

    h = w = 32
    f, centre_shift, n = 16.0, 2.0, 30                   # 90 degrees
    texture = gaussian_blur(torch.rand(1, 3, 64, 400, generator=torch.Generator().manual_seed(8)), 2.0)
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    u, v = cols + 0.5 - w / 2, rows + 0.5 - h / 2
    frames = []
    for t in range(n):                                   # turning left: what the view shows moves right
        azimuth = torch.atan(u / f) - t * math.atan(centre_shift / f)
        height = v * torch.cos(torch.atan(u / f))        # on a cylinder of radius f around the camera
        grid = torch.stack([(azimuth * f + 200) / 200 - 1, height / 32], -1)[None]
        frames.append(F.grid_sample(texture, grid, align_corners=False)[0])
    frames = (torch.stack(frames).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    actions = torch.zeros(n, 2)
    actions[:, 0] = 1                                    # turn_left held throughout; forward never
    result = measure_turns(frames, actions, [n], ["turn_left", "forward"], fovs=(0.0, 60.0, 90.0, 120.0), min_pairs=8)
    left = result["keys"]["turn_left"]
    assert result["fov"] == 90.0 and result["turning_keys"] == 1 and left["pairs"] == n - 2
    assert left["fits"]["90.0"]["centre_shift_px"] == centre_shift
    assert left["fits"]["90.0"]["mse"] < 0.5 * left["fits"]["0.0"]["mse"]     # a translation does not fit a turn
    assert result["keys"]["forward"] == {"pairs": 0}


def test_a_walk_moves_the_view_alike_with_or_without_a_margin():
    view = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    flow = torch.zeros(1, 2, SIZE // 4, SIZE // 4)
    flow[:, 0] = torch.linspace(-1, 1, SIZE // 4) * 4 / SIZE        # the view spreads sideways, as in a walk
    motion = CameraMotion(torch.tensor([[2 * 1.0 / SIZE, 2 * 1.0 / SIZE, 0.02]]), flow)
    alone, held = ViewCanvas(view, 0).move(motion)
    assert not torch.equal(alone, view) and held[..., 0, :].eq(0).all()   # moved; the row a pixel down uncovered
    widened, known = ViewCanvas(view, 4).move(motion)
    assert torch.equal(widened, alone) and torch.equal(known, held)
    assert known[..., 2:-2, 2:-2].eq(1).all()


def test_a_detail_carrying_stream_keeps_the_real_frames_texture_through_a_turn():
    frames = _frames(2, SIZE)
    texture = torch.randint(0, 256, (SIZE, SIZE, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    real = ConvAutoencoder.to_unit(texture[None])
    expected = (real - gaussian_blur(real, 1.0))[..., 3:-9]          # the real detail, 6 px right
    match = []
    for sigma in (0.0, 1.0):
        codec = _codec()
        codec.cfg.refine_detail_sigma = sigma
        stream = codec.streaming_decoder()
        stream.reset(last_frame=texture.numpy())
        z = codec.encode(frames[1:]).repeat(4, 1, 1, 1)
        shown = codec.to_unit(stream.decode_chunk(z, _shift(1.5, 4)))[-1:]
        detail = (shown - gaussian_blur(shown, 1.0))[..., 9:-3]
        match.append(float(F.cosine_similarity(detail.flatten(), expected.flatten(), 0)))
        if sigma:
            assert torch.allclose(stream.canvas.carry, torch.zeros(1, 2), atol=1e-5)     # 6 px travelled whole
            stream.reset(last_frame=texture.numpy())
            assert torch.equal(stream.canvas.carry, torch.zeros(1, 2))
    assert match[1] > 0.5 and match[0] < 0.2      # the texture went with the turn; the plain refiner lost it


def _warp_bundle(codec: ConvAutoencoder, path, turn_px: float = 2.0) -> Bundle:
    """A fresh camera-warp world model (its residual 0: the still prior) on ``codec``; key 0 turns ``turn_px``
    pixels right a frame."""
    cfg = ModelConfig.tiny(in_channels=4, latent_height=SIZE // 2, latent_width=SIZE // 2, stack_frames=1,
                           still_prior=0.5, camera_warp=True, window_frames=3, sink_frames=0)
    bundle = Bundle.random(cfg, codec=codec)
    with torch.no_grad():
        bundle.model.camera_motion[0, 0] = 2 * turn_px / SIZE
    bundle.save(path)
    return Bundle.load(path)


def test_a_session_hands_its_decoder_the_last_real_frame_and_the_keys_motion(tmp_path):
    from runtime import open_session

    frames = _frames(2, SIZE)
    session = open_session(_warp_bundle(_codec(copying=True), tmp_path / "b"), steps=1)
    session.reset(0, context=frames.numpy(), context_actions=[None, None])
    assert np.array_equal(session.step(None)[0], frames[-1].numpy())          # no key: the view stays
    turned = session.step(["forward"])[0]                                     # key 0 of the tiny space
    assert np.array_equal(turned[:, 2:], frames[-1, :, :-2].numpy())
    session.reset(0, context=frames.numpy(), context_actions=[None, None])
    assert np.array_equal(session.step(None)[0], frames[-1].numpy())          # reset: from the context again


def _chain_data(tmp_path, n: int = 48) -> str:
    """One episode where key 0 is always held and the view moves two pixels right a frame."""
    from training.data.shards import Episode, ShardStore

    g = torch.Generator().manual_seed(0)
    wide = torch.rand(1, 3, SIZE // 4, (SIZE + 2 * n) // 4, generator=g)
    wide = torch.nn.functional.interpolate(wide, size=(SIZE, SIZE + 2 * n), mode="bilinear", align_corners=False)
    frames = torch.stack([wide[0, :, :, 2 * (n - i): 2 * (n - i) + SIZE] for i in range(n)])
    frames = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    store = ShardStore(tmp_path / "data")
    store.write_meta({"engine": "synthetic", "version": "0", "fps": 10.0, "resolution": [SIZE, SIZE],
                      "action_space": {"keys": ["forward", "back", "left", "right", "attack"], "values": [],
                                       "bindings": {}}})
    actions = np.zeros((n, 5), np.float32)
    actions[:, 0] = 1
    store.append([Episode(frames, actions, seed=0)])
    return str(tmp_path / "data")


def test_train_refiner_learns_to_carry_the_moving_view_resumes_and_ships(tmp_path):
    from training.refiner import RefinerTrainConfig, chain_loss, chain_starts, episode_conditions, train_refiner
    from training.ship import ship

    assert chain_starts([5, 2, 4], 2).tolist() == [0, 1, 2, 7, 8]
    data = _chain_data(tmp_path)
    base = ConvAutoencoder(ConvAEConfig(**TINY)).eval()     # an untrained decoder: the moved frame is worth more
    save_codec(base, tmp_path / "base")
    world = _warp_bundle(ConvAutoencoder(ConvAEConfig(**TINY)), tmp_path / "world")
    cfg = RefinerTrainConfig(data=data, out=str(tmp_path / "r"), init=str(tmp_path / "base"),
                             motion=str(tmp_path / "world"), steps=60, batch=4, unroll=3, channels=8, blocks=1,
                             lr=1e-2, warmup=1, latent_noise=0.0, latent_blur=0.0)
    from training.codec import load_frames

    frames, lengths = load_frames(data)
    actions = torch.zeros(len(frames), 5)
    actions[:, 0] = 1
    cond = episode_conditions(actions, lengths, world.config.action_condition())
    rows = torch.arange(10, 14)[:, None] + torch.arange(4)

    def loss(codec) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(chain_loss(codec, frames[rows], world.model.camera_move(cond[rows[:, 1:]]), cfg)[0])

    from training.refiner import refiner_codec

    torch.manual_seed(0)
    before = loss(refiner_codec(base, cfg))        # a fresh refiner: the untrained decode
    assert train_refiner(cfg, progress=False)["steps_this_run"] == 60
    from training.codec import load_codec

    trained = load_codec(tmp_path / "r")
    assert loss(trained) < 0.5 * before
    for name, t in base.state_dict().items():                  # encoder and decoder untouched
        assert torch.equal(t, trained.state_dict()[name]), name
    cfg.steps = 62
    assert train_refiner(cfg, progress=False)["steps_this_run"] == 2
    plain = _warp_bundle(base, tmp_path / "plain")
    shipped = Bundle.load(ship(tmp_path / "plain", tmp_path / "shipped", decoder=str(tmp_path / "r")))
    assert shipped.codec.config()["refine_channels"] == 8 and plain.codec.refiner is None
    carrying = Bundle.load(ship(tmp_path / "shipped", tmp_path / "carrying", detail_sigma=2.0, detail_margin=4,
                                detail_fov=90.0))
    assert carrying.codec.config()["refine_detail_sigma"] == 2.0 and carrying.codec.config()["refine_detail_fov"] == 90
    assert carrying.codec.config()["refine_detail_margin"] == 4 and carrying.name == shipped.name   # the rest kept
    for flag in ("sigma", "margin", "fov"):
        with pytest.raises(ValueError, match=f"--detail-{flag} needs a codec with a frame refiner"):
            ship(tmp_path / "plain", tmp_path / "nope", **{f"detail_{flag}": 2})
    z = base.encode(frames[:2])
    assert torch.equal(shipped.codec.encode(frames[:2]), z)
    cfg.motion, cfg.out = str(tmp_path / "base"), str(tmp_path / "bad")
    with pytest.raises((ValueError, FileNotFoundError)):
        train_refiner(cfg, progress=False)


def test_student_chains_are_the_world_models_own_latents_from_real_frames_and_train_the_refiner(tmp_path):
    from training.codec import load_frames
    from training.refiner import RefinerTrainConfig, episode_producers, student_chains, train_refiner

    data = _chain_data(tmp_path, n=24)
    codec = ConvAutoencoder(ConvAEConfig(**TINY)).eval()
    save_codec(codec, tmp_path / "base")
    _warp_bundle(codec, tmp_path / "world")
    frames, lengths = load_frames(data)
    actions = torch.zeros(len(frames), 5)
    actions[:, 0] = 1
    producers = episode_producers(actions, lengths)
    assert producers[0].abs().sum() == 0 and torch.equal(producers[1:], actions[:-1])
    own = student_chains(str(tmp_path / "world"), frames, producers, lengths, chains=3, unroll=2, context=2)
    assert own.rows.shape == (3, 3) and torch.equal(own.rows[:, 1:] - own.rows[:, :1], torch.tensor([[1, 2]] * 3))
    assert own.latents.shape == (3, 2, 4, SIZE // 2, SIZE // 2) and own.motion.flow is None
    assert torch.allclose(own.motion.shift[..., 0], torch.full((3, 2), 2 * 2.0 / SIZE))   # key 0 held: 2 px
    cfg = RefinerTrainConfig(data=data, out=str(tmp_path / "r"), init=str(tmp_path / "base"),
                             motion=str(tmp_path / "world"), student=str(tmp_path / "world"), student_chains=4,
                             student_share=0.5, steps=2, batch=4, unroll=2, channels=8, blocks=1, warmup=1,
                             adversarial_weight=0.5)
    first = train_refiner(cfg, progress=False)
    assert "student_psnr" in first and first["adv_scale"] > 0
    assert (tmp_path / "r" / "student_chains.pt").is_file()
    assert "disc" in torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    cfg.steps, cfg.student_share = 3, 1.0                       # resumed: the chains are read back, not replayed
    assert train_refiner(cfg, progress=False)["steps_this_run"] == 1
    cfg.student_share = 1.5
    with pytest.raises(ValueError, match="student_share"):
        train_refiner(cfg, progress=False)


def test_a_lowpass_chain_loss_leaves_texture_within_a_block_to_the_judge():
    from training.refiner import RefinerTrainConfig, chain_loss

    codec = _codec(copying=True)
    g = torch.Generator().manual_seed(0)
    before = torch.randint(20, 230, (1, SIZE, SIZE, 3), generator=g, dtype=torch.uint8)
    checker = ((torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2 * 20 - 10).to(torch.int16)
    after = (before.to(torch.int16) + checker[None, :, :, None]).to(torch.uint8)   # zero mean in every 2x2 block
    chain = torch.stack([before, after], 1)
    still = CameraMotion(torch.zeros(1, 1, 3))
    z = codec.encode(after)[:, None]
    with torch.no_grad():
        pooled = chain_loss(codec, chain, still, RefinerTrainConfig(lowpass=4, edge_weight=0), z)[0]
        plain = chain_loss(codec, chain, still, RefinerTrainConfig(lowpass=1, edge_weight=0), z)[0]
    assert float(pooled) < 1e-6 < float(plain)


def test_rest_chains_start_where_the_engine_stands_still_and_aim_at_the_still_frame(tmp_path):
    from training.refiner import chain_starts, episode_producers, rest_starts, student_chains

    moving = torch.from_numpy(np.asarray(_frames(12, SIZE)))
    still = moving[-1:].repeat(12, 1, 1, 1)
    frames = torch.cat([moving, still])                     # 12 moving frames, then 12 of one still view
    actions = torch.zeros(24, 5)
    actions[:12, 0] = 1                                     # key 0 held while it moves (frames 1-12)
    producers = episode_producers(actions, [24])
    found = rest_starts(frames, producers, chain_starts([24], 5), 6)
    assert len(found) and found.min() >= 12                 # only inside the still stretch, after the key
    codec = ConvAutoencoder(ConvAEConfig(**TINY)).eval()
    _warp_bundle(codec, tmp_path / "world")
    rest = student_chains(str(tmp_path / "world"), frames, producers, [24], chains=3, unroll=2, context=2,
                          rest_skip=5)
    assert (rest.rows == rest.rows[:, :1]).all() and rest.rows.min() >= 13    # every target: the still frame
    assert rest.motion.shift.abs().max() == 0                                   # no key, no motion
    with pytest.raises(ValueError, match="stands still"):
        student_chains(str(tmp_path / "world"), moving, producers[:12], [12], chains=1, unroll=2, context=2,
                       rest_skip=5)
    from training.data.shards import Episode, ShardStore
    from training.refiner import RefinerTrainConfig, train_refiner

    store = ShardStore(tmp_path / "data")
    store.write_meta({"engine": "synthetic", "version": "0", "fps": 10.0, "resolution": [SIZE, SIZE],
                      "action_space": {"keys": ["forward", "back", "left", "right", "attack"], "values": [],
                                       "bindings": {}}})
    store.append([Episode(frames.numpy(), actions.numpy(), seed=0)])
    save_codec(codec, tmp_path / "base")
    cfg = RefinerTrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "r"), init=str(tmp_path / "base"),
                             motion=str(tmp_path / "world"), student=str(tmp_path / "world"), student_chains=2,
                             rest_chains=3, rest_skip=4, steps=1, batch=2, unroll=2, channels=8, blocks=1, warmup=1)
    train_refiner(cfg, progress=False)
    saved = torch.load(tmp_path / "r" / "student_chains.pt", weights_only=True)
    assert saved["rows"].shape == (5, 3) and (saved["rows"][2:] == saved["rows"][2:, :1]).all()


def test_a_dataset_gives_every_action_row_for_row_with_its_frames(tmp_path):
    from training.data import ClipDataset

    data = _chain_data(tmp_path, n=10)
    clips = ClipDataset(data, clip_frames=1)
    frames, actions = clips.all_frames(), clips.all_actions()
    assert frames.shape[0] == actions.shape[0] == 10 and actions.dtype == np.float32
    assert (actions[:, 0] == 1).all() and (actions[:, 1:] == 0).all()
    empty = ClipDataset(data, clip_frames=1, seeds={99})
    assert empty.all_actions().shape == (0, 5)


@pytest.mark.parametrize("fov", [0.0, 90.0])
def test_a_refiner_trained_with_the_carried_texture_is_drawn_as_the_stream_draws_it(fov):
    from training.refiner import RefinerTrainConfig, chain_loss, refiner_codec

    cfg = RefinerTrainConfig(channels=8, blocks=1, latent_noise=0.0, latent_blur=0.0, detail_sigma=1.0,
                             detail_margin=4, detail_fov=fov)
    codec = refiner_codec(ConvAutoencoder(ConvAEConfig(**TINY)), cfg)
    assert codec.config()["refine_detail_sigma"] == 1.0 and codec.config()["refine_detail_margin"] == 4
    assert codec.config()["refine_detail_fov"] == fov
    texture = torch.randint(0, 256, (1, 3, SIZE, SIZE, 3), generator=torch.Generator().manual_seed(6),
                            dtype=torch.uint8)
    motion = CameraMotion(_shift(2, 2).shift[None])                         # 2 px right, twice
    loss, _, drawn = chain_loss(codec, texture, motion, cfg)
    loss.backward()
    assert codec.refiner.conv_out.weight.grad.abs().sum() > 0             # the refiner still learns through it
    stream = codec.streaming_decoder()                                     # the stream, from the same real frame
    stream.reset(last_frame=texture[0, 0].numpy())
    shown = codec.to_unit(stream.decode_chunk(codec.encode(texture[0, 1:]), _shift(2, 2)))
    assert (drawn[0].detach().clamp(-1, 1) - shown).abs().max() < 3 / 255   # the same frames, but for quantisation
    if fov:
        return                                           # a pinhole turn moves columns unevenly: the flat check below
    real = ConvAutoencoder.to_unit(texture[0, :1])
    carried = (drawn[0, -1:] - gaussian_blur(drawn[0, -1:], 1.0))[..., 7:-3]
    assert F.cosine_similarity(carried.flatten(), (real - gaussian_blur(real, 1.0))[..., 3:-7].flatten(), 0) > 0.8


@pytest.mark.gpu
def test_the_refiner_trains_on_cuda_with_its_student_chains_and_saves_a_cpu_codec(tmp_path):
    from training.codec import load_codec
    from training.refiner import RefinerTrainConfig, train_refiner

    data = _chain_data(tmp_path, n=24)
    codec = ConvAutoencoder(ConvAEConfig(**TINY)).eval()
    save_codec(codec, tmp_path / "base")
    _warp_bundle(codec, tmp_path / "world")
    cfg = RefinerTrainConfig(data=data, out=str(tmp_path / "r"), init=str(tmp_path / "base"),
                             motion=str(tmp_path / "world"), student=str(tmp_path / "world"), student_chains=4,
                             steps=2, batch=4, unroll=2, channels=8, blocks=1, warmup=1, adversarial_weight=0.5,
                             detail_sigma=1.0, detail_margin=4, device="cuda")
    assert "student_psnr" in train_refiner(cfg, progress=False)
    trained = load_codec(tmp_path / "r")
    assert next(trained.parameters()).device.type == "cpu" and trained.refiner is not None
    cfg.steps = 3                                          # resumed on the same device from the CPU checkpoint
    assert train_refiner(cfg, progress=False)["steps_this_run"] == 1
