"""The driving audio of a lip-sync job, read by range so that an hour-long track is never held whole.

An :class:`AudioTrack` is its channels at the source rate (what the output video gets back) and, from them, mono
16 kHz speech (what every audio front-end reads). A file is decoded on demand by cursors that move forward through
it (each reader has its own decoder: the output muxer, the feature encoder); audio that is already in memory (a
ComfyUI AUDIO, a test's tensor) is read in place, never copied whole. Speech is resampled block by block with the
same polyphase filter as :func:`~omnisync_core.audio.resample.resample` on the whole signal: each block reads
enough input on both sides for the filter, so the samples equal the whole-signal ones up to float rounding.

What it costs: a file track keeps a few decoded blocks per cursor (seconds of audio); a memory track keeps
nothing beyond the caller's tensor. Opening a file decodes it once to count its samples and measure its level.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..errors import AudioError
from .align import FpsLike, FrameAligner
from .mel import SAMPLE_RATE
from .resample import _polyphase_filters, resample
from .waveform import (PathLike, _check_rate, _frame_samples, channels_from_array, mono_rms, mono_squares,
                       to_mono)

SILENCE_DB = -60.0


class _MemoryCursor:
    """Samples ``[C, n]`` in memory, read in the track's sample numbers (the first is sample ``offset``)."""

    def __init__(self, samples: Tensor, offset: int = 0):
        self.samples, self.offset = samples, offset

    def read(self, start: int, stop: int) -> Tensor:
        return _padded_slice(self.samples, start - self.offset, stop - self.offset)

    def close(self) -> None:
        pass


def _padded_slice(samples: Tensor, start: int, stop: int) -> Tensor:
    """``samples[:, start:stop]`` with zeros where the range leaves ``[0, N)``."""
    n = samples.shape[1]
    a, b = max(start, 0), min(stop, n)
    if a == start and b == stop:
        return samples[:, a:b]
    out = samples.new_zeros(samples.shape[0], max(stop - start, 0))
    if b > a:
        out[:, a - start:b - start] = samples[:, a:b]
    return out


def _decode(path: str) -> Iterator[Tensor]:
    """Decoded blocks ``[C, n]`` float32 of the first audio stream of ``path``."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioError(f"file has no audio stream: {path}")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                yield _frame_samples(frame)
    except AudioError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise AudioError(f"could not decode audio from {path}: {error}") from None


class _FileCursor:
    """Forward reads of a file's audio: decodes on until ``stop``, keeps only what a later read may still ask for
    (from the last ``start`` on); a read before that re-opens the file."""

    def __init__(self, path: str, channels: int, num_samples: int):
        self.path, self.channels, self.num_samples = path, channels, num_samples
        self._blocks: Optional[Iterator[Tensor]] = None
        self._buffer = torch.zeros(channels, 0)
        self._buffer_start = 0

    def _restart(self) -> None:
        self.close()
        self._blocks, self._buffer, self._buffer_start = _decode(self.path), torch.zeros(self.channels, 0), 0

    def read(self, start: int, stop: int) -> Tensor:
        if self._blocks is None or start < self._buffer_start:
            self._restart()
        want = min(stop, self.num_samples)
        pieces, begin = [self._buffer], self._buffer_start
        have = begin + self._buffer.shape[1]
        while have < want:
            block = next(self._blocks, None)
            if block is None:
                break
            pieces.append(_fit_channels(block, self.channels))
            have += block.shape[1]
            begin = _drop_before(pieces, begin, start)   # a re-decode seeking forward holds only the range
        begin = _drop_before(pieces, begin, start)
        head = max(0, min(start, have) - begin)
        if head:
            pieces[0], begin = pieces[0][:, head:], begin + head
        # one copy of the range, made only when blocks were added; a read inside the buffer is a view of it
        self._buffer = (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0] if pieces
                        else torch.zeros(self.channels, 0))
        self._buffer_start = begin
        return _padded_slice(self._buffer, start - begin, stop - begin)

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks.close()
        self._blocks = None


def _drop_before(pieces: list[Tensor], begin: int, start: int) -> int:
    """Drop the leading pieces that end before sample ``start``; the new first sample number of ``pieces``."""
    while pieces and begin + pieces[0].shape[1] <= start:
        begin += pieces.pop(0).shape[1]
    return begin


def _fit_channels(block: Tensor, channels: int) -> Tensor:
    """A decoded block with the track's channel layout (mono, stereo, or more channels mixed down to mono)."""
    if block.shape[0] == channels:
        return block
    return block.mean(dim=0, keepdim=True)


