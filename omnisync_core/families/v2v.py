"""Video-to-video for models trained as generators (HuMo, InfiniteTalk), shared by their families:

* :func:`time_map`: a window at the source's rate <-> the frames the model sees at its trained rate (nearest
  frame in time both ways), so the output keeps the input's exact fps and frame count;
* :func:`lower_face_mask`: the editable region of each latent frame, the lower face (nose tip to chin, jaw to jaw)
  from our Face Mesh points, dilated by a fraction of the face width;
* :class:`SourceReinjection`: after every sampling step, the source noised to the step's sigma is put back outside
  that mask, so nothing outside the mouth region can drift (``sampling.sample(..., project=...)``);
* :func:`window_mask`, :func:`audio_weight`, :func:`place_stage`, :class:`V2VGenerator`: what those families'
  window generators share (the mask and per-latent mouths of a window at the model's rate, the guidance weight on
  the audio term, model offload between stages, decoding back to the window's own frames).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from torch import Tensor

from ..face.types import point_index
from ..generator import latent_groups

DEFAULT_MASK_DILATION = 0.15
MASK_DILATION_TOOLTIP = ("How far past the lower face (nose tip to chin, jaw to jaw) the model may change the "
                         "picture, as a fraction of the face width. Outside it the source is put back at every "
                         "step, so the background, eyes and hair cannot drift. Larger: more room for a wide-open "
                         "mouth and the jaw; smaller: more of the frame kept exactly.")


def _nearest(x: Fraction) -> int:
    return int((x + Fraction(1, 2)) // 1)


@dataclass(frozen=True)
class TimeMap:
    """``source [m]``: for each model frame, the window frame nearest in time; ``back [n]``: for each window
    frame, the model frame nearest in time. Identity when the rates are equal."""

    source: Tensor
    back: Tensor

    @property
    def model_frames(self) -> int:
        return int(self.source.shape[0])

    def to_model(self, t: Tensor) -> Tensor:
        """Per-window-frame values ``[n, ...]`` -> per-model-frame ``[m, ...]``."""
        return t[self.source.to(t.device)]

    def to_window(self, t: Tensor) -> Tensor:
        """Per-model-frame values ``[m, ...]`` -> per-window-frame ``[n, ...]``."""
        return t[self.back.to(t.device)]


def time_map(num_frames: int, fps, trained_fps) -> TimeMap:
    """The map between a window of ``num_frames`` at ``fps`` and the model's frames at ``trained_fps`` over the
    same span (the first frames coincide; ``floor((n - 1) * trained / fps) + 1`` model frames)."""
    n = int(num_frames)
    if trained_fps is None or fps is None or Fraction(fps) == Fraction(trained_fps):
        same = torch.arange(n)
        return TimeMap(same, same)
    ratio = Fraction(trained_fps) / Fraction(fps)
    m = int((n - 1) * ratio) + 1
    source = torch.tensor([min(_nearest(j / ratio), n - 1) for j in range(m)], dtype=torch.long)
    back = torch.tensor([min(_nearest(i * ratio), m - 1) for i in range(n)], dtype=torch.long)
    return TimeMap(source, back)


def model_frame0(first_frame: int, fps, trained_fps) -> int:
    """The model-rate frame at the time of output frame ``first_frame`` (where a window's audio starts)."""
    if trained_fps is None or fps is None:
        return int(first_frame)
    return _nearest(Fraction(int(first_frame)) * Fraction(trained_fps) / Fraction(fps))


def _ellipses(points: Optional[Tensor], mouth_xy: Tensor, face_width: Tensor, dilation: float
              ) -> tuple[Tensor, Tensor]:
    """Per frame the lower-face ellipse's centre ``[n, 2]`` and semi-axes ``[n, 2]`` in crop pixels."""
    pad = dilation * face_width.float()
    if points is not None:
        def p(name):
            return points[:, point_index(name)].float()

        x0 = torch.minimum(p("right_jaw")[:, 0], p("left_jaw")[:, 0])
        x1 = torch.maximum(p("right_jaw")[:, 0], p("left_jaw")[:, 0])
        y0, y1 = p("nose_tip")[:, 1], p("chin")[:, 1]
        lo = torch.stack([x0 - pad, y0 - pad], 1)
        hi = torch.stack([x1 + pad, y1 + pad], 1)
        if bool(torch.isfinite(lo).all() and torch.isfinite(hi).all() and (hi > lo).all()):
            return (lo + hi) / 2, (hi - lo) / 2
    half = torch.stack([0.35 * face_width.float(), 0.3 * face_width.float()], 1)
    centre = mouth_xy.float() + torch.stack([torch.zeros_like(pad), 0.05 * face_width.float()], 1)
    return centre, half + pad.unsqueeze(1)


def lower_face_mask(mouth_xy: Tensor, face_width: Tensor, crop_size: int, latent_hw: tuple[int, int],
                    points: Optional[Tensor] = None, dilation: float = DEFAULT_MASK_DILATION, temporal: int = 4
                    ) -> Tensor:
    """The editable region ``[F, h, w]`` (1 inside, 0 outside) of each latent frame of a window of ``n`` video
    frames: the union over its video frames of the lower-face ellipse, rasterised at the latent cells' centres.
    ``mouth_xy [n, 2]``, ``face_width [n]`` and ``points [n, K, 2]`` (:data:`~omnisync_core.face.types.FACE_POINTS`,
    or None: an ellipse around the mouth instead) are in crop pixels of a ``crop_size`` square."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    centre, half = _ellipses(points, mouth_xy, face_width, float(dilation))
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * (crop_size / h)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * (crop_size / w)
    dx = (xs.view(1, 1, w) - centre[:, 0].view(-1, 1, 1)) / half[:, 0].clamp_min(1e-3).view(-1, 1, 1)
    dy = (ys.view(1, h, 1) - centre[:, 1].view(-1, 1, 1)) / half[:, 1].clamp_min(1e-3).view(-1, 1, 1)
    inside = (dx * dx + dy * dy) <= 1.0
    groups = latent_groups(inside.shape[0], temporal)
    frames = int(groups[-1]) + 1
    return torch.stack([inside[groups == f].any(0) for f in range(frames)]).float()


class SourceReinjection:
    """``project(x, sigma)`` for :func:`omnisync_core.sampling.sample`: inside ``mask`` the sampled latent,
    outside it the source at that noise level, ``(1 - sigma) * z_src + sigma * noise`` (the same noise the
    progressive init used, so outside the mask the latent equals the noised source at every step).
    ``z_src`` / ``noise`` ``[B, C, F, h, w]``; ``mask [F, h, w]`` (1 = editable)."""

    def __init__(self, z_src: Tensor, noise: Tensor, mask: Tensor):
        self.z_src, self.noise = z_src, noise
        self.keep = (mask > 0.5).to(z_src.device).view(1, 1, *mask.shape)

    def noised_source(self, sigma: float) -> Tensor:
        return (1.0 - sigma) * self.z_src + sigma * self.noise

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        return torch.where(self.keep, x, self.noised_source(float(sigma)).to(x.dtype))


def window_mask(window, tm: TimeMap, latent_hw, frames: int, dilation: float, temporal: int = 4
                ) -> tuple[Tensor, Tensor, Tensor]:
    """For a window (:class:`~omnisync_core.job.WindowInput`) seen at the model's rate through ``tm`` and padded
    to ``frames`` (4k + 1): the editable lower-face mask ``[F, h, w]`` (:func:`lower_face_mask`) and the
    per-latent-frame mouth ``[F, 2]`` and face width ``[F]`` in latent cells (for DS-CFG)."""
    from ..generator import latent_mouths, pad_frames

    size = window.crops.shape[1]
    tail = frames - tm.model_frames
    mouth = pad_frames(tm.to_model(window.mouth_xy), tail)
    width = pad_frames(tm.to_model(window.face_width), tail)
    points = pad_frames(tm.to_model(window.points), tail) if window.points is not None else None
    mask = lower_face_mask(mouth, width, size, latent_hw, points, float(dilation), temporal)
    lm, lw = latent_mouths(mouth, width, size, latent_hw, temporal)
    return mask, lm, lw


def audio_weight(options, mouth: Tensor, width: Tensor, latent_hw, device):
    """``weight(sigma)`` on the audio guidance term for ``options.guidance``: "ds-cfg" DS-CFG's spatio-temporal map
    peaking at ``options.audio_scale`` at the mouth (:class:`~omnisync_core.sampling.DSCFGGuidance`, per latent
    frame ``mouth [F, 2]`` / ``width [F]`` in latent cells), "cfg" the audio scale everywhere, "none" 1."""
    from ..sampling import DSCFGGuidance, DSCFGParams

    if options.guidance == "none":
        return lambda sigma: 1.0
    if options.guidance == "cfg":
        return lambda sigma: float(options.audio_scale)
    params = DSCFGParams(omega_peak=float(options.audio_scale))
    return DSCFGGuidance(mouth.unsqueeze(0).to(device), width.unsqueeze(0), latent_hw, float(options.tau), params)


def place_stage(parts: dict, wanted, plan) -> None:
    """With ``plan.offload == "model"``: the modules named in ``wanted`` on ``plan.device``, the other ``parts``
    (name -> module) in host memory; otherwise nothing moves."""
    if plan.offload != "model":
        return
    for name, module in parts.items():
        if name not in wanted:
            module.to("cpu")
    for name in wanted:
        if name in parts:
            parts[name].to(plan.device)
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


class V2VGenerator:
    """The stages a video-to-video window generator shares: subclasses set ``trained_fps`` and, in ``__init__``,
    ``vae``, ``plan``, ``parts`` (name -> module) and ``stage_parts`` (stage -> names), and implement ``encode`` and
    ``sample`` (a state with ``z`` and ``model_frames``)."""

    trained_fps = None

    def _stage(self, stage: str) -> None:
        """With model offload, the parts of ``stage`` on the device and the others in host memory."""
        place_stage(self.parts, self.stage_parts[stage], self.plan)

    def time_map(self, window) -> TimeMap:
        """The window's frames <-> the model's frames at the trained rate."""
        return time_map(window.crops.shape[0], window.fps, self.trained_fps)

    @torch.no_grad()
    def decode(self, state, window) -> Tensor:
        """The sampled latent decoded and mapped back to the window's frames: ``[n, S, S, 3]`` 0..1 on the CPU."""
        from ..errors import InputError
        from ..generator import decode_window

        if state.z is None:
            raise InputError("this window has not been sampled yet (run the sampler first)")
        self._stage("decode")
        crops = decode_window(self.vae, state.z.float(), state.model_frames)
        return self.time_map(window).to_window(crops).float().cpu()

    @torch.no_grad()
    def __call__(self, window) -> Tensor:
        return self.decode(self.sample(self.encode(window), window), window)


__all__ = ["DEFAULT_MASK_DILATION", "MASK_DILATION_TOOLTIP", "SourceReinjection", "TimeMap", "V2VGenerator",
           "audio_weight", "lower_face_mask", "model_frame0", "place_stage", "time_map", "window_mask"]
