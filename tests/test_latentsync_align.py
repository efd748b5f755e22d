"""LatentSync crop geometry and mouth mask: upstream's 3-point similarity with its EMA bias (fixture from
AlignRestore.transformation_from_points), the MediaPipe point groups of LatentSync 1.5, the squashed 420x560 -> 512
crop checked pixel-wise against OpenCV, the shipped mask, and the feathered mouth-only composite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnisync_core.errors import InputError
from omnisync_core.face.crop import crop_faces
from omnisync_core.face.latentsync_align import (
    LEFT_BROW, NOSE, RIGHT_BROW, latent_mask, latentsync_affines, latentsync_crop_params, latentsync_mask,
    latentsync_points, latentsync_template, mouth_blend_weight, paste_mouth,
)

FIX = Path(__file__).parent / "fixtures" / "latentsync"


@pytest.fixture(scope="module")
def io():
    return load_file(FIX / "align_io.safetensors")


def test_mediapipe_groups_are_latentsync_1_5s(io):
    lm68 = io["mp_landmark_points_68"].tolist()
    assert (list(LEFT_BROW), list(RIGHT_BROW), list(NOSE)) == (lm68[17:22], lm68[22:27], lm68[27:36])


@pytest.mark.parametrize("res", [512, 256])
def test_affines_match_upstream(io, res):
    tmpl, size = latentsync_template(res)
    torch.testing.assert_close(tmpl, io[f"template_{res}"].double())
    assert size == tuple(io[f"face_size_{res}"].tolist()) == ((420, 560) if res == 512 else (210, 280))
    pts = io["points"]
    m, bias = latentsync_affines(pts, res, fp16_matrix=False)
    # the same float32 arithmetic as upstream (one SVD per frame): equal to float32 rounding
    torch.testing.assert_close(m, io[f"M_{res}"].double(), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(bias, io[f"bias_{res}"][-1], atol=1e-6, rtol=0)
    mh, _ = latentsync_affines(pts, res)
    assert torch.equal(mh, io[f"M_{res}"].half().double())   # what upstream's fp16 warp receives
    m0, none = latentsync_affines(pts[:1], res, smooth=False, fp16_matrix=False)
    torch.testing.assert_close(m0[0], io[f"M_nosmooth_{res}"].double(), atol=1e-4, rtol=1e-6)
    assert none is None
    # the smoothing state carries across calls exactly as over the whole sequence
    a, b = latentsync_affines(pts[:3], res, fp16_matrix=False)
    c, _ = latentsync_affines(pts[3:], res, bias=b, fp16_matrix=False)
    assert torch.equal(torch.cat([a, c]), m)


def _landmarks_for(points: torch.Tensor) -> torch.Tensor:
    """Face Mesh points (our convention) whose three groups average to ``points`` (OpenCV convention)."""
    lm = torch.zeros(points.shape[0], 468, 3, dtype=torch.float64)
    for g, p in zip((LEFT_BROW, RIGHT_BROW, NOSE), points.unbind(1)):
        offsets = torch.linspace(-3, 3, len(g), dtype=torch.float64)
        lm[:, list(g), 0] = p[:, None, 0] + 0.5 + offsets
        lm[:, list(g), 1] = p[:, None, 1] + 0.5 - offsets
    return lm


def test_points_from_face_mesh(io):
    pts = io["points"]
    assert torch.equal(latentsync_points(_landmarks_for(pts)), pts)
    with pytest.raises(InputError):
        latentsync_points(torch.zeros(2, 68, 2))


def test_crop_geometry_matches_opencv(io):
    """Our one bilinear warp to 512x512 against upstream's pipeline done with OpenCV (warp to 420x560 with the fp16
    matrix, Lanczos to 512): on a smooth image they agree to resampling error; half a pixel off would be 10x more."""
    cv2 = pytest.importorskip("cv2")
    H, W = 720, 960
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    frame = torch.stack([0.5 + 0.25 * torch.sin(x / 9 + k) * torch.cos(y / 11) + 0.2 * torch.sin((x + y) / 23)
                         for k in range(3)], -1).float()
    pts = io["points"][:2]
    params = latentsync_crop_params(_landmarks_for(pts), frame_hw=(H, W))
    ours = crop_faces(frame[None].expand(2, H, W, 3).contiguous(), params)
    m, _ = latentsync_affines(pts)
    for t in range(2):
        warped = cv2.warpAffine(frame.numpy(), m[t].numpy(), (420, 560), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE)
        ref = torch.from_numpy(cv2.resize(warped, (512, 512), interpolation=cv2.INTER_LANCZOS4))
        err = (ours[t] - ref).abs().mean()
        shifted = torch.from_numpy(cv2.resize(cv2.warpAffine(frame.numpy(), (m[t] + torch.tensor(
            [[0, 0, 0.5], [0, 0, 0.5]], dtype=torch.float64)).numpy(), (420, 560), flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE), (512, 512), interpolation=cv2.INTER_LANCZOS4))
        assert err < 2e-3
        assert (ours[t] - shifted).abs().mean() > 10 * err


def test_mask_is_upstreams():
    m512, m256 = latentsync_mask(512), latentsync_mask(256)
    assert m512.shape == (512, 512) and set(m256.unique().tolist()) == {0.0, 1.0}
    assert abs((m256 == 0).float().mean().item() - 0.407) < 0.005      # ~40.7 % of the crop is redrawn
    assert m512[:100].min() == 1 and m512[300, 256] == 0               # forehead kept, mouth redrawn
    cv2 = pytest.importorskip("cv2")
    import numpy as np
    u8 = (m256 * 255).to(torch.uint8).numpy()
    ref = cv2.resize(np.repeat(u8[..., None], 3, -1), (512, 512), interpolation=cv2.INTER_LANCZOS4)[..., 0] / 255.0
    assert torch.equal(latentsync_mask(512, dtype=torch.float64), torch.from_numpy(ref))
    lat = latent_mask(m512, (64, 64))
    assert torch.equal(lat, m512[::8, ::8])
    assert latentsync_mask(128).shape == (128, 128)


def test_mouth_paste():
    mask = latentsync_mask(512)
    g = torch.Generator().manual_seed(0)
    gen, src = torch.rand(2, 512, 512, 3, generator=g), torch.rand(2, 512, 512, 3, generator=g)
    hard = paste_mouth(gen, src, mask, feather=0)
    m = mask[None, :, :, None]
    torch.testing.assert_close(hard, gen * (1 - m) + src * m, atol=1e-6, rtol=0)   # upstream's composite
    soft = paste_mouth(gen, src, mask, feather=8)
    keep = mask == 1
    assert torch.equal(soft[:, keep], src[:, keep])                   # outside the mouth region: bit-exact source
    w = mouth_blend_weight(mask, 8)
    assert w.min() == 0 and w.max() > 0.999 and (w[keep] == 0).all()
    inner = w > 0.999
    torch.testing.assert_close(soft[:, inner], gen[:, inner], atol=2e-3, rtol=0)
    with pytest.raises(InputError):
        paste_mouth(gen[:, :256], src, mask)
