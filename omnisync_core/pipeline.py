"""Lip sync of files: a video file and an audio track in, an mp4 out, in constant memory.

The job itself (:mod:`omnisync_core.plan`, :mod:`omnisync_core.job`) is the same for files and for frames in memory
(:mod:`omnisync_core.frames`); this module gives it a video file as the frame source, the audio as a track read
block by block, and a video writer as the sink. Two streaming passes over the source: the first tracks the face
(a few numbers per frame are kept), the second goes window by window through the generator into the writer.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from .audio.track import AudioTrack
from .io import VideoWriter
from .job import JobReport, PassThroughGenerator, WindowGenerator, WindowInput, run_job, timed
from .memory import limit_heap_growth
from .plan import (FaceAnalyzer, LipSyncOptions, LipSyncPlan, ProgressFn, analyze_faces, plan_lipsync,
                   with_window_rule)
from .sources import VideoFileFrames

LipSyncReport = JobReport


class LipSyncPipeline:
    """A window generator, a face analyzer and options, for lip-syncing files. ``face_analyzer`` None uses the user
    box or the frame centre for every frame. ``audio_encoder`` is kept for callers of the earlier signature: it
    becomes the generator's encoder when the generator has none."""

    def __init__(self, generator: WindowGenerator, audio_encoder=None, face_analyzer: Optional[FaceAnalyzer] = None,
                 options: Optional[LipSyncOptions] = None):
        if audio_encoder is not None and getattr(generator, "audio_encoder", audio_encoder) is None:
            generator.audio_encoder = audio_encoder
        self.generator = generator
        self.face_analyzer = face_analyzer
        self.options = with_window_rule(options or LipSyncOptions(), generator)

    def plan(self, video: str, audio, progress: Optional[ProgressFn] = None) -> tuple[LipSyncPlan, VideoFileFrames]:
        """The job's plan and its frame source (close it when done)."""
        track = AudioTrack.of(audio)
        source = VideoFileFrames(os.fspath(video))
        return plan_lipsync(track, source, self.face_analyzer, self.options, progress), source

    def run(self, video: str, audio, out: str, progress: Optional[ProgressFn] = None) -> JobReport:
        """Lip-sync ``video`` to ``audio`` (a path, an AudioTrack, a Waveform or a ComfyUI AUDIO) into ``out``."""
        clock, stages = time.perf_counter(), {}
        limit_heap_growth()
        with timed(stages, "faces"):
            plan, source = self.plan(video, audio, progress)
        try:
            with timed(stages, "lipsync"):
                features = self.generator.audio_features(plan.audio, plan.fps)
                with VideoWriter(out, plan.fps, audio=plan.output_audio()) as writer:
                    windows = run_job(plan, self.generator, source, writer, self.options, features, progress)
        finally:
            source.close()
        return JobReport(os.fspath(out), plan.num_frames, plan.fps, windows, plan.timeline.audio_frames,
                         time.perf_counter() - clock, stages, plan.warnings)


__all__ = ["FaceAnalyzer", "LipSyncOptions", "LipSyncPipeline", "LipSyncReport", "PassThroughGenerator",
           "ProgressFn", "WindowGenerator", "WindowInput", "analyze_faces"]
