"""The plan of a lip-sync job: everything decided before the first window is edited.

audio (length, level) -> face track over the source (first pass) -> output timeline (length policy) -> the face and
its crop in every output frame -> the windows. A plan holds a few hundred bytes per output frame (box, named face
points, crop transform, flags) and no pixels, so an hour at 60 fps is a few tens of MB; it is the same whether the
frames come from a file or from memory, and whichever model family edits them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .audio.track import AudioTrack, ClippedAudio
from .errors import AudioError, InputError
from .face.crop import CropParams, crop_params
from .face.track import FaceTrack, ShotChanges, build_track
from .face.types import FaceDetections, FrameFaces
from .timeline import DEFAULT_LENGTH_POLICY, Timeline, Window, plan_timeline, plan_windows, source_frame_index

ProgressFn = Callable[[str, int, int], None]


class FaceAnalyzer(Protocol):
    def __call__(self, frames: Tensor) -> list[FrameFaces]:
        """Faces in each of ``frames [n, H, W, 3]`` (uint8)."""


@dataclass
class LipSyncOptions:
    """What a user may choose; the defaults are the documented behaviour (README, DESIGN.md §1)."""

    window: int = 81
    overlap: int = 8
    crop_size: int = 512
    crop_margin: float = 0.3
    seed: int = 0
    length_policy: str = DEFAULT_LENGTH_POLICY
    face_index: Optional[int] = None
    face_select: str = "largest"
    box: Optional[Sequence[float]] = None
    feather: float = 0.1
    color_match: bool = False
    keep_detail: bool = True
    analysis_batch: int = 16
    window_rule: Optional[str] = None    # None: the generator's (see with_window_rule), else "4k+1"


@dataclass
class LipSyncPlan:
    """One job's plan. ``index [N]``: the source frame each output frame shows; ``track``: the face in the source
    frames; ``out_track`` / ``params``: the face and its crop in each output frame; ``editable [N]``: frames the
    model edits (a face is there and the frame has audio)."""

    audio: AudioTrack
    fps: Fraction
    num_source: int
    frame_hw: tuple[int, int]
    timeline: Timeline
    index: Tensor
    track: FaceTrack
    out_track: FaceTrack
    params: CropParams
    editable: Tensor
    windows: list[Window]
    warnings: list = field(default_factory=list)
    window_rule: str = "4k+1"

    @property
    def num_frames(self) -> int:
        return self.timeline.num_frames

    @property
    def crop_size(self) -> int:
        return self.params.size

    def output_audio(self) -> ClippedAudio:
        """The audio of the output, exactly as long as its frames (trimmed, or padded with silence)."""
        return self.audio.clipped(self.audio.samples_for_frames(self.num_frames, self.fps))

    def nbytes(self) -> int:
        """Memory the plan holds besides the audio source (for the memory tests)."""
        tensors = (self.index, self.editable, self.params.crop_from_frame, self.params.frame_from_crop)
        return self.track.nbytes() + self.out_track.nbytes() + sum(t.nbytes for t in tensors)

    def rewindowed(self, window: int, overlap: int) -> "LipSyncPlan":
        """The same plan cut into other windows."""
        from dataclasses import replace

        return replace(self, windows=plan_windows(self.num_frames, window, overlap, self.window_rule))


def with_window_rule(options: LipSyncOptions, generator) -> LipSyncOptions:
    """``options`` with the generator's window rule (``generator.window_rule``, "4k+1" when it names none) where
    the options leave it unset, so a family with plain 16-frame windows plans them without the caller knowing."""
    if options.window_rule is not None:
        return options
    from dataclasses import replace

    return replace(options, window_rule=getattr(generator, "window_rule", "4k+1"))


def analyze_faces(frames_iter: Iterator[Tensor], analyzer: Optional[FaceAnalyzer], frame_hw: tuple[int, int],
                  options: LipSyncOptions, progress: Optional[ProgressFn] = None, total: int = 0) -> FaceTrack:
    """First pass: faces in every source frame, shot changes, then one smoothed track. What it keeps per frame is
    a few numbers (the compact FaceDetections and one shot score), so an hour-long clip costs a few tens of MB."""
    detections, shots = FaceDetections(), ShotChanges()
    for chunk in frames_iter:
        detections.extend(analyzer(chunk) if analyzer is not None else [FrameFaces.empty()] * chunk.shape[0])
        shots.add(chunk)
        if progress is not None:
            progress("faces", len(detections), total)
    if not len(detections):
        raise InputError("the video has no frames")
    return build_track(detections, frame_hw, face_index=options.face_index, select=options.face_select,
                       box=options.box, shot_changes=shots.cuts())


def check_audio(audio: AudioTrack, fps: Fraction) -> int:
    """The audio's length in output frames; one clear error when it is shorter than a frame."""
    frames = audio.num_frames(fps)
    if frames <= 0:
        raise AudioError("the audio is shorter than one video frame")
    return frames


def plan_lipsync(audio: AudioTrack, source, analyzer: Optional[FaceAnalyzer], options: LipSyncOptions,
                 progress: Optional[ProgressFn] = None) -> LipSyncPlan:
    """Plan a job over ``source`` (a frame source: ``fps``, ``num_frames``, ``frame_hw``, ``chunks(size)``, see
    :mod:`omnisync_core.sources`): read it once to track the face, lay the output out against the audio's length,
    crop every output frame, cut the windows. Never fails for want of a face."""
    if analyzer is not None and hasattr(analyzer, "reset"):
        analyzer.reset()
    audio_frames = check_audio(audio, source.fps)
    track = analyze_faces(source.chunks(max(1, options.analysis_batch)), analyzer, source.frame_hw, options,
                          progress, source.num_frames)
    num_source = len(track)
    timeline = plan_timeline(num_source, audio_frames, options.length_policy)
    index = source_frame_index(torch.arange(timeline.num_frames), num_source, timeline.policy)
    out_track = track._map(lambda x: x[index])
    params = crop_params(out_track, size=options.crop_size, margin=options.crop_margin)
    editable = out_track.valid & (torch.arange(timeline.num_frames) < timeline.audio_frames)
    warnings = list(track.warnings) + (["the audio is silent: the mouth will stay closed"] if audio.silent else [])
    rule = options.window_rule or "4k+1"
    return LipSyncPlan(audio, source.fps, num_source, tuple(source.frame_hw), timeline, index, track, out_track,
                       params, editable, plan_windows(timeline.num_frames, options.window, options.overlap, rule),
                       warnings, rule)


__all__ = ["FaceAnalyzer", "LipSyncOptions", "LipSyncPlan", "ProgressFn", "analyze_faces", "check_audio",
           "plan_lipsync", "with_window_rule"]
