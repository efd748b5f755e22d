"""The OmniSync window generator: VAE-encode the crops, start from the noised source (progressive init), sample
with the DiT under DS-CFG on the audio, decode. One call edits one window of face crops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .audio.align import FrameAligner
from .audio.features import TOKEN_RATE, whisper_tokens
from .errors import InputError
from .model.dit import OmniSyncDiT
from .model.vae import WanVAE
from .sampling import (DSCFGGuidance, DSCFGParams, SampleStats, constant_guidance, flow_sigmas, sample,
                       seeded_noise)
from .timeline import valid_window_length

GUIDANCE_MODES = ("ds-cfg", "cfg", "none")


@dataclass
class SamplerOptions:
    """Sampling knobs (DESIGN.md §1). ``guidance``: "ds-cfg" (default), "cfg" (one scale everywhere, the
    ablation), or "none" (audio-conditioned branch only)."""

    steps: int = 50
    shift: float = 5.0
    tau: float = 0.92
    guidance: str = "ds-cfg"
    cfg_scale: float = 4.5
    ds_cfg: DSCFGParams = field(default_factory=DSCFGParams)


def latent_groups(num_frames: int, temporal: int = 4) -> Tensor:
    """The latent frame of each video frame under Wan's causal VAE: frame 0 alone, then groups of ``temporal``."""
    return torch.cat([torch.zeros(1, dtype=torch.long),
                      (torch.arange(1, num_frames) + temporal - 1) // temporal])[:num_frames]


def latent_mouths(mouth_xy: Tensor, face_width: Tensor, crop_size: int, latent_hw: tuple[int, int],
                  temporal: int = 4) -> tuple[Tensor, Tensor]:
    """Per-video-frame mouth (crop pixels) -> per-latent-frame mouth and face width in latent cells.

    Latent frame 0 covers video frame 0 and latent frame f >= 1 covers video frames 4f-3 .. 4f (Wan's causal VAE);
    each latent frame takes the mean over its video frames.
    """
    frames = mouth_xy.shape[0]
    latents = 1 + (frames - 1) // temporal
    group = latent_groups(frames, temporal)
    counts = torch.bincount(group, minlength=latents).clamp_min(1).unsqueeze(1).float()
    mouth = torch.zeros(latents, 2).index_add_(0, group, mouth_xy.float()) / counts
    width = torch.zeros(latents).index_add_(0, group, face_width.float()) / counts[:, 0]
    scale = torch.tensor([latent_hw[1] / crop_size, latent_hw[0] / crop_size])
    return mouth * scale, width * scale[0]


class WhisperFrameTokens:
    """The OmniSync family's audio conditioning: per video frame the Whisper tokens around its start
    (``before + 1 + after`` of them), read from the whole track's features window by window."""

    def __init__(self, tokens, fps, before: int = 2, after: int = 2):
        self.tokens, self.before, self.after = tokens, int(before), int(after)
        self.aligner = FrameAligner(fps, feature_rate=TOKEN_RATE)

    def window(self, frames: Tensor) -> Tensor:
        """``[n, before + 1 + after, D]`` float32 for output frames ``frames [n]``."""
        index = self.aligner.window_indices(frames, self.before, self.after, self.tokens.num_tokens)
        lo, hi = int(index.min()), int(index.max()) + 1
        return self.tokens.tokens(lo, hi)[index - lo]

    def materialized(self) -> "WhisperFrameTokens":
        """The same conditioning with every token computed now (for the granular nodes: no encoder needed later)."""
        whole = self.tokens.tokens(0, self.tokens.num_tokens)
        return WhisperFrameTokens(_Tokens(whole), self.aligner.fps, self.before, self.after)


class _Tokens:
    """Tokens already computed, read like a :class:`~omnisync_core.audio.features.ChunkedEncoding`."""

    def __init__(self, features: Tensor):
        self.features, self.num_tokens = features, features.shape[0]

    def tokens(self, start: int, stop: int) -> Tensor:
        return self.features[start:stop]


@dataclass
class WindowLatents:
    """One window's state through the stages: the source latent, its noise and, once sampled, the latent."""

    z_src: Tensor
    noise: Tensor
    z: Optional[Tensor] = None


class OmniSyncGenerator:
    """Edits windows of crops with an OmniSync DiT, a Wan VAE (or pixel codec) and a Whisper encoder. ``device``
    and ``dtype`` are where and how the models run; crops come and go on the CPU as float 0..1. ``audio_before``
    and ``audio_after`` are the Whisper tokens around each frame the model was trained with."""

    def __init__(self, dit: OmniSyncDiT, vae: WanVAE, options: Optional[SamplerOptions] = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 step_callback: Optional[Callable[[int, int, Tensor], None]] = None, audio_encoder=None,
                 audio_before: int = 2, audio_after: int = 2):
        self.options = options or SamplerOptions()
        if self.options.guidance not in GUIDANCE_MODES:
            raise InputError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {self.options.guidance!r}")
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.dtype = dtype
        self.dit, self.vae = dit.eval(), vae.eval()
        self.audio_encoder = audio_encoder
        self.audio_before, self.audio_after = int(audio_before), int(audio_after)
        self.step_callback = step_callback
        self.last_stats: Optional[SampleStats] = None

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame: 4 for the Wan VAE, the codec's own factor for a pixel codec."""
        return int(getattr(getattr(self.vae, "config", None), "temporal_factor", 4))

    # ------------------------------------------------------------------ audio

    def audio_features(self, track, fps, progress: Optional[Callable[[int, int], None]] = None
                       ) -> WhisperFrameTokens:
        """Whisper tokens of ``track`` (an AudioTrack), encoded 30 s chunk by chunk as the windows ask for them."""
        if self.audio_encoder is None:
            raise InputError("the OmniSync generator needs its Whisper audio encoder")
        tokens = whisper_tokens(track.speech(), self.audio_encoder, progress=progress)
        return WhisperFrameTokens(tokens, fps, self.audio_before, self.audio_after)

    # ------------------------------------------------------------------ stages

    def _guidance(self, mouth_xy: Tensor, face_width: Tensor, crop_size: int, latent_hw: tuple[int, int]):
        opts = self.options
        if opts.guidance == "none":
            return None
        if opts.guidance == "cfg":
            return constant_guidance(opts.cfg_scale)
        mouth, width = latent_mouths(mouth_xy, face_width, crop_size, latent_hw, self.temporal_factor)
        return DSCFGGuidance(mouth.unsqueeze(0).to(self.device), width.unsqueeze(0), latent_hw, opts.tau, opts.ds_cfg)

    @torch.no_grad()
    def encode(self, window) -> WindowLatents:
        """The window's source latent and the noise drawn for it from its seed (progressive init starts there)."""
        return WindowLatents(*encode_window(self.vae, window.crops, window.seed, self.device))

    @torch.no_grad()
    def sample(self, state: WindowLatents, window, step_callback=None) -> WindowLatents:
        """Sample from ``z_src`` noised to tau (progressive init) under the configured guidance."""
        if window.audio is None:
            raise InputError("the OmniSync generator needs per-frame audio tokens")
        z = self.denoise(state.z_src, state.noise, window.audio, window.mouth_xy, window.face_width,
                         window.crops.shape[1], step_callback)
        return WindowLatents(state.z_src, state.noise, z)

    @torch.no_grad()
    def decode(self, state: WindowLatents, window) -> Tensor:
        if state.z is None:
            raise InputError("this window has not been sampled yet (run the DS-CFG sampler first)")
        return decode_window(self.vae, state.z, window.crops.shape[0])

    @torch.no_grad()
    def __call__(self, window) -> Tensor:
        return self.decode(self.sample(self.encode(window), window), window)

    def edit(self, crops: Tensor, audio: Tensor, mouth_xy: Tensor, face_width: Tensor, seed: int) -> Tensor:
        """One window edited outside a job: ``crops [n, S, S, 3]``, per-frame tokens ``audio [n, A, D]``, mouth
        ``[n, 2]`` and face width ``[n]`` in crop pixels, the window's seed."""
        from .job import WindowInput

        n = crops.shape[0]
        return self(WindowInput(crops, torch.arange(n), None, audio, mouth_xy, face_width, None, int(seed),
                                torch.ones(n, dtype=torch.bool)))

    @torch.no_grad()
    def denoise(self, z_src: Tensor, noise: Tensor, audio: Tensor, mouth_xy: Tensor, face_width: Tensor,
                crop_size: int, step_callback: Optional[Callable[[int, int, Tensor], None]] = None) -> Tensor:
        """Sample one window's latent: from ``z_src`` noised to tau by ``noise`` (progressive init), under the
        configured guidance. ``audio [n, A, D]``, ``mouth_xy [n, 2]`` and ``face_width [n]`` cover the window's n
        video frames; they are padded like the crops (see :func:`encode_window`)."""
        tail = valid_window_length(audio.shape[0]) - audio.shape[0]
        mouth, width = pad_frames(mouth_xy, tail), pad_frames(face_width, tail)
        guidance = self._guidance(mouth, width, crop_size, tuple(z_src.shape[-2:]))
        tokens = pad_frames(audio, tail).unsqueeze(0).to(self.device, self.dtype)
        z_src_model = z_src.to(self.dtype)

        def velocity(x: Tensor, sigma: Tensor, with_audio: bool) -> Tensor:
            out = self.dit(x.to(self.dtype), sigma.reshape(1), source=z_src_model,
                           audio=tokens if with_audio else None)
            return out.float()

        sigmas = flow_sigmas(self.options.steps, self.options.shift)
        z, self.last_stats = sample(velocity, z_src, noise, sigmas, self.options.tau, guidance,
                                    step_callback if step_callback is not None else self.step_callback)
        return z


def pad_frames(t: Tensor, tail: int) -> Tensor:
    """``t`` with its last frame repeated ``tail`` times (windows are padded to 4k + 1 frames)."""
    return torch.cat([t, t[-1:].expand(tail, *t.shape[1:])]) if tail else t


@torch.no_grad()
def encode_window(vae, crops: Tensor, seed: int, device=None) -> tuple[Tensor, Tensor]:
    """A window's crops ``[n, S, S, 3]`` (0..1, padded to 4k + 1 frames by repeating the last) -> the source
    latent and the noise drawn for it from ``seed``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    video = pad_frames(crops, valid_window_length(crops.shape[0]) - crops.shape[0])
    z_src = vae.encode(video.permute(3, 0, 1, 2).unsqueeze(0).to(device, torch.float32).mul(2).sub(1))
    return z_src, seeded_noise(z_src.shape, seed, device=device)


@torch.no_grad()
def decode_window(vae, z: Tensor, frames: int) -> Tensor:
    """A sampled latent -> the window's first ``frames`` crops ``[frames, S, S, 3]`` float 0..1 on the CPU."""
    return vae.decode(z)[0, :, :frames].permute(1, 2, 3, 0).add(1).div(2).clamp(0, 1).cpu()
