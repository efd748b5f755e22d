"""Audio in: decode files with PyAV, normalise in-memory waveforms, to mono float32 at any rate.

Every failure raises :class:`AudioError` with one sentence naming the problem.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import AudioError

PathLike = Union[str, os.PathLike]


@dataclass
class Waveform:
    """Mono float32 samples in [-1, 1] (``[N]``) and their sample rate in Hz."""

    samples: Tensor
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[-1] / self.sample_rate


def _int_scale(dtype: torch.dtype) -> tuple[float, float]:
    """(offset, scale) that map an integer PCM dtype onto [-1, 1)."""
    if dtype == torch.uint8:
        return 128.0, 128.0
    if dtype == torch.int8:
        return 0.0, 128.0
    if dtype == torch.int16:
        return 0.0, 32768.0
    if dtype == torch.int32:
        return 0.0, 2147483648.0
    if dtype == torch.int64:
        return 0.0, 9223372036854775808.0
    raise AudioError(f"unsupported audio sample type {dtype}")


def to_float_pcm(samples: Union[Tensor, np.ndarray]) -> Tensor:
    """Integer PCM (uint8, int8, int16, int32) or float samples as float32 in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(samples)) if isinstance(samples, np.ndarray) else samples
    if tensor.is_floating_point():
        return tensor.to(torch.float32)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise AudioError(f"unsupported audio sample type {tensor.dtype}")
    offset, scale = _int_scale(tensor.dtype)
    return (tensor.to(torch.float64) - offset).div(scale).to(torch.float32)


def to_channels(samples: Tensor, channels_first: bool = True) -> Tensor:
    """``[N]``, ``[C, N]`` (``[N, C]`` with channels_first=False) or ComfyUI's ``[B, C, N]`` as ``[C, N]``.

    A batch of several clips is refused: lip sync takes one audio track.
    """
    if samples.ndim == 3:
        if samples.shape[0] != 1:
            raise AudioError(f"expected one audio clip, got a batch of {samples.shape[0]}")
        samples = samples[0]
    if samples.ndim == 1:
        return samples.unsqueeze(0)
    if samples.ndim != 2:
        raise AudioError(f"audio must be 1-D, 2-D or 3-D, got shape {tuple(samples.shape)}")
    channels = samples if channels_first else samples.T
    if channels.shape[0] == 0:
        raise AudioError("audio has no channels")
    return channels


def to_mono(samples: Tensor, channels_first: bool = True) -> Tensor:
    """Down-mix any layout :func:`to_channels` takes to ``[N]`` (one channel is returned as a view, not a copy)."""
    if samples.ndim == 1:
        return samples
    channels = to_channels(samples, channels_first)
    return channels[0] if channels.shape[0] == 1 else channels.mean(dim=0)


def check_samples(samples: Tensor, what: str = "audio") -> Tensor:
    """Refuse empty audio and audio with NaN or infinite samples."""
    if samples.numel() == 0:
        raise AudioError(f"{what} has zero length (no samples)")
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).sum())
        raise AudioError(f"{what} contains {bad} NaN or infinite samples")
    return samples


def _check_rate(sample_rate: Any) -> int:
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        raise AudioError(f"sample rate must be a number, got {sample_rate!r}") from None
    if not np.isfinite(rate) or rate <= 0 or rate != int(rate):
        raise AudioError(f"sample rate must be a positive whole number of Hz, got {sample_rate!r}")
    return int(rate)


def from_array(samples: Union[Tensor, np.ndarray], sample_rate: int, channels_first: bool = True) -> Waveform:
    """An in-memory waveform of any layout and PCM type as a checked mono float32 :class:`Waveform`."""
    rate = _check_rate(sample_rate)
    mono = to_mono(to_float_pcm(samples), channels_first=channels_first)
    return Waveform(check_samples(mono.contiguous()), rate)


def channels_from_array(samples: Union[Tensor, np.ndarray], sample_rate) -> tuple[Tensor, int]:
    """Like :func:`from_array` but keeping the channels: checked float32 ``[C, N]`` and the rate (for outputs
    that give the user's audio back, stereo and all)."""
    rate = _check_rate(sample_rate)
    return check_samples(to_channels(to_float_pcm(samples)).contiguous()), rate


def _comfy_fields(audio: Mapping) -> tuple[Any, Any]:
    """``waveform`` and ``sample_rate`` of a ComfyUI AUDIO, read by key (VideoHelperSuite passes a lazy Mapping)."""
    if audio is None:
        raise AudioError("no AUDIO is connected")
    try:
        waveform, sample_rate = audio["waveform"], audio["sample_rate"]
    except (KeyError, TypeError):
        raise AudioError("AUDIO input must provide 'waveform' and 'sample_rate'") from None
    if waveform is None:
        raise AudioError("AUDIO input has no waveform")
    return waveform, sample_rate


def from_comfy_audio(audio: Mapping) -> Waveform:
    """A ComfyUI AUDIO value (``{"waveform": [B, C, N], "sample_rate": int}``, possibly a lazy Mapping)."""
    return from_array(*_comfy_fields(audio))


def comfy_audio_channels(audio: Mapping) -> tuple[Tensor, int]:
    """A ComfyUI AUDIO value as checked float32 ``[C, N]`` and its rate (integer PCM normalised)."""
    return channels_from_array(*_comfy_fields(audio))


def load_audio(path: PathLike) -> Waveform:
    """Decode the first audio stream of any file PyAV (FFmpeg) reads: wav, mp3, flac, m4a, mp4, mkv, ..."""
    import av  # imported here so the module imports without PyAV for in-memory use

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise AudioError(f"audio path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioError(f"file has no audio stream: {path}")
            stream = container.streams.audio[0]
            chunks, rate = [], stream.codec_context.sample_rate or stream.rate
            for frame in container.decode(stream):
                rate = frame.sample_rate or rate
                chunks.append(_frame_samples(frame))
    except AudioError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise AudioError(f"could not decode audio from {path}: {error}") from None
    if not chunks:
        raise AudioError(f"audio stream has zero length (no samples): {path}")
    samples = torch.cat(chunks, dim=1)
    return Waveform(check_samples(samples.mean(dim=0).contiguous(), f"audio in {path}"), _check_rate(rate))


def _frame_samples(frame) -> Tensor:
    """One decoded PyAV AudioFrame as float32 ``[C, n]`` (packed and planar layouts, int and float formats)."""
    array = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        array = array.reshape(-1, channels).T
    return to_float_pcm(array.reshape(channels, -1))


def mono_rms(samples: Tensor, block: int = 1 << 18) -> float:
    """RMS of the mono mix of ``[N]`` or ``[C, N]`` samples, summed in float64 one block at a time: an hour of
    audio needs no float64 copy of itself (8 bytes a sample) just to be measured."""
    channels = samples.unsqueeze(0) if samples.ndim == 1 else samples
    count = channels.shape[-1]
    if count == 0:
        return 0.0
    squares = sum(mono_squares(channels[:, a:a + block]) for a in range(0, count, block))
    return math.sqrt(squares / count)


def mono_squares(block: Tensor) -> float:
    """Sum of squares of the mono mix of a ``[C, N]`` block, in float64 (the level's running sum)."""
    return float(block.double().mean(dim=0).pow(2).sum())


def is_silent(waveform: Waveform, threshold_db: float = -60.0) -> bool:
    """True when the whole track's RMS is below ``threshold_db`` dBFS (a closed-mouth result is expected)."""
    return mono_rms(waveform.samples) <= 10.0 ** (threshold_db / 20.0)
