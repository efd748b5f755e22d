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
    landmark model was not run.
    """

    boxes: Tensor
    scores: Tensor
    keypoints: Tensor
    landmarks: Optional[Tensor] = None

    @staticmethod
    def empty() -> "FrameFaces":
        return FrameFaces(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 6, 2), None)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])
