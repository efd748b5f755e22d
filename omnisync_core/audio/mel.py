"""Whisper's log-mel features in torch: 16 kHz, n_fft 400, hop 160, Slaney mel bank, Whisper's normalisation."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..errors import AudioError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
CHUNK_FRAMES = CHUNK_SAMPLES // HOP_LENGTH   # 3000 mel frames = 1500 encoder tokens per 30 s
MEL_RATE = SAMPLE_RATE / HOP_LENGTH          # 100 mel frames per second


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3.0))


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> Tensor:
    """Triangular Slaney-normalised mel filters ``[n_mels, n_fft // 2 + 1]`` from 0 Hz to Nyquist (librosa's
    defaults, which Whisper's bundled filters were made with)."""
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_hz[None, :] - lower) / (centre - lower)
    falling = (upper - fft_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return torch.from_numpy(weights.astype(np.float32))


def log_mel_spectrogram(samples: Tensor, n_mels: int = 80, pad_to_frames: int | None = None) -> Tensor:
    """Whisper log-mel of 16 kHz mono ``[N]`` (or ``[B, N]``) -> ``[n_mels, N // 160]`` (or ``[B, ...]``).

    ``pad_to_frames`` zero-pads (or trims) the audio to exactly that many frames first, as Whisper does for its
    30 s window (3000 frames). The ``max - 8`` clamp is taken over each clip, as in Whisper.
    """
    if samples.ndim not in (1, 2):
        raise AudioError(f"log-mel expects [N] or [B, N] samples, got shape {tuple(samples.shape)}")
    if samples.shape[-1] == 0:
        raise AudioError("cannot compute features of zero-length audio")
    x = samples.to(torch.float32)
    if pad_to_frames is not None:
        target = pad_to_frames * HOP_LENGTH
        x = torch.nn.functional.pad(x, (0, max(0, target - x.shape[-1])))[..., :target]
    if x.shape[-1] < HOP_LENGTH:
        raise AudioError(f"cannot compute features of audio shorter than one {HOP_LENGTH}-sample frame")
    log_spec = _log_mel_power(x, n_mels)
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


MEL_BLOCK_FRAMES = 500


def _log_mel_power(x: Tensor, n_mels: int, block: int = MEL_BLOCK_FRAMES) -> Tensor:
    """``log10(max(mel @ |stft|^2, 1e-10))`` of frames ``0 .. N // 160 - 1`` (centred frames, reflect-padded as
    Whisper's ``torch.stft``), ``block`` frames at a time: a frame reads its own 400 samples only, so a 30 s window's
    frames, spectrum and power (400 x 3000 floats each, some complex) are never held whole."""
    frames = x.shape[-1] // HOP_LENGTH
    pad_mode = "reflect" if x.shape[-1] > N_FFT // 2 else "constant"
    flat = x.reshape(-1, 1, x.shape[-1])
    padded = torch.nn.functional.pad(flat, (N_FFT // 2, N_FFT // 2), mode=pad_mode)[:, 0]
    window = torch.hann_window(N_FFT, periodic=True, device=x.device)
    filters = mel_filters(n_mels).to(x.device)
    out = []
    for f0 in range(0, frames, block):
        f1 = min(f0 + block, frames)
        segment = padded[:, f0 * HOP_LENGTH: (f1 - 1) * HOP_LENGTH + N_FFT]
        spectrum = torch.stft(segment, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        out.append((filters @ spectrum.abs() ** 2).clamp_min(1e-10).log10())
    return torch.cat(out, dim=-1).reshape(*x.shape[:-1], n_mels, frames)
