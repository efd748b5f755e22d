"""Lip sync of frames held in memory (ComfyUI IMAGE batches), whole or stage by stage.

:func:`lipsync_frames` runs the one job (:func:`omnisync_core.job.run_job`) with the frames as its source and a
tensor as its sink. The staged functions split the same job for callers that want each stage on its own (the
granular ComfyUI nodes), through the generator's own stages, and give exactly what :func:`lipsync_frames` gives:

    embed_audio -> plan_faces -> crop_plan -> init_latents -> sample_latents -> decode_latents -> paste_plan

Frames are ``[T, H, W, 3]`` float 0..1 (or uint8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .audio import FrameAligner, as_fraction
from .audio.track import AudioTrack
from .audio.waveform import channels_from_array
from .errors import InputError
from .face.crop import crop_faces, paste_back
from .job import AudioFeatures, run_job, window_audio, window_input
from .plan import (FaceAnalyzer, LipSyncOptions, LipSyncPlan, ProgressFn, check_audio, plan_lipsync,
                   with_window_rule)
from .sources import TensorFrames, TensorSink, check_frames
from .timeline import CrossFader, Window

StepFn = Callable[[int, int, Tensor], None]
FacePlan = LipSyncPlan


# ----------------------------------------------------------------------------------------------------- small helpers

def fps_fraction(fps: Union[int, float, str, Fraction]) -> Fraction:
    """A frame rate as an exact fraction. Floats near an NTSC rate (29.97, 59.94, 23.976, or the 29.97002997...
    a host computes from 30000/1001) are that rate, x000/1001; other floats keep the decimal they print as."""
    if isinstance(fps, float) and math.isfinite(fps) and fps > 0:
        ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
        if ntsc > 0 and abs(float(ntsc) - fps) <= 5e-4:
            return as_fraction(ntsc)
        near = Fraction(fps).limit_denominator(1000)
        if abs(float(near) - fps) < 1e-9 * fps:
            return as_fraction(near)
    return as_fraction(fps)


def audio_channels(waveform: Union[Tensor, np.ndarray], sample_rate) -> tuple[Tensor, int]:
    """A host's audio (``[B=1, C, N]``, ``[C, N]`` or ``[N]``; float or integer PCM) as float32 ``[C, N]``."""
    return channels_from_array(waveform, sample_rate)


def aligned_audio(samples: Tensor, sample_rate: int, num_frames: int, fps: Fraction) -> Tensor:
    """``samples [C, N]`` trimmed, or padded with silence, to exactly ``num_frames / fps`` seconds."""
    return AudioTrack.from_samples(samples, sample_rate).clipped(
        FrameAligner(fps).num_samples(num_frames, sample_rate)).read_all()


# ------------------------------------------------------------------------------------------------------------ audio

@dataclass
class AudioEmbeds:
    """A family's audio conditioning of a whole track (computed now, so later stages need no audio encoder) and
    the track itself, to give the audio back aligned with the output. ``num_frames``: the audio's length in video
    frames at ``fps``."""

    features: AudioFeatures
    track: AudioTrack
    fps: Fraction
    num_frames: int

    @property
    def silent(self) -> bool:
        return self.track.silent

    def frame_windows(self, frames: Tensor) -> Any:
        """The conditioning of output frames ``frames``."""
        return self.features.window(frames)


def embed_audio(samples: Tensor, sample_rate: int, generator, fps,
                progress: Optional[Callable[[int, int], None]] = None) -> AudioEmbeds:
    """Audio ``[C, N]`` at ``sample_rate`` -> :class:`AudioEmbeds` for ``generator``'s family (the whole track,
    in seam-free 30 s windows)."""
    track = AudioTrack.from_samples(*audio_channels(samples, sample_rate))
    rate = fps_fraction(fps)
    frames = check_audio(track, rate)
    features = generator.audio_features(track, rate, progress)
    if hasattr(features, "materialized"):
        features = features.materialized()
    return AudioEmbeds(features, track, rate, frames)


# ------------------------------------------------------------------------------------------------------------ faces

def plan_faces(frames: Tensor, embeds: AudioEmbeds, analyzer: Optional[FaceAnalyzer],
               options: Optional[LipSyncOptions] = None, progress: Optional[ProgressFn] = None) -> LipSyncPlan:
    """Find and track the face in ``frames`` (the source clip), lay out the output timeline against the audio's
    length (``options.length_policy``), the crop of every output frame and the windows. Never fails for want of a
    face."""
    opts = options or LipSyncOptions()
    return plan_lipsync(embeds.track, TensorFrames(frames, embeds.fps), analyzer, opts, progress)


