"""Plain data passed between the face detector, the landmarker, the tracker and the cropper.

All coordinates are in pixels of the full frame, x to the right, y down, with pixel (row i, column j) covering
``[j, j+1) x [i, i+1)`` (so its centre is at ``(j + 0.5, i + 0.5)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class FrameFaces:
    """Every face found in one frame.

    boxes: ``[N, 4]`` as ``(x0, y0, x1, y1)``; scores: ``[N]`` in [0, 1];
    keypoints: ``[N, 6, 2]`` BlazeFace keypoints (right eye, left eye, nose tip, mouth, right ear, left ear, from
    the subject's point of view, as MediaPipe orders them);
    landmarks: ``[N, 468, 3]`` Face Mesh points (x, y in pixels, z in the same scale as x), or None when the
    landmark model was not run;
    points: ``[N, len(FACE_POINTS), 2]`` the named points of :data:`FACE_POINTS` (what a face track keeps of the
    mesh), or None: :meth:`named_points` derives them from ``landmarks``.
    """

    boxes: Tensor
    scores: Tensor
    keypoints: Tensor
    landmarks: Optional[Tensor] = None
    points: Optional[Tensor] = None

    def named_points(self) -> Optional[Tensor]:
        if self.points is not None:
            return self.points
        return None if self.landmarks is None else face_points(self.landmarks)

    @staticmethod
    def empty() -> "FrameFaces":
        return FrameFaces(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 6, 2), None)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


# Face Mesh points a face track keeps for every frame, by name; each is the mean of the listed MediaPipe indices
# (subject's view: "right" is the subject's right, on the left of the picture). Families read their geometry from
# these (DS-CFG's mouth, a lower-face mask, LatentSync's 3-point alignment), so a clip keeps
# 4 bytes x 2 x len(FACE_POINTS) per frame instead of the 5.6 kB of the whole mesh. Checked against mediapipe 0.10.21:
# 13/14 the inner-lip middles, 61/291 the lip corners, 0/17 the outer-lip middles, 234/454 the cheek extremes of
# the face oval, 152 the chin, 172/397 the jaw corners, 1 the nose tip; the brow and nose groups are those
# LatentSync 1.5 used to map Face Mesh onto its alignment points.
FACE_POINTS: dict[str, tuple[int, ...]] = {
    "mouth": (13, 14, 61, 291),
    "mouth_right": (61,), "mouth_left": (291,), "upper_lip": (0,), "lower_lip": (17,),
    "right_eye": (33, 133), "left_eye": (263, 362),
    "right_brow": (71, 63, 105, 66, 107), "left_brow": (336, 296, 334, 293, 301),
    "nose": (168, 197, 5, 4, 75, 97, 2, 326, 305), "nose_tip": (1,),
    "right_cheek": (234,), "left_cheek": (454,), "right_jaw": (172,), "left_jaw": (397,), "chin": (152,),
}
POINT_NAMES = tuple(FACE_POINTS)


def point_index(name: str) -> int:
    """Column of the named point in ``[..., len(FACE_POINTS), 2]`` point arrays."""
    return POINT_NAMES.index(name)


def face_points(landmarks: Tensor) -> Tensor:
    """The named points ``[N, len(FACE_POINTS), 2]`` (x, y pixels) of Face Mesh landmarks ``[N, 468, 2 or 3]``."""
    xy = landmarks[..., :2].float()
    return torch.stack([xy[:, list(group)].mean(dim=1) for group in FACE_POINTS.values()], dim=1)


class FaceDetections:
    """Every face found in every frame of a clip, stored column-wise in a few growing tensors: per face its box,
    score, BlazeFace keypoints and named points (:data:`FACE_POINTS`), about 150 bytes, and no Python object per
    frame (an hour at 60 fps is 216,000 frames). ``append`` a frame's :class:`FrameFaces`, read one back with
    ``frame(t)``."""

    _COLUMNS = {"boxes": (4,), "scores": (), "keypoints": (6, 2), "points": (len(FACE_POINTS), 2), "has_points": ()}

    def __init__(self, capacity: int = 256):
        self._data = {k: torch.zeros(capacity, *shape, dtype=torch.bool if k == "has_points" else torch.float32)
                      for k, shape in self._COLUMNS.items()}
        self._faces = 0
        self._starts = torch.zeros(capacity + 1, dtype=torch.int64)     # frame t's faces: starts[t]..starts[t+1]
        self._frames = 0

    def __len__(self) -> int:
        return self._frames

    @property
    def num_faces(self) -> int:
        return self._faces

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._data.values()) + self._starts.nbytes

    @staticmethod
    def _grow(t: Tensor, need: int) -> Tensor:
        if need <= t.shape[0]:
            return t
        out = t.new_zeros(max(need, 2 * t.shape[0]), *t.shape[1:])
        out[:t.shape[0]] = t
        return out

    def append(self, faces: FrameFaces) -> None:
        n, end = len(faces), self._faces + len(faces)
        self._starts = self._grow(self._starts, self._frames + 2)
        if n:
            self._data = {k: self._grow(t, end) for k, t in self._data.items()}
            d = self._data
            d["boxes"][self._faces:end] = faces.boxes.detach().float().cpu()
            d["scores"][self._faces:end] = faces.scores.detach().float().cpu()
            d["keypoints"][self._faces:end] = faces.keypoints.detach().float().cpu()
            points = faces.named_points()
            if points is not None:
                d["points"][self._faces:end] = points.detach().float().cpu()
                d["has_points"][self._faces:end] = True
        self._faces = end
        self._frames += 1
        self._starts[self._frames] = end

    def extend(self, frames) -> "FaceDetections":
        for faces in frames:
            self.append(faces)
        return self

    def frame(self, t: int, min_score: float = 0.0) -> FrameFaces:
        """Frame ``t``'s faces scoring at least ``min_score`` (``points`` is None when a face had no Face Mesh)."""
        a, b = int(self._starts[t]), int(self._starts[t + 1])
        d = {k: v[a:b] for k, v in self._data.items()}
        if min_score > 0 and b > a:
            keep = d["scores"] >= min_score
            d = {k: v[keep] for k, v in d.items()}
        points = d["points"] if bool(d["has_points"].all()) else None
        return FrameFaces(d["boxes"], d["scores"], d["keypoints"], None, points)

    @staticmethod
    def of(frames) -> "FaceDetections":
        """``frames`` as FaceDetections (a sequence of FrameFaces is converted; FaceDetections pass through)."""
        return frames if isinstance(frames, FaceDetections) else FaceDetections().extend(frames)
