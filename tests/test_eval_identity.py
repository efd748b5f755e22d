"""CSIM's parts (omnisync_core/eval/identity.py): the IResNet read from its keys, the ArcFace alignment and the
cosine similarity, on a tiny random IResNet (no face-recognition weights are available offline)."""

import pytest
import torch

from omnisync_core.eval.faces import FaceSeries
from omnisync_core.eval.identity import (ARCFACE_TEMPLATE, IResNet, align_faces, csim, iresnet_layers,
                                         load_arcface, similarity_transform)
from omnisync_core.face.types import FACE_POINTS
from omnisync_core.model.loading import CheckpointMismatchError

NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left")


def tiny_arcface(seed: int = 0) -> IResNet:
    torch.manual_seed(seed)
    model = IResNet(layers=(1, 1, 1, 1), num_features=32)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_var, 0.5, 1.5)
            torch.nn.init.normal_(m.running_mean, std=0.1)
    return model.eval()


def mesh_at(points5: torch.Tensor) -> torch.Tensor:
    """A 468-point mesh whose named points (eyes, nose tip, mouth corners) sit exactly at ``points5 [5, 2]``."""
    lm = torch.zeros(468, 2)
    for name, p in zip(NAMES, points5):
        lm[list(FACE_POINTS[name])] = p
    return lm


def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = 0.3, 1.7, torch.tensor([5.0, -2.0])
    rot = torch.tensor([[torch.cos(torch.tensor(angle)), -torch.sin(torch.tensor(angle))],
                        [torch.sin(torch.tensor(angle)), torch.cos(torch.tensor(angle))]])
    dst = ARCFACE_TEMPLATE @ (scale * rot).T + shift
    m = similarity_transform(ARCFACE_TEMPLATE, dst)
    torch.testing.assert_close(m[:, :2], scale * rot, rtol=0, atol=1e-5)
    torch.testing.assert_close(m[:, 2], shift, rtol=0, atol=1e-4)


def test_alignment_of_a_face_already_on_the_template_is_the_identity():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 112, 112, 3, generator=g)
    crop = align_faces(image, mesh_at(ARCFACE_TEMPLATE)[None])
    torch.testing.assert_close(crop[0], (image[0].permute(2, 0, 1) - 0.5) / 0.5, rtol=0, atol=1e-4)
    # the same face twice as large at an offset in a bigger frame lands on the same crop
    big = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), scale_factor=2, mode="nearest")
    frame = torch.zeros(1, 3, 300, 300)
    frame[:, :, 40:264, 60:284] = big
    crop2 = align_faces(frame.permute(0, 2, 3, 1), mesh_at(ARCFACE_TEMPLATE * 2 + torch.tensor([60.0, 40.0]))[None])
    assert (crop2 - crop).abs().mean() < 0.05        # nearest-upsampled then bilinear-sampled back: close, not equal


def test_csim_is_one_for_the_same_face_and_lower_for_another(tmp_path):
    model = tiny_arcface()
    from safetensors.torch import save_file

    path = tmp_path / "arcface.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()
               if not k.endswith("num_batches_tracked")}, str(path))
    loaded = load_arcface(path)
    assert iresnet_layers(loaded.state_dict()) == (1, 1, 1, 1) and loaded.fc.out_features == 32
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(3, 112, 112, 3, generator=g) * 255).to(torch.uint8)
    b = (torch.rand(3, 112, 112, 3, generator=g) * 255).to(torch.uint8)
    faces = FaceSeries.from_landmarks(mesh_at(ARCFACE_TEMPLATE).expand(3, -1, -1).clone())
    same, used = csim(loaded, a, a.clone(), faces, faces)
    assert used == 3 and same == pytest.approx(1.0, abs=1e-5)
    other, _ = csim(loaded, a, b, faces, faces)
    assert other < same - 1e-3
    none = FaceSeries.from_landmarks(torch.full((3, 468, 2), float("nan")))
    assert csim(loaded, a, b, faces, none)[1] == 0


def test_wrong_arcface_weights_fail_with_one_readable_error():
    sd = tiny_arcface().state_dict()
    sd["fc.weight"] = torch.zeros(32, 100)
    with pytest.raises(CheckpointMismatchError, match="fc.weight"):
        load_arcface(sd)
