"""Square face crops as per-frame similarity transforms, and the feathered paste-back of edited crops.

Pixel convention of ``types.py``: pixel (i, j) covers ``[j, j+1) x [i, i+1)``; a 2x3 matrix ``M`` maps a point
``p`` (x, y) to ``M[:, :2] @ p + M[:, 2]``. Sampling is bilinear ``grid_sample`` with ``align_corners=False``,
which uses the same convention. Crop pixels that fall outside the frame repeat the frame's edge pixels
(padding "border"): unlike reflection it never invents a mirrored second half-face next to the real one.
Warps only ever touch the crop's bounding rectangle in the frame, never the whole frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from .track import FaceTrack

# Bilinear samples may be this many source pixels apart before the source is low-passed first (see _warp).
# Cropping a large face shrinks real detail, so it is filtered early. Pasting shrinks a crop that was mostly
# enlarged from the frame; filtering it softens the untouched face (round trip at 3.4x: 45.6 dB unfiltered,
# 39 dB filtered to 2x), so only extreme shrinks are filtered.
CROP_MAX_STEP = 1.5
PASTE_MAX_STEP = 4.0
DETAIL_EDIT = 0.08         # keep_detail: an edit this strong (0..1 scale) replaces the source's fine detail


@dataclass
class CropParams:
    """Per-frame similarity transforms: ``crop_from_frame [T, 2, 3]`` (frame pixels -> crop pixels) and its inverse
    ``frame_from_crop``; ``size`` is the crop side in pixels, ``frame_hw`` the frame size."""

    crop_from_frame: Tensor
    frame_from_crop: Tensor
    size: int
    frame_hw: tuple[int, int]

    def __len__(self) -> int:
        return int(self.crop_from_frame.shape[0])

    def __getitem__(self, index: slice) -> "CropParams":
        return replace(self, crop_from_frame=self.crop_from_frame[index], frame_from_crop=self.frame_from_crop[index])

    def window(self, a: int, b: int) -> "CropParams":
        return self[a:b]

    def to(self, device) -> "CropParams":
        return replace(self, crop_from_frame=self.crop_from_frame.to(device),
                       frame_from_crop=self.frame_from_crop.to(device))

    @property
    def scale(self) -> Tensor:
        """Crop pixels per frame pixel, ``[T]``."""
        return self.crop_from_frame[:, :, :2].det().abs().sqrt()


def _invert(m: Tensor) -> Tensor:
    lin = torch.linalg.inv(m[..., :2])
    return torch.cat([lin, -(lin @ m[..., 2:])], -1)


def _apply(m: Tensor, p: Tensor) -> Tensor:
    """Apply ``m [..., 2, 3]`` to points ``p [..., K, 2]``."""
    return p @ m[..., :2].transpose(-1, -2) + m[..., None, :, 2]


def crop_params(track: FaceTrack, size: int = 512, margin: float = 0.3, rotate: bool = False) -> CropParams:
    """Square crops of side ``max(box w, h) * (1 + 2 * margin)`` centred on the (smoothed) face box.

    rotate=True also levels the eye line. It is off by default: the eye-line angle is noisy frame to frame, so a
    rolling crop makes the whole background sway inside the crop (motion the model would try to reproduce), and
    the generator is trained on upright crops of upright faces.
    """
    if size < 8:
        raise InputError("The crop size must be at least 8 pixels.")
    b = track.boxes.double()
    centre = (b[:, :2] + b[:, 2:]) / 2
    side = (b[:, 2:] - b[:, :2]).amax(-1).clamp_min(1.0) * (1 + 2 * margin)
    s = size / side
    if rotate:
        d = (track.eyes[:, 1] - track.eyes[:, 0]).double()
        theta = torch.atan2(d[:, 1], d[:, 0])  # eye-line angle in the frame (y down)
    else:
        theta = torch.zeros_like(s)
    cos, sin = theta.cos() * s, theta.sin() * s
    lin = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # rotate by -theta, scale
    shift = size / 2 - (lin @ centre[..., None])[..., 0]
    m = torch.cat([lin, shift[..., None]], -1)
    return CropParams(m.float(), _invert(m).float(), int(size), tuple(track.frame_hw))


def _footprint(frame_from_crop: Tensor, size: int, hw: tuple[int, int], pad: int = 1) -> tuple[int, int, int, int]:
    """Integer rectangle (x0, y0, x1, y1) of the frame covering the crop square (plus ``pad``), clipped."""
    corners = torch.tensor([[0.0, 0.0], [size, 0.0], [0.0, size], [size, size]], dtype=torch.float64)
    p = _apply(frame_from_crop.double().cpu(), corners)
    x0, y0 = (p.min(0).values.floor().long() - pad).tolist()
    x1, y1 = (p.max(0).values.ceil().long() + pad).tolist()
    H, W = hw
    x0, x1 = min(max(x0, 0), W - 1), min(max(x1, 1), W)
    y0, y1 = min(max(y0, 0), H - 1), min(max(y1, 1), H)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _to_norm(w: int, h: int) -> Tensor:
    """3x3 map from pixel coordinates of a ``w x h`` image to grid_sample's [-1, 1] (align_corners=False)."""
    return torch.tensor([[2.0 / w, 0.0, -1.0], [0.0, 2.0 / h, -1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _h(m: Tensor) -> Tensor:
    return torch.cat([m.double().cpu(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])


def _theta(src_from_dst: Tensor, src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> Tensor:
    """affine_grid theta ``[1, 2, 3]`` for a pixel-space map ``src_from_dst [2, 3]``."""
    th = _to_norm(*src_wh) @ _h(src_from_dst) @ torch.linalg.inv(_to_norm(*dst_wh))
    return th[None, :2].float()


def _shift(x: float, y: float) -> Tensor:
    return torch.tensor([[1.0, 0.0, x], [0.0, 1.0, y]], dtype=torch.float64)


def _compose(a: Tensor, b: Tensor) -> Tensor:
    """2x3 map ``a o b``."""
    return (_h(a) @ _h(b))[:2]


def _affine_grid(th: list, hw: tuple[int, int], device) -> Tensor:
    """``F.affine_grid(theta, align_corners=False)[0]`` by broadcasting (its batched matmul is slow on CPU)."""
    h, w = hw
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    gx = (th[0][0] * xs)[None, :] + (th[0][1] * ys + th[0][2])[:, None]
    gy = (th[1][0] * xs)[None, :] + (th[1][1] * ys + th[1][2])[:, None]
    return torch.stack([gx, gy], -1)[None]


def _warp(src: Tensor, theta: Tensor, out_hw: tuple[int, int], step: float, max_step: float) -> tuple[Tensor, Tensor]:
    """Bilinear warp of ``src [1, C, h, w]`` -> (``[C, *out_hw]``, normalised source grid ``[*out_hw, 2]``).

    ``step`` is the distance between output samples in source pixels. Above ``max_step`` the source is first
    shrunk (antialiased resize) so that samples are ``max_step`` apart, against aliasing; normalised coordinates
    do not depend on the source resolution, so theta stays the same.
    """
    grid = _affine_grid(theta[0].tolist(), out_hw, src.device)
    if step > max_step:
        h, w = src.shape[-2:]
        f = max_step / step
        src = F.interpolate(src, size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear",
                            antialias=True, align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0], grid[0]


def _check_frames(frames: Tensor, params: CropParams) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError("Frames must be shaped [T, H, W, 3].")
    if frames.shape[0] != len(params):
        raise InputError(f"Got {frames.shape[0]} frames but crop parameters for {len(params)}.")
    if tuple(frames.shape[1:3]) != tuple(params.frame_hw):
        raise InputError(f"Frames are {tuple(frames.shape[1:3])} but the track was built for {params.frame_hw}.")


def _region_float(region: Tensor) -> Tensor:
    """A frame region as float 0..1 (uint8 frames are converted here, region by region, never whole)."""
    return region.float().div_(255.0) if region.dtype == torch.uint8 else region.float()


@torch.no_grad()
def crop_faces(frames: Tensor, params: CropParams, size: Optional[int] = None) -> Tensor:
    """Resample ``frames [T, H, W, 3]`` (float 0..1, or uint8) into face crops ``[T, size, size, 3]`` (float 0..1
    for uint8 frames, else the frames' dtype)."""
    size = int(size or params.size)
    _check_frames(frames, params)
    dev = frames.device
    # a different output size only rescales the crop axes
    m_inv = params.frame_from_crop.cpu().clone()
    m_inv[:, :, :2] *= params.size / size
    steps = (params.size / (params.scale * size)).tolist()
    out_dtype = torch.float32 if frames.dtype == torch.uint8 else frames.dtype
    out = torch.empty(frames.shape[0], size, size, 3, dtype=out_dtype, device=dev)
    for t in range(frames.shape[0]):
        x0, y0, x1, y1 = _footprint(m_inv[t], size, params.frame_hw)
        src = _region_float(frames[t, y0:y1, x0:x1]).permute(2, 0, 1)[None]
        theta = _theta(_compose(_shift(-x0, -y0), m_inv[t]), (x1 - x0, y1 - y0), (size, size))
        out[t] = _warp(src, theta, (size, size), steps[t], CROP_MAX_STEP)[0].permute(1, 2, 0).to(out_dtype)
    return out


def _ramp(d: Tensor, width: float) -> Tensor:
    if width <= 0:
        return (d > 0).float()
    r = (d / width).clamp_(0, 1)
    return r * r * (3 - 2 * r)


def _border_ramp(grid: Tensor, theta: Tensor, size: int, width: float) -> Tensor:
    """Blend weight ``[h, w, 1]`` at normalised crop points ``grid [h, w, 2]``: 0 on and outside the crop border,
    rising smoothly (smoothstep) to 1 at ``width`` crop pixels inside it. Separable when the map has no rotation."""
    if theta[0, 0, 1] == 0 and theta[0, 1, 0] == 0:
        gx, gy = grid[0, :, 0], grid[:, 0, 1]
        return (_ramp((1 - gy.abs()) * (size / 2), width)[:, None] * _ramp((1 - gx.abs()) * (size / 2), width))[
            ..., None]
    return _ramp((1 - grid.abs()) * (size / 2), width).prod(-1, keepdim=True)


def _ring_stats(img: Tensor, ring: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of ``img [S, S, 3]`` over its outer band ``ring`` pixels wide."""
    S = img.shape[0]
    band = torch.ones(S, S, dtype=torch.bool, device=img.device)
    band[ring:S - ring, ring:S - ring] = False
    px = img[band]
    return px.mean(0), px.std(0)


@torch.no_grad()
def paste_back(frames: Tensor, crops: Tensor, params: CropParams, valid: Optional[Tensor] = None,
               feather: float = 0.1, color_match: bool = False, inplace: bool = False,
               keep_detail: bool = False, source_crops: Optional[Tensor] = None) -> Tensor:
    """Blend edited ``crops [T, S, S, 3]`` (float 0..1) back into ``frames [T, H, W, 3]`` (float 0..1, or uint8).

    The crop is warped back with the inverse transform and blended with a mask that ramps (smoothstep) from 0 at
    the crop border to 1 at ``feather * S`` inside it. color_match=True first gives the edited crop the per-channel
    mean and std of the original crop over the crop's outer band (15% of its side): the model legitimately changes
    the mouth region, so only the band measures its global colour drift, and it is also where the seam lies.
    Frames with ``valid`` False and every pixel outside the crop footprint are returned bit-exact.

    keep_detail=True keeps the frame's own detail where the model changed nothing: the crop is usually coarser
    than the face in the frame (a 512 crop of a 4K face, the demo model's 64 px crop of any face), so pasting it
    back whole would blur the face. Instead the frame keeps its pixels plus the upsampled *edit* (edited crop minus
    the source crop), and where the edit is strong (more than ``DETAIL_EDIT`` in any channel) the source's fine
    detail gives way to the generated pixels, so no ghost of the old mouth stays. An unedited crop then pastes back
    exactly. No mask is involved: where to change comes from the model's own output. ``source_crops`` (the crops the
    edit started from, ``crop_faces(frames, params)``) saves cropping the frames again for colour match and detail.
    """
    _check_frames(frames, params)
    T, S = frames.shape[0], params.size
    if crops.shape != (T, S, S, 3):
        raise InputError(f"Crops must be shaped [{T}, {S}, {S}, 3] to match the crop parameters, "
                         f"got {list(crops.shape)}.")
    dev = frames.device
    out = frames if inplace else frames.clone()
    valid = torch.ones(T, dtype=torch.bool) if valid is None else valid.detach().bool().cpu().flatten()
    if len(valid) != T:
        raise InputError(f"valid has {len(valid)} entries for {T} frames.")
    steps = params.scale.tolist()  # crop pixels per frame pixel = sample step in the crop
    ring = max(1, round(0.15 * S))
    for t in range(T):
        if not valid[t]:
            continue
        x0, y0, x1, y1 = _footprint(params.frame_from_crop[t], S, params.frame_hw, pad=0)
        theta = _theta(_compose(params.crop_from_frame[t], _shift(x0, y0)), (S, S), (x1 - x0, y1 - y0))
        edited = crops[t].to(dev, torch.float32).nan_to_num(0.0, 1.0, 0.0)
        warped, grid = _warp(edited.permute(2, 0, 1)[None], theta, (y1 - y0, x1 - x0), steps[t], PASTE_MAX_STEP)
        m = _border_ramp(grid, theta, S, feather * S)
        orig = None
        if color_match or keep_detail:
            orig = (source_crops[t].to(dev, torch.float32) if source_crops is not None
                    else crop_faces(frames[t:t + 1], params[t:t + 1])[0].float())
        if color_match:
            (mo, so), (me, se) = _ring_stats(orig, ring), _ring_stats(edited, ring)
            gain = (so / se.clamp_min(1e-6)).clamp(0.5, 2.0)
            warped = (warped - me[:, None, None]) * gain[:, None, None] + mo[:, None, None]
        region = out[t, y0:y1, x0:x1]
        if keep_detail:
            base, _ = _warp(orig.permute(2, 0, 1)[None], theta, (y1 - y0, x1 - x0), steps[t], PASTE_MAX_STEP)
            edit = (warped - base).abs().amax(0, keepdim=True)
            detail = _region_float(region).permute(2, 0, 1) - base
            warped = warped + (1 - (edit / DETAIL_EDIT).clamp(0, 1)) * detail
        # lerp with weight exactly 0 returns the frame pixel bit-exact (the crop is made finite above)
        if region.dtype == torch.float32:
            region.lerp_(warped.permute(1, 2, 0), m)
        elif region.dtype == torch.uint8:    # uint8 frames: blend in 0..1, round back; weight 0 stays exact
            blended = _region_float(region).lerp_(warped.permute(1, 2, 0), m).mul_(255.0).round_()
            out[t, y0:y1, x0:x1] = torch.where(m > 0, blended, region.float()).to(torch.uint8)
        else:
            out[t, y0:y1, x0:x1] = region.float().lerp_(warped.permute(1, 2, 0), m).to(region.dtype)
    return out


def mouth_in_crop(track: FaceTrack, params: CropParams) -> tuple[Tensor, Tensor]:
    """Mouth centre ``[T, 2]`` and face width ``[T]`` in crop pixels."""
    mouth = _apply(params.crop_from_frame.double(), track.mouth_xy.double()[:, None])[:, 0]
    return mouth.float(), (track.face_width.double() * params.scale.double()).float()


def mouth_in_latent(track: FaceTrack, params: CropParams, latent_hw: tuple[int, int],
                    crop_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Mouth centre ``[T, 2]`` (x, y) and face width ``[T]`` in latent-grid units, for DS-CFG.

    Latent cell j covers ``[j, j+1)``, so crop pixel coordinate x maps to ``x * latent_w / crop_size`` (a cell's
    centre is at j + 0.5). ``crop_size`` is the side of the crops the latents were encoded from (default
    ``params.size``). The width uses the horizontal factor.
    """
    crop_size = int(crop_size or params.size)
    mouth, width = mouth_in_crop(track, params)
    mouth, width = mouth * (crop_size / params.size), width * (crop_size / params.size)  # crop resized to crop_size
    lh, lw = latent_hw
    f = torch.tensor([lw / crop_size, lh / crop_size])
    return mouth * f, width * f[0]
