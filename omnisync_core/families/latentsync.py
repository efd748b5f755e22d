"""The LatentSync family (ByteDance LatentSync 1.6; research/latentsync.md): an SD-1.5-sized UNet3D that inpaints
the lower face of 16-frame windows of its own aligned 512 x 512 face crops, conditioned on Whisper-tiny features.
It is an editor, not a generator, so it needs no source re-injection: the mask, the masked frame and the
reference frame are its input (13 channels), and outside the mask we keep the source crop exactly.

Per window (upstream ``latentsync/pipelines/lipsync_pipeline.py`` L387-458, ``research/latentsync.md`` §1.9):

1. our square crops are warped into LatentSync's crop, the 3-point similarity of the eyebrows and the nose onto
   its template, a 420 x 560 box squashed to 512 x 512 (:mod:`omnisync_core.face.latentsync_align`), the points
   from our Face Mesh (without landmarks, from the mouth and face width); a window shorter than 16 frames is padded
   by playing its frames back, because the UNet's GroupNorm statistics span the window;
2. VAE-encoded with a sample of the posterior (upstream's ``latent_dist.sample``), scaled by 0.18215: the masked
   frame (mouth zeroed by ``mask.png``) and the reference (the same frame, whole, as upstream runs it);
3. DDIM (20 steps, eta 0) from one noise frame repeated over every frame of the video (the same for every window
   of a job), classifier-free guidance against zero audio (scale 1.5; "ds-cfg" puts DS-CFG's spatio-temporal
   weight there instead), DeepCache (every third step in full);
4. decoded a few frames at a time, warped back into our crop and blended in through the mask, feathered inward:
   every crop pixel where the warped blend weight is 0 (outside LatentSync's mouth mask, mapped into our crop) is
   the source crop bit for bit.

Any frame rate: the Whisper window of each frame is centred on its own time (:class:`FrameAligner`), and the job
keeps the input's frame count and rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ..errors import InputError, OmniSyncError
from .base import Companion, Family, GenerationOptions, MemoryPlan, ModelFiles, Recognition, RemoteFile
from .components import param_count, shapes_of

GUIDANCE_MODES = ("cfg", "ds-cfg", "none")
WINDOW = 16                   # configs/unet/stage2_512.yaml data.num_frames
CACHE_INTERVAL = 3            # scripts/inference.py L76-80: DeepCache cache_interval 3, cache_branch_id 0
MOUTH_FEATHER = 8.0           # crop pixels (at 512) the blend weight rises over inside the mask
PREFIX = "model.diffusion_model."


# ---------------------------------------------------------------- the family

class LatentSyncFamily(Family):
    """LatentSync 1.5 / 1.6 (the same architecture; 1.6 was trained at 512 x 512).

    Memory on an 8 GB card at 512 x 512 (fp16/bf16, ``research/latentsync.md`` §3.1 and the device check of
    ``benchmarks/family_window.py``): weights 2.54 GB (UNet) + 0.17 GB (VAE) + 0.02 GB (Whisper-tiny); one
    window's UNet activations with CFG batched (batch 2 x 16 frames x 64 x 64 latents) about 2.5 GB, half that
    with ``extra["batch_cfg"] = False``; the VAE encodes and decodes ``extra["vae_slice"]`` frames at a time (4:
    about 1.5 GB), never the whole window; crops, frames and audio features stay in host memory, one window at a
    time. About 5.5 GB at the peak (the UNet pass), so an 8 GB card fits with room; offload "model" moves the UNet
    out while the VAE runs."""

    name = "latentsync"
    title = "LatentSync"
    licence = "weights OpenRAIL++-M (LatentSync 1.5 card; 1.6 unverified), code Apache-2.0, VAE and Whisper MIT"
    trained_fps = None            # any rate: the audio window follows each frame's own time
    trained_window = WINDOW
    window_rule = "any"
    # steps / guidance: scripts/inference.sh (20 steps, guidance 1.5, --enable_deepcache); overlap 0: upstream's
    # windows are back to back (one shared noise frame keeps them consistent). crop_size 640: our square crop is
    # 1.6 face boxes wide (margin 0.3) and LatentSync's 420-px-wide box covers about 1.25 of them, so a 640 crop
    # gives its 512 crop about as many source pixels as it shows (no upsampling of the face twice).
    defaults = {"steps": 20, "guidance": "cfg", "audio_scale": 1.5, "window": WINDOW, "overlap": 0,
                "crop_size": 640, "extra": {"deep_cache": True, "batch_cfg": True, "vae_slice": 4,
                                            "mouth_feather": MOUTH_FEATHER}}
    companions = (Companion("vae", ("sd-vae",), "sd-vae-ft-mse.safetensors"),
                  Companion("audio_encoder", ("whisper-tiny", "whisper"), "latentsync_whisper_tiny.safetensors"))
    downloads = {"latentsync-1.6": (
        RemoteFile("ByteDance/LatentSync-1.6", "latentsync_unet.pt", "diffusion_models", "5.07 GB"),
        RemoteFile("ByteDance/LatentSync-1.6", "whisper/tiny.pt", "audio_encoders", "75.6 MB"),
        RemoteFile("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors", "vae", "335 MB",
                   local_name="sd-vae-ft-mse.safetensors"),
    )}

    def recognise(self, tensors: Mapping, metadata: Mapping[str, str]) -> Optional[Recognition]:
        from ..model.latentsync_unet import LATENTSYNC_UNET_PRESETS, is_latentsync_unet, \
            latentsync_config_from_shapes

        shapes = shapes_of(tensors)
        if any(k.startswith(PREFIX) for k in shapes):
            shapes = {k[len(PREFIX):]: v for k, v in shapes.items() if k.startswith(PREFIX)}
        try:
            if not is_latentsync_unet(shapes):
                return None
            cfg = latentsync_config_from_shapes(shapes)
        except (OmniSyncError, KeyError, ValueError, TypeError, StopIteration):
            return None
        names = {"latentsync-1.6": "LatentSync 1.6 UNet", "latentsync-1.5": "LatentSync 1.5 UNet"}
        label = next((names[n] for n, c in LATENTSYNC_UNET_PRESETS.items() if c == cfg and n in names),
                     "LatentSync UNet")
        details = ("the 1.5 / 1.6 release architecture, 512 x 512" if label != "LatentSync UNet" else
                   f"widths {list(cfg.block_out_channels)}, audio {cfg.cross_attention_dim} wide")
        return Recognition("latentsync-unet", "model", label, param_count(shapes), self.name, details)

    def window_length(self, fps: Fraction, requested: Optional[int] = None, files: Optional[ModelFiles] = None
                      ) -> int:
        """16 frames at any rate (the UNet's GroupNorm spans its training window); a shorter ``requested``
        window is padded to 16 by the generator, a longer one is refused here, before any work."""
        if requested and int(requested) > WINDOW:
            raise InputError(f"a LatentSync window holds at most {WINDOW} frames (its training window), got "
                             f"{requested}; leave the window at its default")
        return int(requested) if requested else WINDOW

    def load(self, files: ModelFiles, plan: MemoryPlan, options: GenerationOptions, step_callback=None,
             progress=None) -> "LatentSyncGenerator":
        from ..model.latentsync_unet import load_latentsync_unet
        from ..model.loading import load_whisper
        from ..model.sd_vae import load_sd_vae

        if plan.fp8 or plan.swap_blocks or plan.offload == "sequential":
            raise InputError("the LatentSync family runs without fp8 weights, block swap or sequential offload "
                             "(it fits 8 GB cards as it is; offload 'model' keeps one model at a time on the GPU)")
        opts = options.resolved(self.defaults_for(files))
        if opts.guidance not in GUIDANCE_MODES:
            raise InputError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {opts.guidance!r}")
        home = torch.device("cpu") if plan.offload == "model" else plan.device
        unet = load_latentsync_unet(files.model, device=home, dtype=plan.dtype)
        vae = load_sd_vae(files.need("vae"), device=home, dtype=plan.dtype)
        audio_dtype = torch.float16 if plan.device.type == "cuda" else torch.float32
        whisper = load_whisper(files.need("audio_encoder"), device=home, dtype=audio_dtype)
        if whisper.config.d_model != unet.config.cross_attention_dim:
            raise InputError(f"{files.companions['audio_encoder'].name} is a Whisper encoder "
                             f"{whisper.config.d_model} wide; {files.recognition.label} attends to "
                             f"{unet.config.cross_attention_dim}-wide features (Whisper tiny: "
                             f"latentsync_whisper_tiny.safetensors, from LatentSync's whisper/tiny.pt)")
        return LatentSyncGenerator(unet, vae, whisper, opts, plan, step_callback)

    def steps_per_window(self, options: GenerationOptions, files: Optional[ModelFiles] = None) -> int:
        """DDIM runs every one of its steps from the shared noise frame (LatentSync inpaints; no tau)."""
        return int(options.resolved(self.defaults_for(files)).steps or self.defaults["steps"])

    def after_download(self, name: str, paths: list[Path], say: Callable[[str], None]) -> list[Path]:
        """Convert the two pickles to safetensors beside them (read weights-only, keys checked strictly against
        the released UNet's; any Whisper, since loading checks its width against the UNet's:
        :func:`~omnisync_core.model.convert.convert_pickle`); the UNet is stored in
        fp16 (upstream runs it in fp16; 2.5 GB instead of 5 GB). A file converted before is kept."""
        from ..model.convert import convert_pickle

        targets = {"latentsync_unet.pt": ("latentsync_unet.safetensors", "latentsync-1.6", torch.float16),
                   "tiny.pt": ("latentsync_whisper_tiny.safetensors", "whisper", None)}
        ready = []
        for path in paths:
            if path.name not in targets:
                ready.append(path)
                continue
            out_name, expect, dtype = targets[path.name]
            out = path.with_name(out_name)
            if not out.is_file():
                say(f"converting {path.name} -> {out.name} (tensors only, keys checked)")
                convert_pickle(path, out, expect=expect, dtype=dtype)
            ready.append(out)
        say("the .pt files can be deleted now: OmniSync reads the .safetensors only")
        return ready


# ---------------------------------------------------------------- audio conditioning

class LatentSyncWindowAudio:
    """LatentSync's audio conditioning of a whole track: :meth:`window` gives ``[n, 10 * L, D]`` (``[n, 50, 384]``
    for Whisper tiny) per output frame: the tokens ``c - 4 .. c + 5`` around the frame's own time, time-major
    (upstream ``audio2feature.py`` L27-52), from :class:`~omnisync_core.audio.latentsync_audio.LatentSyncAudioTrack`
    (or from its tokens all computed: :meth:`materialized`)."""

    def __init__(self, tokens, fps):
        from ..generator import WhisperFrameTokens
        from ..audio.latentsync_audio import TOKENS_AFTER, TOKENS_BEFORE

        self.frames = WhisperFrameTokens(tokens, fps, TOKENS_BEFORE, TOKENS_AFTER)

    def window(self, frames: Tensor) -> Tensor:
        return self.frames.window(frames).flatten(1, 2)

    def materialized(self) -> "LatentSyncWindowAudio":
        whole = self.frames.materialized()
        return LatentSyncWindowAudio(whole.tokens, whole.aligner.fps)


# ---------------------------------------------------------------- geometry of a window

def _fallback_points(mouth_xy: Tensor, face_width: Tensor) -> Tensor:
    """The 3 alignment points ``[n, 3, 2]`` (image-left brow, image-right brow, nose; our pixel convention) of an
    upright face with this mouth centre and cheek-to-cheek width: LatentSync's template proportions (brows 41
    units apart, 20 units above the nose, the mouth about 22 below it) with the brows 1/1.6 of the face width
    apart. For frames without landmarks (a box only)."""
    s = face_width.float() / 1.6
    x, y = mouth_xy[:, 0].float(), mouth_xy[:, 1].float()
    brow_y = y - 1.02 * s
    return torch.stack([torch.stack([x - s / 2, brow_y], 1), torch.stack([x + s / 2, brow_y], 1),
                        torch.stack([x, y - 0.54 * s], 1)], 1)


def alignment_points(points: Optional[Tensor], mouth_xy: Tensor, face_width: Tensor) -> Tensor:
    """LatentSync's 3 points ``[n, 3, 2]`` in OpenCV's convention (pixel centres at integers) from our named face
    points ``[n, K, 2]`` (the Face Mesh groups LatentSync 1.5 used), rounded as upstream rounds them; frames whose
    points are missing or degenerate (brows less than 2 px apart) take :func:`_fallback_points`."""
    from ..face.types import point_index

    fallback = _fallback_points(mouth_xy, face_width)
    if points is None:
        chosen = fallback
    else:
        named = points[:, [point_index("right_brow"), point_index("left_brow"), point_index("nose")]].float()
        ok = torch.isfinite(named).flatten(1).all(1) & ((named[:, 1] - named[:, 0]).norm(dim=1) > 2.0)
        chosen = torch.where(ok.view(-1, 1, 1), named, fallback)
    return (chosen.double() - 0.5).round()


def pad_index(n: int, frames: int = WINDOW) -> Tensor:
    """Which of a window's ``n`` frames fills each of ``frames`` places: the frames, then played back and forth
    (so a short last window keeps natural frame statistics for the window-wide GroupNorm)."""
    from ..timeline import source_frame_index

    if n > frames:
        raise InputError(f"a LatentSync window holds at most {frames} frames, got {n} (--window {frames} on the "
                         f"command line; in code, LipSyncOptions(window=FAMILY.window_length(fps), overlap=0))")
    return source_frame_index(torch.arange(frames), n, "pingpong")


@dataclass
class LatentSyncLatents:
    """One window's state: LatentSync's crops ``[F, R, R, 3]`` and their transform from our crop, the UNet's
    conditioning ``[1, 9, F, h, w]`` (mask, masked-frame and reference latents), the shared noise ``[1, 4, F, h,
    w]``, the window's real frame count ``n`` and, once sampled, the latents ``z``."""

    crops: Tensor
    params: object
    conditioning: Tensor
    noise: Tensor
    n: int
    z: Optional[Tensor] = None


