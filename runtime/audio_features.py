"""Per-video-frame audio features: a log-mel window around each frame's time, in torch only.

Alignment: video frame t is the picture at time t / fps. The log-mel has one column per
`hop_length` samples (100 per second by default), column j centred on sample j * hop_length
(zero padding at the ends, so a column never mixes in audio from outside the clip). Frame t's
window is the `window` columns from c - (window - lookahead) to c + lookahead (exclusive),
c = t * columns_per_frame: `lookahead` columns of future audio, which is what a real-time
loop must wait for before it can draw frame t.

Defined behaviour for awkward input (a live microphone gives all of these):
- another sample rate: resampled with a windowed-sinc filter (`resample`);
- int16 input is scaled by 1/32768; stereo is averaged to mono;
- clipping: float samples beyond [-1, 1] are hard-clipped to it (what an ADC does);
  `clipped_fraction` reports how much was;
- silence: zero power maps to the floor, and the features are exactly 0 there (also for
  the columns before the start and after the end of the audio);
- NaN or inf samples raise ValueError: they mean a broken capture, not quiet.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AudioFeatureConfig:
    sample_rate: int = 16000
    fps: float = 25.0
    n_fft: int = 512
    win_length: int = 400          # 25 ms
    hop_length: int = 160          # 10 ms: 100 columns per second, 4 per frame at 25 fps
    n_mels: int = 32
    f_min: float = 50.0
    f_max: float = 7600.0
    window: int = 16               # columns per video frame
    lookahead: int = 8             # of which after the frame's time
    floor_db: float = -80.0        # power floor (dB re a full-scale spectrum); silence sits here

    def __post_init__(self) -> None:
        ratio = self.sample_rate / self.hop_length / self.fps
        if abs(ratio - round(ratio)) > 1e-9 or ratio < 1:
            raise ValueError(f"sample_rate / hop_length / fps = {ratio:g} must be a whole number of log-mel "
                             f"columns per video frame (e.g. 16000 / 160 / 25 = 4)")
        if self.sample_rate % self.fps:
            raise ValueError(f"sample_rate {self.sample_rate} must be a whole number of samples per frame at "
                             f"{self.fps} fps")
        if not 0 <= self.lookahead <= self.window:
            raise ValueError(f"lookahead {self.lookahead} must be within 0..window ({self.window})")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= {self.sample_rate / 2}, got {self.f_min}, {self.f_max}")
        if self.floor_db >= 0:
            raise ValueError(f"floor_db must be negative, got {self.floor_db}")

    @property
    def columns_per_frame(self) -> int:
        return int(round(self.sample_rate / self.hop_length / self.fps))

    @property
    def samples_per_frame(self) -> int:
        return int(self.sample_rate // self.fps)

    @property
    def dim(self) -> int:
        """Size of one frame's flattened feature vector."""
        return self.window * self.n_mels

    @property
    def latency_s(self) -> float:
        """Audio a live loop must have beyond a frame's time before it can compute its features."""
        return (self.lookahead * self.hop_length + self.win_length / 2) / self.sample_rate

    def to_dict(self) -> dict:
        return asdict(self)

    def value_names(self) -> list[str]:
        """Names of the flattened features, column-major by time: mel{column}_{band}."""
        return [f"mel{c}_{b}" for c in range(self.window) for b in range(self.n_mels)]