def _check_plan(frames: Tensor, plan: LipSyncPlan) -> None:
    check_frames(frames)
    if frames.shape[0] != plan.num_source:
        raise InputError(f"the face track was made for {plan.num_source} frames, got {frames.shape[0]}")
    if tuple(frames.shape[1:3]) != tuple(plan.params.frame_hw):
        raise InputError(f"the face track was made for {plan.params.frame_hw[1]}x{plan.params.frame_hw[0]} frames, "
                         f"got {frames.shape[2]}x{frames.shape[1]}")


def crop_plan(frames: Tensor, plan: LipSyncPlan, chunk: int = 32) -> Tensor:
    """The face crop of every output frame, ``[N, S, S, 3]`` float 0..1."""
    _check_plan(frames, plan)
    out = torch.empty(plan.num_frames, plan.crop_size, plan.crop_size, 3)
    for a in range(0, plan.num_frames, chunk):
        b = min(a + chunk, plan.num_frames)
        out[a:b] = crop_faces(frames[plan.index[a:b]], plan.params[a:b]).float()
    return out


def paste_plan(frames: Tensor, crops: Tensor, plan: LipSyncPlan, feather: float = 0.1, color_match: bool = False,
               chunk: int = 32, progress: Optional[Callable[[int, int], None]] = None,
               keep_detail: bool = True) -> Tensor:
    """Edited crops ``[N, S, S, 3]`` pasted into the output frames ``[N, H, W, 3]`` (float 0..1); frames the model
    does not edit, and every pixel outside the crop, are the source's."""
    _check_plan(frames, plan)
    if crops.shape[0] != plan.num_frames:
        raise InputError(f"the face track has {plan.num_frames} output frames, got {crops.shape[0]} crops")
    out = torch.empty(plan.num_frames, *frames.shape[1:3], 3)
    for a in range(0, plan.num_frames, chunk):
        b = min(a + chunk, plan.num_frames)
        src = frames[plan.index[a:b]]
        src = src.float() / 255.0 if src.dtype == torch.uint8 else src.float()
        out[a:b] = paste_back(src, crops[a:b].float(), plan.params[a:b], plan.editable[a:b], feather=feather,
                              color_match=color_match, inplace=True, keep_detail=keep_detail)
        if progress is not None:
            progress(b, plan.num_frames)
    return out


# ---------------------------------------------------------------------------------------------------------- latents

@dataclass
class WindowLatent:
    """One window: its generator state (None when nothing in it is editable: it keeps its source crops)."""

    window: Window
    state: Any = None
    sampled: bool = False

    @property
    def editable(self) -> bool:
        return self.state is not None


@dataclass
class LatentWindows:
    """The windows of a clip's crops in the generator's state space. ``crops`` are the source crops
    ``[N, S, S, 3]``; ``plan`` the job's plan cut into these windows; ``seed`` the noise seed; ``tau`` where
    sampling starts (progressive init)."""

    windows: list
    tau: float
    crops: Tensor
    plan: LipSyncPlan
    seed: int

    @property
    def editable(self) -> Tensor:
        return self.plan.editable

    @property
    def sampled(self) -> bool:
        return all(w.sampled for w in self.windows if w.editable)

    def window_input(self, item: WindowLatent, features: Optional[AudioFeatures] = None):
        w = item.window
        return window_input(self.plan, w, self.crops[w.start:w.stop], window_audio(features, w), self.seed)


@torch.no_grad()
def init_latents(crops: Tensor, generator, plan: LipSyncPlan, window: int = 81, overlap: int = 8,
                 tau: float = 0.92, seed: int = 0,
                 window_callback: Optional[Callable[[int, int], None]] = None) -> LatentWindows:
    """Progressive noise initialisation: cut the crops into windows and run the generator's first stage on each
    editable one (for OmniSync: encode the crops, draw the noise from ``seed + window start``, so a window's result
    does not depend on the others). Windows with no editable frame are left as they are."""
    if not 0.0 <= float(tau) <= 1.0:
        raise InputError(f"tau must lie in [0, 1], got {tau}")
    if crops.shape[0] != plan.num_frames:
        raise InputError(f"got {crops.shape[0]} crops for a face track of {plan.num_frames} frames")
    latents = LatentWindows([], float(tau), crops, plan.rewindowed(window, overlap), int(seed))
    for w in latents.plan.windows:
        item = WindowLatent(w)
        if bool(plan.editable[w.start:w.stop].any()):
            item.state = generator.encode(latents.window_input(item))
        latents.windows.append(item)
        if window_callback is not None:
            window_callback(len(latents.windows), len(latents.plan.windows))
    return latents


