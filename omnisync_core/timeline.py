"""Time bookkeeping for long videos: the output length when audio and video differ, the windows a video is cut
into, and the streaming cross-fade that joins the windows' outputs without seams in constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .errors import InputError

LENGTH_POLICIES = ("pingpong", "loop", "hold", "trim", "video")
DEFAULT_LENGTH_POLICY = "pingpong"


@dataclass(frozen=True)
class Timeline:
    """How many frames the output has and which source frame each output frame starts from.

    ``audio_frames`` output frames carry audio; frames past it (policy "video" with short audio) pass through
    unedited and silent.
    """

    num_frames: int
    audio_frames: int
    policy: str

    def source_index(self, frames: Tensor, num_source: int) -> Tensor:
        """Source frame index for each output frame index (int64)."""
        return source_frame_index(frames, num_source, self.policy)


def plan_timeline(num_video_frames: int, num_audio_frames: int, policy: str = DEFAULT_LENGTH_POLICY) -> Timeline:
    """The output length under a length policy; ``num_audio_frames`` is the audio's duration in video frames.

    - ``pingpong`` (default), ``loop``, ``hold``: the output is as long as the audio; a shorter video is extended
      by playing it back and forth, by looping it, or by holding its last frame; a longer video is trimmed.
    - ``trim``: the output is as long as the shorter of the two.
    - ``video``: the output is as long as the video; frames past the end of the audio are left as they are.
    """
    if policy not in LENGTH_POLICIES:
        raise InputError(f"unknown length policy {policy!r}; choose one of {', '.join(LENGTH_POLICIES)}")
    if num_video_frames <= 0:
        raise InputError("the video has no frames")
    if num_audio_frames <= 0:
        raise InputError("the audio is shorter than one video frame")
    if policy == "trim":
        length = min(num_video_frames, num_audio_frames)
    elif policy == "video":
        length = num_video_frames
    else:
        length = num_audio_frames
    return Timeline(length, min(length, num_audio_frames), policy)


def source_frame_index(frames: Tensor, num_source: int, policy: str = DEFAULT_LENGTH_POLICY) -> Tensor:
    """Which source frame an output frame shows when the output runs past the source's end."""
    frames = frames.to(torch.int64)
    if num_source == 1:
        return torch.zeros_like(frames)
    if policy == "loop":
        return frames % num_source
    if policy == "pingpong":
        period = 2 * (num_source - 1)
        phase = frames % period
        return torch.where(phase < num_source, phase, period - phase)
    return frames.clamp(max=num_source - 1)


@dataclass(frozen=True)
class Window:
    """Output frames ``[start, stop)``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def valid_window_length(frames: int) -> int:
    """The smallest 4k + 1 frame count >= frames (what the Wan VAE takes)."""
    return frames + (1 - frames) % 4


# What a window length must be, by the name a generator gives (``generator.window_rule``): "4k+1" for models
# behind Wan's causal VAE (4 frames per latent after the first), "any" for models whose windows are plain frame
# counts (LatentSync's 16-frame windows).
WINDOW_RULES = ("4k+1", "any")


def check_window(window: int, rule: str = "4k+1") -> None:
    """One clear error unless ``window`` frames fit ``rule`` (:data:`WINDOW_RULES`)."""
    if rule not in WINDOW_RULES:
        raise InputError(f"unknown window rule {rule!r}; choose one of {', '.join(WINDOW_RULES)}")
    if rule == "4k+1" and (window < 5 or window % 4 != 1):
        raise InputError(f"window must be 4k + 1 frames and at least 5 (e.g. 81), got {window}")
    if window < 1:
        raise InputError(f"window must be at least 1 frame, got {window}")


def plan_windows(num_frames: int, window: int = 81, overlap: int = 8, rule: str = "4k+1") -> list[Window]:
    """Consecutive windows of ``window`` frames sharing ``overlap`` frames; the last one may be shorter (the
    generator pads it to the next valid length). Only neighbouring windows ever share frames. ``rule``: what the
    window length must be (:func:`check_window`)."""
    check_window(window, rule)
    if not 0 <= overlap <= window // 2:
        raise InputError(f"overlap must lie in [0, {window // 2}] frames for a window of {window}, got {overlap}")
    if num_frames <= 0:
        raise InputError("there are no frames to process")
    windows, start = [], 0
    while True:
        stop = min(start + window, num_frames)
        windows.append(Window(start, stop))
        if stop == num_frames:
            return windows
        start = stop - overlap


def fade_in_weights(length: int) -> Tensor:
    """Weights of the later window over an overlap of ``length`` frames: (1 .. length) / (length + 1)."""
    return torch.arange(1, length + 1, dtype=torch.float32) / (length + 1)


class CrossFader:
    """Joins window outputs in order, linearly cross-fading each overlap, and hands back every frame as soon as no
    later window can touch it. At most one overlap's worth of frames is held back.

    ``add(frames)`` takes the next window's output ``[n, ...]`` and returns ``(first_index, finished_frames)``.
    """

    def __init__(self, windows: list[Window]):
        self.windows = windows
        self.next_window = 0
        self.pending: Optional[Tensor] = None     # blended frames [pending_start, previous window's stop)
        self.pending_start = 0

    def add(self, frames: Tensor) -> tuple[int, Tensor]:
        if self.next_window >= len(self.windows):
            raise InputError("more window outputs than planned windows")
        window = self.windows[self.next_window]
        if frames.shape[0] != len(window):
            raise InputError(f"window {self.next_window} covers {len(window)} frames, got {frames.shape[0]}")
        frames = frames.float() if not frames.is_floating_point() else frames
        if self.pending is not None:
            shared = self.pending.shape[0]
            ramp = fade_in_weights(shared).to(frames.device, frames.dtype).view(-1, *([1] * (frames.ndim - 1)))
            head = self.pending * (1 - ramp) + frames[:shared] * ramp
            frames = torch.cat([head, frames[shared:]])
            start = self.pending_start
        else:
            start = window.start
        self.next_window += 1
        if self.next_window == len(self.windows):
            self.pending = None
            return start, frames
        keep_from = self.windows[self.next_window].start - start
        self.pending, self.pending_start = frames[keep_from:], start + keep_from
        return start, frames[:keep_from]
