"""Whole-track Whisper features without seams: 30 s windows that overlap, each trimmed to its well-conditioned
middle, so a track of any length gets one feature every 20 ms (50 per second) and no glitch every 30 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

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


def chunk_log_mel(samples: Tensor, chunk: Chunk, n_mels: int) -> Tensor:
    """The encoder input of one window: log-mel ``[n_mels, 3000]`` of the 30 s from token ``chunk.start`` on,
    zero-padded past the end of the track (as Whisper pads its 30 s window)."""
    begin = chunk.start * TOKEN_SAMPLES
    return log_mel_spectrogram(samples[begin: begin + CHUNK_SAMPLES], n_mels=n_mels, pad_to_frames=CHUNK_FRAMES)


def _window_mels(samples: Tensor, chunks: list[Chunk], n_mels: int) -> Iterator[Tensor]:
    for chunk in chunks:
        yield chunk_log_mel(samples, chunk, n_mels)


@torch.no_grad()
def encode_audio(samples: Tensor, encoder: WhisperEncoder, context: int = 250, batch_size: int = 4,
                 progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """16 kHz mono ``[N]`` -> Whisper features ``[ceil(N / 320), d_model]`` on the encoder's device and dtype.

    Feature k describes the audio from ``k * 20 ms`` to ``(k + 1) * 20 ms``: index it with
    ``FrameAligner(fps, feature_rate=50)``. ``progress(done, total)`` is called after each batch of windows.
    """
    if samples.ndim != 1:
        raise AudioError(f"encode_audio expects mono samples [N], got shape {tuple(samples.shape)}")
    num_tokens = -(-samples.shape[0] // TOKEN_SAMPLES)
    chunks = plan_chunks(num_tokens, context)
    param = next(encoder.parameters())
    mels = _window_mels(samples.to(param.device), chunks, encoder.config.n_mels)
    pieces = []
    for first in range(0, len(chunks), batch_size):
        group = chunks[first: first + batch_size]
        batch = torch.stack([next(mels) for _ in group]).to(param.dtype)
        tokens = encoder(batch)
        for chunk, row in zip(group, tokens):
            pieces.append(row[chunk.keep_from - chunk.start: chunk.keep_to - chunk.start])
        if progress is not None:
            progress(min(first + batch_size, len(chunks)), len(chunks))
    return torch.cat(pieces)


def frame_audio_windows(features: Tensor, num_frames: int, fps: FpsLike, before: int = 2, after: int = 2,
                        first_frame: int = 0) -> Tensor:
    """Per-video-frame audio token windows ``[num_frames, before + 1 + after, D]`` for frames
    ``first_frame .. first_frame + num_frames - 1`` (edges repeat the first/last feature)."""
    aligner = FrameAligner(fps, feature_rate=TOKEN_RATE)
    frames = torch.arange(first_frame, first_frame + num_frames)
    return aligner.gather(features, frames, before, after)
