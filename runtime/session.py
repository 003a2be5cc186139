"""`StreamSession`: one user's stream. Actions in, decoded uint8 frames out, one chunk per `step`.

It adds to `Rollout` what a live stream needs: the bundle's codec, action parsing with clear
errors, seeds, optional real context frames, and timing (first-frame latency, per-chunk
percentiles, steady-state fps with decoding included).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.actions import ActionSpace
from runtime.bundle import AUTO, DEFAULT_NAME, MODELS_DIR, RANDOM_TINY, Bundle, shipped_bundles
from runtime.rollout import ChunkCondition, Rollout
from runtime.warp import CameraMotion

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def resolve_device(device: str | torch.device) -> torch.device:
    """Validate a device string with a message that says what is accepted and what is present."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine; use 'cpu'")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available on this machine; use 'cpu'")
    return torch.device(device)


class StreamSession:
    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", steps: int | None = None,
                 kv_cache: bool = True, seed: int = 0, guidance: float | None = None,
                 runner: torch.nn.Module | None = None, text: torch.Tensor | None = None) -> None:
        """``runner``: what runs the model in the rollout (default: the bundle's model), e.g. a
        `runtime.cuda_step.CudaStepModel` holding it in bf16 with captured CUDA graphs.
        ``text``: the prompt embedding ``[L, text_dim]`` of a text-conditioned bundle (Wan's T5
        features), the same for every chunk of the stream."""
        self.device = resolve_device(device)
        self.bundle = bundle.to(self.device)
        self.config = bundle.config
        self.steps = steps
        # Guidance: the null action is "no key held" (and the null audio silence), so a scale above 1 pushes
        # each frame further along what the held keys (or the voice) change (a second batch row per pass: slower).
        self.sampler = bundle.sampler if guidance is None else replace(bundle.sampler, guidance_scale=guidance)
        self.kv_cache = kv_cache
        self.action_space: ActionSpace = bundle.config.actions
        self._actions = bundle.config.action_condition()   # its momentum average is stream state
        self.frames_per_chunk = self.config.frames_per_chunk
        self.frame_size = bundle.frame_size
        self.text = self._check_text(text)
        self.fps = bundle.fps
        self._generator = torch.Generator(self.device)
        # Temporal codecs (the Wan VAE) decode a chunk with the state the previous chunks left.
        self.decoder = bundle.codec.streaming_decoder()
        if self.sampler.reproject and bundle.codec.temporal:
            raise ValueError(f"the sampler's reproject needs a per-frame codec; this bundle's codec "
                             f"{bundle.codec.type_name!r} is temporal")
        self._shown: torch.Tensor | None = None   # the frames `_reproject` decoded for the chunk just generated
        self._rollout = Rollout(runner if runner is not None else bundle.model, self.sampler, batch=1,
                                kv_cache=kv_cache, generator=self._generator, fuse_commit=True,
                                reproject=self._reproject if self.sampler.reproject else None)
        self._chunk_ms: deque[float] = deque(maxlen=2048)
        self._chunk_frames: deque[int] = deque(maxlen=2048)  # video frames each chunk gave
        self.reset(seed)

    # -- public API -----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, seed: int = 0, context: np.ndarray | None = None, context_actions: Any = None,
              start_scene: bool = True, action_history: Any = None) -> None:
        """Start a new stream. ``context``: optional real frames uint8 ``[n, H, W, 3]`` to continue from
        (``n`` must end on a chunk boundary); ``context_actions``: one action per context frame;
        ``action_history``: the actions of the frames before the context, oldest first, from which a model
        with action momentum starts its running average (without them it starts from rest).
        Without ``context``, a bundle that carries start scenes starts from scene ``seed % S``
        (``start_scene=False``: from noise)."""
        self.seed = seed
        self._generator.manual_seed(seed)
        self._rollout.reset()
        self._actions.reset()
        if action_history is not None:
            self._actions(action_history)   # advances the running average only
        self.decoder.reset()
        self._motion = None
        self._chunk_ms.clear()
        self._chunk_frames.clear()
        self._frames_out = 0
        self._first_frame_ms: float | None = None
        start = time.perf_counter()
        scenes = self.bundle.start_scenes
        if context is None and start_scene and scenes is not None:
            context, context_actions = scenes.scene(seed)
        if context is not None:
            self._add_context(context, context_actions)
            self.decoder.reset(last_frame=np.asarray(context)[-1])   # a refining decoder draws on it first
        self._setup_ms = (time.perf_counter() - start) * 1000   # counted into the first frame's latency

    @torch.no_grad()
    def step(self, action: Any = None, audio: Any = None, video: Any = None) -> np.ndarray:
        """Generate and decode the next chunk under ``action``; returns uint8 ``[n, H, W, 3]``.

        A temporal codec gives a different number of video frames than latent frames (the Wan
        VAE: 1 for the stream's first latent frame, 4 for each later one)."""
        start = time.perf_counter()
        x0 = self.generate_latents(action, audio, video)
        shown, self._shown = self._shown, None
        frames = (shown if shown is not None else self.decode(x0)).cpu().numpy()
        self.record_chunk((time.perf_counter() - start) * 1000, len(frames))
        return frames

    @torch.no_grad()
    def generate_latents(self, action: Any = None, audio: Any = None, video: Any = None) -> torch.Tensor:
        """The next chunk's clean latents ``[n, C, h, w]``, not decoded and not timed (`step` does both;
        a caller that decodes elsewhere, e.g. on another CUDA stream, times with `record_chunk`)."""
        self._shown = None
        n = self._rollout.next_chunk_frames()
        cond = self._condition(n, [action] * n, audio, video)
        move = self.bundle.model.camera_move(cond.action)
        self._motion = None if move is None else move.at(0)   # the stream's one batch row
        cfg = self.config
        noise = torch.randn((1, n, cfg.in_channels, cfg.latent_height, cfg.latent_width),
                            generator=self._generator, device=self.device)
        return self._rollout.generate_chunk(noise, cond, steps=self.steps)[0]

    @property
    def motion(self) -> CameraMotion | None:
        """How the view moved into the chunk just generated (`CausalDiT.camera_move`; None without a camera warp)."""
        return self._motion

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The chunk just generated (`generate_latents`), latents ``[n, C, h, w]``, as uint8 frames: the stream's
        decoder is told how the view moved into them (a refining decoder draws on the frame shown before)."""
        return self.decoder.decode_chunk(latents, self._motion)

    def _reproject(self, latents: torch.Tensor) -> torch.Tensor:
        """``[1, n, C, h, w]`` generated latents -> the encoding of their decoded frames (`SamplerConfig.reproject`);
        the decoded frames are kept for `step` to show, so reprojecting costs one encode per frame."""
        self._shown = self.decode(latents[0])
        return self.bundle.codec.encode(self._shown)[None].to(latents.dtype)

    def record_chunk(self, elapsed_ms: float, frames: int) -> None:
        """Count one delivered chunk of ``frames`` video frames that took ``elapsed_ms`` into `stats`."""
        self._chunk_ms.append(elapsed_ms)
        self._chunk_frames.append(frames)
        if self._first_frame_ms is None:
            self._first_frame_ms = self._setup_ms + elapsed_ms
        self._frames_out += frames

    def stats(self) -> dict[str, float | int | None]:
        """Timing since the last reset. ``fps`` is steady state: the first chunk (warm-up) is left out
        when later chunks exist. ``first_frame_ms`` runs from the reset (context frames encoded and
        cached included, idle time between reset and the first step excluded) to the first decoded
        chunk. Decoding is included in every figure."""
        times = list(self._chunk_ms)
        steady = times[1:] if len(times) > 1 else times
        frames_steady = sum(list(self._chunk_frames)[1:]) if len(times) > 1 else self._frames_out
        total_s = sum(steady) / 1000
        cache = self._rollout.cache
        return {
            "fps": (frames_steady / total_s) if total_s > 0 else None,
            "first_frame_ms": self._first_frame_ms,
            "chunk_ms_p50": float(np.percentile(times, 50)) if times else None,
            "chunk_ms_p95": float(np.percentile(times, 95)) if times else None,
            "kv_cache_bytes": cache.nbytes if cache is not None else 0,
            "decoder_state_bytes": self.decoder.state_bytes,
            "frames": self._frames_out,
            "chunks": len(times),
            "cache_frames_held": cache.frames_held if cache is not None else None,
            "steps": self.steps or self.bundle.sampler.steps,
            "guidance": self.sampler.guidance_scale,
        }

    # -- helpers --------------------------------------------------------------------------------------
    def _condition(self, n: int, actions: list[Any], audio: Any, video: Any) -> ChunkCondition:
        cfg = self.config
        act = None
        if self.action_space.dim:
            act = self._actions(actions).to(self.device)[None]
        aud = None
        if cfg.audio_dim:
            if audio is None:
                raise ValueError(f"this bundle is audio-conditioned: pass audio features [{n}, {cfg.audio_dim}]")
            aud = torch.as_tensor(np.asarray(audio), dtype=torch.float32)
            if aud.shape != (n, cfg.audio_dim):
                raise ValueError(f"audio must have shape [{n}, {cfg.audio_dim}], got {list(aud.shape)}")
            if not torch.isfinite(aud).all():
                raise ValueError("audio features must be finite (no NaN or infinity)")
            aud = aud.to(self.device)[None]
        elif audio is not None:
            raise ValueError("this bundle takes no audio")
        vid = None
        if cfg.video_channels:
            if self.bundle.codec.temporal:
                raise ValueError(f"video conditioning needs a per-frame codec; this bundle's codec "
                                 f"{self.bundle.codec.type_name!r} is temporal")
            if video is None:
                raise ValueError(f"this bundle is video-conditioned: pass {n} frames uint8 [{n}, H, W, 3]")
            vid = self.bundle.codec.encode(torch.as_tensor(np.asarray(video)).to(self.device))
            if vid.shape[0] != n:
                raise ValueError(f"video must hold {n} frames for this chunk, got {vid.shape[0]}")
            vid = vid[None]
        elif video is not None:
            raise ValueError("this bundle takes no video")
        return ChunkCondition(act, aud, vid, self.text)

    def _check_text(self, text: torch.Tensor | None) -> torch.Tensor | None:
        dim = self.config.text_dim
        if not dim:
            if text is not None:
                raise ValueError("this bundle takes no text")
            return None
        if text is None:
            raise ValueError(f"this bundle has text cross-attention: pass text, a prompt embedding [L, {dim}]")
        text = torch.as_tensor(text)
        if text.ndim != 2 or text.shape[1] != dim:
            raise ValueError(f"text must have shape [L, {dim}], got {list(text.shape)}")
        return text.to(self.device, torch.float32)[None]

    def _add_context(self, context: np.ndarray, context_actions: Any) -> None:
        if self.bundle.codec.temporal:
            raise ValueError(f"context frames need a per-frame codec; this bundle's codec "
                             f"{self.bundle.codec.type_name!r} is temporal (start from noise instead)")
        frames = np.asarray(context)
        pattern = self.config.chunk_pattern
        n = frames.shape[0] if frames.ndim == 4 else 0
        if n == 0 or not pattern.is_whole(n):
            raise ValueError(f"context must be uint8 [n, H, W, 3] with n ending on a chunk boundary "
                             f"(first chunk {pattern.first_frames} frames, then {pattern.frames_per_chunk}); "
                             f"got shape {list(frames.shape)}")
        if frames.shape[1:3] != self.frame_size:
            raise ValueError(f"context frames must be {self.frame_size[0]}x{self.frame_size[1]}, "
                             f"got {frames.shape[1]}x{frames.shape[2]}")
        actions = list(context_actions) if context_actions is not None else [None] * n
        if len(actions) != n:
            raise ValueError(f"context_actions must hold one action per context frame ({n}), got {len(actions)}")
        latents = self.bundle.codec.encode(torch.as_tensor(frames).to(self.device))[None]
        done = 0
        while done < n:
            k = self._rollout.next_chunk_frames()
            cond = self._condition(k, actions[done:done + k], None, None) if not (
                self.config.audio_dim or self.config.video_channels) else None
            if cond is None:
                raise ValueError("context frames are not supported for audio- or video-conditioned bundles yet")
            self._rollout.add_context(latents[:, done:done + k], cond)
            done += k


def resolve_bundle(bundle_or_path: Bundle | str | os.PathLike | None, device: str | torch.device = "cpu",
                   models_dir: Path = MODELS_DIR) -> Bundle:
    """What a ``--bundle`` argument names, the same for every command: a bundle, a bundle directory,
    the name of a random bundle (`runtime.presets.RANDOM_BUNDLES`, built directly on ``device``: the
    1.3B one initialises far faster on a GPU), or ``auto`` (None): the bundle shipped under
    ``models_dir`` (``default`` first, else the first by name), else ``random-tiny`` with a note."""
    from runtime.presets import RANDOM_BUNDLES, random_bundle

    if isinstance(bundle_or_path, Bundle):
        return bundle_or_path
    arg = AUTO if bundle_or_path is None else str(bundle_or_path)
    if arg == AUTO:
        shipped = shipped_bundles(models_dir)
        if not shipped:
            print(f"note: no bundle under {models_dir}; using an untrained {RANDOM_TINY} bundle", file=sys.stderr)
            arg = RANDOM_TINY
        else:
            arg = str(([p for p in shipped if p.name == DEFAULT_NAME] or shipped)[0])
    if arg in RANDOM_BUNDLES:
        return random_bundle(arg, device=resolve_device(device))
    if not Path(arg).exists():
        raise FileNotFoundError(f"bundle {arg!r}: no such directory (or use {AUTO!r} or a random bundle: "
                                f"{', '.join(sorted(RANDOM_BUNDLES))})")
    return Bundle.load(arg)


def open_session(bundle_or_path: Bundle | str, device: str = "cpu", steps: int | None = None,
                 kv_cache: bool = True, seed: int = 0, guidance: float | None = None,
                 text: torch.Tensor | None = None) -> StreamSession:
    """Open a stream on a bundle, or on what a ``--bundle`` argument names (see `resolve_bundle`: a
    bundle directory, ``auto``, or a random bundle: ``random-tiny``, ``random-wan1.3b``,
    ``random-wan1.3b-reduced``).

    ``guidance``: classifier-free guidance scale on the actions, or a lip-sync model's audio (default: the
    bundle's).
    ``text``: the prompt embedding ``[L, text_dim]`` a text-conditioned bundle needs.
    A lip-sync bundle (``extra["lipsync"]``) opens a `runtime.lipsync.LipsyncSession`:
    ``step(audio=features, video=frames)``.
    """
    bundle = resolve_bundle(bundle_or_path, device)
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps is not None:  # every chunk then takes `steps` steps: validate that recipe as the bundle's own
        replace(bundle.sampler, steps=steps, first_chunk_steps=None, timesteps=None)
    if guidance is not None and not (math.isfinite(guidance) and guidance > 0):
        raise ValueError(f"guidance must be a positive number, got {guidance}")
    cls = StreamSession
    if "lipsync" in bundle.extra:
        from runtime.lipsync import LipsyncSession

        cls = LipsyncSession
    return cls(bundle, device=device, steps=steps, kv_cache=kv_cache, seed=seed, guidance=guidance, text=text)
