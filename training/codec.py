"""Train and evaluate the per-frame latent codec (runtime/autoencoder.py).

Training uses random crops (the autoencoder is fully convolutional with a small receptive
field, so crops teach it the same thing at a fraction of the cost per step; full frames are
used for normalisation statistics and evaluation). Loss = MSE + `l1_weight` * L1 on [-1, 1]
pixels; a small Gaussian noise on the latents makes the decoder tolerant of the imperfect
latents a world model produces. A codec can also start from a trained one with its encoder frozen
(the latent space every world model on it was trained in stays the same) and train its decoder
against a patch discriminator (training/discriminator.py) on latents blurred like a world
model's, so it draws texture instead of the average. Output directory:
    ckpt.pt          training state (resume)
    codec.json       codec config (type conv_ae, with measured latent normalisation)
    codec.safetensors  codec weights (the same tensors a bundle stores under `codec.`)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from runtime.autoencoder import ConvAEConfig, ConvAutoencoder
from training.checkpoint import (
    Every,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    tensorboard_writer,
)

if TYPE_CHECKING:
    from training.refiner import RefinerTrainConfig


@dataclass
class CodecTrainConfig:
    data: str = ""
    out: str = ""
    steps: int = 20000
    batch: int = 32
    crop: int = 32                  # training crop size (multiple of the codec factor); 0 = full frames
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 200
    l1_weight: float = 0.2
    latent_noise: float = 0.05      # std of latent noise, relative to the batch latent std
    # Weight of an L1 loss on the horizontal and vertical pixel differences: MSE and L1 alone let the
    # decoder smooth texture it cannot place exactly (the first codec kept 0.27 of the real frames'
    # Laplacian variance at 33 dB), which caps how sharp any world model decoded by it can look.
    edge_weight: float = 0.0
    # Starting point and the adversarial decoder fine-tune. `init` names the codec (or bundle) the
    # weights came from, for the record; `freeze_encoder` trains the decoder only and keeps the
    # init's latent normalisation, so the codec still decodes every model trained on the init.
    init: str = ""
    freeze_encoder: bool = False
    adversarial_weight: float = 0.0  # x the adaptive weight (training.discriminator.adaptive_weight)
    disc_lr: float = 2e-4
    # Chance that a training latent is blurred toward its 3x3 average by a random amount: the decoder
    # then also learns to draw texture from the softer latents a one-step world model produces.
    latent_blur: float = 0.0
    # A world model (bundle dir) whose own latents the decoder also learns to draw sharp: before training,
    # it is rolled out from `fake_rollouts` training clips under their recorded keys for `fake_frames`
    # frames each; every step decodes crops of those latents too, judged by the discriminator and held
    # to what the init decoder draws at a quarter of the resolution (the layout the model chose).
    fake_bundle: str = ""
    fake_rollouts: int = 64
    fake_frames: int = 24
    # Judge pairs of consecutive frames (both crops at the same place) instead of single frames: the engine's
    # texture travels with the view, so a decoder that paints a texture fixed to the token grid while the
    # layout under it turns (what a single-frame judge let through) is told apart from the engine.
    adversarial_pairs: bool = False
    seed: int = 0
    ckpt_every_s: float = 180.0
    log_every: int = 50
    threads: int = 0                # torch threads (0: leave as is)


def lr_at(cfg: CodecTrainConfig | RefinerTrainConfig, step: int) -> float:
    """Linear warmup to ``cfg.lr``, then a cosine to ``cfg.min_lr`` at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))  # a float: checkpoints are plain


