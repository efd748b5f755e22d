"""Batched face detection and 468-point landmarks, MediaPipe-compatible, in plain PyTorch.

Frames are ``[B, H, W, 3]`` RGB tensors, uint8 (0..255) or float (0..1, ComfyUI IMAGE). Coordinates in and out
are full-frame pixels in the convention of :mod:`.types` (pixel j spans [j, j + 1)). MediaPipe samples its model
inputs at OpenCV pixel-index positions (pixel j at coordinate j): we sample exactly as it does, so our points
equal MediaPipe's (normalised coordinate times image size) plus half a pixel.

ROIs are rotated squares ``[N, 4]`` = (centre x, centre y, side, rotation in radians, clockwise on screen as
MediaPipe's NormalizedRect.rotation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import InputError
from .blazeface import CONFIGS, WEIGHTS_DIR, DetectorConfig, TFLiteNet, decode, ssd_anchors, weighted_nms
from .facemesh import MESH_SIZE, FaceMesh
from .types import FrameFaces

__all__ = ["FaceDetector", "FaceLandmarker", "detect_faces", "roi_from_detection", "roi_from_landmarks",
           "warp_frames"]


def _check_frames(frames: Tensor) -> Tensor:
    if not isinstance(frames, Tensor) or frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise InputError(f"Frames must be a [B, H, W, 3] RGB tensor, got {shape}.")
    return frames


def _axis_taps(pos: Tensor, n: int, zero_border: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis of length ``n`` (>= 2), rearranged onto a fixed pair of neighbours
    ``(i, i + 1)`` with ``0 <= i <= n - 2`` so that one gather fetches both: returns i (int32) and the weights of
    the two pair slots. Out-of-range taps read 0 (zero border) or the edge pixel (replicate)."""
    i0 = pos.floor()
    f = pos - i0
    i0 = i0.int()
    i = i0.clamp(0, n - 2)
    w_lo, w_hi = torch.zeros_like(f), torch.zeros_like(f)
    for tap, wt in ((i0, 1 - f), (i0 + 1, f)):
        if zero_border:
            wt = wt * ((tap >= 0) & (tap < n))
        t = tap.clamp(0, n - 1)
        w_lo += wt * (t == i)
        w_hi += wt * (t == i + 1)
    return i, w_lo, w_hi


def warp_frames(frames: Tensor, m: Tensor, size: int, zero_border: bool, index: Tensor | None = None) -> Tensor:
    """Bilinear samples of ``frames [B, H, W, 3 or 4]`` (RGB first) at the OpenCV pixel-index position
    ``m @ (j, i, 1)`` for each output pixel (row i, column j): ``m [N, 2, 3]``, output ``[N, 3, size, size]``
    (channels-last) float in 0..255. ``index [N]`` picks the frame of each output (default: output n from
    frame n). Border: zero or replicate. Only the pixels needed are gathered (two horizontally adjacent pixels
    per gathered row), so uint8 1080p frames are never converted whole."""
    b, h, w, c = frames.shape
    if h < 2 or w < 2:
        raise InputError(f"Frames must be at least 2x2 pixels, got {h}x{w}.")
    dev = frames.device
    index = torch.arange(b, device=dev) if index is None else index.to(dev)
    m = m.to(dev, torch.float32)
    r = torch.arange(size, device=dev, dtype=torch.float32)
    xs = (m[:, 0, 0, None, None] * r + m[:, 0, 1, None, None] * r[:, None] + m[:, 0, 2, None, None]).reshape(-1)
    ys = (m[:, 1, 0, None, None] * r + m[:, 1, 1, None, None] * r[:, None] + m[:, 1, 2, None, None]).reshape(-1)
    x, wl, wr = _axis_taps(xs, w, zero_border)
    y, wt, wb = _axis_taps(ys, h, zero_border)
    row = (index.int() * h).repeat_interleave(size * size) + y
    flat = frames.contiguous().reshape(-1)
    pairs = flat.as_strided((b * h * w - 1, 2 * c), (c, 1))  # pixel p and p + 1 side by side
    top = row * w + x
    g = torch.stack([pairs.index_select(0, top), pairs.index_select(0, top + w)])  # [2, P, 2c]
    planar = torch.empty(2, 2 * c, g.shape[1], device=dev, dtype=torch.float32)
    planar.copy_(g.permute(0, 2, 1))  # channel-major, so the weighting below vectorises
    (t, bt) = planar
    out = (t[:3] * wl + t[c:c + 3] * wr) * wt + (bt[:3] * wl + bt[c:c + 3] * wr) * wb  # [3, P]
    out = out.reshape(3, -1, size, size).permute(1, 0, 2, 3)
    if frames.is_floating_point():
        out = out * 255.0
    else:
        out = out.round()  # OpenCV warps uint8 images into uint8
    return out.contiguous(memory_format=torch.channels_last)


