"""The HuMo family (Phantom-video/HuMo, HuMo-1.7B; research/humo.md): a Wan2.1 T2V DiT with Whisper-large-v3 audio
cross-attention and a reference latent appended in time, driven the OmniSync way (DESIGN.md §9).

Per window: the face crops are mapped to HuMo's 25 fps (:func:`~.v2v.time_map`), VAE-encoded, noised to tau
(progressive init); sampling runs HuMo-1.7B's four-pass TIA guidance

    v = neg + s_t (pos_t - neg) + W_a (pos_ta - pos_t) + s_i (pos_tia - pos_ta)

(neg: negative text, zero reference, zero audio; pos_t: prompt, zero reference, zero audio; pos_ta: prompt, zero
reference, audio; pos_tia: prompt, clean reference, audio), where ``W_a`` is DS-CFG's spatio-temporal weight
peaking at the audio scale ("ds-cfg"), the audio scale itself ("cfg") or 1 ("none": audio-conditioned, not guided).
The coefficients sum to 1, so a per-pixel ``W_a`` is safe. After every step the noised source is put back outside
the dilated lower face (:class:`~.v2v.SourceReinjection`): HuMo is a generator, not an editor. The decoded frames
are mapped back to the window's own frames, so the output keeps the input's fps and frame count.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, OmniSyncError
from ..timeline import valid_window_length
from .base import Companion, Family, GenerationOptions, MemoryPlan, ModelFiles, Recognition, RemoteFile
from .components import param_count
from . import v2v
from .conditioning import text_conditioning

HUMO_TRAINED_FPS = 25
GUIDANCE_MODES = ("ds-cfg", "cfg", "none")


class HumoFamily(Family):
    """HuMo-1.7B (Comfy-Org's or the official layout). Memory, weights only: the DiT 3.5 GB in bf16 (30 blocks of
    55.9 M parameters, 64.9 M outside them), Whisper-large-v3's encoder 1.3 GB in fp16, the Wan VAE 0.25 GB.
    offload "model" keeps one of them on the GPU at a time; ``swap_blocks`` N keeps the first N blocks in host
    memory (0.11 GB each in bf16) and streams them in as they run; offload "sequential" does so with every block,
    leaving 0.13 GB of the DiT on the GPU, for the smallest cards (each step then copies 3.4 GB over PCIe)."""

    name = "humo"
    title = "HuMo"
    licence = "Apache-2.0"
    trained_fps = Fraction(HUMO_TRAINED_FPS)
    trained_window = 97              # "trained on 97-frame videos at 25 FPS" (HuMo README)
    # steps / shift: HuMo's set_timesteps(50, shift=5.0); scales: scripts/infer_tia_1_7B.sh (scale_t 7.0,
    # scale_i 4.0, scale_a 7.5); tau: the OmniSync start, where the 50-step shift-5 schedule runs ~34 steps.
    # crop_size 512: HuMo-1.7B trains and runs at 480p (480 x 832); a 512 square face crop is the closest square
    # on the VAE x patch grid (16 px) with about as many pixels as the 480-px side sees of a face, and it is what
    # research/humo.md's cost estimate assumes. 480 works too (crop_size=480).
    defaults = {"steps": 50, "shift": 5.0, "tau": 0.92, "text_scale": 7.0, "image_scale": 4.0, "audio_scale": 7.5,
                "mask_dilation": v2v.DEFAULT_MASK_DILATION, "overlap": 8, "crop_size": 512}
    companions = (Companion("vae", ("wan-vae",), "wan_2.1_vae.safetensors"),
                  # "whisper": a Whisper of no released size (its width is checked against the DiT at load)
                  Companion("audio_encoder", ("whisper-large-v3", "whisper"), "whisper_large_v3_fp16.safetensors"),
                  Companion("text_encoder", ("umt5",), "umt5_xxl_fp16.safetensors", required=False))
    downloads = {"humo-1.7b": (
        RemoteFile("Comfy-Org/HuMo_ComfyUI", "split_files/diffusion_models/humo_1.7B_fp16.safetensors",
                   "diffusion_models", "3.48 GB"),
        RemoteFile("Comfy-Org/HuMo_ComfyUI", "split_files/audio_encoders/whisper_large_v3_fp16.safetensors",
                   "audio_encoders", "3.09 GB"),
        RemoteFile("Comfy-Org/Wan_2.2_ComfyUI_Repackaged", "split_files/vae/wan_2.1_vae.safetensors", "vae",
                   "254 MB"),
        RemoteFile("Comfy-Org/Wan_2.1_ComfyUI_repackaged",
                   "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders", "6.74 GB"),
    )}

    def recognise(self, tensors: Mapping, metadata: Mapping[str, str]) -> Optional[Recognition]:
        from ..model.humo import humo_config_from_shapes, humo_label, is_humo

        try:
            if not is_humo(tensors):
                return None
            cfg = humo_config_from_shapes(tensors)
        except (OmniSyncError, KeyError, ValueError, TypeError):
            return None
        details = f"dim {cfg.dim}, {cfg.num_layers} layers"
        if cfg.in_dim != cfg.out_dim:
            details += f", {cfg.in_dim} input channels (image-conditioned layout)"
        return Recognition("humo", "model", humo_label(cfg), param_count(tensors), self.name, details)

    def load(self, files: ModelFiles, plan: MemoryPlan, options: GenerationOptions, step_callback=None,
             progress=None) -> "HumoGenerator":
        from ..model.humo import load_humo
        from ..model.loading import load_vae, load_whisper

        if plan.fp8:
            raise InputError("the HuMo family runs without fp8 weights (1.7B fits in bf16: use offload 'model', "
                             "or 'sequential' / block swap for the smallest cards)")
        opts = options.resolved(self.defaults_for(files))
        if opts.guidance not in GUIDANCE_MODES:
            raise InputError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {opts.guidance!r}")
        home = torch.device("cpu") if plan.offload != "none" else plan.device
        swap = plan.offload == "sequential" or plan.swap_blocks > 0
        dit = load_humo(files.model, device="cpu" if swap else home, dtype=plan.dtype)
        if swap:      # sequential offload: every block from host memory, one at a time
            place_with_block_swap(dit, dit.config.num_layers if plan.offload == "sequential" else plan.swap_blocks,
                                  plan.device)
        cfg = dit.config
        if cfg.in_dim != cfg.out_dim:
            raise InputError(f"{files.recognition.label} takes {cfg.in_dim} input channels (the image-conditioned "
                             f"17B layout); this family runs the 16-channel HuMo-1.7B layout only")
        from ..text.prompt import HUMO_DEFAULT_PROMPT

        positive, negative = text_conditioning(files, cfg.text_dim, cfg.text_len, plan.device, HUMO_DEFAULT_PROMPT)
        vae = load_vae(files.need("vae"), device=home)
        audio_dtype = torch.float16 if plan.device.type == "cuda" else torch.float32
        whisper = load_whisper(files.need("audio_encoder"), device=home, dtype=audio_dtype)
        wc = whisper.config
        if wc.d_model != cfg.whisper_dim or wc.n_layers % 4:
            raise InputError(f"{files.companions['audio_encoder'].name} is a Whisper encoder {wc.d_model} wide with "
                             f"{wc.n_layers} layers; {files.recognition.label} takes Whisper-large-v3 features "
                             f"({cfg.whisper_dim} wide; whisper_large_v3_fp16.safetensors)")
        return HumoGenerator(dit, vae, whisper, positive, negative, opts, plan, step_callback)


def place_with_block_swap(dit, swapped: int, device) -> None:
    """The DiT (on the host) placed for block swap: its first ``swapped`` blocks stay on the host (pinned on CUDA)
    and run from there one at a time; the other blocks and everything outside the blocks go to ``device``."""
    from ..model.block_swap import BlockSwap

    for name, child in dit.named_children():
        if name != "blocks":
            child.to(device)
    dit.block_swap = BlockSwap(dit.blocks, swapped, device)


# ---------------------------------------------------------------- audio conditioning

class HumoWindowAudio:
    """HuMo's audio conditioning of a whole track: :meth:`window` gives the 25-fps Whisper windows
    ``[T_lat, 8, 5, D]`` of the model frames of some output frames (the window's frames at ``fps`` mapped to 25
    fps, padded to 4k + 1 as the crops are)."""

    def __init__(self, track, fps):
        self.track, self.fps = track, fps

    def window(self, frames: Tensor) -> Tensor:
        n = int(frames.shape[0])
        m = v2v.time_map(n, self.fps, HUMO_TRAINED_FPS).model_frames
        frame0 = v2v.model_frame0(int(frames[0]), self.fps, HUMO_TRAINED_FPS)
        return self.track.windows(frame0, valid_window_length(m))


# ---------------------------------------------------------------- generator

@dataclass
class HumoLatents:
    """One window's state: the source latent and its noise at 25 fps, the reference latent, and once sampled z."""

    z_src: Tensor
    noise: Tensor
    reference: Tensor
    model_frames: int
    z: Optional[Tensor] = None


