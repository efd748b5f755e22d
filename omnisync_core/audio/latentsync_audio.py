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
from .features import TOKEN_RATE, TOKEN_SAMPLES, ChunkedEncoding, as_speech, plan_chunks
from .mel import CHUNK_FRAMES, CHUNK_SAMPLES, HOP_LENGTH, log_mel_spectrogram
from .whisper import WhisperEncoder

__all__ = ["TOKENS_BEFORE", "TOKENS_AFTER", "whisper_layer_stack", "latentsync_audio_features",
           "latentsync_frame_tokens", "log_mel_peak", "LatentSyncAudioTrack"]

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


# ---------------------------------------------------------------- the same features in constant memory

def _track_mel(speech, a: int, b: int, n_mels: int) -> Tensor:
    """Mel frames ``[a, b)`` of the whole track's log-mel (its STFT: centred 400-sample windows, the track's ends
    reflected), read with two frames of audio before and two and a half after; normalised with the floor of the
    samples read (the caller applies the whole track's)."""
    first = max(0, a - 2)
    x = speech.read(first * HOP_LENGTH, min(speech.num_samples, b * HOP_LENGTH + 400))
    return log_mel_spectrogram(x, n_mels=n_mels)[:, a - first: b - first]


def log_mel_peak(speech, n_mels: int = 80, block: int = CHUNK_SAMPLES) -> float:
    """The largest log10 mel value of a whole track (what sets upstream's ``max - 8`` floor), read ``block``
    samples at a time (:func:`_track_mel`), so it is the whole-track log-mel's peak in constant memory."""
    speech = as_speech(speech)
    frames = speech.num_samples // HOP_LENGTH
    if frames < 1:
        raise AudioError(f"The audio is too short for one mel frame ({speech.num_samples} samples).")
    step = max(1, block // HOP_LENGTH)
    return max(4.0 * float(_track_mel(speech, a, min(frames, a + step), n_mels).max()) - 4.0
               for a in range(0, frames, step))


class LatentSyncAudioTrack(ChunkedEncoding):
    """:func:`latentsync_audio_features` of a whole track, encoded 30 s window by window as the job asks for
    tokens (two windows cached: ``2 x 1500 x 5 x 384`` floats), so host memory stays constant in the track's
    length. ``tokens(start, stop)`` gives ``[stop - start, n_layers + 1, d_model]`` float32 on the CPU.

    The windows and kept ranges are :func:`latentsync_audio_features`'s, and so is each window's mel: the frames of
    the whole track's log-mel (:func:`_track_mel`), with the whole track's floor (``peak - 8``, one cheap pass of
    :func:`log_mel_peak`) and zeros past the track's end (upstream pads its last segment in the mel domain)."""

    def __init__(self, speech, encoder: WhisperEncoder, context: int = 250,
                 progress: Optional[Callable[[int, int], None]] = None):
        speech = as_speech(speech)
        if speech.num_samples < TOKEN_SAMPLES:
            raise AudioError(f"The audio is too short for one Whisper token ({speech.num_samples} samples; "
                             f"{TOKEN_SAMPLES} needed).")
        self.encoder = encoder
        self.floor = (log_mel_peak(speech, encoder.config.n_mels) - 4.0) / 4.0   # (peak - 8 + 4) / 4
        self.mel_frames = speech.num_samples // HOP_LENGTH
        self._window_start = 0
        super().__init__(speech, self._encode_window, encoder.config.n_mels, context, progress=progress,
                         num_tokens=speech.num_samples // TOKEN_SAMPLES)

    def _chunk(self, i: int) -> Tensor:
        self._window_start = self.chunks[i].start
        return super()._chunk(i)

    def _encode_window(self, _mel: Tensor) -> Tensor:
        a = self._window_start * (TOKEN_SAMPLES // HOP_LENGTH)
        b = min(self.mel_frames, a + CHUNK_FRAMES)
        mel = _track_mel(self.speech, a, b, self._n_mels).clamp_min(self.floor)
        mel = F.pad(mel, (0, CHUNK_FRAMES - mel.shape[1]))[None]
        param = next(self.encoder.parameters())
        return whisper_layer_stack(self.encoder, mel.to(param.device, param.dtype))
