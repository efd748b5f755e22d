"""MediaPipe Face Mesh (192x192 crop -> 468 3-D landmarks + face presence) in plain PyTorch.

Weights and op list come from ``face_landmark.tflite`` via ``tools/convert_mediapipe.py`` and are replayed by
:class:`~.blazeface.TFLiteNet`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .blazeface import WEIGHTS_DIR, TFLiteNet

MESH_SIZE = 192
NUM_LANDMARKS = 468


class FaceMesh(nn.Module):
    """``forward(x [B, 3, 192, 192] RGB in 0..1)`` -> landmarks ``[B, 468, 3]`` in crop pixels (x, y, and z in
    the same scale as x) and face presence probability ``[B]``."""

    def __init__(self, net: TFLiteNet):
        super().__init__()
        self.net = net

    @classmethod
    def load(cls, path: Path | str | None = None, device=None) -> "FaceMesh":
        return cls(TFLiteNet.load(path or WEIGHTS_DIR / "facemesh.safetensors", device))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        points, flag = self.net(x.contiguous(memory_format=torch.channels_last))
        return points.reshape(-1, NUM_LANDMARKS, 3), flag.reshape(-1).sigmoid()
