"""LMD, the mouth landmark distance to the ground truth (Chen et al., "Lip Movements Generation at a Glance",
ECCV 2018; used by Wav2Lip, LatentSync and the OmniSync paper, Table 1).

``LMD = mean_t mean_k || p_{t,k} - q_{t,k} ||_2 * (256 / w_t)`` over the 40 Face Mesh lip points k of each
frame t where both faces are found, p from the output and q from the ground truth, ``w_t`` the ground truth's
face width: pixels of a face 256 px wide, so the number does not depend on the video's resolution (the papers
measure on their own crop sizes, so only our numbers compare with each other). ``centered=True`` first removes
each frame's mean lip position (shape only, no drift).
"""

from __future__ import annotations

import torch

from .faces import LIPS, FaceSeries

FACE_SCALE = 256.0


def lmd(output: FaceSeries, truth: FaceSeries, centered: bool = False) -> float:
    """Mean lip-landmark distance in 256-px-face pixels over the frames both found (NaN if none)."""
    n = min(len(output), len(truth))
    both = output.found[:n] & truth.found[:n]
    if not bool(both.any()):
        return float("nan")
    p = output.landmarks[:n][both][:, list(LIPS)]
    q = truth.landmarks[:n][both][:, list(LIPS)]
    if centered:
        p, q = p - p.mean(1, keepdim=True), q - q.mean(1, keepdim=True)
    scale = FACE_SCALE / truth.face_width[:n][both].clamp_min(1e-6)
    return float(((p - q).norm(dim=-1) * scale[:, None]).mean())
