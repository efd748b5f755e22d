"""HuMo's audio conditioning (Phantom-video/HuMo, ``humo/utils/audio_processor_whisper.py`` and
``generate_1_7B.py``): Whisper-large-v3 hidden states averaged in five layer groups, resampled from 50 to 25 fps
over the whole track, and cut into one 8-frame window per video latent frame.

What HuMo computes, and what we reproduce:

1. ``T50 = 2 * (N // 640)`` encoder tokens (50 fps) of the 16 kHz track (HuMo cuts its concatenated chunks to
   ``audio_len * 2`` with ``audio_len = N // 640``);
2. per token the mean of Hugging Face hidden states ``[0:8]``, ``[8:16]``, ``[16:24]``, ``[24:32]`` and ``[32]``
   (embedding output, block outputs, final normalised output) -> ``[T50, 5, 1280]``;
3. ``F.interpolate(mode="linear", align_corners=True)`` over the WHOLE track to ``int(T50 / 50 * 25)`` frames
   (upstream's float expression: ``N // 640``, or one less for about 7 % of lengths, e.g. 29 -> 28 frames);
4. per latent frame i of a video window starting at frame ``frame0``: latent 0 gets three zero vectors and frames
   ``frame0 - 2 .. frame0 + 2``, latent i >= 1 frames ``frame0 + 4i - 5 .. frame0 + 4i + 2``; frames outside the
   track are zero vectors.

Deliberate deviation: HuMo encodes back-to-back 30 s chunks; we use the overlapping chunks of
:mod:`.features` (each token from a window with >= 5 s of audio on both sides), so there is no glitch every
30 s. For a track of at most 30 s (``T50 <= 1500``) both are the same single zero-padded 30 s window.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import AudioError, InputError
from .features import TOKEN_RATE, ChunkedEncoding, as_speech
from .mel import SAMPLE_RATE
from .whisper import WhisperEncoder

__all__ = [
    "HUMO_FPS", "HUMO_FRAME_SAMPLES", "HUMO_WINDOW", "HUMO_LAYER_GROUPS", "humo_layer_groups", "humo_num_frames",
    "humo_resample_indices", "humo_resample", "humo_latent_frames", "humo_window_frames", "humo_audio_windows",
    "humo_null_windows", "HumoAudioTrack", "encode_humo_audio",
]

HUMO_FPS = 25
HUMO_FRAME_SAMPLES = SAMPLE_RATE // HUMO_FPS    # 640 samples per 25-fps frame
HUMO_WINDOW = 8                                 # audio frames per latent frame: 2 before, 4 covered, 2 after
HUMO_LAYER_GROUPS = ((0, 8), (8, 16), (16, 24), (24, 32), (32, 33))
_BLOCK_FRAMES = 256                             # 25-fps frames interpolated at a time


def humo_layer_groups(n_layers: int = 32) -> tuple[tuple[int, int], ...]:
    """HuMo's grouping of the ``n_layers + 1`` hidden states: four equal groups of the first ``n_layers`` and
    the final output alone; :data:`HUMO_LAYER_GROUPS` for large-v3's 32 layers (other depths only for tests)."""
    if n_layers <= 0 or n_layers % 4:
        raise InputError(f"HuMo's layer groups need a layer count divisible by 4, got {n_layers}.")
    q = n_layers // 4
    return tuple((g * q, (g + 1) * q) for g in range(4)) + ((n_layers, n_layers + 1),)


