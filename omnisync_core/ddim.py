"""DDIM sampling of LatentSync windows, as upstream runs it with diffusers' DDIMScheduler and the DeepCache package.

Upstream's ``configs/scheduler_config.json``: 1000 training steps, ``scaled_linear`` betas from 0.00085 to 0.012,
``set_alpha_to_one`` false (the step after the last uses ``alphas_cumprod[0]``), ``steps_offset`` 1, ``leading``
spacing, no clipping, epsilon prediction; eta 0. 20 steps give timesteps 951, 901, ..., 51, 1.

One window (upstream ``lipsync_pipeline.py`` L387-452): the UNet input is ``[x, mask, masked latents, reference
latents]`` on channels; classifier-free guidance runs the unconditional branch with all-zero audio tokens and mixes
``uncond + g * (cond - uncond)``; with DeepCache every ``cache_interval``-th step is a full UNet pass and the steps
between reuse its deep features (see :mod:`omnisync_core.model.latentsync_unet`). The initial noise is one latent
frame repeated over the window (and over the whole video: every window starts from the same noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["DDIMConfig", "LATENTSYNC_DDIM", "alphas_cumprod", "ddim_timesteps", "ddim_step", "ddim_add_noise",
           "shared_noise", "sample_window"]


@dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    set_alpha_to_one: bool = False
    steps_offset: int = 1


LATENTSYNC_DDIM = DDIMConfig()


def alphas_cumprod(cfg: DDIMConfig = LATENTSYNC_DDIM) -> Tensor:
    """``prod(1 - beta)`` for the scaled-linear schedule, float32 ``[num_train_timesteps]`` (diffusers' arithmetic)."""
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps,
                           dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int = 20, strength: float = 1.0, cfg: DDIMConfig = LATENTSYNC_DDIM) -> Tensor:
    """The timesteps run, int64, descending: ``leading`` spacing ``(0..steps-1) * (T // steps) + offset``, reversed.

    ``strength < 1`` keeps only the last ``int(steps * strength)`` of them (a start from a partly noised source, as
    diffusers' img2img does; noise the source with :func:`ddim_add_noise` at the first one).
    """
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise InputError(f"DDIM steps must lie in [1, {cfg.num_train_timesteps}], got {steps}.")
    if not 0.0 < strength <= 1.0:
        raise InputError(f"The start strength must lie in (0, 1], got {strength}.")
    ratio = cfg.num_train_timesteps // steps
    t = (torch.arange(steps, dtype=torch.int64) * ratio).flip(0) + cfg.steps_offset
    keep = min(int(steps * strength), steps)
    if keep < 1:
        raise InputError(f"strength {strength} runs no step of {steps}.")
    return t[steps - keep:]


def _alpha(t: int, ac: Tensor, cfg: DDIMConfig) -> Tensor:
    if t >= 0:
        return ac[t]
    return torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]