def as_mono_float(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mono float32 in [-1, 1] from int16 / float, [n] or [n, channels] (see module docstring)."""
    a = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
    if a.dtype == torch.int16:
        a = a.float() / 32768.0
    elif not a.is_floating_point():
        raise ValueError(f"audio must be int16 or float, got {a.dtype}")
    a = a.float()
    if a.ndim == 2:
        a = a.mean(1)
    elif a.ndim != 1:
        raise ValueError(f"audio must be [samples] or [samples, channels], got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("audio contains NaN or inf samples")
    return a.clamp(-1.0, 1.0)


def clipped_fraction(audio: np.ndarray | torch.Tensor, threshold: float = 0.999) -> float:
    """Share of samples at or beyond full scale (int16 input: |x| >= 32767)."""
    a = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
    a = a.float() / 32768.0 if a.dtype == torch.int16 else a.float()
    return float((a.abs() >= threshold).float().mean()) if a.numel() else 0.0


def _sinc_kernel(orig: int, new: int, zero_crossings: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc kernel [new, 1, taps] for a conv1d with stride `orig` (reduced rates)."""
    cutoff = min(1.0, new / orig) * rolloff                  # of the input's Nyquist
    width = math.ceil(zero_crossings / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)
    phase = torch.arange(new, dtype=torch.float64)[:, None] * orig / new
    t = taps[None, :] - phase                                 # input-sample distance to the output time
    window = torch.where(t.abs() <= width, torch.cos(math.pi * t / (2 * width)) ** 2, torch.zeros_like(t))
    kernel = cutoff * torch.sinc(cutoff * t) * window
    return kernel[:, None, :].float(), width


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int, zero_crossings: int = 8,
             rolloff: float = 0.95) -> torch.Tensor:
    """Band-limited resampling of mono audio [n] from `orig_sr` to `new_sr` (any integer rates)."""
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr}, {new_sr}")
    if orig_sr == new_sr:
        return audio
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, zero_crossings, rolloff)
    n = audio.shape[-1]
    x = F.pad(audio.float()[None, None], (width, width + orig))
    y = F.conv1d(x, kernel, stride=orig)[0].t().reshape(-1)
    return y[: math.ceil(n * new / orig)]


def mel_filterbank(cfg: AudioFeatureConfig) -> torch.Tensor:
    """Triangular HTK-mel filters [n_fft // 2 + 1, n_mels]."""
    def to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(cfg.f_min), to_mel(cfg.f_max), cfg.n_mels + 2))
    freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.from_numpy(tri.T.astype(np.float32))


def log_mel(audio: np.ndarray | torch.Tensor, sample_rate: int, cfg: AudioFeatureConfig) -> torch.Tensor:
    """Normalised log-mel [columns, n_mels]: 0 at the floor (silence), about 1 at full scale."""
    a = as_mono_float(audio)
    a = resample(a, sample_rate, cfg.sample_rate)
    return _columns(a, cfg, center=True)


