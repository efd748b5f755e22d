"""Face Mesh landmarks of every frame of a video, as the metrics read them.

The metrics need the whole 468-point mesh per frame (LMD and jitter use the 40 lip points), not the compact
named points a face track keeps, so they call the analyzer directly and keep the largest face of each frame.
Frames without a face hold NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# MediaPipe Face Mesh lip contour (outer and inner lips, FACEMESH_LIPS), 40 points
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409,
        78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415)
INNER_UPPER, INNER_LOWER = 13, 14          # inner-lip middles
CHEEKS = (234, 454)                        # face-oval extremes: the face width
# Points that move least when a person speaks (eye corners, nose bridge and tip): the face's own frame
STABLE = (33, 133, 263, 362, 168, 6, 197, 1)


@dataclass
class FaceSeries:
    """Per frame: ``landmarks [T, 468, 2]`` pixels (NaN where no face), ``found [T]``, ``boxes [T, 4]`` of the
    landmarks' extent (NaN where no face)."""

    landmarks: Tensor
    found: Tensor

    def __len__(self) -> int:
        return int(self.found.shape[0])

    @property
    def boxes(self) -> Tensor:
        xy = self.landmarks
        return torch.cat([xy.amin(1), xy.amax(1)], -1)

    @property
    def face_width(self) -> Tensor:
        """``[T]`` cheek-to-cheek distance in pixels (NaN where no face)."""
        return (self.landmarks[:, CHEEKS[0]] - self.landmarks[:, CHEEKS[1]]).norm(dim=-1)

    @property
    def found_rate(self) -> float:
        return float(self.found.float().mean()) if len(self) else 0.0

    def mouth_opening(self) -> Tensor:
        """``[T]`` inner-lip gap (points 13-14) over the face width (NaN where no face)."""
        gap = (self.landmarks[:, INNER_UPPER] - self.landmarks[:, INNER_LOWER]).norm(dim=-1)
        return gap / self.face_width.clamp_min(1e-6)

    def mouth_center(self) -> Tensor:
        return self.landmarks[:, list(LIPS)].mean(1)

    def select(self, index: Tensor) -> "FaceSeries":
        return FaceSeries(self.landmarks[index], self.found[index])

    @staticmethod
    def from_landmarks(landmarks: Tensor, found: Optional[Tensor] = None) -> "FaceSeries":
        landmarks = landmarks[..., :2].float()
        if found is None:
            found = ~landmarks.isnan().any(-1).any(-1)
        return FaceSeries(torch.where(found[:, None, None], landmarks, torch.nan), found)


def _largest(faces) -> Optional[Tensor]:
    if len(faces) == 0 or faces.landmarks is None:
        return None
    b = faces.boxes
    return faces.landmarks[int(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax())][:, :2]


@torch.no_grad()
def analyze_frames(frames: Tensor, analyzer, batch: int = 16) -> FaceSeries:
    """Face Mesh of ``frames [T, H, W, 3]`` (uint8, or float 0..1) with a FaceAnalyzer (reset first)."""
    if frames.is_floating_point():
        frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    analyzer.reset()
    marks = torch.full((frames.shape[0], 468, 2), torch.nan)
    for start in range(0, frames.shape[0], batch):
        for i, faces in enumerate(analyzer(frames[start:start + batch])):
            points = _largest(faces)
            if points is not None:
                marks[start + i] = points.float().cpu()
    return FaceSeries.from_landmarks(marks)


def fill_gaps(x: Tensor) -> Tensor:
    """``x [T, ...]`` with NaN frames replaced by the nearest earlier valid frame (or the first valid one)."""
    valid = ~x.reshape(x.shape[0], -1).isnan().any(-1)
    if not bool(valid.any()):
        return x
    idx = torch.where(valid, torch.arange(x.shape[0]), -1).cummax(0).values
    first = int(valid.nonzero()[0])
    return x[torch.where(idx < 0, first, idx)]
