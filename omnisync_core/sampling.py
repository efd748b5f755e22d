"""Flow-matching sampling for OmniSync: Wan sigma schedule, progressive noise init (Eq. 5-6) and DS-CFG (Eq. 7-9).

Convention (rectified flow, as Wan and SD3): sigma = 1 is pure noise, sigma = 0 is data,
``x_sigma = (1 - sigma) * x0 + sigma * eps``, the network predicts ``v = eps - x0`` and an Euler step is
``x_next = x + (sigma_next - sigma) * v``. Latents are ``[B, C, T, H, W]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from .errors import InputError

SigmaLike = Union[float, Tensor]


class VelocityFn(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, with_audio: bool) -> Tensor:
        """Velocity at ``x`` and noise level ``sigma`` (a 0-d tensor); ``with_audio=False`` is the null-audio branch."""


GuidanceFn = Callable[[float], Union[Tensor, float]]
StepCallback = Callable[[int, int, Tensor], None]


def flow_sigmas(steps: int, shift: float = 5.0) -> Tensor:
    """The ``steps + 1`` sigmas of a flow-matching schedule, 1.0 down to 0.0, with Wan's time shift
    ``shift * s / (1 + (shift - 1) * s)`` applied to a uniform grid ``s``."""
    if int(steps) != steps or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise InputError(f"shift must be positive, got {shift!r}")
    s = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s)).to(torch.float32)


def progressive_init(z_src: Tensor, tau: SigmaLike, noise: Tensor) -> Tensor:
    """Eq. 5: start from the source latents noised to level ``tau``: ``(1 - tau) * z_src + tau * noise``."""
    if z_src.shape != noise.shape:
        raise InputError(f"noise shape {tuple(noise.shape)} does not match latent shape {tuple(z_src.shape)}")
    tau_value = float(tau)
    if not 0.0 <= tau_value <= 1.0:
        raise InputError(f"tau must lie in [0, 1], got {tau_value}")
    return (1.0 - tau) * z_src + tau * noise


def truncate_sigmas(sigmas: Tensor, tau: float) -> Tensor:
    """The part of a schedule that progressive init runs: ``tau`` itself, then every sigma below it.

    The sample starts at noise level exactly ``tau`` (Eq. 5), so the first model call is made at ``tau``
    even when the schedule has no step there; with tau = 1 the full schedule runs.
    """
    if not 0.0 <= tau <= 1.0:
        raise InputError(f"tau must lie in [0, 1], got {tau}")
    below = sigmas[sigmas < tau - 1e-7]
    return torch.cat([torch.tensor([tau], dtype=sigmas.dtype), below])


def seeded_noise(shape: Sequence[int], seed: int, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian noise drawn on the CPU from ``seed`` and then moved, so a seed gives the same noise on every device."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def ds_cfg_weight(sigma: SigmaLike, mouth_xy: Tensor, latent_hw: Sequence[int], face_width: Union[Tensor, float],
                  omega_base: float = 1.0, omega_peak: float = 4.5, gamma: float = 1.5, s_ratio: float = 0.15,
                  floor: float = 1.0, sigma_max: float = 1.0) -> Tensor:
    """DS-CFG guidance weight map (Eq. 7-9, normalised so the peak is ``omega_peak`` at ``sigma_max``).

    ``W = max(floor, S(x, y) * (sigma / sigma_max) ** gamma)`` with
    ``S = omega_base + (omega_peak - omega_base) * exp(-((x - x_m)^2 + (y - y_m)^2) / (2 s^2))``
    and ``s = s_ratio * face_width``.

    mouth_xy: ``[B, 2]`` mouth centres (x, y) and face_width ``[B]`` (or a float), both in latent-grid units,
    where latent cell (row i, column j) covers ``[j, j+1) x [i, i+1)`` and so has its centre at
    ``(j + 0.5, i + 0.5)``. A NaN mouth (no face in that frame) gives the flat map ``omega_base``.
    Returns ``[B, 1, H, W]``.
    """
    if mouth_xy.ndim != 2 or mouth_xy.shape[-1] != 2:
        raise InputError(f"mouth_xy must have shape [B, 2], got {tuple(mouth_xy.shape)}")
    if sigma_max <= 0:
        raise InputError(f"sigma_max must be positive, got {sigma_max}")
    height, width = (int(v) for v in latent_hw)
    batch = mouth_xy.shape[0]
    device = mouth_xy.device
    mouth = mouth_xy.to(torch.float32)
    widths = torch.as_tensor(face_width, dtype=torch.float32, device=device).expand(batch)
    spread = (s_ratio * widths).clamp_min(1e-6)

    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    dist2 = (xs.view(1, 1, width) - mouth[:, 0].view(batch, 1, 1)) ** 2 \
        + (ys.view(1, height, 1) - mouth[:, 1].view(batch, 1, 1)) ** 2
    bump = torch.exp(-dist2 / (2.0 * spread.view(batch, 1, 1) ** 2)).nan_to_num(0.0)
    spatial = omega_base + (omega_peak - omega_base) * bump

    ratio = (torch.as_tensor(sigma, dtype=torch.float32, device=device) / sigma_max).clamp_min(0.0)
    temporal = ratio.reshape(-1, 1, 1).expand(batch, 1, 1) if ratio.numel() > 1 else ratio.reshape(1, 1, 1)
    weight = spatial * temporal ** gamma
    return weight.clamp_min(floor).unsqueeze(1)


@dataclass(frozen=True)
class DSCFGParams:
    """The knobs of DS-CFG (defaults from DESIGN.md §1); ``floor = 0`` is the paper, literally."""

    omega_base: float = 1.0
    omega_peak: float = 4.5
    gamma: float = 1.5
    s_ratio: float = 0.15
    floor: float = 1.0


class DSCFGGuidance:
    """Per-step DS-CFG weight maps for a latent video ``[B, C, T, H, W]``, one mouth per latent frame.

    mouth_xy: ``[B, T, 2]`` and face_width ``[B, T]`` in latent-grid units (NaN mouth = no face).
    ``sigma_max`` is the first sigma of the run (tau with progressive init), where the peak is reached.
    """

    def __init__(self, mouth_xy: Tensor, face_width: Tensor, latent_hw: Sequence[int], sigma_max: float,
                 params: DSCFGParams = DSCFGParams()):
        if mouth_xy.ndim != 3 or mouth_xy.shape[-1] != 2:
            raise InputError(f"mouth_xy must have shape [B, T, 2], got {tuple(mouth_xy.shape)}")
        self.mouth_xy = mouth_xy
        self.face_width = torch.as_tensor(face_width, dtype=torch.float32).expand(mouth_xy.shape[:2])
        self.latent_hw = tuple(int(v) for v in latent_hw)
        self.sigma_max = float(sigma_max)
        self.params = params

    def __call__(self, sigma: float) -> Tensor:
        batch, frames = self.mouth_xy.shape[:2]
        p = self.params
        flat = ds_cfg_weight(sigma, self.mouth_xy.reshape(batch * frames, 2), self.latent_hw,
                             self.face_width.reshape(batch * frames).to(self.mouth_xy.device),
                             p.omega_base, p.omega_peak, p.gamma, p.s_ratio, p.floor, self.sigma_max)
        return flat.reshape(batch, frames, 1, *self.latent_hw).transpose(1, 2)


def constant_guidance(scale: float) -> GuidanceFn:
    """Plain classifier-free guidance with one scale everywhere (scale 1 = no guidance, no unconditional pass)."""
    return lambda sigma: float(scale)


@dataclass
class SampleStats:
    """What a sampling run did: Euler steps, and model calls per branch."""

    steps: int = 0
    cond_calls: int = 0
    uncond_calls: int = 0
    skipped_uncond: int = 0

    @property
    def model_calls(self) -> int:
        return self.cond_calls + self.uncond_calls


def _is_identity_weight(weight: Union[Tensor, float]) -> bool:
    if isinstance(weight, Tensor):
        return bool(torch.all(weight == 1.0))
    return float(weight) == 1.0


@torch.no_grad()
def sample(velocity: VelocityFn, z_src: Tensor, noise: Tensor, sigmas: Tensor, tau: float = 0.92,
           guidance: Optional[GuidanceFn] = None, callback: Optional[StepCallback] = None,
           project: Optional[Callable[[Tensor, float], Tensor]] = None) -> tuple[Tensor, SampleStats]:
    """Euler flow-matching sampler with progressive noise init and (DS-)CFG on the audio condition.

    Starts at ``progressive_init(z_src, tau, noise)`` and runs ``truncate_sigmas(sigmas, tau)``.
    At each step ``v = v_uncond + W * (v_cond - v_uncond)`` with ``W = guidance(sigma)``; where W is 1
    everywhere (DS-CFG with floor 1, late in the schedule) the unconditional pass is skipped.
    ``callback(step, total, x)`` runs after each step; raising from it stops sampling (interruption).
    ``project(x, sigma_next)``, when given, replaces x after each step (e.g. the noised source put back outside the
    editable mask, :func:`omnisync_core.families.v2v.SourceReinjection`); the callback sees the projected x.
    """
    run_sigmas = truncate_sigmas(sigmas.to(torch.float32).cpu(), float(tau))
    x = progressive_init(z_src, float(tau), noise)
    stats = SampleStats()
    total = len(run_sigmas) - 1
    for index in range(total):
        sigma, sigma_next = float(run_sigmas[index]), float(run_sigmas[index + 1])
        sigma_t = torch.tensor(sigma, device=x.device, dtype=torch.float32)
        v = velocity(x, sigma_t, True)
        stats.cond_calls += 1
        weight = 1.0 if guidance is None else guidance(sigma)
        if _is_identity_weight(weight):
            if guidance is not None:
                stats.skipped_uncond += 1
        else:
            v_uncond = velocity(x, sigma_t, False)
            stats.uncond_calls += 1
            if isinstance(weight, Tensor):
                weight = weight.to(device=v.device, dtype=v.dtype)
            v = v_uncond + weight * (v - v_uncond)
        x = x + (sigma_next - sigma) * v
        if project is not None:
            x = project(x, sigma_next)
        stats.steps += 1
        if callback is not None:
            callback(index + 1, total, x)
    return x, stats