def _normalize_radians(a: Tensor) -> Tensor:
    return a - 2 * math.pi * torch.floor((a + math.pi) / (2 * math.pi))


def _roi(x0: Tensor, y0: Tensor, x1: Tensor, y1: Tensor, p: Tensor, q: Tensor, scale: float) -> Tensor:
    """Square ROI around a box, rotated so that the p -> q vector is horizontal (DetectionsToRects +
    RectTransformation with square_long)."""
    rot = _normalize_radians(-torch.atan2(-(q[..., 1] - p[..., 1]), q[..., 0] - p[..., 0]))
    side = torch.maximum(x1 - x0, y1 - y0) * scale
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, side, rot], -1)


def roi_from_detection(box: Tensor, keypoints: Tensor, scale: float = 1.5) -> Tensor:
    """ROI ``[..., 4]`` from BlazeFace boxes ``[..., 4]`` and keypoints ``[..., 6, 2]`` (pixels), as MediaPipe's
    FaceDetectionFrontDetectionToRoi: rotation from keypoint 0 (right eye) to 1 (left eye), side = 1.5 x long
    side of the box, centred on the box."""
    return _roi(box[..., 0], box[..., 1], box[..., 2], box[..., 3], keypoints[..., 0, :], keypoints[..., 1, :], scale)


def roi_from_landmarks(landmarks: Tensor, scale: float = 1.5) -> Tensor:
    """ROI ``[..., 4]`` from Face Mesh points ``[..., 468, 2 or 3]`` (pixels), as MediaPipe's
    FaceLandmarkLandmarksToRoi: bounding box of all points, rotation from point 33 to 263 (outer eye corners),
    side = 1.5 x long side. Use it to track a face from the previous frame without running the detector."""
    xy = landmarks[..., :2]
    lo, hi = xy.amin(-2), xy.amax(-2)
    return _roi(lo[..., 0], lo[..., 1], hi[..., 0], hi[..., 1], xy[..., 33, :], xy[..., 263, :], scale)


def _roi_matrix(rois: Tensor, size: int) -> Tensor:
    """Affine ``[N, 2, 3]`` from crop pixel (j, i) to frame pixel: centre + R(rot) @ ((j, i) / size - 0.5) * side."""
    cx, cy, side, rot = rois.unbind(-1)
    c, s, k = torch.cos(rot), torch.sin(rot), side / size
    row0 = torch.stack([c * k, -s * k, cx - (c - s) * side / 2], -1)
    row1 = torch.stack([s * k, c * k, cy - (s + c) * side / 2], -1)
    return torch.stack([row0, row1], -2)


class FaceDetector(nn.Module):
    """BlazeFace detector. ``FaceDetector.load("short" | "full")``; call ``detect(frames)`` (or the module)."""

    def __init__(self, net: TFLiteNet, config: DetectorConfig):
        super().__init__()
        self.net, self.config = net, config
        self.register_buffer("anchors", ssd_anchors(config.size, config.strides,
                                                    config.interpolated_scale_aspect_ratio), persistent=False)

    @classmethod
    def load(cls, model: str = "short", device=None) -> "FaceDetector":
        """Load the shipped weights: ``"short"`` (128x128, faces within ~2 m) or ``"full"`` (192x192, ~5 m)."""
        if model not in CONFIGS:
            raise InputError(f"Unknown face detector {model!r}; use 'short' or 'full'.")
        cfg = CONFIGS[model]
        return cls(TFLiteNet.load(WEIGHTS_DIR / cfg.file, device), cfg).to(device)

    def letterbox(self, height: int, width: int) -> tuple[Tensor, float, float, float]:
        """Model-input pixel -> frame pixel affine for MediaPipe's keep-aspect-ratio letterbox (centred square
        of the long side, zero border); also returns (side, x0, y0) of that square."""
        side = float(max(height, width))
        x0, y0 = (width - side) / 2, (height - side) / 2
        k = side / self.config.size
        return torch.tensor([[k, 0.0, x0], [0.0, k, y0]]), side, x0, y0

    @torch.no_grad()
    def detect(self, frames: Tensor, min_score: float = 0.5, nms_threshold: float = 0.3) -> list[FrameFaces]:
        """Faces in each of ``frames [B, H, W, 3]`` (uint8 or float 0..1) -> one :class:`FrameFaces` per frame,
        boxes/keypoints in frame pixels, sorted by score (best first)."""
        frames = _check_frames(frames)
        b, h, w, _ = frames.shape
        if b == 0:
            return []
        m, side, x0, y0 = self.letterbox(h, w)
        dev = self.anchors.device
        x = warp_frames(frames, m.expand(b, 2, 3), self.config.size, zero_border=True).to(dev)
        raw_boxes, raw_scores = self.net(x / 127.5 - 1.0)
        boxes, kps, scores = decode(raw_boxes, raw_scores, self.anchors, self.config.size)
        offset = torch.tensor([x0 + 0.5, y0 + 0.5], device=dev)  # + 0.5: OpenCV pixel index -> our convention
        out = []
        for i in range(b):
            keep = scores[i] >= min_score
            if not keep.any():
                out.append(_empty(dev))
                continue
            bb, kk, ss = weighted_nms(boxes[i][keep], kps[i][keep], scores[i][keep], nms_threshold)
            out.append(FrameFaces(bb * side + offset.repeat(2), ss, kk * side + offset))
        return out

    forward = detect


