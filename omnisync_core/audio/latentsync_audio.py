"""LatentSync's audio tokens: Whisper-tiny features stacked over layers, 10 steps (200 ms) per video frame, any fps.

Upstream (``latentsync/whisper/audio2feature.py``, ``whisper/model.py`` L143-171, ``transcribe.py`` L85-126):

- log-mel of the whole track (the ``max - 8`` floor uses the whole track's maximum), cut into 3000-frame (30 s)
  segments, each zero-padded *as mel* to 3000 frames and encoded alone;
- per 20 ms token the stack of 5 tensors ``[input of block 0 (conv + position), output of block 0, ..., of block
  3]`` (no ``ln_post``), so ``F[t] = [5, 384]`` at 50 Hz; ``floor(mel_frames / 2)`` tokens are kept;
- video frame i takes tokens ``c - 4 .. c + 5`` with ``c = int(i * 50 / fps)``, clamped to the track, flattened
  time-major to ``[50, 384]`` (``[t0 L0..L4, t1 L0..L4, ...]``); a 16-frame window gives ``[16, 50, 384]``.

Here the track is encoded in the overlapping 30 s windows of :func:`omnisync_core.audio.features.plan_chunks`, so
there is no seam every 30 s (a track up to 30 s long is one window: exactly upstream's features), and the frame
centre comes from :class:`FrameAligner` in exact arithmetic at any frame rate instead of a forced 25 fps.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AudioError
from .align import FpsLike, FrameAligner
from .features import TOKEN_RATE, TOKEN_SAMPLES, plan_chunks
from .mel import CHUNK_FRAMES, HOP_LENGTH, log_mel_spectrogram
from .whisper import WhisperEncoder

__all__ = ["TOKENS_BEFORE", "TOKENS_AFTER", "whisper_layer_stack", "latentsync_audio_features",
           "latentsync_frame_tokens"]

TOKENS_BEFORE, TOKENS_AFTER = 4, 5   # audio_feat_length [2, 2]: range(c - 2*2, c + (2+1)*2)


def whisper_layer_stack(encoder: WhisperEncoder, mel: Tensor) -> Tensor:
    """``mel [B, n_mels, T]`` -> ``[B, T / 2, n_layers + 1, d_model]``: the input of block 0 (conv stem plus
    positions) followed by every block's output, as upstream's ``include_embeddings=True``."""
    x = mel.to(encoder.conv1.weight.dtype)
    stem = encoder.embed(x).transpose(1, 2)
    stem = stem + encoder.positional_embedding[: stem.shape[1]].to(stem.dtype)
    _, hidden = encoder(mel, output_hidden_states=True)
    return torch.stack([stem, *hidden], dim=2)


@torch.no_grad()
def latentsync_audio_features(samples: Tensor, encoder: WhisperEncoder, context: int = 250, batch_size: int = 4,
                              progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """16 kHz mono ``[N]`` -> ``[N // 320, n_layers + 1, d_model]`` on the encoder's device and dtype (token k
    covers samples ``[320 k, 320 (k + 1))``; ``[T, 5, 384]`` for Whisper tiny).

    The log-mel is taken over the whole track once (its peak sets the floor, as upstream); each 30 s window of
    :func:`plan_chunks` is then encoded from its slice of that mel, zero-padded in the mel domain as upstream pads
    its last segment, and keeps its well-conditioned middle. ``progress(done, total)`` runs after each batch.
    """
    if samples.ndim != 1:
        raise AudioError(f"LatentSync audio features expect mono samples [N], got shape {tuple(samples.shape)}")
    num_tokens = samples.shape[0] // TOKEN_SAMPLES
    if num_tokens < 1:
        raise AudioError(f"The audio is too short for one Whisper token ({samples.shape[0]} samples; "
                         f"{TOKEN_SAMPLES} needed).")
    param = next(encoder.parameters())
    mel = log_mel_spectrogram(samples.to(param.device), n_mels=encoder.config.n_mels)
    chunks = plan_chunks(num_tokens, context)
    per_token = TOKEN_SAMPLES // HOP_LENGTH
    pieces = []
    for first in range(0, len(chunks), batch_size):
        group = chunks[first: first + batch_size]
        batch = []
        for c in group:
            seg = mel[:, c.start * per_token: c.start * per_token + CHUNK_FRAMES]
            batch.append(F.pad(seg, (0, CHUNK_FRAMES - seg.shape[1])))
        stacks = whisper_layer_stack(encoder, torch.stack(batch).to(param.dtype))
        for c, row in zip(group, stacks):
            pieces.append(row[c.keep_from - c.start: c.keep_to - c.start])
        if progress is not None:
            progress(min(first + batch_size, len(chunks)), len(chunks))
    return torch.cat(pieces)


def latentsync_frame_tokens(features: Tensor, num_frames: int, fps: FpsLike, first_frame: int = 0) -> Tensor:
    """Audio tokens ``[num_frames, 10 * L, D]`` for video frames ``first_frame ..`` at ``fps``, from
    ``features [T, L, D]``: tokens ``c - 4 .. c + 5`` around ``c = floor(frame * 50 / fps)``, clamped to the track,
    time-major (``[50, 384]`` per frame for Whisper tiny)."""
    if features.ndim != 3:
        raise AudioError(f"LatentSync audio features must be [tokens, layers, dim], got {list(features.shape)}.")
    frames = torch.arange(first_frame, first_frame + num_frames)
    index = FrameAligner(fps, feature_rate=TOKEN_RATE).window_indices(frames, TOKENS_BEFORE, TOKENS_AFTER,
                                                                      features.shape[0])
    return features[index.to(features.device)].flatten(1, 2)
