"""Train and evaluate the per-frame latent codec (runtime/autoencoder.py).

Training uses random crops (the autoencoder is fully convolutional with a small receptive
field, so crops teach it the same thing at a fraction of the cost per step; full frames are
used for normalisation statistics and evaluation). Loss = MSE + `l1_weight` * L1 on [-1, 1]
pixels; a small Gaussian noise on the latents makes the decoder tolerant of the imperfect
latents a world model produces. Output directory:
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
    seed: int = 0
    ckpt_every_s: float = 180.0
    log_every: int = 50
    threads: int = 0                # torch threads (0: leave as is)


def lr_at(cfg: CodecTrainConfig, step: int) -> float:
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


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical differences of neighbouring pixels of [n, c, h, w] images."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def codec_loss(model: ConvAutoencoder, batch_u8: torch.Tensor, l1_weight: float,
               latent_noise: float, edge_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    x = model.to_unit(batch_u8)
    z = model.encoder(x)
    if latent_noise > 0:
        z = z + latent_noise * z.detach().std() * torch.randn_like(z)
    y = model.decoder(z)
    mse = F.mse_loss(y, x)
    loss = mse + l1_weight * (y - x).abs().mean()
    if edge_weight > 0:
        loss = loss + edge_weight * sum((gy - gx).abs().mean() for gy, gx in zip(image_gradients(y),
                                                                                  image_gradients(x)))
    # PSNR on [0, 255] of the [-1, 1] MSE: 255^2 / (mse * 127.5^2).
    return loss, {"loss": float(loss.detach()), "psnr": float(10 * torch.log10(4.0 / mse.detach()))}


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
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / ".codec.safetensors.tmp"))
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


def load_frames(data: str) -> torch.Tensor:
    from training.data import ClipDataset

    return torch.from_numpy(ClipDataset(data, clip_frames=1).all_frames())


def train_codec(cfg: CodecTrainConfig, model_cfg: ConvAEConfig | None = None,
                frames: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Train (or resume) a codec in cfg.out; returns final metrics. `frames` overrides cfg.data."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    frames = load_frames(cfg.data) if frames is None else frames
    ckpt = load_checkpoint(out / "ckpt.pt")
    if ckpt is not None:
        model_cfg = ConvAEConfig(**ckpt["model_cfg"])
    model = ConvAutoencoder(model_cfg or ConvAEConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = 0
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        gen.set_state(ckpt["gen"])

    def checkpoint() -> None:
        save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                          "rng": rng_state(), "gen": gen.get_state(),
                                          "model_cfg": asdict(model.cfg), "train_cfg": asdict(cfg)})

    writer = tensorboard_writer(out / "tb")
    every = Every(cfg.ckpt_every_s)
    bar = tqdm(total=cfg.steps, initial=step, desc="train codec", disable=not progress)
    stats, t0, start = {}, time.time(), step
    model.train()
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        idx = torch.randint(len(frames), (cfg.batch,), generator=gen)
        batch = random_crops(frames, idx, cfg.crop, model.spatial_factor, gen)
        loss, stats = codec_loss(model, batch, cfg.l1_weight, cfg.latent_noise, cfg.edge_weight)
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
        if every():
            checkpoint()
    bar.close()
    checkpoint()
    model.eval()
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
