"""Video-frame <-> audio-feature alignment without drift, for any frame rate.

All timing is exact rational arithmetic: frame i starts at ``i / fps`` seconds, so frame 90,000 of a 29.97 fps
clip maps to the same instant as audio sample ``round(90000 / 29.97 * 16000)`` however long the clip is.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Union

import torch
from torch import Tensor

from ..errors import InputError

FpsLike = Union[int, float, str, Fraction]


def as_fraction(fps: FpsLike) -> Fraction:
    """A frame rate as an exact fraction: 25 -> 25, "30000/1001" -> 30000/1001, 29.97 -> 2997/100."""
    try:
        if isinstance(fps, Fraction):
            value = fps
        elif isinstance(fps, float):
            if not math.isfinite(fps):
                raise ValueError
            value = Fraction(repr(fps))   # the decimal the user wrote, not the binary float's expansion
        else:
            value = Fraction(fps)
    except (ValueError, ZeroDivisionError, TypeError):
        raise InputError(f"frame rate must be a positive number, got {fps!r}") from None
    if value <= 0 or value > 1000:
        raise InputError(f"frame rate must lie in (0, 1000] fps, got {fps!r}")
    return value


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


class FrameAligner:
    """Maps video frame indices at ``fps`` to indices of audio features at ``feature_rate`` per second
    (100 for Whisper mel frames, 50 for Whisper encoder tokens) and to audio samples."""

    def __init__(self, fps: FpsLike, feature_rate: FpsLike = 50):
        self.fps = as_fraction(fps)
        self.feature_rate = Fraction(feature_rate)

    def frame_start(self, frame: int) -> Fraction:
        """Start time of a frame in seconds, exactly."""
        return Fraction(frame) / self.fps

    def sample_of_frame(self, frame: int, sample_rate: int) -> int:
        """The audio sample at which a frame starts (nearest)."""
        return _round_half_up(Fraction(frame) * sample_rate / self.fps)

    def feature_of_frame(self, frame: int) -> int:
        """Index of the feature whose interval ``[k / rate, (k + 1) / rate)`` holds the frame's start."""
        return math.floor(Fraction(frame) * self.feature_rate / self.fps)

    def feature_indices(self, frames: Tensor) -> Tensor:
        """Vectorised :meth:`feature_of_frame` in exact integer arithmetic (int64)."""
        num = self.feature_rate.numerator * self.fps.denominator
        den = self.feature_rate.denominator * self.fps.numerator
        return torch.div(frames.to(torch.int64) * num, den, rounding_mode="floor")

    def num_frames(self, num_samples: int, sample_rate: int) -> int:
        """Whole video frames that an audio track of ``num_samples`` covers: ``round(seconds * fps)``."""
        return _round_half_up(Fraction(num_samples, sample_rate) * self.fps)

    def num_samples(self, num_frames: int, sample_rate: int) -> int:
        """Audio samples spanned by ``num_frames`` video frames (nearest)."""
        return self.sample_of_frame(num_frames, sample_rate)

    def window_indices(self, frames: Tensor, before: int, after: int, num_features: int) -> Tensor:
        """``[F, before + 1 + after]`` feature indices around each frame's start, clamped to the track
        (edge features repeat at the very start and end)."""
        if num_features <= 0:
            raise InputError("there are no audio features to align to")
        centre = self.feature_indices(frames).unsqueeze(1)
        offsets = torch.arange(-before, after + 1, dtype=torch.int64).unsqueeze(0)
        return (centre + offsets).clamp_(0, num_features - 1)

    def gather(self, features: Tensor, frames: Tensor, before: int, after: int) -> Tensor:
        """Per-frame feature windows: ``features [N, D]`` -> ``[F, before + 1 + after, D]``."""
        index = self.window_indices(frames, before, after, features.shape[0]).to(features.device)
        return features[index]
