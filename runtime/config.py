"""Configuration dataclasses: the model's geometry and the bundle's sampling recipe.

Everything geometric comes from here: no hidden constants for tokens per frame, cache sizes
or head counts. Both round-trip through JSON (a bundle's ``config.json``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from runtime.actions import ActionCondition, ActionSpace
from runtime.chunks import ChunkPattern

STACK_NOISE_FORMS = ("mix", "add")   # ModelConfig.stack_noise_form
WARP_MODES = ("bilinear", "bicubic")   # ModelConfig.warp_mode

# What a JSON value may be for each annotation used by the config dataclasses below.
_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                            "tuple": (list, tuple), "list": (list, tuple), "dict": (dict,)}


def _check_type(cls, name: str, annotation: str, value: Any) -> None:
    """Refuse a JSON value of the wrong type for a field (e.g. ``"num_layers": "six"``), naming the field."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return
    allowed = tuple(t for a in options for t in _JSON_TYPES.get(a.split("[")[0], ()))
    if not allowed:  # an annotation this check does not know (Any): the constructor checks it
        return
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, allowed):
        raise ValueError(f"{cls.__name__} field {name} must be {annotation}, got {value!r}")


def _from_dict(cls, d: dict[str, Any]):
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be a JSON object, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(fields)}")
    for name, value in d.items():
        _check_type(cls, name, str(fields[name].type), value)
    return cls(**d)