def humo_num_frames(num_samples: int) -> int:
    """HuMo's number of 25-fps features for ``num_samples`` at 16 kHz, as upstream computes it:
    ``int(T50 / 50.0 * 25)`` with ``T50 = 2 * (num_samples // 640)``; float rounding makes it one less than
    ``num_samples // 640`` for some lengths (29 -> 28, 57 -> 56, ...)."""
    return _frames_of_tokens(2 * (int(num_samples) // HUMO_FRAME_SAMPLES))


def _frames_of_tokens(num_tokens: int) -> int:
    return int(num_tokens / float(TOKEN_RATE) * HUMO_FPS)     # upstream's expression, float rounding included


def humo_resample_indices(num_tokens: int, num_frames: int, start: int, stop: int
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source tokens and weights of 25-fps frames ``[start, stop)`` in the ``align_corners=True`` linear resample
    of ``num_tokens`` to ``num_frames``, computed as PyTorch's ``F.interpolate`` does: ``src = j * scale`` in
    float32 with ``scale = (num_tokens - 1) / (num_frames - 1)``. Returns ``(i0, i1, w0, w1)``."""
    if num_frames > 1:
        scale = torch.tensor([num_tokens - 1], dtype=torch.float32) / torch.tensor([num_frames - 1],
                                                                                   dtype=torch.float32)
    else:
        scale = torch.zeros(1)
    src = torch.arange(start, stop, dtype=torch.float32) * scale
    i0 = src.floor().to(torch.int64).clamp_(max=num_tokens - 1)
    w1 = (src - i0.to(torch.float32)).clamp_(0, 1)
    i1 = i0 + (i0 < num_tokens - 1).to(torch.int64)
    return i0, i1, 1 - w1, w1


def _lerp(x0: Tensor, x1: Tensor, w0: Tensor, w1: Tensor) -> Tensor:
    """``x0 * w0 + x1 * w1`` per row, rounded as PyTorch's interpolation kernel rounds it (the first product is
    fused into the sum): exact product and sum in float64, one rounding to float32."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    w0, w1 = w0.view(shape), w1.view(shape)
    return (x0.double() * w0.double() + (x1.float() * w1).double()).float()


def humo_resample(tokens50: Tensor, num_frames: Optional[int] = None) -> Tensor:
    """HuMo's ``linear_interpolation_fps(features, 50, 25)`` of a whole ``[T50, ...]`` tensor -> ``[T25, ...]``
    float32, ``T25 = int(T50 / 50 * 25)`` unless given."""
    num_tokens = tokens50.shape[0]
    num_frames = _frames_of_tokens(num_tokens) if num_frames is None else int(num_frames)
    i0, i1, w0, w1 = humo_resample_indices(num_tokens, num_frames, 0, num_frames)
    i0, i1 = i0.to(tokens50.device), i1.to(tokens50.device)
    return _lerp(tokens50[i0], tokens50[i1], w0.to(tokens50.device), w1.to(tokens50.device))


def humo_latent_frames(num_video_frames: int) -> int:
    """Latent frames of a Wan window of ``num_video_frames``: ``(F - 1) // 4 + 1`` (the same for F and for F
    snapped down to 4k + 1, which is what ``generate_1_7B.py`` does)."""
    if num_video_frames < 1:
        raise InputError(f"A HuMo window needs at least one video frame, got {num_video_frames}.")
    return (int(num_video_frames) - 1) // 4 + 1


def humo_window_frames(frame0: int, num_video_frames: int) -> Tensor:
    """``[T_lat, 8]`` int64: the 25-fps feature index of each window slot, ``frame0 + 4i - 5 + slot``; latent
    0's first three slots are -1 (HuMo's three zero vectors). Indices outside the track stand for zero vectors."""
    latents = torch.arange(humo_latent_frames(num_video_frames), dtype=torch.int64)
    index = int(frame0) + 4 * latents[:, None] - 5 + torch.arange(HUMO_WINDOW, dtype=torch.int64)
    index[0, :3] = -1
    return index


def humo_audio_windows(features25: Tensor, frame0: int, num_video_frames: int) -> Tensor:
    """HuMo's ``get_audio_emb_window``: features ``[T25, ...]`` -> ``[T_lat, 8, ...]`` (same dtype and device),
    exact copies of the features, zero vectors outside ``[0, T25)``."""
    index = humo_window_frames(frame0, num_video_frames).to(features25.device)
    inside = (index >= 0) & (index < features25.shape[0])
    out = features25.new_zeros((*index.shape, *features25.shape[1:]))
    out[inside] = features25[index[inside]]
    return out


def humo_null_windows(num_video_frames: int, num_groups: int = 5, dim: int = 1280,
                      dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """HuMo's null audio for guidance and for the reference latents: zeros ``[T_lat, 8, num_groups, dim]``.
    (They still pass through ``audio_proj``; HuMo does not skip the audio attention.)"""
    return torch.zeros(humo_latent_frames(num_video_frames), HUMO_WINDOW, num_groups, dim, dtype=dtype,
                       device=device)


class HumoAudioTrack:
    """HuMo's 25-fps audio features of a whole track, encoded chunk by chunk on demand.

    ``speech``: 16 kHz mono samples ``[N]`` or a reader of them (:class:`~omnisync_core.audio.track.SpeechReader`).
    :meth:`frames` returns any range of the ``num_frames`` features ``[n, 5, d_model]`` (float32, CPU),
    :meth:`windows` a video window's ``[T_lat, 8, 5, d_model]``. Each value depends only on the track and the chunk
    plan, never on the order of requests: what is returned for a range equals the same rows of
    :func:`encode_humo_audio`.

    Memory (large-v3, d_model 1280): the group means of the last ``cache_chunks`` encoded chunks, at most
    1500 x 5 x 1280 x 4 B = 38 MB each, and the samples only if they were given as a tensor (64 kB per second;
    a reader decodes them as it goes). One encoder call holds its activations plus five float32 running sums
    (5 x 1500 x 1280 x 4 B = 38 MB) instead of 33 hidden states (250 MB). Whole-track features would be
    25 x 5 x 1280 x 4 B = 640 kB per second: 2.3 GB per hour in float32, 1.15 GB in float16; a window of 97 video
    frames is 25 x 8 x 5 x 1280 x 4 B = 5.1 MB. ``progress(done, total)`` is called after each chunk encoded for
    the first time.
    """

    def __init__(self, speech, encoder: WhisperEncoder, context: int = 250, cache_chunks: int = 2,
                 progress: Optional[Callable[[int, int], None]] = None):
        if isinstance(speech, Tensor) and speech.ndim != 1:
            raise AudioError(f"HuMo's audio features need mono samples [N], got shape {tuple(speech.shape)}")
        speech = as_speech(speech.detach().to("cpu", torch.float32) if isinstance(speech, Tensor) else speech)
        samples = speech.num_samples
        self.num_tokens = 2 * (samples // HUMO_FRAME_SAMPLES)      # T50
        self.num_frames = humo_num_frames(samples)                  # T25
        if self.num_frames == 0:
            raise AudioError(f"HuMo's audio features need at least {HUMO_FRAME_SAMPLES} samples (one 25 fps frame "
                             f"at 16 kHz), got {samples}")
        self.encoder = encoder
        self.layer_groups = humo_layer_groups(encoder.config.n_layers)
        param = next(encoder.parameters())

        def groups(mel: Tensor) -> Tensor:
            return encoder(mel.to(param.device, param.dtype), layer_groups=self.layer_groups)[1]

        self._encoding = ChunkedEncoding(speech, groups, encoder.config.n_mels, context, cache_chunks, progress,
                                         num_tokens=self.num_tokens)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return len(self.layer_groups), self.encoder.config.d_model

    def tokens(self, start: int, stop: int) -> Tensor:
        """The 50-fps group means of tokens ``[start, stop)``: ``[stop - start, 5, D]`` float32 (CPU)."""
        return self._encoding.tokens(start, stop)

    def _interpolate(self, start: int, stop: int) -> Tensor:
        """Frames ``[start, stop)`` of the whole-track 50 -> 25 fps resample (:func:`humo_resample_indices`)."""
        i0, i1, w0, w1 = humo_resample_indices(self.num_tokens, self.num_frames, start, stop)
        first = int(i0[0])
        x = self.tokens(first, int(i1[-1]) + 1)
        return _lerp(x[i0 - first], x[i1 - first], w0, w1)

    def frames(self, start: int = 0, stop: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The 25-fps features of frames ``[start, stop)``: ``[stop - start, 5, D]`` in ``dtype`` (CPU)."""
        stop = self.num_frames if stop is None else stop
        if not 0 <= start <= stop <= self.num_frames:
            raise InputError(f"frame range [{start}, {stop}) is not inside [0, {self.num_frames})")
        out = torch.empty(stop - start, *self.feature_shape, dtype=dtype)
        for a in range(start, stop, _BLOCK_FRAMES):
            b = min(a + _BLOCK_FRAMES, stop)
            out[a - start: b - start] = self._interpolate(a, b)
        return out

    def windows(self, frame0: int, num_video_frames: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """HuMo's windows of the video window that starts at frame ``frame0``: ``[T_lat, 8, 5, D]``; only the
        frames it needs are computed."""
        index = humo_window_frames(frame0, num_video_frames)
        inside = index[(index >= 0) & (index < self.num_frames)]
        if inside.numel() == 0:
            return humo_null_windows(num_video_frames, *self.feature_shape, dtype=dtype)
        lo, hi = int(inside.min()), int(inside.max()) + 1
        return humo_audio_windows(self.frames(lo, hi, dtype), frame0 - lo, num_video_frames)


def encode_humo_audio(samples: Tensor, encoder: WhisperEncoder,
                      progress: Optional[Callable[[int, int], None]] = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """HuMo's audio features of a whole 16 kHz mono track ``[N]``: ``[T25, 5, d_model]`` in ``dtype`` on the
    CPU, ``T25 = humo_num_frames(N)`` (``N // 640``, or one less as upstream rounds it).

    No 30 s cut: overlapping 30 s chunks (the deliberate deviation from HuMo's back-to-back chunks described in
    the module docstring; identical for tracks up to 30 s), then the 50 -> 25 fps interpolation over the whole
    track, exactly as HuMo. Cost: 25 x 5 x 1280 x 4 B = 640 kB per second of audio, 2.3 GB per hour in float32
    (1.15 GB with ``dtype=torch.float16``); for long dubs use :class:`HumoAudioTrack`, which holds about 80 MB
    whatever the length. ``progress(done, total)`` is called after each 30 s chunk.
    """
    track = HumoAudioTrack(samples, encoder, progress=progress)
    return track.frames(0, track.num_frames, dtype)
