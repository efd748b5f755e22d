"""Whole-track Whisper features without seams: 30 s windows that overlap, each trimmed to its well-conditioned
middle, so a track of any length gets one feature every 20 ms (50 per second) and no glitch every 30 s.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import AudioError
from .align import FpsLike, FrameAligner
from .mel import CHUNK_FRAMES, CHUNK_SAMPLES, HOP_LENGTH, SAMPLE_RATE, log_mel_spectrogram
from .whisper import WhisperEncoder

TOKEN_SAMPLES = 2 * HOP_LENGTH              # one encoder token per two mel frames: 20 ms
TOKENS_PER_WINDOW = CHUNK_FRAMES // 2       # 1500 tokens per 30 s window
TOKEN_RATE = SAMPLE_RATE // TOKEN_SAMPLES   # 50 per second


@dataclass(frozen=True)
class Chunk:
    """One encoder window: tokens ``[start, start + 1500)`` of the track, of which ``[keep_from, keep_to)`` are kept."""

    start: int
    keep_from: int
    keep_to: int


def plan_chunks(num_tokens: int, context: int = 250) -> list[Chunk]:
    """Windows of 1500 tokens such that every kept token has ``context`` tokens (5 s by default) of real audio on
    both sides, except at the ends of the track; the kept ranges tile ``[0, num_tokens)`` exactly once."""
    if num_tokens <= 0:
        raise AudioError("cannot encode zero-length audio")
    if not 0 <= context < TOKENS_PER_WINDOW // 2:
        raise AudioError(f"context must lie in [0, {TOKENS_PER_WINDOW // 2}) tokens, got {context}")
    chunks, keep_from = [], 0
    while keep_from < num_tokens:
        start = max(0, keep_from - context)
        end = start + TOKENS_PER_WINDOW
        keep_to = num_tokens if end >= num_tokens else end - context
        chunks.append(Chunk(start, keep_from, keep_to))
        keep_from = keep_to
    return chunks


class _TensorSpeech:
    """A 16 kHz mono tensor read like a :class:`~omnisync_core.audio.track.SpeechReader`."""

    def __init__(self, samples: Tensor):
        if samples.ndim != 1:
            raise AudioError(f"speech must be mono samples [N], got shape {tuple(samples.shape)}")
        self.samples, self.num_samples = samples, samples.shape[0]

    def read(self, start: int, stop: int) -> Tensor:
        return self.samples[max(start, 0):stop]


def as_speech(speech):
    """A SpeechReader as it is, or 16 kHz mono samples ``[N]`` wrapped to be read the same way."""
    return speech if hasattr(speech, "read") else _TensorSpeech(speech)


class ChunkedEncoding:
    """A whole track's encoder output in overlapping 30 s chunks (:func:`plan_chunks`), computed chunk by chunk
    when a token range is asked for and cached for the last ``cache_chunks`` chunks.

    ``speech``: 16 kHz mono samples ``[N]`` or a reader (``read(start, stop)``, ``num_samples``: see
    :class:`~omnisync_core.audio.track.SpeechReader`), so the samples need not be in memory either.
    ``encode(mel [1, n_mels, 3000]) -> [1, 1500, ...]`` runs the encoder (its final features, or layer groups).
    Any token range equals the same rows of encoding the whole track at once: each value depends only on its
    chunk. Walking forward encodes every chunk once; a range far behind re-encodes its chunks.
    ``progress(done, total)`` is called after each chunk encoded for the first time.
    """

    def __init__(self, speech, encode: Callable[[Tensor], Tensor], n_mels: int, context: int = 250,
                 cache_chunks: int = 2, progress: Optional[Callable[[int, int], None]] = None,
                 num_tokens: Optional[int] = None):
        self.speech = as_speech(speech)
        self.num_tokens = -(-self.speech.num_samples // TOKEN_SAMPLES) if num_tokens is None else int(num_tokens)
        self.chunks: list[Chunk] = plan_chunks(self.num_tokens, context)
        self._starts = [c.keep_from for c in self.chunks]
        self._encode, self._n_mels = encode, n_mels
        self._cache: "OrderedDict[int, Tensor]" = OrderedDict()
        self._cache_chunks = max(1, int(cache_chunks))
        self._encoded: set[int] = set()
        self._progress = progress

    @torch.no_grad()
    def _chunk(self, i: int) -> Tensor:
        """Chunk i's kept tokens (float32, CPU), cached."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        chunk = self.chunks[i]
        begin = chunk.start * TOKEN_SAMPLES
        samples = self.speech.read(begin, min(begin + CHUNK_SAMPLES, self.speech.num_samples))
        mel = log_mel_spectrogram(samples, n_mels=self._n_mels, pad_to_frames=CHUNK_FRAMES)
        kept = self._encode(mel[None])[0, chunk.keep_from - chunk.start: chunk.keep_to - chunk.start]
        kept = kept.to("cpu", torch.float32)   # a view of the encoder's fresh output when it is that already
        self._cache[i] = kept
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        if i not in self._encoded:
            self._encoded.add(i)
            if self._progress is not None:
                self._progress(len(self._encoded), len(self.chunks))
        return kept

    def tokens(self, start: int, stop: int) -> Tensor:
        """Tokens ``[start, stop)`` of the whole track: ``[stop - start, ...]`` float32 on the CPU."""
        if not 0 <= start < stop <= self.num_tokens:
            raise AudioError(f"token range [{start}, {stop}) is not inside [0, {self.num_tokens})")
        pieces = []
        for i in range(bisect.bisect_right(self._starts, start) - 1, len(self.chunks)):
            chunk = self.chunks[i]
            if chunk.keep_from >= stop:
                break
            lo, hi = max(start, chunk.keep_from), min(stop, chunk.keep_to)
            pieces.append(self._chunk(i)[lo - chunk.keep_from: hi - chunk.keep_from])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def whisper_tokens(speech, encoder: WhisperEncoder, context: int = 250,
                   progress: Optional[Callable[[int, int], None]] = None) -> ChunkedEncoding:
    """Whisper's final features of a whole track, encoded chunk by chunk on demand (see :class:`ChunkedEncoding`):
    what a long job reads window by window, holding two chunks (2 x 1500 x d_model floats) whatever the length."""
    param = next(encoder.parameters())
    return ChunkedEncoding(speech, lambda mel: encoder(mel.to(param.device, param.dtype)), encoder.config.n_mels,
                           context, progress=progress)


