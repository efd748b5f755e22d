"""CSIM: does the output keep the person's identity?

``CSIM = mean_t cos(f(a_t), f(s_t))``, f an ArcFace embedding (Deng et al., "ArcFace", CVPR 2019) of the face
aligned to the 112 x 112 ArcFace template, a_t the output frame and s_t the source frame it was made from, over
up to ``max_frames`` evenly spaced frames where both faces are found (the OmniSync paper, Table 1, reports CSIM
the same way with its own face model).

The embedding network is InsightFace's IResNet (arcface_torch ``backbones/iresnet.py``: r18/r34/r50/r100,
recognised from the key shapes), weights supplied by the user as safetensors with arcface_torch's key names (a
ComfyUI-style ``model.`` or a DataParallel ``module.`` prefix is stripped). Input: RGB, ``(x / 255 - 0.5) / 0.5``.
Alignment: the similarity transform (Umeyama 1991) taking the eyes, nose tip and mouth corners of Face Mesh to
InsightFace's five template points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..face.types import face_points, point_index
from ..model.loading import CheckpointError, CheckpointMismatchError, read_safetensors, validate_state_dict
from .faces import FaceSeries

# InsightFace's 112 x 112 template: right eye, left eye (subject's view), nose tip, right and left mouth corner
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]])
_POINTS = ("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left")
_WIDTHS = (64, 128, 256, 512)


class IBlock(nn.Module):
    """IResNet's residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """``[N, 3, 112, 112]`` -> ``[N, num_features]``; ``layers`` blocks per stage ([3, 4, 14, 3] is r50)."""

    def __init__(self, layers=(3, 4, 14, 3), num_features: int = 512):
        super().__init__()
        self.layers = tuple(layers)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (count, width) in enumerate(zip(layers, _WIDTHS)):
            setattr(self, f"layer{i + 1}", nn.Sequential(*[IBlock(cin if j == 0 else width, width, 2 if j == 0 else 1)
                                                          for j in range(count)]))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


def _strip(sd: dict) -> dict:
    for prefix in ("module.", "model.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def iresnet_layers(keys) -> tuple[int, ...]:
    """Blocks per stage read from the key names (``layer{s}.{j}.conv1.weight``)."""
    counts = []
    for s in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in keys if k.startswith(f"layer{s}.") and k.endswith("conv1.weight")}
        counts.append(max(blocks) + 1 if blocks else 0)
    return tuple(counts)


def load_arcface(path_or_state_dict, device="cpu") -> IResNet:
    """An :class:`IResNet` from a safetensors file (or a state dict); strict; raises one readable error."""
    if isinstance(path_or_state_dict, (str, Path)):
        sd, _ = read_safetensors(path_or_state_dict, device=device)
        what = Path(path_or_state_dict).name
    else:
        sd, what = dict(path_or_state_dict), "state dict"
    sd = _strip(sd)
    layers = iresnet_layers(sd)
    if "fc.weight" not in sd or 0 in layers:
        raise CheckpointError(f"{what} is not an ArcFace IResNet (no layer1..layer4 / fc keys).")
    features = int(sd["fc.weight"].shape[0])
    with torch.device("meta"):
        model = IResNet(layers, features)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = validate_state_dict(sd, expected, optional=tuple(k for k in expected if k.endswith("num_batches_tracked")))
    if not report.ok:
        raise CheckpointMismatchError(f"ArcFace IResNet{sum(layers) * 2 + 2} ({what})", report)
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().to(device)


def similarity_transform(src: Tensor, dst: Tensor) -> Tensor:
    """``[2, 3]`` least-squares similarity (rotation, uniform scale, translation) mapping ``src [K, 2]`` onto
    ``dst [K, 2]`` (Umeyama 1991)."""
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / src.shape[0]
    u, sig, vt = torch.linalg.svd(cov)
    d = torch.ones(2, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        d[1] = -1
    rot = u @ torch.diag(d) @ vt
    scale = (sig * d).sum() / a.square().sum(1).mean()
    m = torch.cat([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]], 1)
    return m.float()


def align_faces(frames: Tensor, landmarks: Tensor, size: int = 112) -> Tensor:
    """ArcFace inputs ``[N, 3, 112, 112]`` (normalised to -1..1) from RGB ``frames [N, H, W, 3]`` and their Face
    Mesh ``landmarks [N, 468, 2]``."""
    img = frames.float() / (255.0 if not frames.is_floating_point() else 1.0)
    pts = face_points(landmarks)[:, [point_index(n) for n in _POINTS]]
    template = ARCFACE_TEMPLATE * (size / 112.0)
    h, w = img.shape[1:3]
    thetas = []
    for p in pts:
        m = similarity_transform(template, p)            # template (crop) pixels -> frame pixels
        # normalised crop coords -> normalised frame coords (align_corners=False)
        to_px = torch.tensor([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]])
        to_norm = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
        full = to_norm @ torch.cat([m, torch.tensor([[0.0, 0, 1]])]) @ to_px
        thetas.append(full[:2])
    grid = F.affine_grid(torch.stack(thetas), [len(thetas), 3, size, size], align_corners=False)
    crops = F.grid_sample(img.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (crops - 0.5) / 0.5


@torch.no_grad()
def csim(model: IResNet, a: Tensor, b: Tensor, faces_a: FaceSeries, faces_b: FaceSeries,
         max_frames: int = 32, device=None) -> tuple[float, int]:
    """(mean cosine similarity, frames used) between the identity embeddings of ``a`` and ``b`` frame by frame."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = min(a.shape[0], b.shape[0], len(faces_a), len(faces_b))
    both = (faces_a.found[:n] & faces_b.found[:n]).nonzero()[:, 0]
    if both.numel() == 0:
        return float("nan"), 0
    pick = both[torch.linspace(0, both.numel() - 1, min(max_frames, both.numel())).round().long()]
    ea = model(align_faces(a[pick], faces_a.landmarks[pick]).to(device)).float()
    eb = model(align_faces(b[pick], faces_b.landmarks[pick]).to(device)).float()
    return float(F.cosine_similarity(ea, eb, dim=-1).mean()), int(pick.numel())


def arcface_or_none(path: Optional[str], device="cpu"):
    return load_arcface(path, device) if path else None
