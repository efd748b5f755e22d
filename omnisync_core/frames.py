"""Lip sync of frames held in memory (ComfyUI IMAGE batches), whole or stage by stage.

:func:`lipsync_frames` is the frames-in/frames-out twin of :meth:`LipSyncPipeline.run` (same face analysis,
length policy, windows, generator, cross-fade and paste-back; only the source and sink differ). The staged
functions split the same work for callers that want each stage separately (the granular ComfyUI nodes):

    embed_audio -> plan_faces -> crop_plan -> init_latents -> sample_latents -> decode_latents -> paste_plan

and give exactly what :func:`lipsync_frames` gives. Frames are ``[T, H, W, 3]`` float 0..1 (or uint8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .audio import SAMPLE_RATE, FrameAligner, Waveform, as_fraction, is_silent, prepare_audio
from .audio.features import TOKEN_RATE, encode_audio
from .audio.waveform import channels_from_array
from .errors import AudioError, InputError
from .face.crop import CropParams, crop_faces, crop_params, mouth_in_crop, paste_back
from .face.track import FaceTrack
from .pipeline import FaceAnalyzer, LipSyncOptions, LipSyncPipeline, ProgressFn, analyze_faces
from .generator import decode_window, encode_window
from .timeline import CrossFader, Timeline, Window, plan_timeline, plan_windows, source_frame_index

StepFn = Callable[[int, int, Tensor], None]


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
    length = FrameAligner(fps).num_samples(num_frames, sample_rate)
    samples = samples[:, :length]
    if samples.shape[1] < length:
        samples = torch.nn.functional.pad(samples, (0, length - samples.shape[1]))
    return samples


def _as_uint8(frames: Tensor) -> Tensor:
    if frames.dtype == torch.uint8:
        return frames
    return frames.float().clamp(0, 1).mul(255).round().to(torch.uint8)


def _check_frames(frames: Tensor) -> None:
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise InputError(f"frames must be shaped [T, H, W, 3] (RGB), got {shape}")
    if frames.shape[0] == 0:
        raise InputError("there are no frames")


# ------------------------------------------------------------------------------------------------------------ audio

@dataclass
class AudioEmbeds:
    """Whisper features of a whole track and how they line up with video frames.

    features ``[tokens, D]`` (one per 20 ms); num_frames: the audio's length in video frames at ``fps``;
    samples ``[C, N]`` / sample_rate: the original audio, kept to return it aligned with the output.
    """

    features: Tensor
    fps: Fraction
    num_frames: int
    before: int
    after: int
    samples: Tensor
    sample_rate: int
    silent: bool = False

    def frame_windows(self, frames: Tensor) -> Tensor:
        """Per-frame token windows ``[n, before + 1 + after, D]`` for output frame indices ``frames``."""
        aligner = FrameAligner(self.fps, feature_rate=TOKEN_RATE)
        return aligner.gather(self.features, frames, self.before, self.after)


def embed_audio(samples: Tensor, sample_rate: int, encoder: torch.nn.Module, fps, before: int = 2, after: int = 2,
                progress: Optional[Callable[[int, int], None]] = None) -> AudioEmbeds:
    """Audio ``[C, N]`` at ``sample_rate`` -> :class:`AudioEmbeds` (the whole track, in seam-free 30 s windows)."""
    samples, sample_rate = audio_channels(samples, sample_rate)
    rate = fps_fraction(fps)
    speech = prepare_audio(Waveform(samples.mean(dim=0), sample_rate))
    features = encode_audio(speech.samples, encoder, progress=progress).float().cpu()
    frames = FrameAligner(rate).num_frames(speech.samples.shape[0], SAMPLE_RATE)
    if frames <= 0:
        raise AudioError("the audio is shorter than one video frame")
    return AudioEmbeds(features, rate, frames, int(before), int(after), samples, sample_rate, is_silent(speech))


# ------------------------------------------------------------------------------------------------------------ faces

@dataclass
class FacePlan:
    """Where the face is in every output frame and how it is cropped.

    track: the face in the source frames; index ``[N]``: the source frame each output frame shows (length
    policy); out_track / params: the face and the crop per output frame; editable ``[N]``: frames the model
    edits (a face is there and the frame has audio); audio: the original track, to return it aligned.
    """

    track: FaceTrack
    index: Tensor
    out_track: FaceTrack
    params: CropParams
    editable: Tensor
    timeline: Timeline
    fps: Fraction
    num_source: int
    samples: Tensor
    sample_rate: int
    warnings: list = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return self.timeline.num_frames

    @property
    def crop_size(self) -> int:
        return self.params.size

    def output_audio(self) -> Tensor:
        """The audio ``[C, N]`` exactly as long as the output frames."""
        return aligned_audio(self.samples, self.sample_rate, self.num_frames, self.fps)


def plan_faces(frames: Tensor, embeds: AudioEmbeds, analyzer: Optional[FaceAnalyzer],
               options: Optional[LipSyncOptions] = None, progress: Optional[ProgressFn] = None) -> FacePlan:
    """Find and track the face in ``frames`` (the source clip), lay out the output timeline against the audio's
    length (``options.length_policy``) and the crop of every output frame. Never fails for want of a face."""
    _check_frames(frames)
    opts = options or LipSyncOptions()
    if analyzer is not None and hasattr(analyzer, "reset"):
        analyzer.reset()
    total, batch = frames.shape[0], max(1, opts.analysis_batch)
    chunks = (_as_uint8(frames[i:i + batch]) for i in range(0, total, batch))
    track = analyze_faces(chunks, analyzer, tuple(frames.shape[1:3]), opts, progress, total)
    timeline = plan_timeline(total, embeds.num_frames, opts.length_policy)
    index = source_frame_index(torch.arange(timeline.num_frames), total, timeline.policy)
    out_track = track._map(lambda x: x[index])
    params = crop_params(out_track, size=opts.crop_size, margin=opts.crop_margin)
    editable = out_track.valid & (torch.arange(timeline.num_frames) < timeline.audio_frames)
    warnings = list(track.warnings) + (["the audio is silent: the mouth will stay closed"] if embeds.silent else [])
    return FacePlan(track, index, out_track, params, editable, timeline, embeds.fps, total, embeds.samples,
                    embeds.sample_rate, warnings)


def _check_plan(frames: Tensor, plan: FacePlan) -> None:
    _check_frames(frames)
    if frames.shape[0] != plan.num_source:
        raise InputError(f"the face track was made for {plan.num_source} frames, got {frames.shape[0]}")
    if tuple(frames.shape[1:3]) != tuple(plan.params.frame_hw):
        raise InputError(f"the face track was made for {plan.params.frame_hw[1]}x{plan.params.frame_hw[0]} frames, "
                         f"got {frames.shape[2]}x{frames.shape[1]}")


def crop_plan(frames: Tensor, plan: FacePlan, chunk: int = 32) -> Tensor:
    """The face crop of every output frame, ``[N, S, S, 3]`` float 0..1."""
    _check_plan(frames, plan)
    out = torch.empty(plan.num_frames, plan.crop_size, plan.crop_size, 3)
    for a in range(0, plan.num_frames, chunk):
        b = min(a + chunk, plan.num_frames)
        out[a:b] = crop_faces(frames[plan.index[a:b]], plan.params[a:b]).float()
    return out


def paste_plan(frames: Tensor, crops: Tensor, plan: FacePlan, feather: float = 0.1, color_match: bool = False,
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
    """One window: ``z_src`` (the source crops' latent), ``noise`` and, once sampled, ``z``. A window with nothing
    to edit has no latents and keeps its source crops."""

    window: Window
    seed: int
    z_src: Optional[Tensor] = None
    noise: Optional[Tensor] = None
    z: Optional[Tensor] = None

    @property
    def editable(self) -> bool:
        return self.z_src is not None


@dataclass
class LatentWindows:
    """The windows of a clip's crops in latent space. ``crops`` are the source crops ``[N, S, S, 3]``."""

    windows: list
    tau: float
    crops: Tensor
    editable: Tensor

    @property
    def sampled(self) -> bool:
        return all(w.z is not None for w in self.windows if w.editable)

    @property
    def plan(self) -> list:
        return [w.window for w in self.windows]

    def start_latent(self, index: int) -> Optional[Tensor]:
        """Where sampling starts for window ``index``: ``(1 - tau) z_src + tau noise`` (Eq. 5)."""
        w = self.windows[index]
        return None if not w.editable else (1.0 - self.tau) * w.z_src + self.tau * w.noise


@torch.no_grad()
def init_latents(crops: Tensor, vae: torch.nn.Module, editable: Tensor, window: int = 81, overlap: int = 8,
                 tau: float = 0.92, seed: int = 0, device=None,
                 window_callback: Optional[Callable[[int, int], None]] = None) -> LatentWindows:
    """Progressive noise initialisation: cut the crops into windows, encode each window's crops (padded to
    4k + 1 frames) and draw its noise from ``seed + window start`` (so a window's result does not depend on
    the others). Windows with no editable frame are left as they are."""
    if not 0.0 <= float(tau) <= 1.0:
        raise InputError(f"tau must lie in [0, 1], got {tau}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    editable = editable.bool().cpu()
    if crops.shape[0] != editable.shape[0]:
        raise InputError(f"got {crops.shape[0]} crops for a face track of {editable.shape[0]} frames")
    windows, plan = [], plan_windows(crops.shape[0], window, overlap)
    for w in plan:
        item = WindowLatent(w, int(seed) + w.start)
        if bool(editable[w.start:w.stop].any()):
            item.z_src, item.noise = encode_window(vae, crops[w.start:w.stop], item.seed, device)
        windows.append(item)
        if window_callback is not None:
            window_callback(len(windows), len(plan))
    return LatentWindows(windows, float(tau), crops, editable)


@torch.no_grad()
def sample_latents(latents: LatentWindows, generator, embeds: AudioEmbeds, plan: FacePlan,
                   step_callback: Optional[StepFn] = None,
                   window_callback: Optional[Callable[[int, int], None]] = None) -> LatentWindows:
    """Run the DS-CFG sampler on every editable window; ``generator`` is an
    :class:`~omnisync_core.generator.OmniSyncGenerator` (its DiT, options, device and dtype, and its guidance).
    ``tau`` comes from the latents (progressive init), the rest of the sampling knobs from the generator."""
    if len(latents.editable) != plan.num_frames:
        raise InputError(f"the latents cover {len(latents.editable)} frames but the face track {plan.num_frames}")
    if embeds.fps != plan.fps:
        raise InputError(f"the audio was encoded for {float(embeds.fps):g} fps but the face track is "
                         f"{float(plan.fps):g} fps")
    opts = generator.options
    if abs(float(opts.tau) - latents.tau) > 1e-9:
        raise InputError(f"the latents were initialised at tau {latents.tau:g} but the sampler is set to tau "
                         f"{float(opts.tau):g}; give both the same tau")
    size = latents.crops.shape[1]
    done = []
    for number, item in enumerate(latents.windows):
        if item.editable:
            span = slice(item.window.start, item.window.stop)
            mouth, width = mouth_in_crop(plan.out_track[span], plan.params[span])
            audio = embeds.frame_windows(torch.arange(span.start, span.stop))
            item = replace(item, z=generator.denoise(item.z_src, item.noise, audio, mouth, width, size,
                                                     step_callback))
        done.append(item)
        if window_callback is not None:
            window_callback(number + 1, len(latents.windows))
    return replace(latents, windows=done)


@torch.no_grad()
def decode_latents(latents: LatentWindows, vae: torch.nn.Module,
                   window_callback: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """Decode every window, keep the source crop where a frame is not edited, and cross-fade the overlaps:
    the edited crops ``[N, S, S, 3]`` float 0..1."""
    if not latents.sampled:
        raise InputError("these latents have not been sampled yet (run the DS-CFG sampler first)")
    crops, plan = latents.crops, latents.plan
    out = torch.empty(crops.shape, dtype=torch.float32)
    fader = CrossFader(plan)
    for number, item in enumerate(latents.windows):
        w = item.window
        source = crops[w.start:w.stop]
        if item.editable:
            edited = decode_window(vae, item.z, len(w))
            keep = latents.editable[w.start:w.stop].view(-1, 1, 1, 1)
            window_crops = torch.where(keep, edited.to(source.dtype), source)
        else:
            window_crops = source
        first, finished = fader.add(window_crops)
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
    window generator (an OmniSyncGenerator, or PassThroughGenerator); ``progress(stage, done, total)`` is called
    per face-analysis batch ("faces") and per window ("lipsync")."""
    _check_frames(frames)
    opts = options or LipSyncOptions()
    pipeline = LipSyncPipeline(generator, audio_encoder, face_analyzer, opts)
    samples, sample_rate = audio_channels(audio, sample_rate)
    if generator.needs_audio:
        embeds = embed_audio(samples, sample_rate, audio_encoder, fps, opts.audio_before, opts.audio_after)
    else:
        rate = fps_fraction(fps)
        speech = prepare_audio(Waveform(samples.mean(dim=0), sample_rate))
        embeds = AudioEmbeds(torch.zeros(0, 1), rate, FrameAligner(rate).num_frames(speech.samples.shape[0],
                             SAMPLE_RATE), opts.audio_before, opts.audio_after, samples, sample_rate,
                             is_silent(speech))
    plan = plan_faces(frames, embeds, face_analyzer, opts, progress)
    features = embeds.features if generator.needs_audio else None
    windows = plan_windows(plan.num_frames, opts.window, opts.overlap)
    fader = CrossFader(windows)
    out = torch.empty(plan.num_frames, *frames.shape[1:3], 3)
    for number, window in enumerate(windows):
        source = frames[plan.index[window.start:window.stop]]
        source = source.float() / 255.0 if source.dtype == torch.uint8 else source.float()
        originals, crops = pipeline._crop_and_edit(source, window, plan.out_track, plan.params, plan.editable,
                                                   features, plan.fps)
        first, finished = fader.add(crops)
        if finished.shape[0]:
            local = slice(first - window.start, first - window.start + finished.shape[0])
            span = slice(first, first + finished.shape[0])
            out[span] = paste_back(source[local], finished, plan.params[span], plan.editable[span],
                                   feather=opts.feather, color_match=opts.color_match, inplace=True,
                                   keep_detail=opts.keep_detail, source_crops=originals[local])
        if progress is not None:
            progress("lipsync", number + 1, len(windows))
    return FramesResult(out, plan.output_audio(), sample_rate, plan.fps, len(windows), plan.timeline.audio_frames,
                        plan.warnings)


__all__ = [
    "AudioEmbeds", "FacePlan", "FramesResult", "LatentWindows", "WindowLatent", "aligned_audio", "audio_channels",
    "crop_plan", "decode_latents", "embed_audio", "fps_fraction", "init_latents", "lipsync_frames", "paste_plan",
    "plan_faces", "sample_latents",
]
