"""BlazeFace face detectors (MediaPipe short range 128x128 and full range 192x192) in plain PyTorch.

The networks are the MediaPipe models converted by ``tools/convert_mediapipe.py``: each weights file holds the
fp16 weights plus a static op list (conv / depthwise conv with explicit pads and fused activation, add, PReLU,
max-pool, pad, reshape, concat, resize, depth-to-space). :class:`TFLiteNet` builds one small module per op at
load time and replays the list in order on NCHW (channels-last) tensors; there is no graph interpretation
beyond that loop, and no dependency on mediapipe or tflite at run time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import OmniSyncError

WEIGHTS_DIR = Path(__file__).parent / "weights"


class FaceModelError(OmniSyncError):
    """A face model weights file is missing or unreadable."""


def _act(x: Tensor, act: str | None) -> Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "relu6":
        return F.relu6(x)
    return x


class _Conv(nn.Module):
    def __init__(self, spec: dict, w_shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(w_shape), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(w_shape[0]), requires_grad=False)
        t, b, l, r = spec["pads"]
        self.sym = (t == b and l == r)
        self.padding = (t, l) if self.sym else (0, 0)
        self.pads = (l, r, t, b)
        self.stride, self.groups, self.act = tuple(spec["stride"]), spec["groups"], spec["act"]
        self.pointwise = w_shape[2:] == (1, 1) and self.stride == (1, 1) and self.groups == 1 and not any(spec["pads"])

    def forward(self, x: Tensor) -> Tensor:
        if self.pointwise and x.is_contiguous(memory_format=torch.channels_last):
            # a 1x1 conv on channels-last data is one GEMM on the NHWC view (no layout copies)
            y = F.linear(x.permute(0, 2, 3, 1), self.weight[:, :, 0, 0], self.bias).permute(0, 3, 1, 2)
            return y.relu_() if self.act == "relu" else _act(y, self.act)
        if not self.sym:
            x = F.pad(x, self.pads)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return y.relu_() if self.act == "relu" else _act(y, self.act)


class _PReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x, self.alpha)


class TFLiteNet(nn.Module):
    """Replays a converted TFLite op list. Input ``[B, 3, H, W]`` float; returns the graph outputs
    (4-D outputs as NCHW, others in TFLite's layout with the batch axis first)."""

    def __init__(self, graph: dict, shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.graph = graph
        mods = []
        for k, op in enumerate(graph["ops"]):
            if op["type"] == "conv":
                mods.append(_Conv(op, shapes[f"ops.{k}.weight"]))
            elif op["type"] == "prelu":
                mods.append(_PReLU(shapes[f"ops.{k}.alpha"][0]))
            else:
                mods.append(nn.Identity())
        self.ops = nn.ModuleList(mods)
        # free each intermediate after its last use
        last: dict[int, int] = {}
        for k, op in enumerate(graph["ops"]):
            for i in op["inputs"]:
                last[i] = k
        keep = set(graph["outputs"])
        self._drop = [[i for i in op["inputs"] if last[i] == k and i not in keep] for k, op in enumerate(graph["ops"])]
        # an ADD may write into its second input when that is a fresh tensor (not a view) used nowhere else
        fresh = {op["out"] for op in graph["ops"] if op["type"] not in ("reshape", "depth_to_space")}
        self._owned = [op["type"] == "add" and op["inputs"][1] in fresh and op["inputs"][1] in self._drop[k]
                       for k, op in enumerate(graph["ops"])]

    @classmethod
    def load(cls, path: Path | str, device=None, dtype=torch.float32) -> "TFLiteNet":
        path = Path(path)
        if not path.is_file():
            raise FaceModelError(f"Face model weights not found: {path}.")
        with safe_open(str(path), framework="pt") as f:
            graph = json.loads(f.metadata()["graph"])
            sd = {k: f.get_tensor(k) for k in f.keys()}
        net = cls(graph, {k: tuple(v.shape) for k, v in sd.items()})
        net.load_state_dict({k: v.float() for k, v in sd.items()})
        return net.to(device=device, dtype=dtype).eval()

    def _add(self, a: list[Tensor], op: dict, k: int) -> Tensor:
        x, y = a
        owned = self._owned[k]
        c0 = op.get("channel_offset")
        if c0 is None:
            y = y.add_(x) if owned else x + y
        else:  # x zero-padded on channels, added to y
            y = y if owned else y.clone()
            y[:, c0:c0 + x.shape[1]] += x
        if op["act"] == "relu":
            return y.relu_()
        return _act(y, op["act"])

    @staticmethod
    def _nchw_axis(axis: int, rank: int) -> int:
        axis %= rank
        return {0: 0, 1: 2, 2: 3, 3: 1}[axis] if rank == 4 else axis

    def forward(self, x: Tensor) -> list[Tensor]:
        env = {self.graph["input"]: x}
        for k, (op, mod) in enumerate(zip(self.graph["ops"], self.ops)):
            t, a = op["type"], [env[i] for i in op["inputs"]]
            if t in ("conv", "prelu"):
                y = mod(a[0])
            elif t == "act":
                y = _act(a[0], op["act"])
            elif t == "add":
                y = self._add(a, op, k)
            elif t == "pad":  # NHWC pads [t, b, l, r, c0, c1] -> F.pad order (last dim first)
                pt, pb, pl, pr, c0, c1 = op["pads"]
                y = F.pad(a[0], (pl, pr, pt, pb, c0, c1))
            elif t == "maxpool":
                pt, pb, pl, pr = op["pads"]
                z = F.pad(a[0], (pl, pr, pt, pb), value=-math.inf) if any(op["pads"]) else a[0]
                y = _act(F.max_pool2d(z, op["kernel"], op["stride"]), op["act"])
            elif t == "reshape":
                z = a[0].permute(0, 2, 3, 1) if a[0].ndim == 4 else a[0]
                y = z.reshape(-1, *op["shape"][1:])
                if y.ndim == 4:
                    y = y.permute(0, 3, 1, 2)
            elif t == "concat":
                y = torch.cat(a, self._nchw_axis(op["axis"], op["rank"]))
            elif t == "resize":
                y = _resize_bilinear(a[0], op["size"], op["align_corners"], op["half_pixel"])
            elif t == "depth_to_space":  # TF DCR order: channel index = (i * bs + j) * C + c
                bsz = op["block"]
                b, c, h, w = a[0].shape
                y = a[0].reshape(b, bsz, bsz, c // bsz**2, h, w).permute(0, 3, 4, 1, 5, 2)
                y = y.reshape(b, c // bsz**2, h * bsz, w * bsz)
            else:
                raise FaceModelError(f"Unknown op type {t!r} in a face model file.")
            env[op["out"]] = y
            for i in self._drop[k]:
                del env[i]
        return [env[i] for i in self.graph["outputs"]]


def _resize_bilinear(x: Tensor, size: list[int], align_corners: bool, half_pixel: bool) -> Tensor:
    if align_corners or half_pixel:
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
    # legacy TF: src = dst * in / out, clamped at the far edge
    h, w = x.shape[-2:]
    ys = torch.arange(size[0], device=x.device, dtype=x.dtype) * (h / size[0])
    xs = torch.arange(size[1], device=x.device, dtype=x.dtype) * (w / size[1])
    y0, x0 = ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    fy, fx = (ys - y0).view(-1, 1), (xs - x0).view(1, -1)
    top = x[..., y0, :][..., x0] * (1 - fx) + x[..., y0, :][..., x1] * fx
    bot = x[..., y1, :][..., x0] * (1 - fx) + x[..., y1, :][..., x1] * fx
    return top * (1 - fy) + bot * fy


# ---------------------------------------------------------------------------------------------------- anchors


@dataclass(frozen=True)
class DetectorConfig:
    """MediaPipe's FaceDetection options for one model (face_detection_{short,full}_range.pbtxt)."""

    file: str
    size: int
    strides: tuple[int, ...]
    interpolated_scale_aspect_ratio: float
    min_score: float


CONFIGS = {
    "short": DetectorConfig("blazeface_short.safetensors", 128, (8, 16, 16, 16), 1.0, 0.5),
    "full": DetectorConfig("blazeface_full.safetensors", 192, (4,), 0.0, 0.6),
}


def ssd_anchors(size: int, strides: tuple[int, ...], interpolated_scale_aspect_ratio: float) -> Tensor:
    """Anchor centres ``[N, 2]`` (x, y, normalised) as MediaPipe's SsdAnchorsCalculator with fixed anchor size
    and aspect ratio 1: consecutive layers with equal stride share one grid, each layer adds one anchor per cell
    plus one more when ``interpolated_scale_aspect_ratio > 0``."""
    per_cell = 1 + (interpolated_scale_aspect_ratio > 0)
    out, i = [], 0
    while i < len(strides):
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
        n = math.ceil(size / strides[i])
        c = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        grid = torch.stack([xx, yy], -1).reshape(-1, 1, 2).expand(-1, per_cell * (j - i), 2)
        out.append(grid.reshape(-1, 2))
        i = j
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------- decoding


def decode(raw_boxes: Tensor, raw_scores: Tensor, anchors: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """MediaPipe TensorsToDetections (reverse_output_order, fixed anchor size, sigmoid score clipped at 100).
    raw_boxes ``[B, N, 16]``, raw_scores ``[B, N, 1]`` -> boxes ``[B, N, 4]`` (x0, y0, x1, y1), keypoints
    ``[B, N, 6, 2]`` (normalised to the model input) and scores ``[B, N]``."""
    r = raw_boxes / size
    centre = anchors + r[..., 0:2]
    half = r[..., 2:4] / 2
    boxes = torch.cat([centre - half, centre + half], -1)
    kps = anchors[:, None, :] + r[..., 4:16].unflatten(-1, (6, 2))
    scores = raw_scores[..., 0].clamp(-100, 100).sigmoid()
    return boxes, kps, scores


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``[N, 4]`` with ``[M, 4]`` -> ``[N, M]``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def weighted_nms(boxes: Tensor, kps: Tensor, scores: Tensor, threshold: float = 0.3):
    """MediaPipe's WEIGHTED non-max suppression: take the best remaining detection, average the boxes and
    keypoints of every remaining detection overlapping it by IoU > threshold (weights = scores), keep the best
    score. Inputs of one frame: ``[N, 4]``, ``[N, K, 2]``, ``[N]``, already filtered by score."""
    order = scores.argsort(descending=True, stable=True)
    boxes, kps, scores = boxes[order], kps[order], scores[order]
    iou = box_iou(boxes, boxes)
    alive = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
    out_b, out_k, out_s = [], [], []
    for i in range(len(scores)):
        if not alive[i]:
            continue
        group = alive & (iou[i] > threshold)
        group[i] = True
        w = scores * group
        out_b.append((boxes * w[:, None]).sum(0) / w.sum())
        out_k.append((kps * w[:, None, None]).sum(0) / w.sum())
        out_s.append(scores[i])
        alive &= ~group
    if not out_s:
        return boxes[:0], kps[:0], scores[:0]
    return torch.stack(out_b), torch.stack(out_k), torch.stack(out_s)