def random_crops(frames: torch.Tensor, idx: torch.Tensor, crop: int, factor: int,
                 gen: torch.Generator) -> torch.Tensor:
    """uint8 [n, crop, crop, 3] crops at positions aligned to the codec factor."""
    n, h, w, _ = frames.shape
    if crop <= 0 or crop >= min(h, w):
        return frames[idx]
    ys = torch.randint(0, (h - crop) // factor + 1, (len(idx),), generator=gen) * factor
    xs = torch.randint(0, (w - crop) // factor + 1, (len(idx),), generator=gen) * factor
    return torch.stack([frames[i, y:y + crop, x:x + crop] for i, y, x in zip(idx.tolist(), ys.tolist(),
                                                                              xs.tolist())])


def pair_starts(lengths: list[int]) -> torch.Tensor:
    """Indices i of frames concatenated from episodes of ``lengths`` whose next frame i + 1 is in the same episode."""
    out, offset = [], 0
    for n in lengths:
        out.append(torch.arange(offset, offset + n - 1))
        offset += n
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def paired(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``x[idx]`` and ``x[idx + 1]`` side by side on ``dim``, so one random crop cuts both at the same place."""
    return torch.cat([x[idx], x[idx + 1]], dim=dim)


def split_pairs(x: torch.Tensor) -> torch.Tensor:
    """[n, 2c, h, w] pairs -> [2n, c, h, w]: the first frames, then the second ones."""
    return torch.cat(x.chunk(2, dim=1))


def join_pairs(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_pairs`: [2n, c, h, w] -> [n, 2c, h, w]."""
    return torch.cat(x.chunk(2), dim=1)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical differences of neighbouring pixels of [n, c, h, w] images."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def blur_latents(z: torch.Tensor, chance: float) -> torch.Tensor:
    """Each latent, with probability ``chance``, mixed with its 3x3 average by a uniform random amount."""
    if chance <= 0:
        return z
    n = len(z)
    amount = torch.rand(n, 1, 1, 1) * (torch.rand(n, 1, 1, 1) < chance)
    soft = F.avg_pool2d(z, 3, stride=1, padding=1, count_include_pad=False)
    return z + amount.to(z) * (soft - z)


def reconstruct(model: ConvAutoencoder, batch_u8: torch.Tensor, latent_noise: float, latent_blur: float = 0.0,
                freeze_encoder: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch in [-1, 1] and its decode from (augmented) latents."""
    x = model.to_unit(batch_u8)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_encoder):
        z = model.encoder(x)
    z = blur_latents(z, latent_blur)
    if latent_noise > 0:
        z = z + latent_noise * z.detach().std() * torch.randn_like(z)
    return x, model.decoder(z)


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, l1_weight: float,
                        edge_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    mse = F.mse_loss(y, x)
    loss = mse + l1_weight * (y - x).abs().mean()
    if edge_weight > 0:
        loss = loss + edge_weight * sum((gy - gx).abs().mean() for gy, gx in zip(image_gradients(y),
                                                                                  image_gradients(x)))
    # PSNR on [0, 255] of the [-1, 1] MSE: 255^2 / (mse * 127.5^2).
    return loss, {"loss": float(loss.detach()), "psnr": float(10 * torch.log10(4.0 / mse.detach()))}


def codec_loss(model: ConvAutoencoder, batch_u8: torch.Tensor, l1_weight: float,
               latent_noise: float, edge_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    x, y = reconstruct(model, batch_u8, latent_noise)
    return reconstruction_loss(x, y, l1_weight, edge_weight)


def adversarial_step(last_layer: torch.Tensor, disc: torch.nn.Module, disc_opt: torch.optim.Optimizer,
                     x: torch.Tensor, ys: list[torch.Tensor], rec_loss: torch.Tensor,
                     weight: float) -> tuple[torch.Tensor, dict]:
    """One discriminator update on x (real) against each decoded batch in ys, then the generator's total
    loss: the reconstruction plus the hinge generator loss, weighted adaptively at ``last_layer`` (the
    generator's output weight)."""
    from training.discriminator import adaptive_weight, hinge_discriminator_loss, hinge_generator_loss

    real_logits = disc(x)
    d_loss = sum(hinge_discriminator_loss(real_logits, disc(y.detach())) for y in ys) / len(ys)
    disc_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    disc_opt.step()
    g_loss = sum(hinge_generator_loss(disc(y)) for y in ys) / len(ys)
    scale = weight * adaptive_weight(rec_loss, g_loss, last_layer)
    total = rec_loss + scale * g_loss
    return total, {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach()), "adv_scale": float(scale)}


@torch.no_grad()
def student_latents(bundle: str, data: str, rollouts: int, frames: int, context: int = 4,
                    seed: int = 0, progress: bool = False) -> torch.Tensor:
    """Raw (un-normalised) latents [rollouts * frames, C, h, w] that ``bundle`` generates from random
    training clips of ``data``, each continued from its first ``context`` real frames under its recorded keys."""
    from tqdm import tqdm

    from runtime import open_session
    from training.data import ClipDataset
    from training.latents import conditioning_actions

    session = open_session(bundle)
    clips = ClipDataset(data, clip_frames=context + frames)
    g = torch.Generator().manual_seed(seed)
    codec = session.bundle.codec
    out = []
    for i in tqdm(torch.randint(len(clips), (rollouts,), generator=g).tolist(), desc="student latents",
                  disable=not progress):
        clip = clips[i]
        acts = clip["actions"].numpy()
        session.reset(seed + i, context=clip["frames"][:context].numpy(),
                      context_actions=list(conditioning_actions(clip["actions"])[:context].numpy()))
        z = torch.cat([session.generate_latents(acts[context - 1 + h]) for h in range(frames)])
        out.append(z * codec.scale + codec.shift)
    return torch.cat(out)


def random_latent_crops(latents: torch.Tensor, n: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """n random [C, crop, crop] crops of [N, C, h, w] latents (all of each when crop covers it)."""
    idx = torch.randint(len(latents), (n,), generator=gen)
    h, w = latents.shape[-2:]
    if crop <= 0 or crop >= min(h, w):
        return latents[idx]
    ys = torch.randint(0, h - crop + 1, (n,), generator=gen).tolist()
    xs = torch.randint(0, w - crop + 1, (n,), generator=gen).tolist()
    return torch.stack([latents[i, :, y:y + crop, x:x + crop] for i, y, x in zip(idx.tolist(), ys, xs)])


@torch.no_grad()
def measure_normalisation(model: ConvAutoencoder, frames: torch.Tensor, n: int = 2048,
                          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of raw encoder outputs over up to n frames."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(frames), generator=g)[:n]
    zs = torch.cat([model.encoder(model.to_unit(frames[idx[i:i + 256]])) for i in range(0, len(idx), 256)])
    return zs.mean((0, 2, 3)), zs.std((0, 2, 3)).clamp(min=1e-4)


def save_codec(model: ConvAutoencoder, out: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(out / ".codec.safetensors.tmp"))
    (out / ".codec.safetensors.tmp").replace(out / "codec.safetensors")
    (out / "codec.json").write_text(json.dumps(model.config(), indent=2))


def load_codec(path: str | Path) -> ConvAutoencoder:
    """A trained codec dir; a missing, garbage or truncated file fails with a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / "codec.json", path / "codec.safetensors"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no codec.json (train one with `forcekit train codec`)")
    try:
        model = ConvAutoencoder.from_config(json.loads(cfg_file.read_text()))
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{cfg_file}: not a codec config ({e})") from e
    try:
        model.load_state_dict(load_file(str(weights_file)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{weights_file}: unreadable, truncated or not this codec's weights ({e})") from e
    return model.eval()


def load_codec_or_bundle(path: str | Path):
    """A trained codec dir (codec.json), or a bundle dir's codec (config.json and no codec.json)."""
    path = Path(path)
    if not (path / "codec.json").is_file() and (path / "config.json").is_file():
        from runtime import Bundle

        return Bundle.load(path).codec.eval()
    return load_codec(path)


def load_frames(data: str) -> tuple[torch.Tensor, list[int]]:
    """Every frame of ``data`` and the episodes' lengths (in the frames' order)."""
    from training.data import ClipDataset

    clips = ClipDataset(data, clip_frames=1)
    return torch.from_numpy(clips.all_frames()), [r[2] for r in clips.episode_rows]


def train_codec(cfg: CodecTrainConfig, model_cfg: ConvAEConfig | None = None,
                frames: torch.Tensor | None = None, progress: bool = True,
                init: ConvAutoencoder | None = None) -> dict:
    """Train (or resume) a codec in cfg.out; returns final metrics. `frames` overrides cfg.data;
    `init` (a trained codec) is the starting point of a fresh run (a resumed run reads its checkpoint)."""
    from tqdm import tqdm

    from training.discriminator import PatchDiscriminator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    frames, lengths = load_frames(cfg.data) if frames is None else (frames, [len(frames)])
    pairs = pair_starts(lengths) if cfg.adversarial_pairs else None
    if cfg.adversarial_pairs and cfg.adversarial_weight <= 0:
        raise ValueError("adversarial_pairs needs adversarial_weight > 0 (the pairs are what the discriminator judges)")
    ckpt = load_checkpoint(out / "ckpt.pt")
    if ckpt is not None:
        model_cfg = ConvAEConfig(**ckpt["model_cfg"])
    elif init is not None:
        model_cfg = ConvAEConfig(**{k: v for k, v in init.config().items() if k != "type"})
    if cfg.freeze_encoder and ckpt is None and init is None:
        raise ValueError("freeze_encoder needs a trained codec to start from (init)")
    model = ConvAutoencoder(model_cfg or ConvAEConfig())
    if init is not None and ckpt is None:
        model.load_state_dict(init.state_dict())
    trained = model.decoder if cfg.freeze_encoder else model
    opt = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=0.0)
    disc = PatchDiscriminator(in_channels=6 if cfg.adversarial_pairs else 3) if cfg.adversarial_weight > 0 else None
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)) if disc else None
    if cfg.fake_bundle and disc is None:
        raise ValueError("fake_bundle needs adversarial_weight > 0 (its latents are judged by the discriminator)")
    fakes = anchor = None
    if cfg.fake_bundle:
        from runtime import Bundle

        if Bundle.load(cfg.fake_bundle).codec.config() != model.config():
            raise ValueError(f"fake_bundle {cfg.fake_bundle}: its codec is not the one trained here (start from "
                             "it: init)")
        fakes = student_latents(cfg.fake_bundle, cfg.data, cfg.fake_rollouts, cfg.fake_frames, seed=cfg.seed,
                                progress=progress).float()
        fake_pairs = pair_starts([cfg.fake_frames] * cfg.fake_rollouts)
        anchor = ConvAutoencoder.from_config(model.config())
        anchor.load_state_dict(model.state_dict())
        anchor.eval().requires_grad_(False)
    step = 0
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        gen.set_state(ckpt["gen"])
        if disc is not None and "disc" in ckpt:
            disc.load_state_dict(ckpt["disc"])
            disc_opt.load_state_dict(ckpt["disc_opt"])

    def checkpoint() -> None:
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng_state(),
                 "gen": gen.get_state(), "model_cfg": asdict(model.cfg), "train_cfg": asdict(cfg)}
        if disc is not None:
            state.update(disc=disc.state_dict(), disc_opt=disc_opt.state_dict())
        save_checkpoint(out / "ckpt.pt", state)

    writer = tensorboard_writer(out / "tb")
    every = Every(cfg.ckpt_every_s)
    bar = tqdm(total=cfg.steps, initial=step, desc="train codec", disable=not progress)
    stats, t0, start = {}, time.time(), step
    judged = join_pairs if pairs is not None else (lambda t: t)   # what the discriminator reads of a decoded batch
    model.train()
    if cfg.freeze_encoder:
        model.encoder.eval().requires_grad_(False)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        if pairs is None:
            idx = torch.randint(len(frames), (cfg.batch,), generator=gen)
            batch = random_crops(frames, idx, cfg.crop, model.spatial_factor, gen)
        else:   # each frame and the next one, cropped alike, reconstructed as one batch of 2 * batch
            idx = pairs[torch.randint(len(pairs), (cfg.batch,), generator=gen)]
            both = random_crops(paired(frames, idx, -1), torch.arange(cfg.batch), cfg.crop, model.spatial_factor, gen)
            batch = torch.cat(both.chunk(2, dim=-1))
        x, y = reconstruct(model, batch, cfg.latent_noise, cfg.latent_blur, cfg.freeze_encoder)
        loss, stats = reconstruction_loss(x, y, cfg.l1_weight, cfg.edge_weight)
        decoded = [judged(y)]
        if fakes is not None:
            crop = cfg.crop // model.spatial_factor
            if pairs is None:
                z = random_latent_crops(fakes, cfg.batch, crop, gen)
            else:
                zi = fake_pairs[torch.randint(len(fake_pairs), (cfg.batch,), generator=gen)]
                z = split_pairs(random_latent_crops(paired(fakes, zi, 1), cfg.batch, crop, gen))
            y_fake = model.decoder(z)
            layout = (F.avg_pool2d(y_fake, 4) - F.avg_pool2d(anchor.decoder(z), 4)).abs().mean()
            loss = loss + layout
            decoded.append(judged(y_fake))
            stats["layout_l1"] = float(layout.detach())
        if disc is not None:
            loss, adv = adversarial_step(model.decoder.conv_out.weight, disc, disc_opt, judged(x), decoded, loss,
                                         cfg.adversarial_weight)
            stats.update(adv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}")
            if writer:
                writer.add_scalar("codec/loss", stats["loss"], step)
                writer.add_scalar("codec/train_psnr", stats["psnr"], step)
                writer.add_scalar("codec/lr", opt.param_groups[0]["lr"], step)
                for name in ("d_loss", "g_loss", "adv_scale"):
                    if name in stats:
                        writer.add_scalar(f"codec/{name}", stats[name], step)
        if every():
            checkpoint()
    bar.close()
    checkpoint()
    model.eval()
    if not (cfg.freeze_encoder and model.cfg.scale is not None):  # a frozen encoder keeps its init's
        shift, scale = measure_normalisation(model, frames, seed=cfg.seed)
        model.set_normalisation(shift, scale)
    save_codec(model, out)
    if writer:
        writer.close()
    return {"step": step, "steps_this_run": step - start, "seconds_this_run": round(time.time() - t0, 1),
            **stats}


@torch.no_grad()
def eval_codec(codec: ConvAutoencoder, frames: torch.Tensor, batch: int = 256, timing_runs: int = 50) -> dict:
    """Held-out reconstruction PSNR/SSIM, sharpness ratio and per-frame decode/encode latency (batch 1,
    median). The sharpness ratio (Laplacian variance of the round trip over the real frame's) is the
    ceiling of any world model decoded by this codec on `eval world`'s sharpness."""
    from training.metrics import laplacian_variance, mean_psnr, psnr, ssim

    codec.eval()
    ps, ss, mses, sharp = [], [], [], []
    for i in range(0, len(frames), batch):
        f = frames[i:i + batch]
        r = codec.decode(codec.encode(f))
        ps.append(psnr(r, f))
        ss.append(ssim(r, f))
        mses.append((r.float() - f.float()).pow(2).flatten(1).mean(1))
        sharp.append(laplacian_variance(r) / laplacian_variance(f).clamp(min=1e-6))
    p, s = torch.cat(ps), torch.cat(ss)
    mse_psnr = float(10 * torch.log10(255.0**2 / torch.cat(mses).mean()))

    def median_ms(fn) -> float:
        for _ in range(5):
            fn()
        ts = []
        for _ in range(timing_runs):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts) * 1e3)

    one = frames[:1]
    z = codec.encode(one)
    c, h, w = codec.latent_shape(*frames.shape[1:3])
    return {
        "frames": len(frames), "psnr_db": round(mean_psnr(p), 3), "psnr_of_mean_mse_db": round(mse_psnr, 3),
        "ssim": round(float(s.mean()), 4), "sharpness_ratio": round(float(torch.cat(sharp).mean()), 4),
        "decode_ms_per_frame": round(median_ms(lambda: codec.decode(z)), 3),
        "encode_ms_per_frame": round(median_ms(lambda: codec.encode(one)), 3),
        "torch_threads": torch.get_num_threads(),
        "latent_shape": [c, h, w], "frame_shape": list(frames.shape[1:]),
        "params": sum(p.numel() for p in codec.parameters()),
        "decoder_params": sum(p.numel() for p in codec.decoder.parameters()),
    }
