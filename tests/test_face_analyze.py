"""FaceAnalyzer on video: detect, follow by landmarks, detect again when due or when the face is lost."""

from __future__ import annotations

import pytest
import torch

from omnisync_core.face.analyze import FaceAnalyzer, faces_from_landmarks
from omnisync_core.train.synthetic import FaceStyle, mouth_track, render_clip


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer(detector="auto", redetect_every=8)


@pytest.fixture(scope="module")
def talking_clip():
    t = torch.arange(16000 * 2) / 16000
    speech = 0.3 * torch.sin(2 * torch.pi * 180 * t) * (torch.sin(2 * torch.pi * 2.5 * t) > 0)
    style = FaceStyle.random(3)
    return render_clip(style, mouth_track(speech, 25), size=256, motion_seed=4, motion_scale=1.5)


def real_face_clip(frames: int = 24) -> torch.Tensor:
    """The astronaut's head drifting across a 16:9 frame (uint8)."""
    from skimage import data

    face = torch.from_numpy(data.astronaut()[10:330, 60:380].copy())
    clip = torch.full((frames, 400, 711, 3), 100, dtype=torch.uint8)
    for i in range(frames):
        clip[i, 20 + i:340 + i, 100 + 4 * i:420 + 4 * i] = face
    return clip


def test_detects_every_few_frames_and_follows_in_between(analyzer):
    frames = real_face_clip()
    calls = {"detect": 0}
    detect = analyzer._detect

    def counting(frame):
        calls["detect"] += 1
        return detect(frame)

    analyzer.reset()
    analyzer._detect = counting
    try:
        faces = analyzer(frames[:10]) + analyzer(frames[10:])      # state carries over between calls
    finally:
        analyzer._detect = detect
    assert [len(f) for f in faces] == [1] * 24
    assert calls["detect"] == 3                                  # frames 0, 8 and 16
    centres = torch.stack([(f.boxes[0, :2] + f.boxes[0, 2:]) / 2 for f in faces])
    steps = centres[1:] - centres[:-1]
    motion = torch.tensor([4.0, 1.0])                            # the face moves 4 px right, 1 px down a frame
    assert torch.allclose(steps.mean(0), motion, atol=0.5)
    assert (steps - motion).abs().max() < 4.0                   # landmark jitter of a pixel or two, no jumps


def test_never_loses_a_stylised_face(analyzer, talking_clip):
    frames = (talking_clip.frames * 255).round().to(torch.uint8)
    analyzer.reset()
    faces = analyzer(frames)
    assert all(len(f) == 1 for f in faces)
    for i, found in enumerate(faces):
        mouth = found.keypoints[0, 3]
        truth = talking_clip.mouth_center[i]
        assert (mouth - truth).norm() < 0.08 * talking_clip.face_width[i], i
        box = found.boxes[0]
        assert box[0] <= truth[0] <= box[2] and box[1] <= truth[1] <= box[3]
        assert found.landmarks.shape == (1, 468, 3)


def test_lost_face_triggers_detection_and_empty_frames_are_empty(analyzer, talking_clip):
    frames = (talking_clip.frames[:6] * 255).round().to(torch.uint8)
    frames[3] = 90                                               # a blank frame in the middle
    analyzer.reset()
    faces = analyzer(frames)
    assert [len(f) for f in faces] == [1, 1, 1, 0, 1, 1]
    assert faces[3].landmarks.shape == (0, 468, 3)


def test_boxes_and_keypoints_come_from_landmarks():
    points = torch.zeros(1, 468, 3)
    points[0, :, 0] = torch.linspace(10, 110, 468)
    points[0, :, 1] = torch.linspace(20, 220, 468)
    faces = faces_from_landmarks(points, torch.ones(1))
    assert faces.boxes.tolist() == [[10.0, 20.0, 110.0, 220.0]]
    assert torch.allclose(faces.keypoints[0, 2], points[0, 1, :2])
    assert torch.allclose(faces.keypoints[0, 3], points[0, [13, 14], :2].mean(0))