def _columns(a: torch.Tensor, cfg: AudioFeatureConfig, center: bool, mel: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Normalised log-mel columns of resampled mono audio; ``center=False``: column j starts at j * hop
    (the streaming path hands in exactly the samples each column covers)."""
    window = torch.hann_window(cfg.win_length)
    spec = torch.stft(a, cfg.n_fft, cfg.hop_length, cfg.win_length, window=window, center=center,
                      pad_mode="constant", return_complex=True)
    power = (spec.abs() / window.sum()).pow(2).t()           # [columns, bins]; a full-scale sine ~ -6 dB
    mel = power @ (mel_filterbank(cfg) if mel is None else mel)
    db = 10 * torch.log10(mel.clamp_min(10 ** (cfg.floor_db / 10)))
    return (db / -cfg.floor_db + 1.0).contiguous()


def frame_windows(mel: torch.Tensor, frames: int, cfg: AudioFeatureConfig, span: int = 1) -> torch.Tensor:
    """Windows [frames, window + (span - 1) * columns_per_frame, n_mels]: window t covers video frames
    t .. t + span - 1; columns outside the audio are silence (0)."""
    if frames < 0 or span < 1:
        raise ValueError(f"need frames >= 0 and span >= 1, got {frames}, {span}")
    cpf = cfg.columns_per_frame
    past = cfg.window - cfg.lookahead
    length = cfg.window + (span - 1) * cpf
    start = torch.arange(frames) * cpf - past
    idx = start[:, None] + torch.arange(length)[None, :]
    padded = torch.cat([mel, torch.zeros(1, mel.shape[1], dtype=mel.dtype)])   # the last row is silence
    idx = torch.where((idx >= 0) & (idx < len(mel)), idx, torch.full_like(idx, len(mel)))
    return padded[idx]


def frame_count(samples: int, sample_rate: int, fps: float) -> int:
    """Video frames a clip of `samples` audio samples covers (frame t at t / fps, inside the audio)."""
    return int(math.ceil(samples * fps / sample_rate - 1e-9))


def frame_features(audio: np.ndarray | torch.Tensor, sample_rate: int, cfg: AudioFeatureConfig,
                   frames: int | None = None) -> np.ndarray:
    """Flattened per-frame features float32 [frames, window * n_mels] (the recorded `actions`)."""
    a = as_mono_float(audio)
    n = frame_count(len(a), sample_rate, cfg.fps) if frames is None else frames
    return frame_windows(log_mel(a, sample_rate, cfg), n, cfg).reshape(n, -1).numpy()


class StreamingResampler:
    """`resample` block by block: the same output samples, each emitted once the input it needs is in.

    Output block b (``new`` samples, reduced rates) needs the input up to ``b * orig + width + orig``,
    so the resampler holds back about ``width + orig`` input samples (under a millisecond for
    48 or 44.1 kHz to 16 kHz). `flush` ends the stream as `resample` ends a recording: zeros after it.
    """

    def __init__(self, orig_sr: int, new_sr: int, zero_crossings: int = 8, rolloff: float = 0.95) -> None:
        if orig_sr <= 0 or new_sr <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_sr}, {new_sr}")
        g = math.gcd(int(orig_sr), int(new_sr))
        self.orig, self.new = int(orig_sr) // g, int(new_sr) // g
        self.identity = orig_sr == new_sr
        if not self.identity:
            self.kernel, self.width = _sinc_kernel(self.orig, self.new, zero_crossings, rolloff)
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self._blocks = 0
        # buffer[0] is input sample blocks * orig - width (the zeros before the stream included)
        self._buf = torch.zeros(0 if self.identity else self.width)

    @property
    def holdback_samples(self) -> int:
        """Input samples past a block's start needed before it can be emitted (0 without resampling)."""
        return 0 if self.identity else self.width + self.orig

    def _run(self) -> torch.Tensor:
        span = 2 * self.width + self.orig
        k = (len(self._buf) - span) // self.orig + 1 if len(self._buf) >= span else 0
        if k <= 0:
            return torch.zeros(0)
        seg = self._buf[: (k - 1) * self.orig + span]
        y = F.conv1d(seg[None, None], self.kernel, stride=self.orig)[0].t().reshape(-1)
        self._buf = self._buf[k * self.orig:]
        self._blocks += k
        return y

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """Mono float input samples -> the output samples they complete."""
        self.received += len(x)
        if self.identity:
            return x.float()
        self._buf = torch.cat([self._buf, x.float()])
        return self._run()

    def flush(self) -> torch.Tensor:
        """The stream has ended: the remaining output samples (as many in total as `resample` gives)."""
        if self.identity:
            return torch.zeros(0)
        total = math.ceil(self.received * self.new / self.orig)
        done = self._blocks * self.new
        self._buf = torch.cat([self._buf, torch.zeros(self.width + self.orig)])
        return self._run()[: max(0, total - done)]


class StreamingAudioFeatures:
    """Microphone blocks in, each video frame's features out as soon as its lookahead has arrived.

    Blocks may have any size and come at any sample rate (resampled on the fly), int16 or float,
    mono or ``[n, channels]``; the features equal `frame_features` of the whole recording
    (tests/test_lipsync_stream.py): frame t's window of log-mel columns is emitted once the last
    column it holds is computable, i.e. ``lookahead_s`` of audio after the frame's time (plus the
    resampler's hold-back at other rates). `flush` ends the stream the way a recording ends. Memory
    is bounded: only the samples and columns later frames still need are kept.
    """

    def __init__(self, cfg: AudioFeatureConfig, sample_rate: int) -> None:
        self.cfg = cfg
        self.sample_rate = int(sample_rate)
        self._resampler = StreamingResampler(self.sample_rate, cfg.sample_rate)
        self._mel = mel_filterbank(cfg)
        self._left = (cfg.n_fft - cfg.win_length) // 2     # zeros of the window padded to n_fft, left side
        self.reset()

    def reset(self) -> None:
        """Start a new stream (frame 0 is the first block's first sample)."""
        self._resampler.reset()
        half = self.cfg.n_fft // 2
        self._samples = torch.zeros(half)    # resampled samples from index self._s0 (the zeros before 0 included)
        self._s0 = -half
        self._got = 0                        # resampled samples received
        self._cols = torch.zeros(0, self.cfg.n_mels)
        self._c0 = 0                         # column index of self._cols[0]
        self.frames = 0                      # frames emitted so far
        self.clipped_samples = 0
        self.samples_in = 0
        self.ended = False

    @property
    def lookahead_s(self) -> float:
        """Audio past a frame's time needed before its features come out (feature window + resampler)."""
        c = self.cfg
        last = (c.lookahead - 1) * c.hop_length - c.n_fft // 2 + self._left + c.win_length
        return last / c.sample_rate + self._resampler.holdback_samples / self.sample_rate

    def push(self, block: np.ndarray | torch.Tensor) -> np.ndarray:
        """One block of samples -> float32 ``[k, dim]``: the features of frames ``frames - k .. frames - 1``."""
        if self.ended:
            raise ValueError("this stream was flushed: reset() before pushing more audio")
        raw = torch.as_tensor(np.asarray(block) if not isinstance(block, torch.Tensor) else block)
        self.clipped_samples += int(round(clipped_fraction(raw) * raw.shape[0])) if raw.numel() else 0
        a = as_mono_float(raw)
        self.samples_in += len(a)
        self._append(self._resampler.push(a))
        return self._emit(final=False)

    def flush(self) -> np.ndarray:
        """End of the stream: the remaining frames (`frame_count` of all the audio pushed), zeros past the end."""
        if self.ended:
            return np.zeros((0, self.cfg.dim), np.float32)
        self._append(self._resampler.flush())
        self.ended = True
        return self._emit(final=True)

    def _append(self, x: torch.Tensor) -> None:
        self._samples = torch.cat([self._samples, x])
        self._got += len(x)

    def _columns_ready(self, final: bool) -> int:
        """Columns computable now (all of them once the stream has ended)."""
        c = self.cfg
        if final:
            return 1 + self._got // c.hop_length
        # column j covers samples [j*hop - n_fft/2 + left, ... + win): everything else is windowed to 0
        need = -c.n_fft // 2 + self._left + c.win_length
        return max(0, (self._got - need) // c.hop_length + 1)

    def _emit(self, final: bool) -> np.ndarray:
        c = self.cfg
        ready = self._columns_ready(final)
        first = self._c0 + len(self._cols)
        if ready > first:
            lo = first * c.hop_length - c.n_fft // 2
            hi = (ready - 1) * c.hop_length + c.n_fft // 2
            seg = self._samples[lo - self._s0:hi - self._s0]
            seg = torch.cat([seg, torch.zeros(hi - lo - len(seg))])   # windowed out, or past the end
            self._cols = torch.cat([self._cols, _columns(seg, c, center=False, mel=self._mel)])
        cpf, past = c.columns_per_frame, c.window - c.lookahead
        if final:
            total = frame_count(self.samples_in, self.sample_rate, c.fps)
        else:
            total = max(0, (ready - c.lookahead) // cpf + 1) if ready >= c.lookahead else 0
        out = []
        padded = torch.cat([self._cols, torch.zeros(1, c.n_mels)])   # the last row: silence
        for t in range(self.frames, total):
            idx = torch.arange(t * cpf - past, t * cpf - past + c.window) - self._c0
            idx = torch.where((idx >= 0) & (idx < len(self._cols)), idx, torch.full_like(idx, len(self._cols)))
            out.append(padded[idx].reshape(-1))
        self.frames = max(self.frames, total)
        keep = self.frames * cpf - past                     # the first column a later frame can use
        if keep > self._c0:
            drop = min(keep - self._c0, len(self._cols))
            self._cols, self._c0 = self._cols[drop:], self._c0 + drop
        s_keep = (self._c0 + len(self._cols)) * c.hop_length - c.n_fft // 2   # the next column's first sample
        if s_keep > self._s0:
            self._samples, self._s0 = self._samples[s_keep - self._s0:], s_keep
        return torch.stack(out).numpy() if out else np.zeros((0, c.dim), np.float32)
