"""Clip files: the held-out synthetic problems made on first use, and the media the metrics read.

A synthetic clip is a face of :mod:`omnisync_core.train.synthetic` (a seed the demo never trained on) speaking
sentence A with its own voice (``source.mp4``, with that audio), sentence B in another voice (``driving.wav``, what
it must now say), and the same face, head motion and blinks speaking B (``truth.mp4``): the ground truth, which
the renderer can draw because it knows the mouth that B implies.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..audio import Waveform, prepare_audio
from ..fsutil import publish
from ..io import VideoReader, VideoWriter, probe_video
from .manifest import ClipSpec


@dataclass
class ClipFiles:
    name: str
    video: Path
    audio: Path
    ground_truth: Optional[Path]


def write_wav(path: Path, samples: Tensor, rate: int) -> Path:
    """16-bit PCM mono WAV (written through a temporary file)."""
    pcm = (samples.float().clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    partial = path.with_name(path.name + ".partial")
    with wave.open(str(partial), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(pcm)
    publish(partial, path)
    return path


def write_video(path: Path, frames: Tensor, fps, audio: Optional[Waveform] = None) -> Path:
    with VideoWriter(path, fps, audio=audio, crf=12) as writer:
        writer.write(frames)
    return path


def synthetic_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def make_synthetic(spec: dict, folder: Path) -> ClipFiles:
    """The three files of a synthetic clip in ``folder`` (made once; the folder is named by the spec's hash)."""
    from ..audio.align import FrameAligner
    from ..train import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    video, audio, truth = folder / "source.mp4", folder / "driving.wav", folder / "truth.mp4"
    if video.is_file() and audio.is_file() and truth.is_file():
        return ClipFiles(folder.name, video, audio, truth)
    fps, size, seed = 25, int(spec["size"]), int(spec["seed"])
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        own = prepare_audio(synthetic.speak(spec["sentence"], Path(tmp) / "a.wav", voice=spec["voice"]))
        new = prepare_audio(synthetic.speak(spec["driving_sentence"], Path(tmp) / "b.wav", voice=spec["driving_voice"],
                                            speed=int(spec.get("driving_speed", 140))))
    clip = synthetic.render_clip(synthetic.style_of(seed), synthetic.mouth_track(own.samples, fps), size=size,
                                 motion_seed=seed + 1)
    track_b = synthetic.mouth_track(new.samples, fps)
    n = min(len(clip), len(track_b))
    gt = synthetic.lip_swap(seed, track_b, n, size=size)
    to_u8 = lambda x: (x * 255).round().to(torch.uint8)
    frames_a = FrameAligner(fps).num_samples(len(clip), own.sample_rate)
    own_audio = Waveform(torch.nn.functional.pad(own.samples, (0, max(0, frames_a - own.samples.numel())))[:frames_a],
                         own.sample_rate)
    samples_b = FrameAligner(fps).num_samples(n, new.sample_rate)
    write_video(video, to_u8(clip.frames), fps, own_audio)
    write_video(truth, to_u8(gt.frames), fps, Waveform(new.samples[:samples_b], new.sample_rate))
    write_wav(audio, new.samples, new.sample_rate)
    return ClipFiles(folder.name, video, audio, truth)


def clip_files(spec: ClipSpec, cache: Path) -> ClipFiles:
    """Paths of a clip's files (making a synthetic clip's under ``cache/clips`` first)."""
    if spec.synthetic is not None:
        files = make_synthetic(spec.synthetic, cache / "clips" / f"{spec.name}-{synthetic_key(spec.synthetic)}")
        return ClipFiles(spec.name, files.video, files.audio, files.ground_truth)
    return ClipFiles(spec.name, spec.video, spec.audio, spec.ground_truth)


def read_frames(path) -> tuple[Tensor, float]:
    """All frames ``[T, H, W, 3]`` uint8 and the frame rate (the metrics hold short clips in memory)."""
    info = probe_video(path)
    with VideoReader(path) as reader:
        return reader.read_all(), float(info.fps)


def read_speech(path) -> Tensor:
    """A file's audio as 16 kHz mono float ``[N]``."""
    return prepare_audio(os.fspath(path)).samples


def file_digest(path: Path, memo: Optional[dict] = None) -> str:
    """sha256 of a file's bytes, memoised by (path, size, mtime) in ``memo``."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo[key] = digest
    return digest
