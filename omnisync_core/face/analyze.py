"""Faces and landmarks for batches of video frames: the short-range detector first, the full-range one for
frames where it finds nothing (small or distant faces), then Face Mesh on every face found."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from .detect import FaceDetector, FaceLandmarker, detect_faces
from .types import FrameFaces

DETECTOR_MODES = ("auto", "short", "full")


class FaceAnalyzer:
    """Callable ``frames [n, H, W, 3] uint8 -> list[FrameFaces]`` with landmarks, batched on ``device``.

    detector: "auto" (short range, then full range where short found nothing), "short" or "full".
    """

    def __init__(self, device: Optional[torch.device] = None, detector: str = "auto", min_score: float = 0.5,
                 max_faces: int = 4, batch_size: int = 16):
        if detector not in DETECTOR_MODES:
            raise InputError(f"detector must be one of {', '.join(DETECTOR_MODES)}, got {detector!r}")
        self.mode, self.min_score, self.max_faces, self.batch_size = detector, min_score, max_faces, batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.short = FaceDetector.load("short", self.device) if detector in ("auto", "short") else None
        self.full = FaceDetector.load("full", self.device) if detector in ("auto", "full") else None
        self.landmarker = FaceLandmarker.load(self.device)

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> list[FrameFaces]:
        results: list[FrameFaces] = []
        for start in range(0, frames.shape[0], self.batch_size):
            batch = frames[start:start + self.batch_size].to(self.device)
            results.extend(self._batch(batch))
        return results

    def _batch(self, frames: Tensor) -> list[FrameFaces]:
        first = self.short or self.full
        faces = detect_faces(frames, first, self.landmarker, self.min_score, self.max_faces)
        if self.short is not None and self.full is not None:
            missed = [i for i, f in enumerate(faces) if len(f) == 0]
            if missed:
                retry = detect_faces(frames[missed], self.full, self.landmarker, self.min_score, self.max_faces)
                for i, found in zip(missed, retry):
                    faces[i] = found
        return [FrameFaces(f.boxes.cpu(), f.scores.cpu(), f.keypoints.cpu(),
                           None if f.landmarks is None else f.landmarks.cpu()) for f in faces]
