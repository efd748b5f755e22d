"""Follow one face through a clip: selection, identity over time, shot changes, gap filling, zero-lag smoothing.

Smoothing is a zero-phase Savitzky-Golay filter (local quadratic least squares, centred window) applied to each
segment on its own, a segment being the frames of one shot that follow one person. Being centred it has no lag, and
being per segment it never blends two shots. The whole clip is known before cropping, so a causal filter
(One-Euro) would only add lag.
"""

from __future__ import annotations

import json
import math
import warnings as _warnings
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .types import FACE_POINTS, FaceDetections, FrameFaces, point_index

# Face Mesh indices in MediaPipe's order (see FACE_POINTS): the mouth centre, the cheeks that give the face width.
MOUTH_POINTS = FACE_POINTS["mouth"]
CHEEK_POINTS = (*FACE_POINTS["right_cheek"], *FACE_POINTS["left_cheek"])
# BlazeFace keypoint order (subject's view): right eye, left eye, nose tip, mouth, right ear, left ear.
KP_RIGHT_EYE, KP_LEFT_EYE, KP_MOUTH = 0, 1, 3

SELECT_MODES = ("largest", "central")
_TENSORS = ("boxes", "points", "valid", "detected", "shot_ids", "mouth_xy", "face_width", "eyes")


@dataclass
class FaceTrack:
    """One face followed through ``T`` frames (all coordinates in frame pixels, see ``types.py``).

    boxes ``[T, 4]`` xyxy; points ``[T, len(FACE_POINTS), 2]`` the named Face Mesh points (types.FACE_POINTS) or
    None (no landmark model, or no face anywhere);
    valid ``[T]`` a face is there (seen, or interpolated/held close to a sighting): only these frames are edited;
    detected ``[T]`` the face was seen in that frame; shot_ids ``[T]`` segment index (given cuts plus cuts inferred
    from the detections); mouth_xy ``[T, 2]``; face_width ``[T]``; eyes ``[T, 2, 2]`` right then left eye
    (subject's view); frame_hw ``(H, W)``; warnings: human-readable notes (fallback boxes, frames passed through).
    """

    boxes: Tensor
    points: Optional[Tensor]
    valid: Tensor
    detected: Tensor
    shot_ids: Tensor
    mouth_xy: Tensor
    face_width: Tensor
    eyes: Tensor
    frame_hw: tuple[int, int]
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def _map(self, fn) -> "FaceTrack":
        return replace(self, **{k: None if getattr(self, k) is None else fn(getattr(self, k)) for k in _TENSORS},
                       warnings=list(self.warnings))

    def window(self, a: int, b: int) -> "FaceTrack":
        """Frames ``a`` (inclusive) to ``b`` (exclusive), as a new track sharing storage."""
        return self[a:b]

    def __getitem__(self, index: slice) -> "FaceTrack":
        if not isinstance(index, slice):
            raise InputError("A FaceTrack can only be sliced with a range of frames, e.g. track[0:81].")
        return self._map(lambda x: x[index])

    def to(self, device) -> "FaceTrack":
        return self._map(lambda x: x.to(device))

    def point(self, name: str) -> Optional[Tensor]:
        """The named point ``[T, 2]`` (see types.FACE_POINTS), or None without landmarks."""
        return None if self.points is None else self.points[:, point_index(name)]

    def nbytes(self) -> int:
        """Memory the track holds: about 200 bytes per frame."""
        return sum(getattr(self, k).nbytes for k in _TENSORS if getattr(self, k) is not None)

    def save(self, path: str, with_points: bool = True) -> None:
        """Write the track as one safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in _TENSORS
                   if getattr(self, k) is not None and (k != "points" or with_points)}
        meta = {"format": "omnisync-face-track", "version": "2", "frame_hw": json.dumps(list(self.frame_hw)),
                "warnings": json.dumps(self.warnings)}
        save_file(tensors, path, metadata=meta)

    @staticmethod
    def load(path: str, device="cpu") -> "FaceTrack":
        """Read a track written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != "omnisync-face-track" or meta.get("version") != "2":
                raise InputError(f"{path} is not an OmniSync face track file (of this version).")
            t = {k: f.get_tensor(k) for k in f.keys()}
        return FaceTrack(**{k: t.get(k) for k in _TENSORS}, frame_hw=tuple(json.loads(meta["frame_hw"])),
                         warnings=json.loads(meta["warnings"]))