@dataclass
class ModelConfig:
    """A Wan-style causal video DiT over per-frame latents ``[B, F, C, H, W]``.

    Field names follow diffusers' ``WanTransformer3DModel`` where they overlap.
    """

    in_channels: int = 16
    out_channels: int | None = None
    latent_height: int = 8
    latent_width: int = 8
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    num_layers: int = 4
    ffn_dim: int = 512
    freq_dim: int = 64
    eps: float = 1e-6
    rope_theta: float = 10000.0
    timestep_scale: float = 1000.0  # model sees t * timestep_scale, as Wan does (t in [0, 1])
    text_dim: int | None = None  # None: no text cross-attention
    cross_attn_norm: bool = True
    action_space: dict[str, Any] = field(default_factory=dict)  # ActionSpace.to_dict()
    audio_dim: int = 0  # per-frame audio feature size; 0: none
    video_channels: int = 0  # channel-concatenated video conditioning latents; 0: none
    stack_frames: int = 0  # clean latents of this many previous frames on the channel axis (runtime.stacking)
    # With stacking: > 0 makes the network predict the velocity on top of the "nothing moved" estimate,
    # x0 ~ N(previous frame, still_prior^2), so a still world is the default (CausalDiT.still_velocity).
    still_prior: float = 0.0
    # How noise augmentation mixes noise into the stacked frames (runtime.stacking): "mix" (1 - l) x + l n
    # shrinks the frame, so the still prior learns to scale it back up, which a model fed its own frames
    # compounds until the view runs away; "add" x + l n keeps the frame as the stacked input's mean.
    stack_noise_form: str = "mix"
    # With stacking: the model is told the stacked frames' noise level (an embedding of it added to the
    # timestep's, as GameNGen does). A level-blind model must hedge between "copy" and "denoise" on every
    # stacked frame, so even a clean one (level 0, what inference feeds) is shrunk toward the mean and a
    # still view fades frame after frame; told the level, it copies a clean frame as it is.
    stack_noise_condition: bool = False
    patch_overlap: int = 0  # the patch embedding also reads this many latent pixels beyond each patch edge
    # With stacking: the held keys move the stacked frames by a global translation and zoom per key
    # (the camera's motion, CausalDiT.camera_motion, measured from the data by training.camera)
    # before the model reads them.
    camera_warp: bool = False
    # > 0: each frame's action condition also holds the exponential average of the actions so far with
    # this decay per frame (runtime.actions.key_momentum): the speed the keys built up in a game with
    # momentum, which decides how far a walking view moves. A stream keeps the average as its state.
    action_momentum: float = 0.0
    # With camera_warp and action_momentum: the keys' averages also move the stacked frames by a flow field
    # per key (CausalDiT.camera_flow, latent-pixel offsets per unit of the average, measured from the data by
    # training.camera): walking is parallax, the floor and ceiling streaming past at a speed set by the average.
    camera_flow: bool = False
    # With camera_warp: the view's horizontal field of view in degrees, so a turning key moves the stacked frames
    # as a pinhole camera's turn (the view's edges faster than its centre, `runtime.warp.yaw_grid`) instead of a
    # translation; `forcekit eval camera` measures it on the recorded turns. 0: a translation.
    camera_fov: float = 0.0
    # How the camera warp resamples the stacked frames (torch grid_sample). A move by a fraction of a latent
    # pixel, as the keys' averages ramp up and down, blurs the frame bilinearly; bicubic keeps more of its edges.
    warp_mode: str = "bilinear"
    # With the still prior and an action space: a learned per-channel gate of each frame's conditioning (level, keys,
    # their averages) on the residual (CausalDiT.rest_gate), which can close where nothing moves.
    rest_gate: bool = False
    # With audio: the latent-pixel box (y0, x0, y1, x1) whose tokens also get each frame's audio embedding
    # added to their input (a lip-sync model's mask box): the mouth's tokens read the audio directly, not
    # only through the per-frame adaLN modulation every token shares with the timestep.
    audio_region: tuple[int, int, int, int] | None = None
    # Chunks and the KV cache, in frames.
    frames_per_chunk: int = 1
    first_chunk_frames: int | None = None
    window_frames: int = 8
    sink_frames: int = 1

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        sizes = ("in_channels", "out_channels", "latent_height", "latent_width", "num_attention_heads",
                 "attention_head_dim", "num_layers", "ffn_dim", "freq_dim", "frames_per_chunk")
        bad = {name: getattr(self, name) for name in sizes if getattr(self, name) < 1}
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            bad["patch_size"] = list(self.patch_size)
        if bad:
            raise ValueError(f"model sizes must be >= 1, got {bad}")
        pt, ph, pw = self.patch_size
        if pt != 1:
            raise ValueError(f"patch_size[0] must be 1 (frames are the unit of causality), got {pt}")
        if self.latent_height % ph or self.latent_width % pw:
            raise ValueError(f"latent size {self.latent_height}x{self.latent_width} is not divisible by "
                             f"patch {ph}x{pw}")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ValueError(f"attention_head_dim must be even and >= 6 for 3D RoPE, got {self.attention_head_dim}")
        if self.stack_frames < 0:
            raise ValueError(f"stack_frames must be >= 0, got {self.stack_frames}")
        if self.still_prior < 0 or (self.still_prior and not self.stack_frames):
            raise ValueError(f"still_prior must be >= 0 and needs stack_frames >= 1, got still_prior "
                             f"{self.still_prior} with stack_frames {self.stack_frames}")
        if self.stack_noise_condition and not self.stack_frames:
            raise ValueError("stack_noise_condition needs stack_frames >= 1")
        if self.stack_noise_form not in STACK_NOISE_FORMS:
            raise ValueError(f"stack_noise_form must be one of {STACK_NOISE_FORMS}, got {self.stack_noise_form!r}")
        if self.camera_warp and not (self.stack_frames and self.actions.dim):
            raise ValueError("camera_warp needs stack_frames >= 1 and an action space")
        if not 0 <= self.action_momentum < 1 or (self.action_momentum and not self.actions.dim):
            raise ValueError(f"action_momentum must be in [0, 1) and needs an action space, got "
                             f"{self.action_momentum}")
        if self.rest_gate and not (self.still_prior and self.actions.dim):
            raise ValueError("rest_gate needs still_prior > 0 and an action space")
        if self.warp_mode not in WARP_MODES:
            raise ValueError(f"warp_mode must be one of {WARP_MODES}, got {self.warp_mode!r}")
        if not 0 <= self.camera_fov < 180:
            raise ValueError(f"camera_fov must be a field of view in [0, 180) degrees (0: a translation), got "
                             f"{self.camera_fov!r}")
        if self.camera_fov and not self.camera_warp:
            raise ValueError("camera_fov needs camera_warp: it says how the warp turns the stacked frames")
        if self.camera_flow and not (self.camera_warp and self.action_momentum):
            raise ValueError("camera_flow needs camera_warp and action_momentum > 0")
        if self.patch_overlap < 0:
            raise ValueError(f"patch_overlap must be >= 0, got {self.patch_overlap}")
        if self.audio_region is not None:
            self.audio_region = tuple(int(v) for v in self.audio_region)
            y0, x0, y1, x1 = self.audio_region if len(self.audio_region) == 4 else (0, 0, 0, 0)
            if not (self.audio_dim and 0 <= y0 < y1 <= self.latent_height and 0 <= x0 < x1 <= self.latent_width):
                raise ValueError(f"audio_region must be (y0, x0, y1, x1) inside the {self.latent_height}x"
                                 f"{self.latent_width} latent and needs audio_dim > 0, got {self.audio_region} "
                                 f"with audio_dim {self.audio_dim}")
        if self.window_frames < 0 or self.sink_frames < 0:
            raise ValueError("window_frames and sink_frames must be >= 0")
        ActionSpace.from_dict(self.action_space)  # fails early on a malformed action space
        ChunkPattern(self.frames_per_chunk, self.first_chunk_frames, self.tokens_per_frame)  # checks chunk sizes

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch_size[1]) * (self.latent_width // self.patch_size[2])

    @property
    def actions(self) -> ActionSpace:
        return ActionSpace.from_dict(self.action_space)

    @property
    def action_condition_dim(self) -> int:
        """Width of the per-frame action condition the model reads: the actions, and their average
        when ``action_momentum`` > 0."""
        return self.actions.dim * (2 if self.action_momentum else 1)

    def action_condition(self) -> ActionCondition:
        """A fresh per-stream encoder of this model's action condition."""
        return ActionCondition(self.actions, self.action_momentum)

    @property
    def chunk_pattern(self) -> ChunkPattern:
        return ChunkPattern(self.frames_per_chunk, self.first_chunk_frames, self.tokens_per_frame)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        if self.audio_region is not None:
            d["audio_region"] = list(self.audio_region)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d)

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """The small config the tests use: 3-channel pixel latents, 16 tokens per frame."""
        base = dict(
            in_channels=3, latent_height=8, latent_width=8, patch_size=(1, 2, 2),
            num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64, freq_dim=32,
            action_space=ActionSpace(
                keys=("forward", "back", "left", "right", "attack"), values=(),
                bindings={"w": "forward", "up": "forward", "s": "back", "down": "back",
                          "a": "left", "left": "left", "d": "right", "right": "right", "space": "attack"},
            ).to_dict(),
            frames_per_chunk=1, window_frames=4, sink_frames=1,
        )
        base.update(overrides)
        return cls(**base)


