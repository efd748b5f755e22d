"""Sync without weights: does the mouth open when the speech is loud?

- **speech envelope** ``e_t``: the mouth openness the synthetic renderer draws for the audio of frame t
  (:func:`omnisync_core.train.synthetic.mouth_track`: RMS over the frame plus 25 ms, in dB over a 30 dB range below
  the clip's loud level, raised to 1.7).
- **mouth opening** ``m_t``: the inner-lip gap of Face Mesh (points 13-14) over the face width (points 234-454).
- **AV correlation** ``r(k) = pearson(m_t, e_{t-k})`` over the frames where a face is found; ``av_corr`` = r(0);
  ``av_offset`` = argmax_k r(k) for |k| <= ``max_lag`` (frames, positive: the mouth lags the audio);
  ``av_corr_best`` = r at that lag.
- **re-voicing correlation** (omnisync_core/eval/sync.py, for synthetic faces): pearson between the dark-interior
  height :func:`~omnisync_core.train.synthetic.measure_openness` reads from pixels at the Face Mesh mouth centre
  and the envelope. On the source video with new speech it is the leak check (a copy of the source scores it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..train import synthetic


def speech_envelope(pcm_16k: Tensor, fps: float, num_frames: int) -> Tensor:
    """``[num_frames]`` openness in 0..1 implied by 16 kHz speech (0 for frames past the audio's end)."""
    pcm = torch.as_tensor(pcm_16k).reshape(-1)
    if pcm.numel() == 0:
        return torch.zeros(num_frames)
    return synthetic.mouth_track(pcm, fps, num_frames).openness.float()


def pearson_masked(a: Tensor, b: Tensor) -> float:
    """Pearson correlation over the entries where both are finite (NaN when fewer than 3 or no variance)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    keep = a.isfinite() & b.isfinite()
    if int(keep.sum()) < 3:
        return float("nan")
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 1e-12 else float("nan")


def lagged(x: Tensor, k: int) -> Tensor:
    """``y_t = x_{t-k}`` with NaN where t - k falls outside."""
    y = torch.full_like(x.double(), float("nan"))
    n = x.shape[0]
    if k >= 0:
        y[k:] = x[:n - k].double()
    else:
        y[:n + k] = x[-k:].double()
    return y


@dataclass
class AVSync:
    corr: float          # r(0)
    best_corr: float     # r at the best lag
    offset: int          # the best lag in frames (positive: mouth after audio)


def av_sync(opening: Tensor, envelope: Tensor, max_lag: int = 2) -> AVSync:
    """Correlation of a mouth-opening series with the speech envelope, at lag 0 and at the best lag."""
    n = min(opening.shape[0], envelope.shape[0])
    opening, envelope = opening[:n], envelope[:n]
    scores = {k: pearson_masked(opening, lagged(envelope, k)) for k in range(-max_lag, max_lag + 1)}
    finite = {k: v for k, v in scores.items() if v == v}
    if not finite:
        return AVSync(float("nan"), float("nan"), 0)
    best = max(finite, key=lambda k: (finite[k], -abs(k)))
    return AVSync(scores[0], finite[best], best)


def pixel_opening(frames: Tensor, mouth_center: Tensor, face_width: Tensor) -> Tensor:
    """``[T]`` dark mouth-interior height (face widths) read from pixels at each mouth centre; NaN where no face."""
    ok = mouth_center.isfinite().all(-1) & face_width.isfinite()
    out = torch.full((frames.shape[0],), float("nan"))
    if bool(ok.any()):
        out[ok] = synthetic.measure_openness(frames[ok], mouth_center[ok], face_width[ok])
    return out
