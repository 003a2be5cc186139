"""Bundles: a directory with ``config.json`` + ``weights.safetensors`` + ``card.md``.

Every stage of the recipe writes one and the next stage (or a session) reads it. Loading
checks every tensor's name and shape and fails with a message that names the file and the
tensor; saving writes to a temporary directory and renames it, so a bundle on disk is
always whole.

A ``--bundle`` argument names a bundle directory, a random bundle (``random-tiny``: an untrained
tiny model that exercises every moving part without claiming to show a world) or ``auto``: the
bundle shipped under ``models/`` (``models/default`` first, else the first by name), else
``random-tiny``. Every command resolves it with `runtime.session.resolve_bundle`, so they all
mean the same by it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.audio_mouth import AudioToMouth, build_audio_mouth
from runtime.codec import Codec, PixelCodec, build_codec
from runtime.config import ModelConfig, SamplerConfig
from runtime.model import CausalDiT
from runtime.start_scenes import START_SCENES_FILE, StartScenes, StartScenesError

FORMAT = "forcekit.bundle/1"
CODEC_PREFIX = "codec."
AUDIO_MOUTH_PREFIX = "audio_mouth."
RANDOM_TINY = "random-tiny"
AUTO = "auto"
DEFAULT_NAME = "default"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class BundleError(ValueError):
    """A bundle on disk is missing, truncated, corrupt or does not match its config."""


@dataclass
class Bundle:
    config: ModelConfig
    model: CausalDiT
    codec: Codec
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    fps: float = 15.0
    name: str = "unnamed"
    card: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: stage, data, commands
    start_scenes: StartScenes | None = None  # real frames sessions start from (optional start_scenes.npz)
    audio_mouth: AudioToMouth | None = None  # lip-sync bundles told the mouth: its audio -> mouth net

    @classmethod
    def random(cls, config: ModelConfig | None = None, seed: int = 0, sampler: SamplerConfig | None = None,
               codec: Codec | None = None, name: str = "random") -> Bundle:
        """An untrained bundle (random weights, pixel codec unless given) for tests and demos."""
        config = config or ModelConfig.tiny()
        codec = codec or PixelCodec()
        c, h, w = codec.latent_shape(config.latent_height * codec.spatial_factor,
                                     config.latent_width * codec.spatial_factor)
        if (c, h, w) != (config.in_channels, config.latent_height, config.latent_width):
            raise ValueError(f"codec latents {c}x{h}x{w} do not match the model's "
                             f"{config.in_channels}x{config.latent_height}x{config.latent_width}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = CausalDiT(config)
        card = (f"# {name}\n\nUntrained: random weights (seed {seed}). Its output is noise-like; it exists to "
                "exercise the runtime end to end.\n")
        return cls(config, model.eval(), codec, sampler or SamplerConfig(), name=name, card=card)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of decoded frames."""
        s = self.codec.spatial_factor
        return self.config.latent_height * s, self.config.latent_width * s

    def state_dict(self) -> dict[str, torch.Tensor]:
        parts = [("", self.model), (CODEC_PREFIX, self.codec)]
        if self.audio_mouth is not None:
            parts.append((AUDIO_MOUTH_PREFIX, self.audio_mouth))
        return {prefix + k: v.detach().cpu().contiguous() for prefix, module in parts
                for k, v in module.state_dict().items()}

    def config_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "name": self.name, "fps": self.fps, "model": self.config.to_dict(),
             "sampler": self.sampler.to_dict(), "codec": self.codec.config(), "extra": self.extra}
        if self.audio_mouth is not None:
            d["audio_mouth"] = self.audio_mouth.config()
        return d

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / "config.json").write_text(json.dumps(self.config_dict(), indent=2) + "\n")
            save_file(self.state_dict(), str(tmp / "weights.safetensors"))
            (tmp / "card.md").write_text(self.card or f"# {self.name}\n")
            if self.start_scenes is not None:
                self.start_scenes.save(tmp / START_SCENES_FILE)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> Bundle:
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: not a bundle directory (expected config.json, weights.safetensors, card.md)")
        cfg_file, weights_file = path / "config.json", path / "weights.safetensors"
        for f in (cfg_file, weights_file):
            if not f.is_file():
                raise BundleError(f"{f}: missing from the bundle")
        try:
            raw = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{cfg_file}: not valid JSON ({e})") from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise BundleError(f"{cfg_file}: not a forcekit bundle config (format should be {FORMAT!r})")
        try:
            config = ModelConfig.from_dict(raw["model"])
            sampler = SamplerConfig.from_dict(raw.get("sampler", {}))
            codec = build_codec(_section(raw, "codec", {"type": "pixel"}))
            fps, name, extra = _fps(raw.get("fps", 15.0)), str(raw.get("name", path.name)), _section(raw, "extra", {})
            audio_mouth = build_audio_mouth(_section(raw, "audio_mouth", {})) if "audio_mouth" in raw else None
        except KeyError as e:
            raise BundleError(f"{cfg_file}: invalid config: no {e} section") from e
        except (TypeError, ValueError) as e:
            raise BundleError(f"{cfg_file}: invalid config: {e}") from e
        tensors = _read_safetensors(weights_file)
        try:
            model = CausalDiT(config)
        except (TypeError, ValueError, RuntimeError) as e:  # a geometry the checks above let through
            raise BundleError(f"{cfg_file}: cannot build the model its config describes ({e})") from e
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        _load_checked(model, {k: v for k, v in tensors.items()
                              if not k.startswith((CODEC_PREFIX, AUDIO_MOUTH_PREFIX))}, weights_file)
        _load_checked(codec, part(CODEC_PREFIX), weights_file, prefix=CODEC_PREFIX)
        if audio_mouth is not None:
            _load_checked(audio_mouth, part(AUDIO_MOUTH_PREFIX), weights_file, prefix=AUDIO_MOUTH_PREFIX)
            audio_mouth.eval()
        elif part(AUDIO_MOUTH_PREFIX):
            raise BundleError(f"{weights_file}: holds audio_mouth.* tensors but {cfg_file} has no audio_mouth section")
        card_file = path / "card.md"
        card = card_file.read_text(errors="replace") if card_file.is_file() else ""
        bundle = cls(config, model.eval(), codec.eval(), sampler, fps=fps, name=name, card=card, extra=extra,
                     audio_mouth=audio_mouth)
        scenes_file = path / START_SCENES_FILE
        if scenes_file.is_file():
            try:
                scenes = StartScenes.load(scenes_file)
                scenes.check_fits(bundle.frame_size, config.actions.dim, str(scenes_file))
            except StartScenesError as e:
                raise BundleError(str(e)) from e
            bundle.start_scenes = scenes
        return bundle.to(device)

    def to(self, device: torch.device | str) -> Bundle:
        self.model.to(device)
        self.codec.to(device)
        if self.audio_mouth is not None:
            self.audio_mouth.to(device)
        return self


def shipped_bundles(models_dir: Path = MODELS_DIR) -> list[Path]:
    """Bundle directories under models/ (a bundle dir holds a config.json), sorted by name."""
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if (p / "config.json").is_file())


def _section(raw: dict[str, Any], key: str, default: dict[str, Any]) -> dict[str, Any]:
    value = raw.get(key, default)
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} must be a JSON object, got {value!r}")
    return value


def _fps(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"fps must be a number > 0, got {value!r}")
    return float(value)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{file}: unreadable or truncated safetensors file ({e})") from e


def _load_checked(module: torch.nn.Module, tensors: dict[str, torch.Tensor], file: Path, prefix: str = "") -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise BundleError(f"{file}: missing tensor {prefix}{missing[0]}" +
                          (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise BundleError(f"{file}: unexpected tensor {prefix}{unexpected[0]} not in the model config" +
                          (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise BundleError(f"{file}: tensor {prefix}{name} has shape {list(tensor.shape)}, "
                              f"the config expects {list(expected[name].shape)}")
    module.load_state_dict(tensors)
