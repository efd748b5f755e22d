"""The lip-sync pipeline end to end: lengths, fps, audio, seams, memory, bad input."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from omnisync_core.audio import FrameAligner, load_audio
from omnisync_core.io import VideoReader, VideoWriter, probe_video
from omnisync_core.pipeline import LipSyncOptions, LipSyncPipeline, PassThroughGenerator

from tiny_models import talking_pattern


def moving_pattern(frames: int, height: int = 192, width: int = 256) -> torch.Tensor:
    """tiny_models.talking_pattern as uint8 video frames, with a larger blob."""
    return (talking_pattern(frames, height, width, blob_radius=30.0) * 255).round().to(torch.uint8)


def write_clip(path: Path, frames: torch.Tensor, fps, crf: int = 18) -> Path:
    with VideoWriter(path, fps, crf=crf) as writer:
        writer.write(frames)
    return path


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(255.0 ** 2 / float((a.float() - b.float()).pow(2).mean()))


@pytest.fixture(scope="module")
def speech(speech_wav):
    return speech_wav


@pytest.mark.parametrize("fps", ["24000/1001", "25", "30000/1001", "60"])
def test_output_length_fps_and_audio(tmp_path, speech, fps):
    fps = Fraction(fps)
    clip = write_clip(tmp_path / "in.mp4", moving_pattern(40), fps)
    out = tmp_path / "out.mp4"
    options = LipSyncOptions(window=21, overlap=4, crop_size=128)
    report = LipSyncPipeline(PassThroughGenerator(), options=options).run(str(clip), str(speech), str(out))
    audio = load_audio(speech)
    expected = FrameAligner(fps).num_frames(audio.samples.shape[0], audio.sample_rate)
    info = probe_video(out)
    assert info.fps == fps
    assert info.num_frames == report.frames == expected        # round(audio seconds * fps)
    assert info.has_audio
    assert abs(info.duration - audio.seconds) <= 1 / float(fps)
    muxed = load_audio(out)
    assert abs(muxed.seconds - audio.seconds) <= 1 / float(fps) + 1024 / audio.sample_rate


def test_pass_through_has_no_seams(tmp_path, speech):
    source = moving_pattern(120)
    clip = write_clip(tmp_path / "in.mp4", source, 25, crf=0)
    out = tmp_path / "out.mp4"
    options = LipSyncOptions(window=21, overlap=6, crop_size=512, length_policy="trim")
    report = LipSyncPipeline(PassThroughGenerator(), options=options).run(str(clip), str(speech), str(out))
    assert report.windows > 3
    with VideoReader(clip) as reader:
        decoded_input = reader.read_all()
    with VideoReader(out) as reader:
        output = reader.read_all()
    assert output.shape[0] == report.frames
    frame_psnr = [psnr(a, b) for a, b in zip(decoded_input, output)]
    assert min(frame_psnr) >= 40.0, min(frame_psnr)