# ----------------------------------------------------------------------------------------------- geometry helpers

def _area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)


def _iou(boxes: Tensor, ref: Tensor) -> Tensor:
    lt, rb = torch.maximum(boxes[:, :2], ref[:2]), torch.minimum(boxes[:, 2:], ref[2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    return inter / (_area(boxes) + _area(ref) - inter).clamp_min(1e-9)


def _centre(b: Tensor) -> Tensor:
    return (b[..., :2] + b[..., 2:]) / 2


def _match(boxes: Tensor, ref: Tensor, gap: int = 1) -> Optional[int]:
    """Index of the box that is the same person as ``ref`` seen ``gap`` frames ago, or None."""
    if len(boxes) == 0:
        return None
    size = _area(ref).sqrt().clamp_min(1e-6)
    dist = (_centre(boxes) - _centre(ref)).norm(dim=-1) / size
    ratio = _area(boxes).sqrt() / size
    iou = _iou(boxes, ref)
    reach = min(0.5 + 0.05 * (gap - 1), 1.5)  # a face unseen for a while may have moved further
    ok = (iou >= 0.3) | ((dist < reach) & (ratio > 0.6) & (ratio < 1.0 / 0.6))
    if not ok.any():
        return None
    return int(torch.where(ok, iou - dist, torch.tensor(-math.inf)).argmax())


def _select(faces: FrameFaces, hw: tuple[int, int], select: str, face_index: Optional[int], clamp: bool):
    n = len(faces)
    if n == 0:
        return None
    if face_index is not None:
        order = _centre(faces.boxes)[:, 0].argsort()
        if face_index < n:
            return int(order[face_index])
        return int(order[-1]) if clamp else None
    if select == "largest":
        return int(_area(faces.boxes).argmax())
    mid = torch.tensor([hw[1] / 2, hw[0] / 2])
    return int(((_centre(faces.boxes) - mid) / max(hw)).norm(dim=-1).argmin())


# ------------------------------------------------------------------------------------------------------ smoothing

def savgol(x: Tensor, window: int, order: int = 2) -> Tensor:
    """Zero-phase Savitzky-Golay smoothing of ``x [n, D]`` along time; edges use the fit of the first/last window."""
    n = x.shape[0]
    w = min(window, n if n % 2 else n - 1)
    if w <= order + 1:
        return x
    k = w // 2
    offs = torch.arange(-k, k + 1, dtype=torch.float64)
    vander = offs[:, None] ** torch.arange(order + 1, dtype=torch.float64)
    proj = torch.linalg.pinv(vander)  # [order+1, w]: polynomial coefficients from the window samples
    xd = x.double()
    mid = F.conv1d(xd.T[:, None], proj[0][None, None])[:, 0].T  # value at offset 0 of each window
    edge = vander[:k] @ proj  # value at offsets -k..-1 of the first window
    head, tail = edge @ xd[:w], edge.flip(0, 1) @ xd[-w:]
    return torch.cat([head, mid, tail]).to(x.dtype)


# ------------------------------------------------------------------------------------------------- shot changes

@torch.no_grad()
def frame_signatures(frames: Tensor, chunk: int = 32) -> Tensor:
    """Small per-frame summary ``[T, 48 + thumbnail]`` for shot detection: a colour histogram (16 bins per channel,
    each channel summing to 1) then a 32-pixel thumbnail. Compute it chunk by chunk on a long video, concatenate,
    and pass it to :func:`shot_changes_from_signatures`."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError("Shot detection needs frames shaped [T, H, W, 3].")
    out = []
    for c in range(0, frames.shape[0], chunk):
        x = frames[c:c + chunk]
        step = max(1, min(x.shape[1:3]) // 128)  # subsample first: the thumbnail needs ~1/100 of a 1080p frame
        x = x[:, ::step, ::step]
        x = (x.float() / 255 if not x.is_floating_point() else x.float()).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        s = 32 / max(h, w)
        small = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")
        bins = ((small.clamp(0, 1) * 15.999).long() + 16 * torch.arange(3, device=x.device)[:, None, None]).flatten(1)
        hist = torch.zeros(x.shape[0], 48, device=x.device).scatter_add_(1, bins, torch.ones_like(bins, dtype=x.dtype))
        out.append(torch.cat([hist / (hist.sum(1, keepdim=True) / 3), small.flatten(1)], 1).cpu())
    return torch.cat(out)


def pair_scores(sig: Tensor, previous: Optional[Tensor] = None) -> Tensor:
    """Change scores ``[T - 1]`` between consecutive :func:`frame_signatures` ``[T, D]`` (``[T]`` when the
    signature ``previous [1, D]`` of the frame before them is given)."""
    if previous is not None:
        sig = torch.cat([previous, sig])
    hist, thumb = sig[:, :48], sig[:, 48:]
    return (hist[1:] - hist[:-1]).abs().sum(1) / 6 + 2 * (thumb[1:] - thumb[:-1]).abs().mean(1)


class ShotChanges:
    """Shot detection over a clip fed chunk by chunk, in constant memory: it keeps the last frame's signature and one
    score (4 bytes) per frame, not the 12 kB signature of every frame."""

    def __init__(self):
        self._last: Optional[Tensor] = None
        self._scores: list[Tensor] = []

    def add(self, frames: Tensor) -> None:
        if frames.shape[0] == 0:
            return
        sig = frame_signatures(frames)
        self._scores.append(pair_scores(sig, self._last))
        self._last = sig[-1:].clone()

    def cuts(self, threshold: float = 0.35, ratio: float = 3.0, min_shot: int = 4) -> list[int]:
        """First frames of the new shots so far (see :func:`detect_shot_changes` for the rule)."""
        score = torch.cat(self._scores) if self._scores else torch.zeros(0)
        return shot_changes_from_scores(score, threshold, ratio, min_shot)


def shot_changes_from_signatures(sig: Tensor, threshold: float = 0.35, ratio: float = 3.0,
                                 min_shot: int = 4) -> list[int]:
    """Shot starts from :func:`frame_signatures` (see :func:`detect_shot_changes` for the rule)."""
    return shot_changes_from_scores(pair_scores(sig), threshold, ratio, min_shot)


def shot_changes_from_scores(score: Tensor, threshold: float = 0.35, ratio: float = 3.0,
                             min_shot: int = 4) -> list[int]:
    """Shot starts from the change score of each frame pair (:func:`pair_scores`)."""
    if score.shape[0] < 1:
        return []
    pad = 8
    neigh = F.pad(score[None, None], (pad, pad), mode="replicate")[0, 0].unfold(0, 2 * pad + 1, 1)
    local = torch.cat([neigh[:, :pad], neigh[:, pad + 1:]], 1).median(1).values  # the pair itself excluded
    cand = ((score > threshold) & (score > ratio * local)).nonzero().flatten().tolist()
    cuts: list[int] = []
    for i in sorted(cand, key=lambda i: -float(score[i])):
        if all(abs(i - j) >= min_shot for j in cuts):
            cuts.append(i)
    return sorted(i + 1 for i in cuts)


def detect_shot_changes(frames: Tensor, threshold: float = 0.35, ratio: float = 3.0, min_shot: int = 4) -> list[int]:
    """First frame index of every new shot in ``frames [T, H, W, 3]`` (float 0..1 or uint8).

    Score per frame pair: half the L1 distance of 16-bin-per-channel colour histograms (averaged over channels)
    plus twice the mean absolute difference of 32-pixel thumbnails. A cut is a score above ``threshold`` and
    ``ratio`` times the median score of the 16 surrounding pairs (adaptive: fast motion raises the bar); cuts
    closer than ``min_shot`` frames keep the strongest.
    """
    shots = ShotChanges()
    shots.add(frames)
    return shots.cuts(threshold, ratio, min_shot)


# ----------------------------------------------------------------------------------------------------- tracking

def _fallback_box(hw: tuple[int, int], box) -> Tensor:
    if box is not None:
        b = torch.as_tensor(box, dtype=torch.float32).flatten()
        if b.numel() != 4 or not (b[2] > b[0] and b[3] > b[1]):
            raise InputError("The face box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, in pixels.")
        return b
    H, W = hw
    half = 0.25 * min(H, W)
    return torch.tensor([W / 2 - half, H / 2 - half, W / 2 + half, H / 2 + half])


def _keypoints_from_box(b: Tensor) -> Tensor:
    """Rough BlazeFace-like keypoints for a face filling box ``b``."""
    x0, y0, w, h = b[0], b[1], b[2] - b[0], b[3] - b[1]
    rel = torch.tensor([[0.32, 0.38], [0.68, 0.38], [0.5, 0.56], [0.5, 0.76], [0.05, 0.45], [0.95, 0.45]])
    return torch.stack([x0 + rel[:, 0] * w, y0 + rel[:, 1] * h], -1)


class _Scored:
    """The detections of each frame that score at least ``min_score``, read on demand (no list of T objects)."""

    def __init__(self, detections: FaceDetections, min_score: float):
        self.detections, self.min_score = detections, min_score

    def __len__(self) -> int:
        return len(self.detections)

    def __getitem__(self, t: int) -> FrameFaces:
        return self.detections.frame(t, self.min_score)

    def __iter__(self):
        return (self[t] for t in range(len(self)))


def _assign(faces: _Scored, hw, starts: set[int], select, face_index, max_gap, clamp):
    """Choose one face per frame. Returns (choice [T] ints, -1 = none; segment start frames)."""
    T = len(faces)
    choice = [-1] * T
    seg_starts = [0]
    prev, last = None, -1
    for t in range(T):
        if t in starts and t > 0:
            seg_starts.append(t)
            prev = None
        f = faces[t]
        if len(f) == 0:
            continue
        j = None if prev is None else _match(f.boxes, prev, t - last)
        if j is None and prev is not None:
            # Inferred cut: the face seen in t-1 vanished, every face now is new relative to t-1, and it stays gone.
            lost_now = last == t - 1 and all(_match(faces[t - 1].boxes, b) is None for b in f.boxes)
            lost_next = t + 1 >= T or _match(faces[t + 1].boxes, prev, 2) is None
            if lost_now and lost_next:
                if t not in starts:
                    seg_starts.append(t)
                prev = None
            elif t - last > max_gap:  # long gone: follow whoever the rule picks now, as a new segment
                seg_starts.append(t)
                prev = None
            else:
                continue
        if j is None:
            j = _select(f, hw, select, face_index, clamp)
            if j is None:
                continue
        choice[t], prev, last = j, f.boxes[j], t
    return choice, sorted(set(seg_starts))


def _fill_segment(feat: Tensor, seen: Tensor, box_win: int, lm_win: int, max_gap: int, max_hold: int):
    """Interpolate gaps, smooth, hold ends, in place on ``feat [n, D]``; returns valid [n] (None when no sighting)."""
    idx = seen.nonzero().flatten()
    if len(idx) == 0:
        return None
    n = feat.shape[0]
    valid = torch.zeros(n, dtype=torch.bool)
    valid[idx] = True
    for a, b in zip(idx[:-1].tolist(), idx[1:].tolist()):
        if b - a > 1:
            w = torch.linspace(0, 1, b - a + 1)[1:-1, None]
            feat[a + 1:b] = (1 - w) * feat[a] + w * feat[b]
            valid[a + 1:b] = b - a - 1 <= max_gap
    a, b = int(idx[0]), int(idx[-1]) + 1
    feat[a:b, :4] = savgol(feat[a:b, :4], box_win)
    feat[a:b, 4:] = savgol(feat[a:b, 4:], lm_win)
    feat[:a], feat[b:] = feat[a], feat[b - 1]
    valid[max(0, a - max_hold):a] = True
    valid[b:b + max_hold] = True
    return valid


def _ranges(mask: Tensor) -> str:
    idx = mask.nonzero().flatten().tolist()
    out, start = [], None
    for i, t in enumerate(idx):
        if start is None:
            start = t
        if i + 1 == len(idx) or idx[i + 1] != t + 1:
            out.append(f"{start}-{t}" if t > start else f"{t}")
            start = None
    return ", ".join(out[:8]) + (" ..." if len(out) > 8 else "")


def build_track(frames_faces: "Sequence[FrameFaces] | FaceDetections", frame_hw: tuple[int, int],
                face_index: Optional[int] = None,
                select: str = "largest", box=None, smoothing: int = 15, landmark_smoothing: int = 5,
                shot_changes: Optional[Sequence[int]] = None, min_score: float = 0.5, max_gap: int = 25,
                max_hold: int = 5) -> FaceTrack:
    """Follow one face through a clip and return its smoothed :class:`FaceTrack`. Never raises for missing faces.

    frames_faces: detections per frame (FaceDetections, or a sequence of FrameFaces). face_index: pick the i-th face counted left to right (at the start of each
    shot) instead of ``select`` ("largest" area or most "central"). box: (x0, y0, x1, y1) used when no face is
    found anywhere (else a centred square of 0.5 * min(H, W)). smoothing / landmark_smoothing: Savitzky-Golay
    window in frames for boxes / keypoints and landmarks (<= 3 disables). shot_changes: first frames of new shots
    (from :func:`detect_shot_changes`); the face is re-selected there and nothing is smoothed or interpolated
    across. Gaps of up to ``max_gap`` frames inside a segment are interpolated and stay valid; frames within
    ``max_hold`` of the first/last sighting of a segment hold it and stay valid.
    """
    detections = FaceDetections.of(frames_faces)
    T = len(detections)
    H, W = int(frame_hw[0]), int(frame_hw[1])
    if T == 0:
        raise InputError("build_track needs detections for at least one frame.")
    if select not in SELECT_MODES:
        raise InputError(f"select must be one of {SELECT_MODES}, not {select!r}.")
    if face_index is not None and face_index < 0:
        raise InputError("face_index counts faces from 0, left to right; it cannot be negative.")
    hw = (H, W)
    fallback = _fallback_box(hw, box)
    faces = _Scored(detections, min_score)
    starts = {int(s) for s in (shot_changes or []) if 0 < int(s) < T}
    choice, seg_starts = _assign(faces, hw, starts, select, face_index, max_gap, clamp=False)
    warns: list[str] = []
    if face_index is not None and all(c < 0 for c in choice) and any(len(f) for f in faces):
        warns.append(f"Face index {face_index} was never present (at most {max(len(f) for f in faces)} faces); "
                     "using the rightmost face.")
        choice, seg_starts = _assign(faces, hw, starts, select, face_index, max_gap, clamp=True)

    chosen = [t for t in range(T) if choice[t] >= 0]
    has_lm = bool(chosen) and all(faces[t].points is not None for t in chosen)
    K = len(FACE_POINTS)
    D = 16 + (2 * K if has_lm else 0)
    feat = torch.zeros(T, D)
    feat[:, :4] = fallback
    feat[:, 4:16] = _keypoints_from_box(fallback).flatten()
    for t in chosen:
        f, j = faces[t], choice[t]
        feat[t, :4], feat[t, 4:16] = f.boxes[j], f.keypoints[j].flatten()
        if has_lm:
            feat[t, 16:] = f.points[j].flatten()
    detected = torch.tensor([c >= 0 for c in choice], dtype=torch.bool)
    valid = torch.zeros(T, dtype=torch.bool)
    lm_ok = torch.zeros(T, dtype=torch.bool)  # frames whose landmark rows hold real (seen/interpolated/held) values
    shot_ids = torch.zeros(T, dtype=torch.long)
    bounds = seg_starts + [T]
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        shot_ids[a:b] = s
        v = _fill_segment(feat[a:b], detected[a:b], smoothing, landmark_smoothing, max_gap, max_hold)
        if v is not None:
            valid[a:b], lm_ok[a:b] = v, has_lm

    if not chosen:
        msg = (f"No face was found in any of the {T} frames; using the "
               f"{'given box' if box is not None else 'centred box'} {[round(float(v), 1) for v in fallback]}.")
        warns.append(msg)
        valid[:] = True
    elif not valid.all():
        warns.append(f"{int((~valid).sum())} of {T} frames have no usable face and pass through unchanged "
                     f"(frames {_ranges(~valid)}).")
    for w in warns:
        _warnings.warn(w, stacklevel=2)

    boxes, kps = feat[:, :4].clone(), feat[:, 4:16].view(T, 6, 2)
    points = feat[:, 16:].reshape(T, K, 2).clone() if has_lm else None
    mouth = kps[:, KP_MOUTH].clone()
    width = boxes[:, 2] - boxes[:, 0]
    eyes = kps[:, [KP_RIGHT_EYE, KP_LEFT_EYE]].clone()
    if has_lm:
        pt = points[lm_ok]
        mouth[lm_ok] = pt[:, point_index("mouth")]
        width[lm_ok] = (pt[:, point_index("left_cheek")] - pt[:, point_index("right_cheek")]).norm(dim=-1)
        eyes[lm_ok] = torch.stack([pt[:, point_index("right_eye")], pt[:, point_index("left_eye")]], 1)
    return FaceTrack(boxes, points, valid, detected, shot_ids, mouth, width, eyes, hw, warns)
