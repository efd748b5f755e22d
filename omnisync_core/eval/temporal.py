"""Temporal stability: does the mouth shake, and do window boundaries show?

- **mouth jitter** (the complaint against MuseTalk and Wav2Lip): the mean second difference of the 40 Face Mesh lip
  points in the face's own frame, ``J = 100 * mean_{t,k} || q_{t+1,k} - 2 q_{t,k} + q_{t-1,k} ||``, where
  ``q_{t,k} = (p_{t,k} - c_t) / w_t`` (c_t the mean of the stable points: eye corners and nose, w_t the face
  width), over runs of three consecutive frames with a face: percent of the face width per frame^2. Head motion
  cancels; articulation does not, so compare with the source's own J (``jitter_ratio`` = output / source).
- **seam error** (the complaint against InfiniteTalk's chunks): with ``d_t`` the mean absolute change (0..255
  levels) from frame t-1 to t inside the face box, ``S = mean_{t in B} d_t - mean_{t not in B} d_t``, B the
  transitions where one window hands over to the next (the cross-faded frames and the first frame after them).
  About 0 when boundaries are invisible; a jump at every seam raises it by the jump's size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..timeline import plan_windows
from .faces import LIPS, STABLE, FaceSeries, fill_gaps


def mouth_jitter(faces: FaceSeries) -> float:
    """``J`` above (NaN with fewer than 3 consecutive frames with a face)."""
    lm = faces.landmarks
    q = (lm[:, list(LIPS)] - lm[:, list(STABLE)].mean(1, keepdim=True)) / faces.face_width.clamp_min(1e-6)[:, None,
                                                                                                          None]
    if q.shape[0] < 3:
        return float("nan")
    second = (q[2:] - 2 * q[1:-1] + q[:-2]).norm(dim=-1)        # [T - 2, 40], NaN where a frame had no face
    ok = second.isfinite().all(-1)
    return float(100 * second[ok].mean()) if bool(ok.any()) else float("nan")


def boundary_transitions(num_frames: int, window: int, overlap: int) -> Tensor:
    """``[T]`` bool: transition t (frame t-1 -> t) lies in a window hand-over (see the module)."""
    marks = torch.zeros(num_frames, dtype=torch.bool)
    windows = plan_windows(num_frames, window, overlap)
    for prev, nxt in zip(windows, windows[1:]):
        marks[nxt.start:min(prev.stop + 1, num_frames)] = True
    marks[0] = False
    return marks


def frame_changes(frames: Tensor, boxes: Tensor) -> Tensor:
    """``d_t`` ``[T]`` (d_0 = NaN): mean absolute change in 0..255 levels inside each frame's face box ``[T, 4]``
    (gaps filled from the previous box; the whole frame when there is no box at all)."""
    t, h, w = frames.shape[:3]
    img = frames.float() * (255.0 if frames.is_floating_point() else 1.0)
    box = fill_gaps(boxes.float())
    d = torch.full((t,), float("nan"))
    for i in range(1, t):
        b = box[i]
        if bool(b.isfinite().all()):
            x0, y0 = int(b[0].clamp(0, w - 1)), int(b[1].clamp(0, h - 1))
            x1, y1 = max(int(b[2].ceil().clamp(1, w)), x0 + 1), max(int(b[3].ceil().clamp(1, h)), y0 + 1)
        else:
            x0, y0, x1, y1 = 0, 0, w, h
        d[i] = (img[i, y0:y1, x0:x1] - img[i - 1, y0:y1, x0:x1]).abs().mean()
    return d


def seam_error(frames: Tensor, boxes: Tensor, window: int, overlap: int) -> float:
    """``S`` above for a video made in windows of ``window`` frames sharing ``overlap`` (NaN with one window)."""
    d = frame_changes(frames, boxes)
    marks = boundary_transitions(frames.shape[0], window, overlap)
    rest = ~marks
    rest[0] = False
    if not bool(marks.any()) or not bool(rest.any()):
        return float("nan")
    return float(d[marks].mean() - d[rest].mean())
