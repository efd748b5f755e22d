"""Integrated loudness (ITU-R BS.1770-4: K-weighting, 400 ms blocks with 75 % overlap, -70 LUFS absolute and -10 LU
relative gates) and normalisation to a target loudness, in numpy, as pyloudnorm computes it.

InfiniteTalk normalises every speech track to -23 LUFS with pyloudnorm before wav2vec2 (``generate_infinitetalk.py``
``loudness_norm``), leaving tracks whose loudness has a magnitude above 100 (e.g. digital silence, -inf) alone. The
K-weighting here is pyloudnorm's: two biquads from the audio-EQ-cookbook formulas, a high shelf (+4 dB, Q 1/sqrt 2,
1500 Hz) and a high pass (Q 0.5, 38 Hz), designed for the track's own sample rate (BS.1770's printed coefficients are
for 48 kHz only). The filters run exactly (no scipy): the FIR part directly, the recursive part as a convolution with
its impulse response, which both biquads' poles make vanish below 1e-17 within a few thousand samples.

What it costs: float64 copies of the track (8 bytes a sample, a few at a time) and FFTs of 64 k samples; an hour of
16 kHz mono (57.6 M samples) takes about 0.5 GB and a few seconds.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

__all__ = ["LUFS_TARGET", "k_weighting", "integrated_loudness", "normalize_loudness"]

LUFS_TARGET = -23.0
_BLOCK_S, _OVERLAP = 0.4, 0.75
_ABS_GATE, _REL_GATE = -70.0, -10.0
_CHANNEL_GAINS = (1.0, 1.0, 1.0, 1.41, 1.41)     # L, R, C, Ls, Rs


def _biquads(rate: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-weighting as two (b, a) biquads normalised by a0: the high shelf, then the high pass."""
    out = []
    # high shelf: gain 4 dB, Q 1/sqrt(2), 1500 Hz
    big_a, w0 = 10 ** (4.0 / 40.0), 2.0 * math.pi * 1500.0 / rate
    alpha, cw, root = math.sin(w0) / (2.0 / math.sqrt(2.0)), math.cos(w0), math.sqrt(big_a)
    b = [big_a * ((big_a + 1) + (big_a - 1) * cw + 2 * root * alpha), -2 * big_a * ((big_a - 1) + (big_a + 1) * cw),
         big_a * ((big_a + 1) + (big_a - 1) * cw - 2 * root * alpha)]
    a = [(big_a + 1) - (big_a - 1) * cw + 2 * root * alpha, 2 * ((big_a - 1) - (big_a + 1) * cw),
         (big_a + 1) - (big_a - 1) * cw - 2 * root * alpha]
    out.append((np.array(b) / a[0], np.array(a) / a[0]))
    # high pass: Q 0.5, 38 Hz
    w0 = 2.0 * math.pi * 38.0 / rate
    alpha, cw = math.sin(w0) / (2.0 * 0.5), math.cos(w0)
    b = [(1 + cw) / 2, -(1 + cw), (1 + cw) / 2]
    a = [1 + alpha, -2 * cw, 1 - alpha]
    out.append((np.array(b) / a[0], np.array(a) / a[0]))
    return out