class HumoGenerator(v2v.V2VGenerator):
    """Edits windows of face crops with a HuMo-1.7B DiT, a Wan VAE and Whisper-large-v3 (a WindowGenerator)."""

    temporal_factor = 4
    trained_fps = HUMO_TRAINED_FPS

    def __init__(self, dit, vae, audio_encoder, positive: Tensor, negative: Tensor, options: GenerationOptions,
                 plan: MemoryPlan, step_callback=None):
        self.dit, self.vae, self.audio_encoder = dit.eval(), vae.eval(), audio_encoder.eval()
        self.options, self.plan = options, plan
        self.device, self.dtype = plan.device, plan.dtype
        self.positive, self.negative = positive, negative
        self.step_callback = step_callback
        self.last_stats = None
        # with block swap the DiT is placed once for good (its swapped blocks live on the host)
        self.parts = {"vae": self.vae, "audio": self.audio_encoder}
        if dit.block_swap is None:
            self.parts["dit"] = self.dit
        self.stage_parts = {"audio": ("audio",), "encode": ("vae",), "sample": ("dit",), "decode": ("vae",)}

    # ------------------------------------------------------------------ audio

    def audio_features(self, track, fps, progress=None) -> HumoWindowAudio:
        """HuMo's Whisper features of ``track`` (an AudioTrack) at 25 fps, encoded chunk by chunk on demand."""
        from ..audio.humo_features import HumoAudioTrack

        self._stage("audio")
        return HumoWindowAudio(HumoAudioTrack(track.speech(), self.audio_encoder, progress=progress), fps)

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def encode(self, window) -> HumoLatents:
        from ..generator import encode_window

        self._stage("encode")
        tm = self.time_map(window)
        z_src, noise = encode_window(self.vae, tm.to_model(window.crops), window.seed, self.device)
        # Wan's VAE is causal: latent frame 0 sees video frame 0 alone, so it is the latent of the window's first
        # source frame, HuMo's reference (one latent frame, appended after the video in time by the DiT)
        reference = z_src[:, :, :1].clone()
        return HumoLatents(z_src, noise, reference, tm.model_frames)

    def _mask_and_mouths(self, window, tm, latent_hw, frames: int) -> tuple[Tensor, Tensor, Tensor]:
        return v2v.window_mask(window, tm, latent_hw, frames, float(self.options.mask_dilation),
                               self.temporal_factor)

    def _audio_weight(self, mouth: Tensor, width: Tensor, latent_hw):
        return v2v.audio_weight(self.options, mouth, width, latent_hw, self.device)

    @torch.no_grad()
    def sample(self, state: HumoLatents, window, step_callback=None) -> HumoLatents:
        from ..sampling import flow_sigmas, sample

        if window.audio is None:
            raise InputError("the HuMo generator needs its audio windows (audio_features(...).window(frames))")
        self._stage("sample")
        z_src, noise = state.z_src, state.noise
        frames, latent_hw = valid_window_length(state.model_frames), tuple(z_src.shape[-2:])
        audio = window.audio.to(self.device, self.dtype)
        if audio.shape[0] != z_src.shape[2]:
            raise InputError(f"the audio covers {audio.shape[0]} latent frames, the window {z_src.shape[2]}")
        tm = self.time_map(window)
        mask, mouth, width = self._mask_and_mouths(window, tm, latent_hw, frames)
        weight = self._audio_weight(mouth, width, latent_hw)
        velocity = self._velocity(audio, state.reference, weight)
        project = v2v.SourceReinjection(z_src, noise, mask)
        sigmas = flow_sigmas(int(self.options.steps), float(self.options.shift))
        callback = step_callback if step_callback is not None else self.step_callback
        z, self.last_stats = sample(velocity, z_src, noise, sigmas, float(self.options.tau), None, callback,
                                    project=project)
        return HumoLatents(z_src, noise, state.reference, state.model_frames, z)

    def _velocity(self, audio: Tensor, reference: Tensor, weight):
        """The guided velocity closure: HuMo-1.7B's four passes (one batched forward unless
        ``extra["batch_passes"]`` is False), combined with the text, image and (weighted) audio scales."""
        opts, dt, dev = self.options, self.dtype, self.device
        s_t, s_i = float(opts.text_scale), float(opts.image_scale)
        length = max(self.positive.shape[1], self.negative.shape[1])
        pos = F.pad(self.positive, (0, 0, 0, length - self.positive.shape[1])).to(dev, dt)
        neg = F.pad(self.negative, (0, 0, 0, length - self.negative.shape[1])).to(dev, dt)
        audio = audio.unsqueeze(0)
        null_audio = torch.zeros_like(audio)
        ref = reference.to(dev, dt)
        null_ref = torch.zeros_like(ref)
        # (text, audio, reference) of neg, pos_t, pos_ta, pos_tia
        passes = [(neg, null_audio, null_ref), (pos, null_audio, null_ref), (pos, audio, null_ref), (pos, audio, ref)]
        batched = bool(opts.extra.get("batch_passes", True))
        if batched:
            texts = torch.cat([p[0] for p in passes])
            audios = torch.cat([p[1] for p in passes])
            refs = torch.cat([p[2] for p in passes])

        def velocity(x: Tensor, sigma: Tensor, with_audio: bool = True) -> Tensor:
            xm = x.to(dev, dt)
            if batched:
                out = self.dit(xm.expand(len(passes), -1, -1, -1, -1), sigma.reshape(1), texts, audios, refs).float()
                v_neg, v_t, v_ta, v_tia = out.chunk(len(passes))
            else:
                v_neg, v_t, v_ta, v_tia = (self.dit(xm, sigma.reshape(1), t, a, r).float() for t, a, r in passes)
            w = weight(float(sigma))
            if isinstance(w, Tensor):
                w = w.to(v_ta.device, v_ta.dtype)
            return v_neg + s_t * (v_t - v_neg) + w * (v_ta - v_t) + s_i * (v_tia - v_ta)

        return velocity


FAMILY = HumoFamily()

__all__ = ["FAMILY", "HumoFamily", "HumoGenerator", "HumoLatents", "HumoWindowAudio"]