@torch.no_grad()
def encode_audio(samples: Tensor, encoder: WhisperEncoder, context: int = 250,
                 progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """16 kHz mono ``[N]`` -> Whisper features ``[ceil(N / 320), d_model]`` float32 on the CPU.

    Feature k describes the audio from ``k * 20 ms`` to ``(k + 1) * 20 ms``: index it with
    ``FrameAligner(fps, feature_rate=50)``. ``progress(done, total)`` is called after each 30 s window. The whole
    track's features are 50 x d_model floats per second; :func:`whisper_tokens` reads them window by window.
    """
    if samples.ndim != 1:
        raise AudioError(f"encode_audio expects mono samples [N], got shape {tuple(samples.shape)}")
    stream = whisper_tokens(samples, encoder, context, progress)
    return stream.tokens(0, stream.num_tokens)


def frame_audio_windows(features: Tensor, num_frames: int, fps: FpsLike, before: int = 2, after: int = 2,
                        first_frame: int = 0) -> Tensor:
    """Per-video-frame audio token windows ``[num_frames, before + 1 + after, D]`` for frames
    ``first_frame .. first_frame + num_frames - 1`` (edges repeat the first/last feature)."""
    aligner = FrameAligner(fps, feature_rate=TOKEN_RATE)
    frames = torch.arange(first_frame, first_frame + num_frames)
    return aligner.gather(features, frames, before, after)
