"""The lip-sync job, written once: plan -> windows -> family generator -> cross-fade -> paste-back -> sink.

Every way of running a lip sync goes through :func:`run_job`: the CLI and the streaming node (a video file in, a
video file out), the one-node lip sync (frames in memory), and, stage by stage, the granular nodes. The job knows
no model family: a *window generator* edits one window of face crops and says what audio conditioning it needs.

The generator protocol (see :class:`WindowGenerator`): ``audio_features(track, fps)`` returns the family's
conditioning for a whole track (computed lazily: a long job holds only what its current windows need); its
``window(frames)`` gives the conditioning of some output frames, in whatever form the family's model takes. Then
``encode(window) -> state``, ``sample(state, window) -> state``, ``decode(state, window) -> crops`` edit one
window (the granular nodes run them as separate stages), and ``generator(window)`` runs all three.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor

from .face.crop import _apply, crop_faces, mouth_in_crop, paste_back
from .plan import LipSyncOptions, LipSyncPlan, ProgressFn
from .timeline import CrossFader, Window


@dataclass
class WindowInput:
    """One window of the job as a generator sees it. ``crops [n, S, S, 3]`` float 0..1 (the source's face crops);
    ``frames [n]`` the output frame indices (audio time); ``audio`` the family's conditioning for them;
    ``mouth_xy [n, 2]``, ``face_width [n]`` and ``points [n, K, 2]`` (the named face points of
    :data:`~omnisync_core.face.types.FACE_POINTS`, or None without landmarks) in crop pixels; ``seed`` for this
    window's noise (``options.seed + window start``, so a window's result does not depend on the others);
    ``editable [n]`` the frames to edit (others are given back as they were)."""

    crops: Tensor
    frames: Tensor
    fps: Fraction
    audio: Any
    mouth_xy: Tensor
    face_width: Tensor
    points: Optional[Tensor]
    seed: int
    editable: Tensor


class AudioFeatures(Protocol):
    """A family's audio conditioning of a whole track."""

    def window(self, frames: Tensor) -> Any:
        """Conditioning for output frames ``frames [n]`` (consecutive)."""


class WindowGenerator(Protocol):
    """Edits windows of face crops so the mouth follows the audio (one per model family)."""

    def audio_features(self, track, fps: Fraction, progress: Optional[Callable[[int, int], None]] = None
                       ) -> Optional[AudioFeatures]:
        """The conditioning of ``track`` (an AudioTrack) at ``fps``, or None when the generator needs no audio."""

    def encode(self, window: WindowInput) -> Any:
        """A window's starting state (e.g. its source latents and noise); ``window.audio`` may be None here."""

    def sample(self, state: Any, window: WindowInput, step_callback=None) -> Any:
        """The sampled state."""

    def decode(self, state: Any, window: WindowInput) -> Tensor:
        """The edited crops ``[n, S, S, 3]`` float 0..1 on the CPU."""

    def __call__(self, window: WindowInput) -> Tensor:
        """``decode(sample(encode(window)))``."""


class PassThroughGenerator:
    """Returns every crop unchanged: checks that windows, cross-fades and paste-back add no seams."""

    def audio_features(self, track, fps, progress=None):
        return None

    def encode(self, window: WindowInput):
        return window.crops

    def sample(self, state, window: WindowInput, step_callback=None):
        return state

    def decode(self, state, window: WindowInput):
        return state

    def __call__(self, window: WindowInput) -> Tensor:
        return window.crops


def window_audio(features: Optional[AudioFeatures], window: Window):
    """The generator's audio conditioning of ``window`` (None when it takes no audio)."""
    return features.window(torch.arange(window.start, window.stop)) if features is not None else None


def window_input(plan: LipSyncPlan, window: Window, crops: Tensor, audio, seed: int) -> WindowInput:
    """What the generator gets for ``window``: its crops, its audio (:func:`window_audio`), face geometry in crop
    pixels and its seed (``seed + window start``)."""
    span = slice(window.start, window.stop)
    frames = torch.arange(window.start, window.stop)
    mouth, width = mouth_in_crop(plan.out_track[span], plan.params[span])
    points = plan.out_track.points
    if points is not None:
        points = _apply(plan.params.crop_from_frame[span].double(), points[span].double()).float()
    return WindowInput(crops, frames, plan.fps, audio, mouth, width, points, int(seed) + window.start,
                       plan.editable[span])


def edit_window(generator: WindowGenerator, window: WindowInput) -> Tensor:
    """The edited crops of a window: the generator's output on editable frames, the source crops elsewhere (and
    the source crops as they are when nothing in the window is editable)."""
    if not bool(window.editable.any()):
        return window.crops
    edited = generator(window)
    keep = window.editable.view(-1, 1, 1, 1).to(edited.device)
    return torch.where(keep, edited.to(window.crops.dtype), window.crops)


@dataclass
class JobReport:
    """What a run did, for the CLI's summary and the nodes' outputs."""

    output: Optional[str]
    frames: int
    fps: Fraction
    windows: int
    audio_frames: int
    seconds: float
    stage_seconds: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def seconds_per_output_second(self) -> float:
        return self.seconds / max(self.frames / float(self.fps), 1e-9)


def run_job(plan: LipSyncPlan, generator: WindowGenerator, source, sink, options: LipSyncOptions,
            features: Optional[AudioFeatures] = None, progress: Optional[ProgressFn] = None) -> int:
    """The window loop: read each window's source frames, crop, edit, cross-fade the overlaps, paste back and write,
    in order. Holds one window of frames and one overlap whatever the length. ``features`` is the generator's
    audio conditioning (``generator.audio_features(plan.audio, plan.fps)`` when not given). Returns the number of
    windows. The sink is not closed here (its owner finishes or aborts it)."""
    if features is None:
        features = generator.audio_features(plan.audio, plan.fps)
    fader = CrossFader(plan.windows)
    for number, window in enumerate(plan.windows):
        _run_window(plan, window, generator, source, sink, fader, features, options)
        if progress is not None:
            progress("lipsync", number + 1, len(plan.windows))
    return len(plan.windows)


def _run_window(plan: LipSyncPlan, window: Window, generator: WindowGenerator, source, sink, fader: CrossFader,
                features: Optional[AudioFeatures], options: LipSyncOptions) -> None:
    # the audio first: a window that starts a new 30 s audio chunk encodes it before this window's frames and crops
    # are held; and the frames die on return, not when the next window's frames are already being read
    audio = window_audio(features, window)
    frames = source.read(plan.index[window.start:window.stop])
    crops = crop_faces(frames, plan.params[window.start:window.stop])
    edited = edit_window(generator, window_input(plan, window, crops, audio, options.seed))
    first, finished = fader.add(edited)
    if finished.shape[0]:
        local = slice(first - window.start, first - window.start + finished.shape[0])
        span = slice(first, first + finished.shape[0])
        sink.write(paste_back(frames[local], finished, plan.params[span], plan.editable[span],
                              feather=options.feather, color_match=options.color_match, inplace=True,
                              keep_detail=options.keep_detail, source_crops=crops[local]))


def timed(stages: dict, name: str):
    """Context manager adding the seconds spent inside it to ``stages[name]``."""

    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - self.start

    return _Timer()


__all__ = ["AudioFeatures", "JobReport", "PassThroughGenerator", "WindowGenerator", "WindowInput", "edit_window",
           "run_job", "timed", "window_audio", "window_input"]