@torch.no_grad()
def sample_latents(latents: LatentWindows, generator, embeds: AudioEmbeds, plan: LipSyncPlan,
                   step_callback: Optional[StepFn] = None,
                   window_callback: Optional[Callable[[int, int], None]] = None) -> LatentWindows:
    """Sample every editable window with the generator (for OmniSync: the DiT under DS-CFG). ``tau`` comes from
    the latents (progressive init), the other sampling knobs from the generator's options."""
    if plan.num_frames != latents.plan.num_frames:
        raise InputError(f"the latents cover {latents.plan.num_frames} frames but the face track {plan.num_frames}")
    if embeds.fps != plan.fps:
        raise InputError(f"the audio was encoded for {float(embeds.fps):g} fps but the face track is "
                         f"{float(plan.fps):g} fps")
    opts = getattr(generator, "options", None)
    if opts is not None and abs(float(opts.tau) - latents.tau) > 1e-9:
        raise InputError(f"the latents were initialised at tau {latents.tau:g} but the sampler is set to tau "
                         f"{float(opts.tau):g}; give both the same tau")
    done = []
    for number, item in enumerate(latents.windows):
        if item.editable:
            state = generator.sample(item.state, latents.window_input(item, embeds.features), step_callback)
            item = replace(item, state=state, sampled=True)
        done.append(item)
        if window_callback is not None:
            window_callback(number + 1, len(latents.windows))
    return replace(latents, windows=done)


@torch.no_grad()
def decode_latents(latents: LatentWindows, generator,
                   window_callback: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """Decode every window, keep the source crop where a frame is not edited, and cross-fade the overlaps:
    the edited crops ``[N, S, S, 3]`` float 0..1."""
    if not latents.sampled:
        raise InputError("these latents have not been sampled yet (run the DS-CFG sampler first)")
    crops = latents.crops
    out = torch.empty(crops.shape, dtype=torch.float32)
    fader = CrossFader(latents.plan.windows)
    for number, item in enumerate(latents.windows):
        w = item.window
        source = crops[w.start:w.stop]
        if item.editable:
            edited = generator.decode(item.state, latents.window_input(item))
            keep = latents.editable[w.start:w.stop].view(-1, 1, 1, 1)
            source = torch.where(keep, edited.to(source.dtype), source)
        first, finished = fader.add(source)
        out[first:first + finished.shape[0]] = finished
        if window_callback is not None:
            window_callback(number + 1, len(latents.windows))
    return out


# -------------------------------------------------------------------------------------------------------- one call

@dataclass
class FramesResult:
    """What :func:`lipsync_frames` returns: the output frames ``[N, H, W, 3]`` float 0..1, the audio ``[C, M]``
    exactly as long as them, the frame rate and notes for the user."""

    frames: Tensor
    audio: Tensor
    sample_rate: int
    fps: Fraction
    windows: int
    audio_frames: int
    warnings: list = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def lipsync_frames(frames: Tensor, audio: Tensor, sample_rate: int, fps, generator, audio_encoder=None,
                   face_analyzer: Optional[FaceAnalyzer] = None, options: Optional[LipSyncOptions] = None,
                   progress: Optional[ProgressFn] = None) -> FramesResult:
    """Lip-sync in-memory ``frames [T, H, W, 3]`` (float 0..1 or uint8) to ``audio [C, N]`` (or ``[1, C, N]``,
    ``[N]``) at ``sample_rate``: the same job as :meth:`LipSyncPipeline.run` on a file. ``generator`` is any
    window generator; ``audio_encoder`` becomes its encoder when it has none. ``progress(stage, done, total)`` is
    called per face-analysis batch ("faces") and per window ("lipsync")."""
    opts = with_window_rule(options or LipSyncOptions(), generator)
    if audio_encoder is not None and getattr(generator, "audio_encoder", audio_encoder) is None:
        generator.audio_encoder = audio_encoder
    track = AudioTrack.from_samples(*audio_channels(audio, sample_rate))
    source = TensorFrames(frames, fps_fraction(fps))
    plan = plan_lipsync(track, source, face_analyzer, opts, progress)
    sink = TensorSink(plan.num_frames, plan.frame_hw)
    windows = run_job(plan, generator, source, sink, opts, progress=progress)
    sink.close()
    return FramesResult(sink.frames, plan.output_audio().read_all(), track.sample_rate, plan.fps, windows,
                        plan.timeline.audio_frames, plan.warnings)


__all__ = [
    "AudioEmbeds", "FacePlan", "FramesResult", "LatentWindows", "WindowLatent", "aligned_audio", "audio_channels",
    "crop_plan", "decode_latents", "embed_audio", "fps_fraction", "init_latents", "lipsync_frames", "paste_plan",
    "plan_faces", "sample_latents",
]
