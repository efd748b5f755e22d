"""Audio front-end: decoding, resampling to 16 kHz, Whisper log-mel, frame alignment, Whisper encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import numpy as np
from torch import Tensor

from ..errors import AudioError
from .align import FrameAligner, as_fraction
from .mel import CHUNK_FRAMES, HOP_LENGTH, MEL_RATE, SAMPLE_RATE, log_mel_spectrogram, mel_filters
from .resample import resample, to_whisper_rate
from .waveform import Waveform, from_array, from_comfy_audio, is_silent, load_audio

AudioSource = Union[str, "os.PathLike[str]", Waveform, Mapping, Tensor, np.ndarray]


def prepare_audio(source: AudioSource, sample_rate: Optional[int] = None) -> Waveform:
    """Any audio input -> mono float32 at 16 kHz: a file path, a :class:`Waveform`, a ComfyUI AUDIO mapping, or
    an array/tensor with ``sample_rate``."""
    if isinstance(source, Waveform):
        wave = source
    elif isinstance(source, Mapping):
        wave = from_comfy_audio(source)
    elif isinstance(source, (Tensor, np.ndarray)):
        if sample_rate is None:
            raise AudioError("an audio array needs its sample_rate")
        wave = from_array(source, sample_rate)
    else:
        wave = load_audio(source)
    return Waveform(to_whisper_rate(wave.samples, wave.sample_rate), SAMPLE_RATE)


__all__ = [
    "AudioSource", "CHUNK_FRAMES", "FrameAligner", "HOP_LENGTH", "MEL_RATE", "SAMPLE_RATE", "Waveform",
    "as_fraction", "from_array", "from_comfy_audio", "is_silent", "load_audio", "log_mel_spectrogram",
    "mel_filters", "prepare_audio", "resample", "to_whisper_rate",
]