@dataclass
class SamplerConfig:
    """How a bundle samples each chunk, and how its KV cache is written.

    ``kind``: ``"euler"`` integrates the flow ODE (teachers, many steps); ``"consistency"``
    predicts x0 and re-noises to the next level (few-step students). ``timesteps``, when
    given, are the explicit noise levels in (0, 1] (e.g. [1.0, 0.75, 0.5, 0.25]) and override
    ``steps``; ``first_chunk_steps`` lets the first chunk take more steps. ``shift`` warps the
    levels as SD3/Wan do: t' = s t / (1 + (s - 1) t). ``cache_from``: ``"clean"`` re-runs the
    denoised chunk at t=0 to write the cache; ``"last_step"`` keeps the last denoising step's keys.
    ``guidance_scale`` applies classifier-free guidance on the actions (1.0: off).
    ``stack_noise`` (frame stacking): the stacked previous frames are mixed with this much noise
    at inference (`runtime.stacking.noised_at`), which keeps long rollouts of a model fed back its
    own frames from running away. ``noise_scale`` multiplies the noise each chunk starts from (a sampling
    temperature: below 1 a few-step student draws closer to its mean, so a still world shimmers less).
    ``reproject`` (per-frame codecs): each generated chunk enters the context as the codec's encoding of its
    decoded frames, the frames the viewer sees, not as the raw latents: a model fed back its own latents
    compounds what its decoder cannot show (a still view melts into a token-grid texture within a few hundred
    frames); re-encoded, every frame it continues from is one the codec can draw. One encode per frame.
    """

    kind: str = "consistency"
    steps: int = 2
    first_chunk_steps: int | None = None
    timesteps: list[float] | None = None
    shift: float = 1.0
    cache_from: str = "clean"
    guidance_scale: float = 1.0
    stack_noise: float = 0.0
    noise_scale: float = 1.0
    reproject: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.noise_scale <= 1:
            raise ValueError(f"noise_scale must be in [0, 1], got {self.noise_scale}")
        if not 0 <= self.stack_noise < 1:
            raise ValueError(f"stack_noise must be in [0, 1), got {self.stack_noise}")
        if self.kind not in ("euler", "consistency"):
            raise ValueError(f"sampler kind must be 'euler' or 'consistency', got {self.kind!r}")
        if self.cache_from not in ("clean", "last_step"):
            raise ValueError(f"cache_from must be 'clean' or 'last_step', got {self.cache_from!r}")
        if self.steps < 1 or (self.first_chunk_steps is not None and self.first_chunk_steps < 1):
            raise ValueError("steps must be >= 1")
        if self.timesteps is not None and not all(0 < t <= 1 for t in self.timesteps):
            raise ValueError(f"timesteps must lie in (0, 1], got {self.timesteps}")
        if self.cache_from == "last_step" and 1 in self.step_counts():
            raise ValueError(f"cache_from='last_step' needs at least 2 denoising steps per chunk, got "
                             f"{self.step_counts()}: with one step the keys kept are those of the pure-noise "
                             f"input, never of the generated frame; use cache_from='clean'")

    def step_counts(self) -> list[int]:
        """The numbers of denoising steps a chunk can take (first chunk and later chunks)."""
        if self.timesteps is not None:
            return [len(self.timesteps)]
        return [self.steps] + ([self.first_chunk_steps] if self.first_chunk_steps else [])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplerConfig:
        return _from_dict(cls, d)
