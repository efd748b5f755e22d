"""Faces and landmarks for video frames, the way MediaPipe's face pipeline runs on video: detect, then follow
each face with Face Mesh alone (its region of interest comes from the previous frame's landmarks) and detect
again every few frames or as soon as a face is lost. Detection tries the short-range model first and the
full-range one where it finds nothing (small or distant faces).

Boxes and keypoints of every face that has landmarks are derived from the landmarks, so they mean the same
thing on detected and tracked frames and the crop does not breathe when detection runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError
from .detect import FaceDetector, FaceLandmarker, detect_faces, roi_from_landmarks
from .types import FrameFaces

DETECTOR_MODES = ("auto", "short", "full")
# MediaPipe Face Mesh indices for BlazeFace's six keypoints (subject's view): eye corners averaged, nose tip,
# inner-lip middles averaged, and the cheek extremes standing in for the ears.
_KEYPOINT_GROUPS = ((33, 133), (263, 362), (1,), (13, 14), (234,), (454,))


def faces_from_landmarks(landmarks: Tensor, scores: Tensor) -> FrameFaces:
    """FrameFaces whose boxes (landmark extent) and keypoints come from Face Mesh points ``[N, 468, 3]``."""
    xy = landmarks[..., :2]
    boxes = torch.cat([xy.amin(dim=1), xy.amax(dim=1)], dim=-1)
    keypoints = torch.stack([xy[:, list(group)].mean(dim=1) for group in _KEYPOINT_GROUPS], dim=1)
    return FrameFaces(boxes, scores, keypoints, landmarks)


class FaceAnalyzer:
    """Callable ``frames [n, H, W, 3] uint8 -> list[FrameFaces]`` with landmarks. Keeps the faces of the last
    frame between calls (frames are expected in order; call :meth:`reset` before another video).

    detector: "auto" (short range, then full range where short found nothing), "short" or "full".
    redetect_every: frames between detections while faces are followed by their landmarks (1 = every frame).
    """

    def __init__(self, device: Optional[torch.device] = None, detector: str = "auto", min_score: float = 0.5,
                 min_presence: float = 0.5, max_faces: int = 4, redetect_every: int = 10, batch_size: int = 16):
        if detector not in DETECTOR_MODES:
            raise InputError(f"detector must be one of {', '.join(DETECTOR_MODES)}, got {detector!r}")
        if redetect_every < 1:
            raise InputError(f"redetect_every must be at least 1, got {redetect_every}")
        self.min_score, self.min_presence, self.max_faces = min_score, min_presence, max_faces
        self.min_presence_kept = 0.1
        self.redetect_every, self.batch_size = redetect_every, batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.short = FaceDetector.load("short", self.device) if detector in ("auto", "short") else None
        self.full = FaceDetector.load("full", self.device) if detector in ("auto", "full") else None
        self.landmarker = FaceLandmarker.load(self.device)
        self.reset()

    def reset(self) -> None:
        self._previous: Optional[Tensor] = None      # landmarks [N, 468, 3] of the last frame
        self._since_detection = 0

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> list[FrameFaces]:
        results = []
        for frame in frames:
            followed, confident = self._follow(frame) if self._previous is not None else (None, False)
            if confident:
                faces = followed
            else:
                detected = self._detect(frame)
                # Stylised faces can give Face Mesh a low presence score while it still fits them; keep following
                # such a face when the detector does not see it either.
                faces = detected if len(detected) or followed is None else followed
            self._previous = faces.landmarks if len(faces) else None
            results.append(FrameFaces(faces.boxes.cpu(), faces.scores.cpu(), faces.keypoints.cpu(),
                                      faces.landmarks.cpu()))
        return results

    def _follow(self, frame: Tensor) -> tuple[Optional[FrameFaces], bool]:
        """The previous faces re-found by Face Mesh alone (None if all are gone), and whether that is good enough
        to skip detection on this frame (every face confidently present and no detection due)."""
        points, presence = self.landmarker.landmarks(frame[None].to(self.device), roi_from_landmarks(self._previous),
                                                     frame_index=torch.zeros(len(self._previous), dtype=torch.long))
        kept = presence >= self.min_presence_kept
        if not bool(kept.any()):
            return None, False
        faces = faces_from_landmarks(points[kept], presence[kept])
        due = self._since_detection + 1 >= self.redetect_every
        confident = bool(kept.all()) and bool((presence >= self.min_presence).all()) and not due
        if confident:
            self._since_detection += 1
        return faces, confident

    def _detect(self, frame: Tensor) -> FrameFaces:
        self._since_detection = 0
        batch = frame[None].to(self.device)
        faces = FrameFaces.empty()
        for detector in (self.short, self.full):
            if detector is None:
                continue
            faces = detect_faces(batch, detector, self.landmarker, self.min_score, self.max_faces)[0]
            if len(faces):
                break
        if not len(faces):
            return FrameFaces(faces.boxes, faces.scores, faces.keypoints, torch.zeros(0, 468, 3))
        return faces_from_landmarks(faces.landmarks, faces.scores)
