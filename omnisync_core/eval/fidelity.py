"""Fidelity: what lip sync must not change, and how close the face is to the ground truth.

Regions, per frame, from the Face Mesh of both videos compared (where found):
- **mouth mask**: the union of discs of radius ``dilate * w`` (w the face width, default 0.15) around the 40 lip
  points of either video: the lips, the mouth interior and a margin for the jaw's motion;
- **face region**: the landmarks' bounding box grown by ``margin`` (default 0.3, the crop margin of inference) on
  every side, clipped to the frame; **outside the mouth** is the face region minus the mouth mask (the cheeks, nose,
  eyes and the background next to the face, where an editor should change nothing; far background is left out so
  it does not dilute the score);
- **face crop**: the landmarks' bounding box itself.

``PSNR = 10 log10(1 / MSE)`` with MSE pooled over the region's pixels and RGB channels of all frames (0..1 scale),
capped at 100 dB (identical pixels). ``SSIM`` (Wang et al., IEEE TIP 2004) on BT.601 luma with an 11 x 11 Gaussian
window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2, its map averaged over the region's pixels of all frames; outside the
mouth only over pixels whose window does not reach into the mask (5 px clear of it), so a change inside the mask
leaves it at 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .faces import LIPS, FaceSeries

PSNR_CAP = 100.0
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _gauss(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_map(a: Tensor, b: Tensor, c1: float = 0.01 ** 2, c2: float = 0.03 ** 2) -> Tensor:
    """SSIM map ``[H, W]`` of two luma images ``[H, W]`` in 0..1 (reflect-padded so the map has the input's size)."""
    w = _gauss()
    x = torch.stack([a, b, a * a, b * b, a * b])[:, None]
    pad = w.shape[-1] // 2
    mode = "reflect" if min(a.shape) > pad else "replicate"
    m = F.conv2d(F.pad(x, (pad,) * 4, mode=mode), w)[:, 0]
    mu_a, mu_b = m[0], m[1]
    var_a, var_b, cov = m[2] - mu_a ** 2, m[3] - mu_b ** 2, m[4] - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def psnr_from_mse(mse: float) -> float:
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else min(PSNR_CAP, -10 * math.log10(mse))


class _Pool:
    """Accumulates squared error and SSIM over masked pixels of many frames."""

    def __init__(self):
        self.sse = self.count = self.ssim = self.ssim_count = 0.0

    def add(self, a: Tensor, b: Tensor, mask: Tensor, ssim: Tensor, ssim_mask: Optional[Tensor] = None) -> None:
        n = float(mask.sum())
        if n == 0:
            return
        self.sse += float((a - b).square().sum(-1)[mask].sum())
        self.count += 3 * n
        ssim_mask = mask if ssim_mask is None else ssim_mask
        self.ssim += float(ssim[ssim_mask].sum())
        self.ssim_count += float(ssim_mask.sum())

    def result(self) -> tuple[float, float]:
        if self.count == 0:
            return float("nan"), float("nan")
        return psnr_from_mse(self.sse / self.count), self.ssim / self.ssim_count


def _to_float(frames: Tensor) -> Tensor:
    return frames.float() / 255.0 if not frames.is_floating_point() else frames.float()


def mouth_discs(points: Tensor, radius: Tensor, y0: int, x0: int, h: int, w: int) -> Tensor:
    """``[h, w]`` bool: pixels (centres) of the rectangle at (y0, x0) within ``radius [K]`` of any ``points [K, 2]``."""
    ys = torch.arange(y0, y0 + h, dtype=torch.float32) + 0.5
    xs = torch.arange(x0, x0 + w, dtype=torch.float32) + 0.5
    d2 = (xs[None, None, :] - points[:, 0, None, None]).square() + (ys[None, :, None] - points[:, 1, None, None]).square()
    return (d2 <= radius[:, None, None].square()).any(0)


@dataclass
class Fidelity:
    psnr_outside_mouth: float
    ssim_outside_mouth: float
    psnr_face: float
    ssim_face: float
    frames: int            # frames that had a face in either video


def fidelity(a: Tensor, b: Tensor, faces_a: FaceSeries, faces_b: FaceSeries, dilate: float = 0.15,
             margin: float = 0.3) -> Fidelity:
    """PSNR / SSIM of frames ``a`` against ``b`` (``[T, H, W, 3]``, uint8 or 0..1, the same size) outside the mouth
    mask and inside the face crop (see the module). Frames where neither video has a face are skipped."""
    t = min(a.shape[0], b.shape[0], len(faces_a), len(faces_b))
    hgt, wid = a.shape[1:3]
    outside, face, used = _Pool(), _Pool(), 0
    for i in range(t):
        marks = [f.landmarks[i] for f in (faces_a, faces_b) if bool(f.found[i])]
        if not marks:
            continue
        used += 1
        pts = torch.cat(marks)
        lo, hi = pts.amin(0), pts.amax(0)
        size = hi - lo
        gx0, gy0 = (lo - margin * size).floor().clamp(min=0).long().tolist()
        gx1, gy1 = (hi + margin * size).ceil().long().tolist()
        gx1, gy1 = min(gx1, wid), min(gy1, hgt)
        if gx1 <= gx0 or gy1 <= gy0:
            continue
        fa, fb = _to_float(a[i, gy0:gy1, gx0:gx1]), _to_float(b[i, gy0:gy1, gx0:gx1])
        ssim = ssim_map(fa @ _LUMA, fb @ _LUMA)
        lips = torch.cat([m[list(LIPS)] for m in marks])
        widths = torch.cat([torch.full((len(LIPS),), float((m[234] - m[454]).norm())) for m in marks])
        mouth = mouth_discs(lips, dilate * widths, gy0, gx0, gy1 - gy0, gx1 - gx0)
        ys = torch.arange(gy0, gy1, dtype=torch.float32)[:, None] + 0.5
        xs = torch.arange(gx0, gx1, dtype=torch.float32)[None, :] + 0.5
        in_box = (xs >= lo[0]) & (xs <= hi[0]) & (ys >= lo[1]) & (ys <= hi[1])
        # SSIM outside the mouth only where its 11 x 11 window does not reach into the mask
        near = F.max_pool2d(mouth[None, None].float(), 11, 1, 5)[0, 0] > 0
        outside.add(fa, fb, ~mouth, ssim, ~near)
        face.add(fa, fb, in_box, ssim)
    return Fidelity(*outside.result(), *face.result(), used)


def psnr(a: Tensor, b: Tensor, mask: Optional[Tensor] = None) -> float:
    """PSNR of two frame stacks (uint8 or 0..1) over ``mask [T, H, W]`` (all pixels if None), capped at 100 dB."""
    d = (_to_float(a) - _to_float(b)).square().sum(-1)
    if mask is None:
        return psnr_from_mse(float(d.mean()) / 3)
    n = float(mask.sum())
    return float("nan") if n == 0 else psnr_from_mse(float(d[mask].sum()) / (3 * n))