def _empty(device) -> FrameFaces:
    e = FrameFaces.empty()
    return FrameFaces(e.boxes.to(device), e.scores.to(device), e.keypoints.to(device))


class FaceLandmarker(nn.Module):
    """Face Mesh on rotated square ROIs. ``FaceLandmarker.load()``; call ``landmarks(frames, rois)``."""

    def __init__(self, mesh: FaceMesh):
        super().__init__()
        self.mesh = mesh

    @classmethod
    def load(cls, device=None) -> "FaceLandmarker":
        return cls(FaceMesh.load(device=device))

    @torch.no_grad()
    def landmarks(self, frames: Tensor, rois: Tensor, frame_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """468 points ``[N, 468, 3]`` (frame pixels; z in the scale of x, MediaPipe's sign) and face presence
        probabilities ``[N]`` for ``rois [N, 4]`` (see module doc). Without ``frame_index [N]`` ROI n is in
        frame n (N == B)."""
        frames = _check_frames(frames)
        rois = torch.as_tensor(rois, dtype=torch.float32).reshape(-1, 4)
        dev = next(self.mesh.parameters()).device
        if frame_index is None and len(rois) != frames.shape[0]:
            raise InputError(f"Got {len(rois)} face ROIs for {frames.shape[0]} frames; pass frame_index.")
        if len(rois) == 0:
            return torch.zeros(0, 468, 3, device=dev), torch.zeros(0, device=dev)
        m = _roi_matrix(rois.to(frames.device), MESH_SIZE)
        to_index = torch.tensor([0.0, 0.0, 0.5], device=m.device)  # our convention -> OpenCV pixel index
        crops = warp_frames(frames, m - to_index, MESH_SIZE, zero_border=False, index=frame_index).to(dev)
        pts, presence = self.mesh(crops / 255.0)
        m = m.to(dev)
        xy = torch.einsum("nij,nkj->nki", m[:, :, :2], pts[..., :2]) + m[:, None, :, 2]
        z = pts[..., 2:] * (rois[:, 2].to(dev) / MESH_SIZE)[:, None, None]
        return torch.cat([xy, z], -1), presence

    forward = landmarks


@torch.no_grad()
def detect_faces(frames: Tensor, detector: FaceDetector, landmarker: FaceLandmarker, min_score: float = 0.5,
                 max_faces: int | None = None) -> list[FrameFaces]:
    """Detect faces and fill their 468 landmarks (ROI from each detection, as MediaPipe's static-image mode);
    ``max_faces`` keeps only the best-scored faces of each frame. Frames without faces give empty FrameFaces."""
    faces = detector.detect(frames, min_score)
    if max_faces is not None:
        faces = [FrameFaces(f.boxes[:max_faces], f.scores[:max_faces], f.keypoints[:max_faces]) for f in faces]
    counts = [len(f) for f in faces]
    if sum(counts) == 0:
        return [FrameFaces(f.boxes, f.scores, f.keypoints, f.boxes.new_zeros(0, 468, 3)) for f in faces]
    boxes = torch.cat([f.boxes for f in faces])
    kps = torch.cat([f.keypoints for f in faces])
    index = torch.repeat_interleave(torch.arange(len(faces)), torch.tensor(counts))
    lms, _ = landmarker.landmarks(frames, roi_from_detection(boxes, kps), frame_index=index)
    lms = lms.split(counts)
    return [FrameFaces(f.boxes, f.scores, f.keypoints, lm) for f, lm in zip(faces, lms)]
