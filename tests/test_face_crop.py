"""Face crop and paste-back: pixel convention, round trips on a real photo, bit-exactness, DS-CFG mouth maps."""

import math

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from omnisync_core.errors import InputError
from omnisync_core.face.crop import (CropParams, crop_faces, crop_params, mouth_in_crop, mouth_in_latent,
                                     paste_back)
from omnisync_core.face.track import build_track
from omnisync_core.face.types import FrameFaces

# Input data: the astronaut's face box (BlazeFace short range, via mediapipe 0.10.21) in the 512 x 512 photo.
ASTRONAUT_BOX = torch.tensor([177.6, 82.9, 272.9, 178.2])


def astronaut() -> torch.Tensor:
    return torch.from_numpy(np.array(skimage.data.astronaut())).float() / 255


def resize(img: torch.Tensor, hw) -> torch.Tensor:
    x = F.interpolate(img.permute(2, 0, 1)[None], size=hw, mode="bicubic", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def static_track(box, hw, T, eyes=None):
    kp = torch.zeros(6, 2)
    x0, y0, x1, y1 = box.tolist()
    kp[:] = torch.tensor([[x0 + 0.3 * (x1 - x0), y0 + 0.35 * (y1 - y0)]])
    kp[1] = torch.tensor([x0 + 0.7 * (x1 - x0), y0 + 0.35 * (y1 - y0)])
    kp[3] = torch.tensor([(x0 + x1) / 2, y0 + 0.75 * (y1 - y0)])
    if eyes is not None:
        kp[:2] = eyes
    return build_track([FrameFaces(box[None].clone(), torch.ones(1), kp[None].clone()) for _ in range(T)], hw)


def footprint_mask(params: CropParams, t: int, hw) -> torch.Tensor:
    """Frame pixels whose centre maps strictly inside the crop square (computed here, independently)."""
    H, W = hw
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    m = params.crop_from_frame[t].double()
    u = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    v = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    S = params.size
    return (u > 0) & (u < S) & (v > 0) & (v < S)


def psnr(a, b):
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def round_trip(frames, box, size=512, valid=None):
    track = static_track(box, tuple(frames.shape[1:3]), frames.shape[0])
    params = crop_params(track, size)
    crops = crop_faces(frames, params)
    assert crops.shape == (frames.shape[0], size, size, 3)
    out = paste_back(frames, crops, params, track.valid if valid is None else valid)
    return track, params, crops, out


def check_round_trip(frames, box, min_psnr=45.0):
    _, params, _, out = round_trip(frames, box)
    hw = tuple(frames.shape[1:3])
    for t in range(frames.shape[0]):
        inside = footprint_mask(params, t, hw)
        assert 0.01 < inside.float().mean() < 1
        assert torch.equal(out[t][~inside], frames[t][~inside])  # bit-exact outside the footprint
        assert psnr(out[t][inside], frames[t][inside]) >= min_psnr
    return params


def test_round_trip_astronaut():
    check_round_trip(astronaut()[None].expand(2, -1, -1, -1).contiguous(), ASTRONAUT_BOX)


def test_round_trip_1080p_landscape_and_invalid_frames_untouched():
    img = resize(astronaut(), (1080, 1080))
    frames = torch.zeros(3, 1080, 1920, 3)
    frames[:, :, 420:1500] = img
    box = ASTRONAUT_BOX * 1080 / 512 + torch.tensor([420.0, 0, 420, 0])
    check_round_trip(frames, box)
    valid = torch.tensor([True, False, True])
    _, _, _, out = round_trip(frames, box, valid=valid)
    assert torch.equal(out[1], frames[1])
    assert not torch.equal(out[0], frames[0])


def test_round_trip_portrait_phone_frame_with_face_near_the_edge():
    img = resize(astronaut(), (1080, 1080))
    frames = torch.full((2, 1920, 1080, 3), 0.2)
    frames[:, 400:1480] = img
    box = ASTRONAUT_BOX * 1080 / 512 + torch.tensor([0.0, 400, 0, 400])
    params = check_round_trip(frames, box)
    assert params.frame_hw == (1920, 1080)
    # a face cut by the left border: the crop reaches outside the frame and repeats the edge pixels there
    edge_box = torch.tensor([-40.0, 900, 160, 1100])
    track = static_track(edge_box, (1920, 1080), 2)
    params = crop_params(track, 256)
    crops = crop_faces(frames, params)
    x_left = params.crop_from_frame[0, 0, 2]  # crop x of the frame's left edge (no rotation, y unused)
    assert x_left > 10
    col = int(x_left) - 3
    u = torch.tensor([col + 0.5, 128.5], dtype=torch.float64)
    inv = params.frame_from_crop[0].double()
    py = float(inv[1, 0] * u[0] + inv[1, 1] * u[1] + inv[1, 2])
    assert torch.allclose(crops[0, 128, col], frames[0, int(py), 0], atol=0.02)
    out = paste_back(frames, crops, params, track.valid)
    inside = footprint_mask(params, 0, (1920, 1080))
    assert torch.equal(out[0][~inside], frames[0][~inside])
    assert psnr(out[0][inside], frames[0][inside]) > 40


@pytest.mark.parametrize("box_size", [80.0, 500.0])  # upsampled crop, and shrunk crop (prefiltered)
def test_crop_follows_the_pixel_centre_convention(box_size):
    """A linear ramp image is reproduced exactly by bilinear sampling: crop pixel (i, j) must equal the ramp at
    frame_from_crop(j + 0.5, i + 0.5)."""
    H, W = 600, 800
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    ramp = lambda x, y: 0.1 + 0.0007 * x + 0.0004 * y  # noqa: E731
    frame = torch.stack([ramp(xs, ys), ramp(xs, ys) * 0.5, 1 - ramp(xs, ys)], -1)[None]
    box = torch.tensor([400 - box_size / 2, 300 - box_size / 2, 400 + box_size / 2, 300 + box_size / 2])
    params = crop_params(static_track(box, (H, W), 1), 128, margin=0.05)
    crop = crop_faces(frame, params)[0]
    ci, cj = torch.meshgrid(torch.arange(128) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    m = params.frame_from_crop[0].double()
    px = m[0, 0] * cj + m[0, 1] * ci + m[0, 2]
    py = m[1, 0] * cj + m[1, 1] * ci + m[1, 2]
    inner = (slice(4, -4), slice(4, -4))  # the prefilter's edge taps see the clipped rectangle
    assert torch.allclose(crop[..., 0][inner].double(), ramp(px, py)[inner].double(), atol=2e-4)


def test_rotation_levels_the_eye_line():
    H, W = 400, 400
    box = torch.tensor([150.0, 150, 250, 250])
    angle = math.radians(20)
    c, d = torch.tensor([200.0, 190]), 30 * torch.tensor([math.cos(angle), math.sin(angle)])
    track = static_track(box, (H, W), 1, eyes=torch.stack([c - d, c + d]))
    for rotate in (False, True):
        params = crop_params(track, 256, rotate=rotate)
        m = params.crop_from_frame[0]
        e = track.eyes[0] @ m[:, :2].T + m[:, 2]
        dy = float(e[1, 1] - e[0, 1])
        assert (abs(dy) < 1e-3) == rotate
        # the eye midpoint, 10 px above the box centre, lands where the (rotated, scaled) offset says
        a = angle if rotate else 0.0
        off = params.scale[0] * torch.tensor([-10 * math.sin(a), -10 * math.cos(a)])
        assert torch.allclose(e.mean(0), 128 + off, atol=1e-3)
    # round trip through a rotated crop keeps pixels outside the (rotated) footprint bit-exact
    frames = resize(astronaut(), (H, W))[None]
    crops = crop_faces(frames, params)
    out = paste_back(frames, crops, params, track.valid)
    inside = footprint_mask(params, 0, (H, W))
    assert torch.equal(out[0][~inside], frames[0][~inside])
    assert psnr(out[0][inside], frames[0][inside]) > 35


def test_mouth_in_latent_matches_manual_computation():
    H, W, size, margin = 720, 1280, 512, 0.3
    box = torch.tensor([600.0, 200, 760, 380])  # 160 x 180
    track = static_track(box, (H, W), 3)
    params = crop_params(track, size, margin=margin)
    mouth, width = mouth_in_latent(track, params, (64, 64))
    # manual: square crop of side 180 * 1.6 centred on the box centre, mapped to 512 px, then to 64 latent cells
    side = 180 * (1 + 2 * margin)
    s = size / side
    mx, my = 680.0, 200 + 0.75 * 180
    exp_x, exp_y = ((mx - 680) * s + 256) * 64 / 512, ((my - 290) * s + 256) * 64 / 512
    assert torch.allclose(mouth, torch.tensor([exp_x, exp_y]).expand(3, 2), atol=1e-4)
    assert torch.allclose(width, torch.full((3,), 160 * s * 64 / 512), atol=1e-4)
    # crops resized to 256 before encoding, latents 32 x 32: the same relative position
    mouth2, width2 = mouth_in_latent(track, params, (32, 32), crop_size=256)
    assert torch.allclose(mouth2, mouth / 2, atol=1e-4) and torch.allclose(width2, width / 2, atol=1e-4)
    mc, wc = mouth_in_crop(track, params)
    assert torch.allclose(mc, mouth * 8, atol=1e-3) and torch.allclose(wc, torch.full((3,), 160 * s), atol=1e-3)


def test_feathered_mask_and_colour_match():
    H, W, size = 300, 300, 128
    box = torch.tensor([100.0, 100, 200, 200])
    track = static_track(box, (H, W), 1)
    params = crop_params(track, size, margin=0.25)  # crop covers frame [75, 225)
    frames = torch.zeros(1, H, W, 3)
    out = paste_back(frames, torch.ones(1, size, size, 3), params, track.valid, feather=0.1)[0, :, :, 0]
    assert torch.equal(out[150, :75], torch.zeros(75)) and torch.equal(out[150, 225:], torch.zeros(75))
    assert 0 < float(out[150, 75]) < 0.01 and float(out[150, 150]) == 1.0
    ramp = out[150, 75:100]
    assert (ramp[1:] >= ramp[:-1]).all() and 0.2 < float(ramp[7]) < 0.8
    # colour match: a crop with a global colour drift is pulled back to the original's statistics
    frames = resize(astronaut(), (H, W))[None]
    crops = crop_faces(frames, params)
    drift = crops * 0.8 + torch.tensor([0.1, 0.05, -0.02])
    inside = footprint_mask(params, 0, (H, W))
    plain = paste_back(frames, drift, params, track.valid)
    matched = paste_back(frames, drift, params, track.valid, color_match=True)
    unedited = paste_back(frames, crops, params, track.valid)
    ref = psnr(unedited[0][inside], frames[0][inside])  # what resampling alone costs
    assert psnr(plain[0][inside], frames[0][inside]) < ref - 5
    assert psnr(matched[0][inside], frames[0][inside]) > ref - 0.1  # an affine drift is undone exactly
    assert torch.equal(matched[0][~inside], frames[0][~inside])


def test_inplace_and_bad_shapes():
    frames = torch.rand(2, 64, 64, 3)
    track = static_track(torch.tensor([20.0, 20, 40, 40]), (64, 64), 2)
    params = crop_params(track, 32)
    crops = crop_faces(frames, params)
    copy = frames.clone()
    out = paste_back(copy, crops.flip(1), params, track.valid, inplace=True)
    assert out.data_ptr() == copy.data_ptr() and not torch.equal(copy, frames)
    with pytest.raises(InputError):
        crop_faces(frames[:1], params)
    with pytest.raises(InputError):
        paste_back(frames, crops[:, :16], params, track.valid)
    with pytest.raises(InputError):
        crop_faces(torch.rand(2, 32, 64, 3), params)


def test_round_trip_uint8_frames_converts_only_the_footprint():
    frames = (astronaut() * 255).round().to(torch.uint8)[None]
    track, params, crops, out = round_trip(frames, ASTRONAUT_BOX)
    assert crops.dtype == torch.float32 and 0 <= float(crops.min()) and float(crops.max()) <= 1
    assert out.dtype == torch.uint8
    inside = footprint_mask(params, 0, tuple(frames.shape[1:3]))
    assert torch.equal(out[0][~inside], frames[0][~inside])
    assert psnr(out[0][inside].float() / 255, frames[0][inside].float() / 255) >= 45.0
    float_crops = crop_faces(frames.float() / 255, params)
    assert (crops - float_crops).abs().max() < 1e-5


def test_keep_detail_pastes_an_unedited_crop_back_exactly_and_an_edit_in_full():
    """A coarse crop (64 px of a 300 px face) pasted back whole blurs the face; with keep_detail the frame keeps its
    own pixels where the crop is unchanged, and takes the generated pixels where the edit is strong."""
    from omnisync_core.face.crop import DETAIL_EDIT

    frames = astronaut()[None].float().contiguous()
    track = build_track([FrameFaces(ASTRONAUT_BOX[None], torch.ones(1), torch.zeros(1, 6, 2), None)], (512, 512))
    params = crop_params(track, size=64)
    crops = crop_faces(frames, params)
    inside = footprint_mask(params, 0, (512, 512))
    blurred = paste_back(frames, crops, params)
    kept = paste_back(frames, crops, params, keep_detail=True)
    assert psnr(blurred[0][inside], frames[0][inside]) < 35           # the coarse crop loses detail
    assert (kept - frames).abs().max() < 1e-5                         # unchanged crop: the frame itself
    edited = crops.clone()
    edited[0, 40:50, 20:44] = torch.tensor([1.0, 0.0, 0.0])           # a strong edit: a red bar
    out = paste_back(frames, edited, params, keep_detail=True)
    assert torch.allclose(paste_back(frames, edited, params, keep_detail=True, source_crops=crops), out, atol=1e-6)
    centre = params.frame_from_crop[0] @ torch.tensor([32.0, 45.0, 1.0])
    x, y = centre.round().long().tolist()
    assert torch.allclose(out[0, y, x], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)   # generated pixels win there
    far = params.frame_from_crop[0] @ torch.tensor([32.0, 12.0, 1.0])              # forehead, far from the edit
    x, y = far.round().long().tolist()
    assert torch.equal(out[0, y, x], frames[0, y, x])
    assert DETAIL_EDIT > 0