# ---------------------------------------------------------------- generator

class LatentSyncGenerator:
    """Edits windows of face crops with a LatentSync UNet3D, the SD VAE and Whisper tiny (a WindowGenerator).
    ``resolution``: LatentSync's crop side, the UNet's latent size times the VAE's factor (512 for 1.6)."""

    window_rule = "any"

    def __init__(self, unet, vae, audio_encoder, options: GenerationOptions, plan: MemoryPlan, step_callback=None):
        self.unet, self.vae, self.audio_encoder = unet.eval(), vae.eval(), audio_encoder.eval()
        self.options, self.plan = options, plan
        self.device = plan.device
        self.step_callback = step_callback
        self.frames = WINDOW
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(unet.config.sample_size) * self.factor
        self.parts = {"unet": self.unet, "vae": self.vae, "audio": self.audio_encoder}
        self.stage_parts = {"audio": ("audio",), "encode": ("vae",), "sample": ("unet",), "decode": ("vae",)}

    def _stage(self, stage: str) -> None:
        """With model offload, only the models of ``stage`` on the device (the UNet leaves while the VAE runs)."""
        if self.plan.offload != "model":
            return
        wanted = self.stage_parts[stage]
        for name in sorted(self.parts, key=lambda n: n in wanted):      # out of the device first
            self.parts[name].to(self.device if name in wanted else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _extra(self, name: str):
        return self.options.extra.get(name, LatentSyncFamily.defaults["extra"][name])

    # ------------------------------------------------------------------ audio

    def audio_features(self, track, fps, progress=None) -> LatentSyncWindowAudio:
        """Whisper-tiny's 5-layer features of ``track`` (an AudioTrack), 30 s windows encoded as asked for."""
        from ..audio.latentsync_audio import LatentSyncAudioTrack

        self._stage("audio")
        return LatentSyncWindowAudio(LatentSyncAudioTrack(track.speech(), self.audio_encoder, progress=progress),
                                     fps)

    # ------------------------------------------------------------------ geometry

    def crop_params(self, window):
        """Per padded frame the transform from our crop to LatentSync's (:class:`~omnisync_core.face.crop.
        CropParams` with our crop as the frame), and the padding index."""
        from ..face.latentsync_align import latentsync_points_params

        index = pad_index(window.crops.shape[0], self.frames)
        points = window.points[index] if window.points is not None else None
        pts = alignment_points(points, window.mouth_xy[index], window.face_width[index])
        size = int(window.crops.shape[1])
        return latentsync_points_params(pts, (size, size), self.resolution), index

    @staticmethod
    def _back(params):
        """The inverse of ``params``: LatentSync's crop as the frame, our crop as the crop."""
        from ..face.crop import CropParams

        size = int(params.frame_hw[0])
        return CropParams(params.frame_from_crop, params.crop_from_frame, size, (params.size, params.size))

    def blend_weight(self, state: LatentSyncLatents) -> Tensor:
        """Weight ``[n, S, S]`` of the generated pixels in our crop: LatentSync's mask (1 - mask.png), shrunk and
        feathered inward by ``extra["mouth_feather"]`` pixels at 512 (:func:`~omnisync_core.face.latentsync_align.
        mouth_blend_weight`), warped into our crop. Where it is 0 the output is the source crop exactly."""
        from ..face.crop import crop_faces
        from ..face.latentsync_align import latentsync_mask, mouth_blend_weight

        feather = float(self._extra("mouth_feather")) * self.resolution / 512
        w = mouth_blend_weight(latentsync_mask(self.resolution), feather)
        w3 = w.view(1, *w.shape, 1).expand(state.n, -1, -1, 3).contiguous()
        return crop_faces(w3, self._back(state.params[:state.n]))[..., 0].clamp_(0, 1)

    # ------------------------------------------------------------------ stages

    @torch.no_grad()
    def encode(self, window) -> LatentSyncLatents:
        from ..ddim import shared_noise
        from ..face.crop import crop_faces
        from ..face.latentsync_align import latent_mask, latentsync_mask

        self._stage("encode")
        params, index = self.crop_params(window)
        crops = crop_faces(window.crops[index].float(), params)                    # [F, R, R, 3] in 0..1
        pixels = crops.permute(3, 0, 1, 2).unsqueeze(0).to(self.device).mul(2).sub(1)   # [1, 3, F, R, R]
        mask = latentsync_mask(self.resolution, device=self.device)
        gen = torch.Generator().manual_seed(int(window.seed))
        slice_size = int(self._extra("vae_slice"))
        masked = self.vae.encode(pixels * mask, gen, slice_size=slice_size).float()
        reference = self.vae.encode(pixels, gen, slice_size=slice_size).float()
        h, w = masked.shape[-2:]
        mask_lat = latent_mask(mask, (h, w)).float().view(1, 1, 1, h, w).expand(1, 1, self.frames, h, w)
        conditioning = torch.cat([mask_lat, masked, reference], 1)
        # upstream draws one noise frame per video: the job's seed (each window's seed is seed + its first frame)
        base_seed = int(window.seed) - int(window.frames[0])
        noise = shared_noise((h, w), self.frames, torch.Generator().manual_seed(base_seed), device=self.device)
        return LatentSyncLatents(crops, params, conditioning, noise, int(window.crops.shape[0]))

    def _guidance(self, state: LatentSyncLatents, window, timesteps: Tensor):
        """The CFG scale, or for "ds-cfg" a function of the timestep giving DS-CFG's weight map ``[1, 1, F, h,
        w]`` (noise level ``sqrt(1 - alpha_bar_t)``, the mouth mapped into LatentSync's crop)."""
        from ..ddim import alphas_cumprod
        from ..face.crop import _apply
        from ..sampling import DSCFGGuidance, DSCFGParams

        opts = self.options
        if opts.guidance == "none":
            return 1.0
        if opts.guidance == "cfg":
            return float(opts.audio_scale)
        index = pad_index(state.n, self.frames)
        m = state.params.crop_from_frame.double()
        mouth = _apply(m, window.mouth_xy[index].double()[:, None])[:, 0]
        width = window.face_width[index].double() * m[:, :, 0].norm(dim=1)
        h, w = state.noise.shape[-2:]
        scale = torch.tensor([w / self.resolution, h / self.resolution], dtype=torch.float64)
        sigma = (1 - alphas_cumprod()).sqrt()
        weight = DSCFGGuidance((mouth * scale).float()[None].to(self.device), (width * scale[0]).float()[None],
                               (h, w), float(sigma[int(timesteps[0])]), DSCFGParams(omega_peak=float(opts.audio_scale)))
        return lambda t: weight(float(sigma[int(t)]))

    @torch.no_grad()
    def sample(self, state: LatentSyncLatents, window, step_callback=None) -> LatentSyncLatents:
        from ..ddim import ddim_timesteps, sample_window

        if window.audio is None:
            raise InputError("the LatentSync generator needs its audio windows (audio_features(...).window(frames))")
        self._stage("sample")
        audio = window.audio
        if audio.shape[0] != state.n:
            raise InputError(f"the audio covers {audio.shape[0]} frames, the window {state.n}")
        audio = audio[pad_index(state.n, self.frames)].unsqueeze(0).to(self.device)
        steps = int(self.options.steps)
        callback = step_callback if step_callback is not None else self.step_callback
        z = sample_window(self.unet, state.noise, state.conditioning.to(self.device), audio, steps,
                          self._guidance(state, window, ddim_timesteps(steps)), bool(self._extra("deep_cache")),
                          CACHE_INTERVAL, batch_cfg=bool(self._extra("batch_cfg")),
                          step_callback=(lambda i, n, t, x: callback(i, n, x)) if callback is not None else None)
        return LatentSyncLatents(state.crops, state.params, state.conditioning, state.noise, state.n, z)

    @torch.no_grad()
    def decode(self, state: LatentSyncLatents, window) -> Tensor:
        """The edited crops ``[n, S, S, 3]``: the decoded mouth, warped back into our crop, blended into the source
        crop through :meth:`blend_weight` (the source exactly where the weight is 0)."""
        from ..face.crop import crop_faces

        if state.z is None:
            raise InputError("this window has not been sampled yet (run the sampler first)")
        self._stage("decode")
        n = state.n
        decoded = self.vae.decode(state.z[:, :, :n], slice_size=int(self._extra("vae_slice")))
        generated = decoded[0].float().add(1).div(2).clamp(0, 1).permute(1, 2, 3, 0).cpu()    # [n, R, R, 3]
        ours = crop_faces(generated, self._back(state.params[:n]))
        weight = self.blend_weight(state).unsqueeze(-1)
        source = window.crops.float()
        return torch.where(weight > 0, source + weight * (ours - source), source)

    @torch.no_grad()
    def __call__(self, window) -> Tensor:
        return self.decode(self.sample(self.encode(window), window), window)


FAMILY = LatentSyncFamily()

__all__ = ["FAMILY", "LatentSyncFamily", "LatentSyncGenerator", "LatentSyncLatents", "LatentSyncWindowAudio",
           "alignment_points", "pad_index"]
