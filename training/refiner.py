"""Train a codec's frame refiner (`runtime.autoencoder.FrameRefiner`) on short chains of real frames.

The refiner draws each frame from its decode and the frame shown before it, moved by the camera. It is
trained the way it runs: a chain starts from a real frame, each next frame is decoded from the codec's
latent of the real frame (blurred and noised like a world model's latents), drawn on the chain's own
previous output moved by the camera motion of that frame, and compared with the real frame; ``unroll``
frames per chain, the gradient through the whole chain, so the refiner learns not to let its own small
errors pile up. The camera motion comes from a world model (``motion``: a bundle with a camera warp):
its measured per-key motion under each frame's recorded keys and their running average, exactly what
the session hands the decoder at play time. With a ``student`` (a world model), part of every batch is
chains it played itself from real frames (`student_chains`): a world model's latents drift where the engine
stands still, and rest chains (after up to ``rest_skip`` unseen no-key frames, every target the still real
frame) teach the refiner to keep a still view however far they drifted. Encoder and decoder stay frozen:
every world model on the codec still decodes as before, and the refiner is the only new part. Output directory:
    ckpt.pt            training state (resume)
    codec.json         the codec config with the refiner (``refine_channels``, ...)
    codec.safetensors  the codec's weights, refiner included (`forcekit ship --decoder` takes the directory)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from runtime.autoencoder import ConvAEConfig, ConvAutoencoder, FrameRefiner
from runtime.canvas import ViewCanvas
from runtime.warp import CameraMotion
from training.checkpoint import Every, load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state
from training.codec import adversarial_step, blur_latents, lr_at, reconstruction_loss, save_codec


@dataclass
class RefinerTrainConfig:
    data: str = ""
    out: str = ""
    init: str = ""                 # a codec dir or bundle: the frozen encoder and decoder
    motion: str = ""               # a bundle with a camera warp: how each frame's keys move the view
    steps: int = 3000
    batch: int = 8                 # chains per step
    unroll: int = 4                # frames per chain after its real first frame
    channels: int = 24             # ConvAEConfig.refine_channels
    blocks: int = 2                # ConvAEConfig.refine_blocks
    warp: str = "bilinear"         # ConvAEConfig.refine_warp
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 100
    l1_weight: float = 0.2
    edge_weight: float = 0.5
    latent_noise: float = 0.1      # std of the latent noise, relative to the batch latent std
    latent_blur: float = 0.5       # chance a latent is blurred toward its 3x3 average (training.codec.blur_latents)
    # A world model (bundle) whose own latents the refiner also learns on: `student_chains` of it, this share of
    # every batch. Its latents drift where the engine stands still; the refiner learns to keep the view there.
    student: str = ""
    student_chains: int = 1024
    student_share: float = 0.5
    # Rest chains of the student (`student_chains` with rest_skip): this many more, each after up to rest_skip
    # unseen no-key frames, every target the still real frame; a still view then stays still however far the
    # student's latents have drifted.
    rest_chains: int = 0
    rest_skip: int = 256
    # A patch discriminator judging the drawn frames against the real ones (x the adaptive weight, 0: none):
    # where the moved previous frame is close but not exact (a turn streams Doom's floor a little unlike a
    # scroll) the plain loss prefers the decode's blur; the judge prefers the sharp texture that travelled.
    adversarial_weight: float = 0.0
    disc_lr: float = 2e-4
    # Compare drawn and real frames averaged over lowpass x lowpass pixels (1: pixel by pixel). Doom's floor does
    # not stream exactly as the camera warp moves it (the moved previous frame is 26-28 dB from the next real one
    # under a turn), so pixel losses prefer a blur to texture that travelled a little wrong; averaged, they hold
    # the layout and leave the texture to the judge (use with adversarial_weight, edge_weight 0).
    lowpass: int = 1
    # Train as it runs with the texture carried with the view (`ConvAEConfig.refine_detail_sigma`,
    # `refine_detail_margin` and `refine_detail_fov`, kept in the trained codec; 0: off): each drawn frame's fine
    # detail is the chain's previous frames', moved, as the stream draws it, so the refiner learns on the frame it
    # will be shown and the loss (and the judge) reach its own texture only where the move uncovered the view.
    detail_sigma: float = 0.0
    detail_margin: int = 0
    detail_fov: float = 0.0
    seed: int = 0
    ckpt_every_s: float = 180.0
    log_every: int = 50
    threads: int = 0
    device: str = "cpu"            # where the codec, the refiner, the judge and the chains train (cpu, cuda, cuda:N)


def episode_producers(actions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Recorded actions ``[N, D]`` of episodes of ``lengths`` (concatenated; row t produced frame t + 1) -> the
    action that produced each frame (none for an episode's first)."""
    from training.latents import conditioning_actions

    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return torch.cat([conditioning_actions(actions[a:b]) for a, b in zip(offsets, offsets[1:])])


