"""LatentSync's face crop and mouth mask, driven by our Face Mesh points: geometry and masks only.

Upstream (``latentsync/utils/affine_transform.py``, ``image_processor.py`` L54-80):

- three points: the means of the two eyebrows and of the nose, rounded to whole pixels (1.6 takes them from
  InsightFace's 106 landmarks; 1.5 took them from FAN-68 or MediaPipe through
  ``mediapipe_lm478_to_face_alignment_lm68``, whose MediaPipe indices are used here);
- a similarity (Procrustes on the 3 points, reflection fixed) onto the template ``[[17, 20], [58, 20], [37.5, 40]] *
  2.8 * res / 256``, plus a "smoothing" bias: the nose point's offset in *normalised* units, filtered
  ``0.2 * previous + 0.8 * current`` over the whole video and added to the pixel translation;
- the matrix is used in fp16 (``AlignRestore``'s default dtype) to warp a 420 x 560 crop (at 512), which is then
  resized to 512 x 512: the face is squashed anisotropically;
- a fixed mask (``mask.png``, 256 x 256; Lanczos-resized): 1 keeps the pixel, 0 is the lower face the model redraws.
  The decoded crop is composited ``decoded * (1 - mask) + source * mask``.

Coordinates: upstream's matrices use OpenCV's convention (pixel centres at integers); ours (``types.py``) put pixel
centres at ``j + 0.5``. :func:`latentsync_crop_params` converts, so :func:`omnisync_core.face.crop.crop_faces` and
``paste_back`` produce the same geometry (they resample once, bilinearly, and repeat border pixels where upstream warps
bilinearly with grey 127 fill, then resizes with Lanczos).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .crop import CropParams, _invert
from .track import FaceTrack

__all__ = ["LEFT_BROW", "RIGHT_BROW", "NOSE", "latentsync_points", "latentsync_template", "latentsync_affines",
           "latentsync_crop_params", "latentsync_points_params", "latentsync_mask", "latent_mask",
           "mouth_blend_weight", "paste_mouth"]

# MediaPipe Face Mesh indices of FAN-68 points 17-21, 22-26 and 27-35 (LatentSync 1.5, 75a4a17
# image_processor.py L195-264): the eyebrow on the image's left, the one on its right, the nose.
LEFT_BROW = (71, 63, 105, 66, 107)
RIGHT_BROW = (336, 296, 334, 293, 301)
NOSE = (168, 197, 5, 4, 75, 97, 2, 326, 305)
MASK_FILE = Path(__file__).parent / "weights" / "latentsync_mask.safetensors"


def latentsync_points(landmarks: Tensor, round_points: bool = True) -> Tensor:
    """Face Mesh ``[T, 468, 2 or 3]`` (our pixel convention) -> the 3 alignment points ``[T, 3, 2]`` in OpenCV's
    convention (centres at integers), rounded as upstream rounds its landmark means."""
    if landmarks.ndim != 3 or landmarks.shape[1] < 468:
        raise InputError(f"Face Mesh landmarks must be [frames, 468, 2 or 3], got {list(landmarks.shape)}.")
    xy = landmarks[..., :2].double() - 0.5
    pts = torch.stack([xy[:, list(g)].mean(1) for g in (LEFT_BROW, RIGHT_BROW, NOSE)], dim=1)
    return pts.round() if round_points else pts


def latentsync_template(resolution: int = 512) -> tuple[Tensor, tuple[int, int]]:
    """The 3-point template ``[3, 2]`` and the crop size ``(width, height)`` (420 x 560 at 512)."""
    ratio = resolution / 256 * 2.8
    tmpl = torch.tensor([[19 - 2, 30 - 10], [56 + 2, 30 - 10], [37.5, 45 - 5]], dtype=torch.float64) * ratio
    return tmpl, (int(75 * ratio), int(100 * ratio))


def _similarity(p1: Tensor, p2: Tensor) -> tuple[Tensor, Tensor]:
    """Upstream's ``transformation_from_points`` without the bias, in its float32 arithmetic:
    (M [2, 3], nose offset in normalised units [2])."""
    p1, p2 = p1.float(), p2.float()
    c1, c2 = p1.mean(0), p2.mean(0)
    q1, q2 = p1 - c1, p2 - c2
    s1, s2 = q1.std(), q2.std()
    n1, n2 = q1 / s1, q2 / s2
    u, _, v = torch.svd(n1.T @ n2)
    r = v @ u.T
    if torch.det(r) < 0:
        v[:, -1] = -v[:, -1]
        r = v @ u.T
    t = c2.reshape(2, 1) - (s2 / s1) * (r @ c1.reshape(2, 1))
    return torch.cat([(s2 / s1) * r, t], 1), n2[2] - n1[2]


def latentsync_affines(points: Tensor, resolution: int = 512, smooth: bool = True, bias: Optional[Tensor] = None,
                       fp16_matrix: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Per-frame crop matrices ``[T, 2, 3]`` (float64, OpenCV convention: frame -> the 420 x 560 crop at 512) from
    3-point sets ``[T, 3, 2]``, and the EMA bias state after the last frame.

    ``bias`` carries the smoothing state from a previous call (upstream keeps one state for the whole video);
    ``fp16_matrix`` rounds each matrix to fp16 as upstream's warp receives it.
    """
    tmpl, _ = latentsync_template(resolution)
    out = []
    for p in points:
        m, b = _similarity(p, tmpl)
        if smooth:
            bias = b if bias is None else bias * 0.2 + b * 0.8
            m[:, 2] = m[:, 2] + bias
        out.append(m.half().double() if fp16_matrix else m.double())
    return torch.stack(out), bias if smooth else None