def ddim_step(eps: Tensor, t: int, x: Tensor, steps: int, cfg: DDIMConfig = LATENTSYNC_DDIM,
              ac: Optional[Tensor] = None) -> Tensor:
    """One deterministic (eta 0) DDIM step from timestep ``t`` to ``t - T // steps`` with an epsilon prediction.

    Computed in float32 (upstream computes in the latents' dtype, fp16 on GPU); returned in ``x``'s dtype.
    """
    ac = alphas_cumprod(cfg) if ac is None else ac
    t = int(t)
    a_t = _alpha(t, ac, cfg).to(x.device)
    a_prev = _alpha(t - cfg.num_train_timesteps // steps, ac, cfg).to(x.device)
    xf, ef = x.float(), eps.float()
    x0 = (xf - (1 - a_t) ** 0.5 * ef) / a_t ** 0.5
    return (a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * ef).to(x.dtype)


def ddim_add_noise(x0: Tensor, noise: Tensor, t: int, cfg: DDIMConfig = LATENTSYNC_DDIM) -> Tensor:
    """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` (diffusers' ``add_noise``), for a start at timestep ``t``."""
    a = alphas_cumprod(cfg)[int(t)]
    return (a ** 0.5 * x0.float() + (1 - a) ** 0.5 * noise.float()).to(x0.dtype)


def shared_noise(latent_hw: tuple[int, int], num_frames: int, generator: Optional[torch.Generator] = None,
                 channels: int = 4, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """One noise frame ``[1, channels, 1, h, w]`` repeated over ``num_frames`` (upstream's ``prepare_latents``).

    It is drawn on the generator's device (CPU when none) with ``dtype`` and moved to ``device``; upstream draws it
    once per video with the pipeline's dtype, so every window starts from this same frame.
    """
    h, w = latent_hw
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn((1, channels, 1, h, w), generator=generator, device=gen_dev, dtype=dtype)
    return z.to(device if device is not None else gen_dev).repeat(1, 1, num_frames, 1, 1)


StepCallback = Callable[[int, int, int, Tensor], None]


@torch.no_grad()
def sample_window(unet, latents: Tensor, conditioning: Tensor, audio: Tensor, steps: int = 20,
                  guidance: "float | Callable[[int], float | Tensor]" = 1.5, deepcache: bool = True,
                  cache_interval: int = 3, strength: float = 1.0,
                  batch_cfg: bool = True, step_callback: Optional[StepCallback] = None,
                  cfg: DDIMConfig = LATENTSYNC_DDIM) -> Tensor:
    """Denoise one window: ``latents [B, 4, F, h, w]`` (the initial noise, or a source noised to the first timestep
    when ``strength < 1``) -> final latents, same shape and dtype.

    ``conditioning [B, 9, F, h, w]`` is ``[mask (1 = keep), masked-frame latents, reference latents]``, scaled by the
    VAE factor; ``audio [B, F, S, D]`` the per-frame audio tokens. Guidance above 1 adds the zero-audio branch, in
    one batch with the conditional one (upstream's order ``[uncond, cond]``) or, with ``batch_cfg=False``, as two
    passes (half the activation memory). ``guidance`` may also be a function of the timestep giving the scale or
    a weight map broadcast over ``[B, 1, F, h, w]`` (DS-CFG); the zero-audio branch then always runs. DeepCache (``cache_interval``, branch 0): the first step run and every
    ``cache_interval``-th after it are full passes, the others cached; ``deepcache=False`` runs every step in full.
    ``step_callback(i, n, t, latents)`` runs after each step (it may raise to stop the window).
    """
    if latents.ndim != 5 or conditioning.shape[0] != latents.shape[0] or conditioning.shape[2:] != latents.shape[2:]:
        raise InputError(f"Latents {list(latents.shape)} and conditioning {list(conditioning.shape)} do not match.")
    if cache_interval < 1:
        raise InputError(f"cache_interval must be at least 1, got {cache_interval}.")
    timesteps = ddim_timesteps(steps, strength, cfg)
    ac = alphas_cumprod(cfg)
    scale = guidance if callable(guidance) else (lambda t: guidance)
    use_cfg = callable(guidance) or guidance > 1.0
    dt = unet.dtype
    cond, audio = conditioning.to(dt), audio.to(dt)
    if use_cfg and batch_cfg:
        branches = [(torch.cat([cond, cond]), torch.cat([torch.zeros_like(audio), audio]))]
    elif use_cfg:
        branches = [(cond, torch.zeros_like(audio)), (cond, audio)]
    else:
        branches = [(cond, audio)]
    caches: list[Optional[Tensor]] = [None] * len(branches)
    x = latents
    for i, t in enumerate(timesteps.tolist()):
        full = not deepcache or i % cache_interval == 0
        preds = []
        for b, (c, a) in enumerate(branches):
            xin = x.to(dt)
            xin = torch.cat([xin, xin]) if c.shape[0] != x.shape[0] else xin
            inp = torch.cat([xin, c], dim=1)
            if not deepcache:
                preds.append(unet(inp, t, a))
            else:
                eps, cache = unet(inp, t, a, deep_cache=None if full else caches[b], return_deep_cache=True)
                caches[b] = cache
                preds.append(eps)
        if use_cfg:
            uncond, condp = preds[0].chunk(2) if batch_cfg else preds
            w = scale(t)
            eps = uncond + (w.to(condp.device, condp.dtype) if isinstance(w, Tensor) else w) * (condp - uncond)
        else:
            eps = preds[0]
        x = ddim_step(eps, t, x, steps, cfg, ac)
        if step_callback is not None:
            step_callback(i, len(timesteps), t, x)
    return x