def episode_conditions(producers: torch.Tensor, lengths: list[int], condition) -> torch.Tensor:
    """Each frame's producing action (`episode_producers`) -> its action condition as a stream feeds it
    (`runtime.actions.ActionCondition`, reset at each episode's first frame)."""
    out, offset = [], 0
    for n in lengths:
        condition.reset()
        out.append(condition(list(producers[offset:offset + n])))
        offset += n
    return torch.cat(out) if out else torch.zeros(0, condition.dim)


def chain_starts(lengths: list[int], unroll: int) -> torch.Tensor:
    """Rows i (episodes concatenated) whose next ``unroll`` frames are in the same episode."""
    out, offset = [], 0
    for n in lengths:
        out.append(torch.arange(offset, offset + max(0, n - unroll)))
        offset += n
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _lowpass(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, k) if k > 1 else x


def chain_loss(codec: ConvAutoencoder, frames: torch.Tensor, motion: CameraMotion, cfg: RefinerTrainConfig,
               latents: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Loss of one batch of chains: real frames uint8 ``[B, 1 + unroll, H, W, 3]`` and the motion into each of
    the ``unroll`` later frames (shift ``[B, unroll, 3]``, flow ``[B, unroll, 2, h, w]``). The later frames are
    decoded from ``latents`` ``[B, unroll, C, h, w]`` (a world model's, `student_chains`) where given, else from
    the codec's own latents of the real frames, blurred and noised. Also returns the drawn frames
    ``[B, unroll, 3, H, W]``."""
    b, k = frames.shape[0], frames.shape[1] - 1
    device = next(codec.parameters()).device
    x = codec.to_unit(frames.flatten(0, 1).to(device)).view(b, k + 1, 3, *frames.shape[2:4])
    with torch.no_grad():
        if latents is None:
            z = codec.encode_unit(x[:, 1:].flatten(0, 1))
            z = blur_latents(z, cfg.latent_blur)
            z = z + cfg.latent_noise * z.std() * torch.randn_like(z)
        else:
            z = latents.flatten(0, 1).to(device)
        decoded = codec.decode_unit(z).view(b, k, *x.shape[2:])
    previous, total, stats, drawn = x[:, 0], 0.0, {}, []
    canvas = None
    if codec.cfg.refine_detail_sigma > 0:
        canvas = ViewCanvas(x[:, 0], codec.cfg.refine_detail_margin, codec.cfg.refine_detail_fov)
    for i in range(k):
        step = motion.at((slice(None), i))
        frame = codec.refine_unit(decoded[:, i], previous, step)
        if canvas is not None:   # the canvas holds no gradient: the carried texture is not the refiner's
            frame = codec.carry_detail(frame, *canvas.move(step))
            canvas.paint(frame.detach().clamp(-1, 1))
        drawn.append(frame)
        loss, stats = reconstruction_loss(_lowpass(x[:, i + 1], cfg.lowpass), _lowpass(drawn[-1], cfg.lowpass),
                                          cfg.l1_weight, cfg.edge_weight)
        total = total + loss / k
        previous = drawn[-1].clamp(-1, 1)
    return total, {**stats, "loss": float(total.detach())}, torch.stack(drawn, 1)


@dataclass
class StudentChains:
    """Chains whose later frames a world model generated from the real frames before them (`student_chains`)."""

    rows: torch.Tensor        # long [n, 1 + unroll]: the real frames (the last context frame, then the targets)
    latents: torch.Tensor     # [n, unroll, C, h, w]: the model's normalised latents of the targets
    motion: CameraMotion      # shift [n, unroll, 3], flow [n, unroll, 2, h, w] or None: what its session moved


def rest_starts(frames: torch.Tensor, producers: torch.Tensor, starts: torch.Tensor, span: int,
                min_db: float = 40.0) -> torch.Tensor:
    """The ``starts`` whose ``span`` frames were all produced with no key held and stay within ``min_db`` PSNR of
    their first: where the engine stands still (its momentum run out)."""
    keep = []
    for s in starts.tolist():
        if producers[s + 1:s + span].abs().sum() > 0:
            continue
        window = frames[s:s + span].float()
        mse = (window - window[:1]).pow(2).flatten(1).mean(1).max()
        if mse <= 255.0 ** 2 / 10 ** (min_db / 10):
            keep.append(s)
    return torch.tensor(keep, dtype=torch.long)


@torch.no_grad()
def student_chains(bundle: str, frames: torch.Tensor, producers: torch.Tensor, lengths: list[int], chains: int,
                   unroll: int, context: int = 4, seed: int = 0, rest_skip: int = 0, device: str = "cpu",
                   progress: bool = False) -> StudentChains:
    """``chains`` random chains of the recorded episodes (``frames`` concatenated, ``producers[t]`` the action that
    produced frame t) played by ``bundle``'s session: from ``context`` real frames (its key momentum from the
    episode's keys before them), ``unroll`` frames under the recorded keys. The refiner learns on them what a
    world model's own latents look like, drift at rest included, against the real frames they stand for.

    ``rest_skip`` > 0: *rest chains* instead, from starts where the engine stands still (`rest_starts`); the
    session first plays 0..rest_skip no-key frames unseen, so the chain's latents have drifted as far as a long
    still view drifts, and every target is the last real frame: the engine's frame does not change at rest."""
    from tqdm import tqdm

    from runtime import open_session

    session = open_session(bundle, device=device)
    starts = chain_starts(lengths, context - 1 + unroll)
    if rest_skip:
        starts = rest_starts(frames, producers, starts, context + unroll)
        if not len(starts):
            raise ValueError("no stretch of the data stands still for a rest chain (no key, frames unchanged)")
    episode_start = torch.repeat_interleave(torch.tensor([0, *lengths[:-1]]).cumsum(0), torch.tensor(lengths))
    g = torch.Generator().manual_seed(seed)
    rows, latents, shifts, flows = [], [], [], []
    for i, s in enumerate(tqdm(starts[torch.randint(len(starts), (chains,), generator=g)].tolist(),
                               desc="rest chains" if rest_skip else "student chains", disable=not progress)):
        last = s + context - 1
        session.reset(seed + i, context=frames[s:last + 1].numpy(),
                      context_actions=list(producers[s:last + 1].numpy()),
                      action_history=list(producers[int(episode_start[s]):s].numpy()))
        no_key = torch.zeros_like(producers[0]).numpy()
        for _ in range(int(torch.randint(rest_skip + 1, (1,), generator=g)) if rest_skip else 0):
            session.generate_latents(no_key)
        z, moves = [], []
        for h in range(unroll):
            z.append(session.generate_latents(no_key if rest_skip else producers[last + 1 + h].numpy()))
            moves.append(session.motion)
        rows.append(torch.full((1 + unroll,), last) if rest_skip else torch.arange(last, last + 1 + unroll))
        latents.append(torch.cat(z).cpu())
        shifts.append(torch.cat([m.shift for m in moves]).cpu())
        flows.append(None if moves[0].flow is None else torch.cat([m.flow for m in moves]).cpu())
    flow = None if flows[0] is None else torch.stack(flows)
    return StudentChains(torch.stack(rows), torch.stack(latents).float(), CameraMotion(torch.stack(shifts), flow))


def _joined(a: StudentChains, b: StudentChains) -> StudentChains:
    flow = None if a.motion.flow is None else torch.cat([a.motion.flow, b.motion.flow])
    return StudentChains(torch.cat([a.rows, b.rows]), torch.cat([a.latents, b.latents]),
                         CameraMotion(torch.cat([a.motion.shift, b.motion.shift]), flow))


def refiner_codec(init: ConvAutoencoder, cfg: RefinerTrainConfig) -> ConvAutoencoder:
    """``init``'s codec with a fresh refiner of ``cfg``'s shape (its encoder and decoder copied)."""
    base = {k: v for k, v in init.config().items() if k != "type"}
    codec = ConvAutoencoder(replace(ConvAEConfig(**base), refine_channels=cfg.channels, refine_blocks=cfg.blocks,
                                    refine_warp=cfg.warp, refine_detail_sigma=cfg.detail_sigma,
                                    refine_detail_margin=cfg.detail_margin, refine_detail_fov=cfg.detail_fov))
    state = {k: v for k, v in init.state_dict().items() if not k.startswith("refiner.")}
    codec.load_state_dict({**codec.state_dict(), **state})
    return codec


def _load_init(path: str) -> ConvAutoencoder:
    from training.codec import load_codec_or_bundle

    codec = load_codec_or_bundle(path)
    if not isinstance(codec, ConvAutoencoder):
        raise ValueError(f"--init {path}: a refiner needs a conv_ae codec, got {codec.type_name!r}")
    return codec


def train_refiner(cfg: RefinerTrainConfig, progress: bool = True) -> dict:
    """Train (or resume) a refiner in ``cfg.out``; returns the last step's figures."""
    from tqdm import tqdm

    from runtime import Bundle
    from training.data import ClipDataset

    if cfg.unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {cfg.unroll}")
    if cfg.lowpass < 1:
        raise ValueError(f"lowpass must be >= 1, got {cfg.lowpass}")
    if not 0 <= cfg.student_share <= 1:
        raise ValueError(f"student_share must be in [0, 1], got {cfg.student_share}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world = Bundle.load(cfg.motion, device=cfg.device)
    if world.model.camera_motion is None:
        raise ValueError(f"--motion {cfg.motion}: its model has no camera warp (ModelConfig.camera_warp)")
    seed_everything(cfg.seed)
    codec = refiner_codec(_load_init(cfg.init), cfg).to(cfg.device)
    codec.requires_grad_(False)
    codec.eval()
    refiner: FrameRefiner = codec.refiner
    refiner.requires_grad_(True).train()
    opt = torch.optim.AdamW(refiner.parameters(), lr=cfg.lr, weight_decay=0.0)
    disc = disc_opt = None
    if cfg.adversarial_weight > 0:
        from training.discriminator import PatchDiscriminator

        disc = PatchDiscriminator().to(cfg.device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))

    clips = ClipDataset(cfg.data, clip_frames=1)     # one pass over the shards: frames and actions
    frames, actions = torch.from_numpy(clips.all_frames()), torch.from_numpy(clips.all_actions())
    lengths = [n for _, _, n, _ in clips.episode_rows]
    producers = episode_producers(actions, lengths)
    conditions = episode_conditions(producers, lengths, world.config.action_condition()).to(cfg.device)
    starts = chain_starts(lengths, cfg.unroll)
    if not len(starts):
        raise ValueError(f"{cfg.data}: no episode is {cfg.unroll + 1} frames long")
    own = None
    if cfg.student:
        cached = out / "student_chains.pt"     # generated once: a resumed run reads them back
        saved = load_checkpoint(cached)
        if saved is not None:
            own = StudentChains(saved["rows"], saved["latents"], CameraMotion(saved["shift"], saved.get("flow")))
        else:
            own = student_chains(cfg.student, frames, producers, lengths, cfg.student_chains, cfg.unroll,
                                 seed=cfg.seed, device=cfg.device, progress=progress)
            if cfg.rest_chains:
                own = _joined(own, student_chains(cfg.student, frames, producers, lengths, cfg.rest_chains, cfg.unroll,
                                                  seed=cfg.seed + 1, rest_skip=cfg.rest_skip, device=cfg.device,
                                                  progress=progress))
            save_checkpoint(cached, {"rows": own.rows, "latents": own.latents, "shift": own.motion.shift,
                                     **({} if own.motion.flow is None else {"flow": own.motion.flow})})
    if own is not None:
        own = StudentChains(own.rows, own.latents.to(cfg.device), CameraMotion(*(
            None if t is None else t.to(cfg.device) for t in own.motion)))
    mine = round(cfg.batch * cfg.student_share) if own is not None else 0

    step = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = load_checkpoint(out / "ckpt.pt")
    if ckpt is not None:
        refiner.load_state_dict(ckpt["refiner"])
        opt.load_state_dict(ckpt["opt"])
        if disc is not None and "disc" in ckpt:
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_opt"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        gen.set_state(ckpt["gen"])

    def checkpoint() -> None:   # the codec dir too, so a run in progress can be shipped and measured
        state = {"refiner": refiner.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng_state(),
                 "gen": gen.get_state(), "train_cfg": asdict(cfg)}
        if disc is not None:
            state.update(disc=disc.state_dict(), disc_opt=disc_opt.state_dict())
        save_checkpoint(out / "ckpt.pt", state)
        save_codec(codec, out)

    every = Every(cfg.ckpt_every_s)
    bar = tqdm(total=cfg.steps, initial=step, desc="train refiner", disable=not progress)
    stats, t0, first = {}, time.time(), step
    offsets = torch.arange(cfg.unroll + 1)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        parts = []       # (chains, loss, figures, drawn) of the real latents' chains and of the world model's
        real = []        # the real frames those chains stand for
        if cfg.batch > mine:
            rows = starts[torch.randint(len(starts), (cfg.batch - mine,), generator=gen)][:, None] + offsets
            with torch.no_grad():
                motion = world.model.camera_move(conditions[rows[:, 1:]])
            parts.append((cfg.batch - mine, *chain_loss(codec, frames[rows], motion, cfg)))
            real.append(frames[rows[:, 1:]])
        if mine:
            pick = torch.randint(len(own.rows), (mine,), generator=gen)
            parts.append((mine, *chain_loss(codec, frames[own.rows[pick]], own.motion.at(pick), cfg,
                                            own.latents[pick])))
            real.append(frames[own.rows[pick, 1:]])
        loss = sum(n * part for n, part, _, _ in parts) / cfg.batch
        stats = {**parts[0][2], "loss": float(loss.detach())}
        if mine:
            stats["student_psnr"] = parts[-1][2]["psnr"]
        if disc is not None:
            x = codec.to_unit(torch.cat(real).flatten(0, 1).to(cfg.device))
            loss, adv = adversarial_step(refiner.conv_out.weight, disc, disc_opt, x,
                                         [torch.cat([d for _, _, _, d in parts]).flatten(0, 1)], loss,
                                         cfg.adversarial_weight)
            stats.update(adv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}")
        if every():
            checkpoint()
    bar.close()
    checkpoint()
    return {"step": step, "steps_this_run": step - first, "seconds_this_run": round(time.time() - t0, 1), **stats}