def _all_pole_response(a: np.ndarray, tol: float = 1e-17, limit: int = 1 << 22) -> np.ndarray:
    """Impulse response g of 1 / (1 + a1 z^-1 + a2 z^-2) until it falls below `tol` of its peak: g[n] is the top-left
    entry of the companion matrix to the n-th power, built by doubling (log2 n batched 2x2 products)."""
    comp = np.array([[-a[1], -a[2]], [1.0, 0.0]])
    powers = np.eye(2)[None]
    step = comp
    while True:
        powers = np.concatenate([powers, powers @ step])           # A^0 .. A^(2L-1)
        step = step @ step
        g = powers[:, 0, 0]
        tail = np.abs(powers[-powers.shape[0] // 2:]).max()
        if tail < tol * np.abs(g).max() or powers.shape[0] >= limit:
            cut = np.nonzero(np.abs(g) >= tol * np.abs(g).max())[0][-1] + 1
            return g[:cut]


def _fft_convolve(x: np.ndarray, h: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """The first len(x) samples of x * h (overlap-add in blocks, float64)."""
    n_fft = 1 << (block + len(h) - 2).bit_length()
    spec = np.fft.rfft(h, n_fft)
    y = np.zeros(len(x) + len(h) - 1)
    for s in range(0, len(x), block):
        seg = x[s:s + block]
        n = len(seg) + len(h) - 1
        y[s:s + n] += np.fft.irfft(np.fft.rfft(seg, n_fft) * spec, n_fft)[:n]
    return y[:len(x)]


def k_weighting(samples: np.ndarray, rate: float) -> np.ndarray:
    """K-weighted copy (float64) of a track [N] or [N, C], filtering along time as scipy's lfilter would."""
    y = np.asarray(samples, dtype=np.float64)
    flat = y.reshape(len(y), -1)
    out = np.empty_like(flat)
    for c in range(flat.shape[1]):
        v = flat[:, c]
        for b, a in _biquads(rate):
            fir = b[0] * v
            fir[1:] += b[1] * v[:-1]
            fir[2:] += b[2] * v[:-2]
            v = _fft_convolve(fir, _all_pole_response(a))
        out[:, c] = v
    return out.reshape(y.shape)


def integrated_loudness(samples, rate: float) -> float:
    """Gated integrated loudness in LUFS of a track [N] (mono) or [N, C <= 5] (pyloudnorm's channel order and
    gains); -inf when no block passes the gates (silence). Raises InputError for a track shorter than one 400 ms
    block, as pyloudnorm does."""
    x = np.asarray(samples)
    if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[1] > 5):
        raise InputError(f"loudness needs samples [N] or [N, channels <= 5], got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError("loudness needs floating-point samples.")
    if x.shape[0] < _BLOCK_S * rate:
        raise InputError(f"loudness needs at least {_BLOCK_S * 1000:.0f} ms of audio, got {x.shape[0] / rate:.3f} s.")
    y = k_weighting(x, rate).reshape(x.shape[0], -1)
    step = 1.0 - _OVERLAP
    blocks = int(np.round((x.shape[0] / rate - _BLOCK_S) / (_BLOCK_S * step))) + 1
    j = np.arange(blocks)
    lo = np.array([int(_BLOCK_S * (k * step) * rate) for k in j])          # pyloudnorm's bounds, same float math
    hi = np.minimum([int(_BLOCK_S * (k * step + 1) * rate) for k in j], x.shape[0])
    csum = np.concatenate([np.zeros((1, y.shape[1])), np.cumsum(y * y, axis=0)])
    z = (csum[hi] - csum[lo]).T / (_BLOCK_S * rate)                        # [C, blocks] mean squares
    g = np.array(_CHANNEL_GAINS[: y.shape[1]])[:, None]
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10.0 * np.log10((g * z).sum(0))
        gated = block_lufs >= _ABS_GATE
        if not gated.any():
            return float("-inf")
        rel = -0.691 + 10.0 * np.log10((g[:, 0] * z[:, gated].mean(1)).sum()) + _REL_GATE
        keep = (block_lufs > rel) & (block_lufs > _ABS_GATE)
        if not keep.any():
            return float("-inf")
        return float(-0.691 + 10.0 * np.log10((g[:, 0] * z[:, keep].mean(1)).sum()))


def normalize_loudness(samples, rate: float, target: float = LUFS_TARGET) -> np.ndarray:
    """InfiniteTalk's loudness_norm: the track scaled to `target` LUFS (float32), or unchanged when its loudness has a
    magnitude above 100 (silence) or it is shorter than one 400 ms block (where upstream's pyloudnorm raises)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.shape[0] < _BLOCK_S * rate:
        return x
    lufs = integrated_loudness(x, rate)
    if not abs(lufs) <= 100:
        return x
    return (x * np.float32(10.0 ** ((target - lufs) / 20.0))).astype(np.float32)