@dataclass
class AudioTrack:
    """Audio of ``num_samples`` samples at ``sample_rate`` Hz with ``channels`` (1 or 2) channels; ``rms`` is the
    level of its mono mix. Build one with :meth:`from_file` or :meth:`from_samples`."""

    sample_rate: int
    channels: int
    num_samples: int
    rms: float
    path: Optional[str] = None
    samples: Optional[Tensor] = None      # [C, N] float32 when the audio is in memory

    # ------------------------------------------------------------------ opening

    @staticmethod
    def from_samples(samples: Tensor, sample_rate) -> "AudioTrack":
        """In-memory audio (``[N]``, ``[C, N]``, ``[1, C, N]``; float or integer PCM), read in place when it is
        float32 already. More than two channels are mixed down to mono."""
        channels, rate = channels_from_array(samples, sample_rate)
        if channels.shape[0] > 2:
            channels = channels.mean(dim=0, keepdim=True)
        return AudioTrack(rate, channels.shape[0], channels.shape[1], mono_rms(channels), samples=channels)

    @staticmethod
    def from_file(path: PathLike) -> "AudioTrack":
        """The first audio stream of any file FFmpeg reads. Decodes it once here to count the samples, check them
        (NaN, zero length) and measure the level; later reads decode again as they go."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise AudioError(f"audio file not found: {path}")
        if os.path.isdir(path):
            raise AudioError(f"audio path is a folder, not a file: {path}")
        if os.path.getsize(path) == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}")
        rate, channels, count, squares = _probe(path)
        if count == 0:
            raise AudioError(f"audio stream has zero length (no samples): {path}")
        return AudioTrack(rate, channels, count, math.sqrt(squares / count), path=path)

    @staticmethod
    def of(audio) -> "AudioTrack":
        """An AudioTrack from a path, an AudioTrack, a :class:`~.waveform.Waveform`, or a ComfyUI AUDIO mapping."""
        from collections.abc import Mapping

        from .waveform import Waveform, comfy_audio_channels

        if isinstance(audio, AudioTrack):
            return audio
        if audio is None:
            raise AudioError("no audio was given")
        if isinstance(audio, Waveform):
            return AudioTrack.from_samples(audio.samples, audio.sample_rate)
        if isinstance(audio, Mapping):
            return AudioTrack.from_samples(*comfy_audio_channels(audio))
        return AudioTrack.from_file(audio)

    # ------------------------------------------------------------------ facts

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def silent(self) -> bool:
        """The whole track's RMS is below -60 dBFS (the mouth will stay closed)."""
        return self.rms <= 10.0 ** (SILENCE_DB / 20.0)

    @property
    def num_speech_samples(self) -> int:
        """Length at 16 kHz (as the whole-signal resampler makes it: ``ceil(N * 16000 / rate)``)."""
        return -(-self.num_samples * SAMPLE_RATE // self.sample_rate)

    def num_frames(self, fps: FpsLike) -> int:
        """Whole video frames the audio spans at ``fps`` (``round(seconds * fps)``, from the 16 kHz length)."""
        return FrameAligner(fps).num_frames(self.num_speech_samples, SAMPLE_RATE)

    def samples_for_frames(self, num_frames: int, fps: FpsLike) -> int:
        """Samples (at the track's rate) spanned by ``num_frames`` video frames."""
        return FrameAligner(fps).num_samples(num_frames, self.sample_rate)

    # ------------------------------------------------------------------ reading

    def cursor(self):
        """A reader with ``read(start, stop) -> [C, stop - start]`` (zeros outside the track); reads should move
        forward (a backward read re-decodes a file from its start). ``close()`` it when done."""
        if self.samples is not None:
            return _MemoryCursor(self.samples)
        return _FileCursor(self.path, self.channels, self.num_samples)

    def read_all(self) -> Tensor:
        """The whole track ``[C, N]`` (a view for in-memory audio). Only for short audio or a host that needs it."""
        if self.samples is not None:
            return self.samples
        cursor = self.cursor()
        try:
            return cursor.read(0, self.num_samples)
        finally:
            cursor.close()

    def clipped(self, num_samples: int) -> "ClippedAudio":
        """This track trimmed, or padded with silence, to exactly ``num_samples`` (what the output gets)."""
        return ClippedAudio(self, int(num_samples))

    def speech(self) -> "SpeechReader":
        """A reader of the mono 16 kHz speech (what Whisper-style front-ends take)."""
        return SpeechReader(self)


def _probe(path: str) -> tuple[int, int, int, float]:
    """(rate, channels, samples, sum of squares of the mono mix) of a file's first audio stream."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise AudioError(f"file has no audio stream: {path}")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            channels, count, squares = None, 0, 0.0
            for frame in container.decode(stream):
                block = _frame_samples(frame)
                rate = frame.sample_rate or rate
                if channels is None:
                    channels = block.shape[0] if block.shape[0] <= 2 else 1
                block = _fit_channels(block, channels)
                if not torch.isfinite(block).all():
                    raise AudioError(f"audio in {path} contains NaN or infinite samples")
                squares += mono_squares(block)
                count += block.shape[1]
    except AudioError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise AudioError(f"could not decode audio from {path}: {error}") from None
    return _check_rate(rate), channels or 1, count, squares


class ClippedAudio:
    """A track seen as exactly ``num_samples`` long (trimmed, or padded with silence): the source a video writer
    pulls the output's audio from, block by block."""

    def __init__(self, track: AudioTrack, num_samples: int):
        self.track, self.num_samples = track, num_samples
        self.sample_rate, self.channels = track.sample_rate, track.channels
        self._cursor = None

    def read(self, start: int, stop: int) -> Tensor:
        if self._cursor is None:
            self._cursor = self.track.cursor()
        stop = min(stop, self.num_samples)
        return self._cursor.read(start, stop) if stop > start else torch.zeros(self.channels, 0)

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
        self._cursor = None

    def read_all(self) -> Tensor:
        try:
            return self.read(0, self.num_samples)
        finally:
            self.close()


READ_BLOCK = 4 * SAMPLE_RATE


class SpeechReader:
    """Mono 16 kHz speech of a track by range, resampled block by block (see the module docstring)."""

    def __init__(self, track: AudioTrack):
        self.track = track
        self.num_samples = track.num_speech_samples
        self._cursor = track.cursor()
        rate = track.sample_rate
        g = math.gcd(rate, SAMPLE_RATE)
        self.up, self.down = SAMPLE_RATE // g, rate // g
        if rate != SAMPLE_RATE:
            reach = _polyphase_filters(self.up, self.down, 32, 14.0, 1.0)[2]
            self.margin = -(-(reach + 1) // self.down) * self.down   # input samples, a whole number of periods
        else:
            self.margin = 0

    def read(self, start: int, stop: int) -> Tensor:
        """Speech samples ``[stop - start]`` (zeros outside the track). A long range is decoded once and resampled
        ``READ_BLOCK`` at a time: a 30 s window's resampling buffers (several times its 1.9 MB) are never held."""
        if stop - start <= READ_BLOCK or self.up == self.down:
            return self._resampled(self._cursor, start, stop)
        lo, hi = self._input_range(start, stop)
        decoded = _MemoryCursor(self._cursor.read(lo, hi), lo)
        out = torch.empty(stop - start)
        for a in range(start, stop, READ_BLOCK):
            b = min(a + READ_BLOCK, stop)
            out[a - start: b - start] = self._resampled(decoded, a, b)
        return out

    def _input_range(self, start: int, stop: int) -> tuple[int, int]:
        """The input samples that output ``[start, stop)`` reads: whole filter periods plus the filter's reach."""
        first, last = start - start % self.up, -(-stop // self.up) * self.up
        return first // self.up * self.down - self.margin, last // self.up * self.down + self.margin

    def _resampled(self, cursor, start: int, stop: int) -> Tensor:
        if stop <= start:
            return torch.zeros(0)
        if self.up == self.down:
            return to_mono(cursor.read(start, stop))
        x = to_mono(cursor.read(*self._input_range(start, stop)))
        y = resample(x, self.track.sample_rate, SAMPLE_RATE)
        out = y[self.margin * self.up // self.down + start % self.up:][:stop - start]
        valid = max(0, min(stop, self.num_samples) - start)
        if valid < out.shape[0]:
            out = out.clone()
            out[valid:] = 0
        return out

    def close(self) -> None:
        self._cursor.close()


__all__ = ["AudioTrack", "ClippedAudio", "SpeechReader", "SILENCE_DB"]
