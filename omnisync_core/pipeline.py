"""The lip-sync job: video + audio in, the same video with the mouth following the audio out.

decode -> face track -> windows with overlap -> audio slices -> generator (VAE encode, progressive noise init,
DS-CFG sampling, decode) -> cross-fade overlaps -> paste back -> encode.

Two passes over the source: the first reads it once to find and track the face (only a few numbers per frame are
kept), the second streams it window by window through the generator and into the writer. Memory is bounded by one
window of frames whatever the length of the video.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .audio import FrameAligner, SAMPLE_RATE, Waveform, is_silent, load_audio, prepare_audio
from .audio.features import TOKEN_RATE, encode_audio
from .audio.waveform import from_array
from .errors import AudioError, InputError
from .face.crop import CropParams, crop_faces, crop_params, mouth_in_crop, paste_back
from .face.track import FaceTrack, build_track, frame_signatures, shot_changes_from_signatures
from .face.types import FrameFaces
from .io import VideoInfo, VideoReader, VideoWriter, probe_video
from .memory import limit_heap_growth
from .timeline import (DEFAULT_LENGTH_POLICY, CrossFader, Timeline, Window, plan_timeline, plan_windows,
                       source_frame_index)

ProgressFn = Callable[[str, int, int], None]


class WindowGenerator(Protocol):
    """Edits one window of face crops so the mouth follows the audio."""

    needs_audio: bool

    def __call__(self, crops: Tensor, audio: Optional[Tensor], mouth_xy: Tensor, face_width: Tensor,
                 seed: int) -> Tensor:
        """crops ``[n, S, S, 3]`` float 0..1; audio ``[n, A, D]`` per-frame tokens (None if not needed);
        mouth_xy ``[n, 2]`` and face_width ``[n]`` in crop pixels -> edited crops ``[n, S, S, 3]``."""


class FaceAnalyzer(Protocol):
    def __call__(self, frames: Tensor) -> list[FrameFaces]:
        """Faces in each of ``frames [n, H, W, 3]`` (uint8)."""


class PassThroughGenerator:
    """Returns every crop unchanged: checks that windows, cross-fades and paste-back add no seams."""

    needs_audio = False

    def __call__(self, crops, audio, mouth_xy, face_width, seed):
        return crops


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
    audio_before: int = 2
    audio_after: int = 2
    analysis_batch: int = 16


@dataclass
class LipSyncReport:
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


def analyze_faces(frames_iter: Iterator[Tensor], analyzer: Optional[FaceAnalyzer], frame_hw: tuple[int, int],
                  options: LipSyncOptions, progress: Optional[ProgressFn] = None,
                  total: int = 0) -> FaceTrack:
    """First pass: faces in every source frame, shot changes, then one smoothed track."""
    detections: list[FrameFaces] = []
    signatures = []
    for chunk in frames_iter:
        detections.extend(analyzer(chunk) if analyzer is not None else [FrameFaces.empty()] * chunk.shape[0])
        signatures.append(frame_signatures(chunk))
        if progress is not None:
            progress("faces", len(detections), total)
    if not detections:
        raise InputError("the video has no frames")
    cuts = shot_changes_from_signatures(torch.cat(signatures))
    return build_track(detections, frame_hw, face_index=options.face_index, select=options.face_select,
                       box=options.box, shot_changes=cuts)


def _index_track(track: FaceTrack, index: Tensor) -> FaceTrack:
    """The track re-timed to output frames (output frame k shows source frame index[k])."""
    return track._map(lambda x: x[index])


class SourceFrames:
    """Source frames by index for one window at a time. Forward reads continue on one open decoder; a window that
    needs a frame before the decoder's position (ping-pong and loop policies) re-opens the file. Only the frames of
    the current window are kept."""

    def __init__(self, path: str, fps: Fraction):
        self.path, self.fps = path, fps
        self._reader: Optional[VideoReader] = None
        self._iter: Optional[Iterator[Tensor]] = None
        self._position = 0                       # index of the frame the decoder yields next
        self._kept: dict[int, Tensor] = {}

    def read(self, index: Tensor) -> Tensor:
        """``[n, H, W, 3]`` uint8 frames for source indices ``index [n]`` (any order, repeats allowed)."""
        wanted = set(index.tolist())
        frames = {i: f for i, f in self._kept.items() if i in wanted}
        needed = wanted - frames.keys()
        if needed:
            if self._iter is None or min(needed) < self._position:
                self._reopen()
            last = max(needed)
            while self._position <= last:
                frame = next(self._iter, None)
                if frame is None:
                    raise InputError(f"the video ended at frame {self._position} although it reported more frames")
                if self._position in wanted:
                    frames[self._position] = frame
                self._position += 1
        self._kept = frames
        return torch.stack([frames[i] for i in index.tolist()])

    def _reopen(self) -> None:
        self.close()
        self._reader = VideoReader(self.path, fps=self.fps)
        self._reader.__enter__()
        self._iter, self._position = iter(self._reader), 0

    def close(self) -> None:
        if self._reader is not None:
            self._reader.__exit__(None, None, None)
        self._reader = self._iter = None


def output_audio(wave: Waveform, timeline: Timeline, fps: Fraction) -> Waveform:
    """The audio of the output: exactly ``num_frames / fps`` long (trimmed, or padded with silence)."""
    samples = FrameAligner(fps).num_samples(timeline.num_frames, wave.sample_rate)
    track = wave.samples[:samples]
    if track.shape[0] < samples:
        track = torch.nn.functional.pad(track, (0, samples - track.shape[0]))
    return Waveform(track, wave.sample_rate)


class LipSyncPipeline:
    """Models and options for lip-syncing files. ``audio_encoder`` (a Whisper encoder) is needed when the
    generator uses audio; ``face_analyzer`` None uses the user box or the frame centre for every frame."""

    def __init__(self, generator: WindowGenerator, audio_encoder: Optional[torch.nn.Module] = None,
                 face_analyzer: Optional[FaceAnalyzer] = None, options: Optional[LipSyncOptions] = None):
        self.generator = generator
        self.audio_encoder = audio_encoder
        self.face_analyzer = face_analyzer
        self.options = options or LipSyncOptions()
        if generator.needs_audio and audio_encoder is None:
            raise InputError("this generator needs an audio encoder (Whisper)")

    def run(self, video: str, audio, out: str, progress: Optional[ProgressFn] = None) -> LipSyncReport:
        """Lip-sync ``video`` to ``audio`` (a path, a Waveform or a ComfyUI AUDIO mapping) into ``out``."""
        opts, clock, stages = self.options, time.perf_counter(), {}
        limit_heap_growth()
        info = probe_video(video)
        original = audio if isinstance(audio, Waveform) else _load_any_audio(audio)
        speech = prepare_audio(original)
        report_warnings = []
        if is_silent(speech):
            report_warnings.append("the audio is silent: the mouth will stay closed")
        aligner = FrameAligner(info.fps)
        timeline = plan_timeline(info.num_frames, aligner.num_frames(speech.samples.shape[0], SAMPLE_RATE),
                                 opts.length_policy)
        windows = plan_windows(timeline.num_frames, opts.window, opts.overlap)

        started = time.perf_counter()
        with VideoReader(video, fps=info.fps) as reader:
            chunks = (batch for _, batch in reader.windows(opts.analysis_batch, 0))
            track = analyze_faces(chunks, self.face_analyzer, info.display_size, opts, progress, info.num_frames)
        report_warnings.extend(track.warnings)
        stages["faces"] = time.perf_counter() - started

        started = time.perf_counter()
        features = None
        if self.generator.needs_audio:
            features = encode_audio(speech.samples, self.audio_encoder)
        stages["audio"] = time.perf_counter() - started

        index = source_frame_index(torch.arange(timeline.num_frames), info.num_frames, timeline.policy)
        out_track = _index_track(track, index)
        params = crop_params(out_track, size=opts.crop_size, margin=opts.crop_margin)
        editable = out_track.valid & (torch.arange(timeline.num_frames) < timeline.audio_frames)

        started = time.perf_counter()
        source = SourceFrames(video, info.fps)
        fader = CrossFader(windows)
        try:
            with VideoWriter(out, info.fps, audio=output_audio(original, timeline, info.fps)) as writer:
                for number, window in enumerate(windows):
                    frames = source.read(index[window.start:window.stop])
                    originals, crops = self._crop_and_edit(frames, window, out_track, params, editable, features,
                                                           info.fps)
                    first, finished = fader.add(crops)
                    if finished.shape[0]:
                        local = slice(first - window.start, first - window.start + finished.shape[0])
                        span = slice(first, first + finished.shape[0])
                        writer.write(paste_back(frames[local], finished, params[span], editable[span],
                                                feather=opts.feather, color_match=opts.color_match, inplace=True,
                                                keep_detail=opts.keep_detail, source_crops=originals[local]))
                    if progress is not None:
                        progress("lipsync", number + 1, len(windows))
        finally:
            source.close()
        stages["lipsync"] = time.perf_counter() - started
        return LipSyncReport(os.fspath(out), timeline.num_frames, info.fps, len(windows), timeline.audio_frames,
                             time.perf_counter() - clock, stages, report_warnings)

    def _crop_and_edit(self, frames: Tensor, window: Window, track: FaceTrack, params: CropParams, editable: Tensor,
                       features: Optional[Tensor], fps: Fraction) -> tuple[Tensor, Tensor]:
        """The window's source crops and their edited version (the source crops again where nothing is editable)."""
        span = slice(window.start, window.stop)
        crops = crop_faces(frames, params[span])
        if not bool(editable[span].any()):
            return crops, crops
        audio = None
        if features is not None:
            aligner = FrameAligner(fps, feature_rate=TOKEN_RATE)
            audio = aligner.gather(features, torch.arange(window.start, window.stop), self.options.audio_before,
                                   self.options.audio_after)
        mouth, width = mouth_in_crop(track[span], params[span])
        edited = self.generator(crops, audio, mouth, width, self.options.seed + window.start)
        keep = editable[span].view(-1, 1, 1, 1).to(edited.device)
        return crops, torch.where(keep, edited.to(crops.dtype), crops)


def _load_any_audio(audio) -> Waveform:
    """A path or a ComfyUI AUDIO mapping -> mono Waveform at its own rate (the output keeps that rate)."""
    from collections.abc import Mapping

    from .audio.waveform import from_comfy_audio

    if isinstance(audio, Mapping):
        return from_comfy_audio(audio)
    if audio is None:
        raise AudioError("no audio was given")
    return load_audio(audio)