def latentsync_crop_params(track: "FaceTrack | Tensor", frame_hw: Optional[tuple[int, int]] = None,
                           resolution: int = 512, smooth: bool = True, fp16_matrix: bool = True) -> CropParams:
    """LatentSync's squashed 512 x 512 crops as :class:`CropParams` (use with ``crop_faces`` / ``paste_back``).

    ``track`` is a :class:`FaceTrack` with Face Mesh landmarks, or landmarks ``[T, 468, 2|3]`` with ``frame_hw``.
    The smoothing state runs over the given frames in order.
    """
    if isinstance(track, FaceTrack):
        if track.landmarks is None:
            raise InputError("LatentSync's crop needs Face Mesh landmarks; the face track has none.")
        landmarks, frame_hw = track.landmarks, track.frame_hw
    else:
        landmarks = track
        if frame_hw is None:
            raise InputError("frame_hw is needed when landmarks are given without a FaceTrack.")
    return latentsync_points_params(latentsync_points(landmarks), frame_hw, resolution, smooth, fp16_matrix)


def latentsync_points_params(points: Tensor, frame_hw: tuple[int, int], resolution: int = 512, smooth: bool = True,
                             fp16_matrix: bool = True) -> CropParams:
    """:func:`latentsync_crop_params` from the 3 alignment points ``[T, 3, 2]`` (OpenCV's convention, as
    :func:`latentsync_points` gives them) of images ``frame_hw`` in size."""
    m, _ = latentsync_affines(points, resolution, smooth, fp16_matrix=fp16_matrix)
    _, (w, h) = latentsync_template(resolution)
    half = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    unhalf = torch.tensor([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    squash = torch.diag(torch.tensor([resolution / w, resolution / h, 1.0], dtype=torch.float64))
    m3 = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64).expand(len(m), 1, 3)], 1)
    crop_from_frame = (squash @ half @ m3 @ unhalf)[:, :2]
    return CropParams(crop_from_frame.float(), _invert(crop_from_frame).float(), int(resolution), tuple(frame_hw))


# ---------------------------------------------------------------- mask and compositing

@lru_cache(maxsize=4)
def _mask_u8(resolution: int) -> Tensor:
    from safetensors.torch import load_file

    masks = load_file(str(MASK_FILE))
    key = f"mask_{resolution}"
    if key in masks:   # upstream's exact mask at its resolutions (cv2 Lanczos4 resize of mask.png, uint8)
        return masks[key]
    m = masks["mask_256"].float()[None, None]
    up = F.interpolate(m, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    return up.round().clamp(0, 255).to(torch.uint8)[0, 0]


def latentsync_mask(resolution: int = 512, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """LatentSync's fixed crop mask ``[resolution, resolution]`` in [0, 1]: 1 keeps the pixel, 0 is regenerated.

    At 512 and 256 it is upstream's mask exactly (``load_fixed_mask``); other sizes are a bicubic resize of the
    256 x 256 original (upstream uses OpenCV's Lanczos4)."""
    if resolution < 8:
        raise InputError(f"The mask resolution must be at least 8, got {resolution}.")
    return (_mask_u8(int(resolution)).to(device=device, dtype=torch.float64) / 255.0).to(dtype)


def latent_mask(mask: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """The UNet's mask channel: ``F.interpolate(mask, latent_hw)`` with its default nearest mode, as upstream."""
    return F.interpolate(mask[None, None].float(), size=tuple(latent_hw))[0, 0].to(mask.dtype)


def mouth_blend_weight(mask: Tensor, feather: float = 8.0) -> Tensor:
    """Weight ``[R, R]`` of the generated pixels: ``1 - mask`` shrunk by ``ceil(feather)`` pixels and blurred over the
    same radius, so it rises smoothly inside the regenerated region and is exactly 0 outside it (there the source stays
    untouched). ``feather=0`` is upstream's composite weight ``1 - mask``."""
    w = (1.0 - mask.float())[None, None]
    r = int(torch.tensor(float(feather)).ceil())
    if r <= 0:
        return w[0, 0].to(mask.dtype)
    w = -F.max_pool2d(-w, 2 * r + 1, stride=1, padding=r)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / max(feather / 2.0, 1e-3)) ** 2)
    k = k / k.sum()
    w = F.conv2d(F.pad(w, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    w = F.conv2d(F.pad(w, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return w[0, 0].clamp(0, 1).to(mask.dtype)


def paste_mouth(generated: Tensor, source: Tensor, mask: Tensor, feather: float = 8.0) -> Tensor:
    """Blend generated crops into the source crops ``[T, R, R, C]`` through :func:`mouth_blend_weight`: only the
    mouth region changes, with a feathered edge; outside it the source is returned bit-exact."""
    if generated.shape != source.shape or generated.shape[1:3] != mask.shape:
        raise InputError(f"Crops {list(generated.shape)} / {list(source.shape)} and mask {list(mask.shape)} "
                         f"do not match.")
    w = mouth_blend_weight(mask, feather).to(source.device, source.dtype)[None, :, :, None]
    return torch.where(w > 0, source + w * (generated - source), source)
