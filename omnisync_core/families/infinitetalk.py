"""The InfiniteTalk family (MeiGen-AI/InfiniteTalk; research/infinitetalk.md): stock Wan2.1-I2V-14B plus the
InfiniteTalk single-speaker audio adapter, with chinese-wav2vec2-base audio, CLIP ViT-H image conditioning and umT5
text, driven the OmniSync way (DESIGN.md §9).

Files: the Wan2.1-I2V-14B base in the original keys (the official shards merged, or Comfy-Org's repack: fp16, bf16
or ``fp8_scaled``), the adapter as a patch (MeiGen's ``single/infinitetalk.safetensors`` or Comfy-Org's
``model_patches/wan2.1_infiniteTalk_single_fp16.safetensors``, 330 keys; a file holding base and adapter together
needs none), ``clip_vision_h.safetensors``, chinese-wav2vec2-base (safetensors), the Wan 2.1 VAE and, unless the
text conditioning is given, umT5-xxl.

Per window (:class:`InfiniteTalkGenerator`): the face crops are mapped to the trained 25 fps
(:func:`~.v2v.time_map`), VAE-encoded and noised to tau (progressive init). The reference is the window's first
source frame, as upstream's V2V takes one source frame per chunk (``wan/multitalk.py`` L433, L807): its CLIP
features (``clip.visual``, penultimate block, L527-542 of ``wan/modules/clip.py``) and the 20-channel I2V condition
``y`` = [mask: 1 on latent frame 0 ; VAE latent of the reference followed by grey frames] (L551-581). Latent frame 0
is the clean latent of that frame before every model call and after every step, as upstream's first chunk
(L711, L773). Sampling runs InfiniteTalk's three-pass guidance (L755-757)

    v = uncond + s_t (cond - drop_text) + W_a (drop_text - uncond)

(uncond: negative text, null audio; drop_text: negative text, audio; cond: prompt, audio; the null audio is zero
wav2vec2 features through audio_proj, L668-685), with ``W_a`` DS-CFG's spatio-temporal weight peaking at the audio
scale ("ds-cfg"), the audio scale itself ("cfg") or 1 ("none"). At text scale 1 it is upstream's two passes
``drop_audio + W_a (cond - drop_audio)`` (L719-722, L753). After every step the noised source is put back outside
the dilated lower face (:class:`~.v2v.SourceReinjection`): InfiniteTalk re-renders whole frames, this keeps it to
the mouth. The decoded frames are mapped back to the window's own frames (exact fps and frame count kept).

Memory (weights on the compute device; parameters 16.39 B base + 2.49 B adapter = 18.88 B; a block 464.2 M;
outside the blocks 315.6 M; see :mod:`~omnisync_core.model.wan_i2v` for the per-tensor arithmetic):

* bf16: 18.88 B x 2 B = 37.8 GB: a 48 GB card or more.
* fp8 (``--fp8``, or an ``fp8_scaled`` file as it is): 18.87 B Linear weights x 1 B + 7.5 M others x 2 B = 18.9 GB
  (plus one dequantised Linear at a time, at most 315 MB); fits a 24 GB card with the activations of a 512^2 face
  crop window (about 7.5 GB for the three passes in one batch, less one by one: ``extra={"batch_passes": False}``)
  only with block swap as well, e.g. fp8 + 10 blocks: 0.32 + 32 x 0.464 = 15.2 GB.
* block swap of N blocks (``--swap-blocks N``): outside + (40 - N + min(N, 2)) x block on the device, block =
  0.928 GB bf16 / 0.464 GB fp8, outside = 0.63 GB bf16 / 0.32 GB fp8: bf16 N = 20: 21.0 GB, N = 40: 2.5 GB;
  fp8 N = 20: 10.5 GB, N = 40: 1.2 GB. The host holds N blocks (pinned). Each forward moves N blocks over PCIe.
* beside the DiT: CLIP ViT-H vision 0.63 B (1.3 GB fp16), the Wan VAE 0.13 B (0.5 GB fp32), wav2vec2-base 95 M
  (0.38 GB fp32), all moved to the host between stages with ``--offload model``; umT5-xxl (5.7 B: 11.4 GB bf16,
  6.7 GB fp8) runs once at load and is freed (or never, with ``--prompt-embeds`` / ComfyUI's conditioning).

Why the download takes Comfy-Org's ``fp8_scaled`` base: it is 16.4 GB on disk instead of 32.8 GB, it is what most
artists' ComfyUI folders already hold, and it is the only way 18.9 B parameters come near a 24 GB card; bf16 weights
give no better lips in Comfy users' reports, and ``--fp8`` makes the same layout from an fp16 file at load anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, OmniSyncError
from ..timeline import valid_window_length
from . import v2v
from .base import Companion, Family, GenerationOptions, MemoryPlan, ModelFiles, Recognition, RemoteFile
from .components import param_count
from .conditioning import text_conditioning

INFINITETALK_TRAINED_FPS = 25            # "Assume the video fps is 25" (generate_infinitetalk.py L325)
GUIDANCE_MODES = ("ds-cfg", "cfg", "none")
SHIFT_480P, SHIFT_720P = 7.0, 11.0       # generate_infinitetalk.py L46-52
# the V2V example's prompt (examples/single_example_video.json), and the English negative prompt InfiniteTalk uses
# when none is given (wan/configs/wan_multitalk_14B.py L11, wan/multitalk.py L485-486)
INFINITETALK_DEFAULT_PROMPT = "A person is talking."
INFINITETALK_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards")
_REPACK = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"


def default_shift(crop_size: int) -> float:
    """InfiniteTalk's shift for a crop side: 7 (its 480p setting) below 720 px, 11 (720p) from there on."""
    return SHIFT_720P if int(crop_size) >= 720 else SHIFT_480P


class InfiniteTalkFamily(Family):
    name = "infinitetalk"
    title = "InfiniteTalk"
    licence = "Apache-2.0"
    trained_fps = Fraction(INFINITETALK_TRAINED_FPS)
    trained_window = 81              # frame_num 81 (generate_infinitetalk.py L182-185)
    # steps 40, text 5, audio 4: generate_infinitetalk.py L43-44, L199-208; shift: None = by crop size
    # (default_shift); tau 0.92: the OmniSync start (25 of the 40 shift-7 steps run, 20 at shift 11).
    # crop_size 512: a 512^2 crop on the VAE x patch grid (16 px) is 21,504 tokens a window, under 480p's 640^2.
    defaults = {"steps": 40, "shift": None, "tau": 0.92, "text_scale": 5.0, "audio_scale": 4.0,
                "mask_dilation": v2v.DEFAULT_MASK_DILATION, "overlap": 8, "crop_size": 512,
                "extra": {"batch_passes": True, "clean_first_latent": True}}
    companions = (Companion("patch", ("infinitetalk-patch",), "wan2.1_infiniteTalk_single_fp16.safetensors"),
                  Companion("clip_vision", ("clip-vision",), "clip_vision_h.safetensors"),
                  Companion("audio_encoder", ("wav2vec2",), "wav2vec2-chinese-base_fp16.safetensors"),
                  Companion("vae", ("wan-vae",), "wan_2.1_vae.safetensors"),
                  Companion("text_encoder", ("umt5",), "umt5_xxl_fp8_e4m3fn_scaled.safetensors", required=False))
    downloads = {"infinitetalk": (
        RemoteFile(_REPACK, "split_files/diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors",
                   "diffusion_models", "16.4 GB"),
        RemoteFile(_REPACK, "split_files/model_patches/wan2.1_infiniteTalk_single_fp16.safetensors",
                   "model_patches", "4.97 GB"),
        RemoteFile(_REPACK, "split_files/clip_vision/clip_vision_h.safetensors", "clip_vision", "1.26 GB"),
        RemoteFile("Kijai/wav2vec2_safetensors", "wav2vec2-chinese-base_fp16.safetensors", "audio_encoders",
                   "190 MB"),
        RemoteFile(_REPACK, "split_files/vae/wan_2.1_vae.safetensors", "vae", "254 MB"),
        RemoteFile(_REPACK, "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders",
                   "6.74 GB"),
    )}

    def recognise(self, tensors: Mapping, metadata: Mapping[str, str]) -> Optional[Recognition]:
        from ..model.wan_i2v import is_wan_i2v, wan_i2v_config_from_shapes, wan_i2v_label

        try:
            if not is_wan_i2v(tensors):
                return None
            cfg = wan_i2v_config_from_shapes(tensors)
        except (OmniSyncError, KeyError, ValueError, TypeError):
            return None
        fp8 = any(str(getattr(v, "dtype", "")).startswith("F8") for v in tensors.values())
        details = [f"dim {cfg.dim}, {cfg.num_layers} layers"] + (["fp8 scaled"] if fp8 else [])
        details.append("base and InfiniteTalk adapter in one file" if cfg.audio else
                       "the base of InfiniteTalk: give its adapter with --patch")
        skip = lambda k: k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8"    # noqa: E731
        return Recognition("infinitetalk" if cfg.audio else "wan-i2v", "model", wan_i2v_label(cfg),
                           param_count(tensors, skip), self.name, "; ".join(details))

    def companion_roles(self, files: Optional[ModelFiles] = None) -> tuple[Companion, ...]:
        """A file holding base and adapter needs no patch."""
        if files is not None and files.recognition.kind == "infinitetalk":
            return tuple(c for c in self.companions if c.role != "patch")
        return self.companions

    def load(self, files: ModelFiles, plan: MemoryPlan, options: GenerationOptions, step_callback=None,
             progress=None) -> "InfiniteTalkGenerator":
        """The generator: the DiT (base + patch) in ``plan.dtype`` with fp8 weights (an fp8_scaled file as it is;
        ``plan.fp8`` also quantises 16-bit files at load) and ``plan.swap_blocks`` blocks in host memory; CLIP,
        VAE and wav2vec2 beside it; the text conditioning made once."""
        from ..model.clip_vision import load_clip_vision
        from ..model.loading import load_vae
        from ..model.wan_i2v import load_wan_i2v
        from ..audio.wav2vec2 import load_wav2vec2

        if plan.offload == "sequential":
            raise InputError("the InfiniteTalk family moves its DiT's blocks with block swap: use --swap-blocks N "
                             "(up to 40) instead of sequential offload")
        opts = options.resolved(self.defaults_for(files))
        if opts.guidance not in GUIDANCE_MODES:
            raise InputError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {opts.guidance!r}")
        patch = None if files.recognition.kind == "infinitetalk" else files.need("patch")
        home = torch.device("cpu") if plan.offload == "model" else plan.device
        # with block swap the DiT stays where block swap put it (its swapped blocks on the host already)
        dit_home = plan.device if plan.swap_blocks else home
        dit = load_wan_i2v(files.model, patch, device=dit_home, dtype=plan.dtype,
                           fp8=True if plan.fp8 else None, swap_blocks=plan.swap_blocks)
        cfg = dit.config
        if not cfg.audio:
            raise InputError(f"{files.recognition.label} has no InfiniteTalk adapter: give it with --patch")
        positive, negative = text_conditioning(files, cfg.text_dim, cfg.text_len, plan.device,
                                               INFINITETALK_DEFAULT_PROMPT, INFINITETALK_NEGATIVE_PROMPT)
        vae = load_vae(files.need("vae"), device=home)
        if vae.config.z_dim != cfg.out_dim:
            raise InputError(f"{files.companions['vae'].name} has {vae.config.z_dim} latent channels; "
                             f"{files.recognition.label} takes the Wan 2.1 VAE's {cfg.out_dim}")
        clip = load_clip_vision(files.need("clip_vision"), device=home,
                                dtype=torch.float16 if plan.device.type == "cuda" else torch.float32)
        if clip.config.hidden_size != cfg.clip_dim:
            raise InputError(f"{files.companions['clip_vision'].name} is a CLIP vision tower "
                             f"{clip.config.hidden_size} wide; {files.recognition.label} takes CLIP ViT-H/14 "
                             f"features ({cfg.clip_dim} wide; clip_vision_h.safetensors)")
        wav2vec = load_wav2vec2(files.need("audio_encoder"), device=home, dtype=torch.float32)
        wc = wav2vec.config
        if (wc.num_hidden_layers, wc.hidden_size) != (cfg.wav2vec_layers, cfg.wav2vec_dim):
            raise InputError(f"{files.companions['audio_encoder'].name} is a wav2vec2 of {wc.num_hidden_layers} "
                             f"layers x {wc.hidden_size}; the InfiniteTalk adapter takes {cfg.wav2vec_layers} x "
                             f"{cfg.wav2vec_dim} (chinese-wav2vec2-base)")
        return InfiniteTalkGenerator(dit, vae, clip, wav2vec, positive, negative, opts, plan, step_callback,
                                     shift=options.shift)


# ---------------------------------------------------------------- audio conditioning

class InfiniteTalkAudio:
    """chinese-wav2vec2-base features of a whole track at 25 fps, as upstream's ``get_embedding``
    (``generate_infinitetalk.py`` L283-343): the speech normalised to -23 LUFS over the whole track, the CNN
    features interpolated to 25 fps before the transformer (:func:`~omnisync_core.audio.wav2vec2.encode_speech`'s
    order), the 12 layer outputs. :meth:`window` gives a video window's per-model-frame windows of 5 features
    ``[4k + 1, 5, 12, 768]`` (upstream's ``indices = arange(5) - 2`` around each frame, clamped to the track).

    Long tracks are encoded in chunks of ``chunk_frames`` features (40 s, upstream's longest default clip) with
    ``context`` features of audio either side that are encoded and dropped, on demand, the last ``cache_chunks``
    kept; a track up to ``chunk_frames`` features is one chunk, exactly upstream's whole-clip encoding. The speech
    itself is held as float32 (64 kB per second) since the loudness is measured over the whole track.
    """

    def __init__(self, speech, encoder, fps, chunk_frames: int = 1000, context: int = 125, cache_chunks: int = 2,
                 progress=None):
        from ..audio.features import as_speech
        from ..audio.wav2vec2 import SAMPLE_RATE, prepare_speech

        reader = as_speech(speech)
        samples = reader.read(0, reader.num_samples)
        samples = samples.mean(0) if samples.ndim == 2 else samples
        self.samples = prepare_speech(samples, do_normalize=encoder.config.do_normalize)
        self.per_frame = SAMPLE_RATE // INFINITETALK_TRAINED_FPS          # 640 samples per feature
        self.num_frames = len(self.samples) // self.per_frame
        if self.num_frames < 1:
            raise InputError(f"the audio has {len(self.samples)} samples, fewer than one 25 fps frame "
                             f"({self.per_frame} at 16 kHz)")
        self.encoder, self.fps = encoder, fps
        self.chunk_frames, self.context = int(chunk_frames), int(context)
        self.num_chunks = -(-self.num_frames // self.chunk_frames)
        self._cache: "OrderedDict[int, Tensor]" = OrderedDict()
        self._cache_chunks = max(1, int(cache_chunks))
        self._progress, self._done = progress, set()

    @torch.no_grad()
    def _chunk(self, i: int) -> Tensor:
        """Features ``[i * chunk_frames, (i + 1) * chunk_frames)`` (float32, CPU), cached."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        keep0, keep1 = i * self.chunk_frames, min((i + 1) * self.chunk_frames, self.num_frames)
        lo, hi = max(0, keep0 - self.context), min(self.num_frames, keep1 + self.context)
        stop = len(self.samples) if hi == self.num_frames else hi * self.per_frame
        p = next(self.encoder.parameters())
        x = torch.from_numpy(self.samples[lo * self.per_frame: stop]).to(p.device, p.dtype)
        feats = self.encoder(x, hi - lo)[0, keep0 - lo: keep1 - lo].to("cpu", torch.float32)
        self._cache[i] = feats
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        if i not in self._done:
            self._done.add(i)
            if self._progress is not None:
                self._progress(len(self._done), self.num_chunks)
        return feats

    def features(self, start: int, stop: int) -> Tensor:
        """Features ``[start, stop)`` of the whole track: ``[stop - start, 12, 768]`` float32 on the CPU."""
        if not 0 <= start < stop <= self.num_frames:
            raise InputError(f"feature range [{start}, {stop}) is not inside [0, {self.num_frames})")
        first, last = start // self.chunk_frames, (stop - 1) // self.chunk_frames
        x = torch.cat([self._chunk(i) for i in range(first, last + 1)])
        return x[start - first * self.chunk_frames: stop - first * self.chunk_frames]

    def window(self, frames: Tensor) -> Tensor:
        """Per-model-frame windows ``[4k + 1, 5, 12, 768]`` of output frames ``frames`` (consecutive, at the
        source's fps, mapped to 25 fps and padded to 4k + 1 as the crops are)."""
        from ..model.wan_i2v import audio_windows

        n = int(frames.shape[0])
        m = v2v.time_map(n, self.fps, INFINITETALK_TRAINED_FPS).model_frames
        frame0 = v2v.model_frame0(int(frames[0]), self.fps, INFINITETALK_TRAINED_FPS)
        length, half = valid_window_length(m), 2
        lo = min(max(frame0 - half, 0), self.num_frames - 1)
        hi = max(min(frame0 + length + half, self.num_frames), lo + 1)
        return audio_windows(self.features(lo, hi), frame0 - lo, length, 2 * half + 1)


# ---------------------------------------------------------------- generator

@dataclass
class InfiniteTalkLatents:
    """One window's state at 25 fps: the source latent and its noise, the I2V condition ``y`` and CLIP features of
    the reference frame, and once sampled z."""

    z_src: Tensor
    noise: Tensor
    y: Tensor
    clip: Tensor
    model_frames: int
    z: Optional[Tensor] = None


def i2v_condition(vae, reference: Tensor, frames: int) -> Tensor:
    """Upstream's y (``wan/multitalk.py`` L551-581) for a ``frames``-frame (4k + 1) window: ``reference`` is
    one crop ``[S, S, 3]`` (0..1); the result ``[1, 4 + z, T, h, w]`` is the mask (1 on latent frame 0, the known
    frame) and the VAE latent of the reference followed by ``frames - 1`` grey frames (0 in [-1, 1])."""
    p = next(vae.parameters())
    video = torch.zeros(1, 3, frames, *reference.shape[:2], device=p.device)
    video[:, :, 0] = reference.permute(2, 0, 1).to(p.device).float() * 2 - 1
    latent = vae.encode(video)
    mask = torch.zeros(1, 4, *latent.shape[2:], device=latent.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)


class InfiniteTalkGenerator(v2v.V2VGenerator):
    """Edits windows of face crops with Wan2.1-I2V-14B + InfiniteTalk, CLIP ViT-H, the Wan VAE and
    chinese-wav2vec2-base (a WindowGenerator; see the module docstring)."""

    temporal_factor = 4
    trained_fps = INFINITETALK_TRAINED_FPS

    def __init__(self, dit, vae, clip, audio_encoder, positive: Tensor, negative: Tensor,
                 options: GenerationOptions, plan: MemoryPlan, step_callback=None, shift: Optional[float] = None):
        self.dit, self.vae, self.clip, self.audio_encoder = dit.eval(), vae.eval(), clip.eval(), audio_encoder.eval()
        self.options, self.plan, self.shift = options, plan, shift
        self.device, self.dtype = plan.device, plan.dtype
        self.positive, self.negative = positive, negative
        self.step_callback = step_callback
        self.last_stats = None
        # with block swap the DiT is placed once for good (its swapped blocks live on the host)
        self.parts = {"vae": self.vae, "clip": self.clip, "audio": self.audio_encoder}
        if not plan.swap_blocks:
            self.parts["dit"] = self.dit
        self.stage_parts = {"audio": ("audio",), "encode": ("vae", "clip"), "sample": ("dit",), "decode": ("vae",)}

    def audio_features(self, track, fps, progress=None) -> InfiniteTalkAudio:
        """The wav2vec2 features of ``track`` (an AudioTrack), encoded chunk by chunk on demand."""
        self._stage("audio")
        return InfiniteTalkAudio(track.speech(), self.audio_encoder, fps, progress=progress)

    def _shift(self, crop_size: int) -> float:
        return float(self.shift) if self.shift is not None else default_shift(crop_size)

    @torch.no_grad()
    def encode(self, window) -> InfiniteTalkLatents:
        from ..generator import encode_window
        from ..model.clip_vision import encode_image

        self._stage("encode")
        tm = self.time_map(window)
        crops = tm.to_model(window.crops)
        z_src, noise = encode_window(self.vae, crops, window.seed, self.device)
        reference = crops[0]
        y = i2v_condition(self.vae, reference, valid_window_length(tm.model_frames)).to(self.device)
        clip = encode_image(self.clip, reference.permute(2, 0, 1)[None].float() * 2 - 1).to(self.device)
        return InfiniteTalkLatents(z_src, noise, y, clip, tm.model_frames)

    @torch.no_grad()
    def sample(self, state: InfiniteTalkLatents, window, step_callback=None) -> InfiniteTalkLatents:
        from ..sampling import flow_sigmas, sample

        if window.audio is None:
            raise InputError("the InfiniteTalk generator needs its audio windows (audio_features(...).window(...))")
        self._stage("sample")
        z_src, noise = state.z_src, state.noise
        frames, latent_hw = valid_window_length(state.model_frames), tuple(z_src.shape[-2:])
        if window.audio.shape[0] != frames:
            raise InputError(f"the audio covers {window.audio.shape[0]} video frames at 25 fps, the window {frames}")
        tm = self.time_map(window)
        mask, mouth, width = v2v.window_mask(window, tm, latent_hw, frames, float(self.options.mask_dilation),
                                             self.temporal_factor)
        weight = v2v.audio_weight(self.options, mouth, width, latent_hw, self.device)
        first = z_src[:, :, :1] if self.options.extra.get("clean_first_latent", True) else None
        velocity = self._velocity(window.audio, state, weight, first)
        reinject = v2v.SourceReinjection(z_src, noise, mask)

        def project(x: Tensor, sigma: float) -> Tensor:
            x = reinject(x, sigma)
            if first is not None:
                x[:, :, :1] = first.to(x.dtype)
            return x

        sigmas = flow_sigmas(int(self.options.steps), self._shift(window.crops.shape[1]))
        callback = step_callback if step_callback is not None else self.step_callback
        z, self.last_stats = sample(velocity, z_src, noise, sigmas, float(self.options.tau), None, callback,
                                    project=project)
        return InfiniteTalkLatents(z_src, noise, state.y, state.clip, state.model_frames, z)

    def _passes(self, tokens: Tensor, null: Tensor) -> tuple[list, str]:
        """The (text, audio tokens) of each forward pass and how they combine: InfiniteTalk's three passes, or
        fewer where a scale of 1 makes one drop out."""
        s_t, guided = float(self.options.text_scale), self.options.guidance != "none"
        length = max(self.positive.shape[1], self.negative.shape[1])
        pos = F.pad(self.positive, (0, 0, 0, length - self.positive.shape[1])).to(self.device, self.dtype)
        neg = F.pad(self.negative, (0, 0, 0, length - self.negative.shape[1])).to(self.device, self.dtype)
        if s_t != 1.0 and guided:
            return [(neg, null), (neg, tokens), (pos, tokens)], "text+audio"
        if s_t != 1.0:
            return [(neg, tokens), (pos, tokens)], "text"
        if guided:
            return [(pos, null), (pos, tokens)], "audio"
        return [(pos, tokens)], "cond"

    def _velocity(self, audio: Tensor, state: InfiniteTalkLatents, weight, first: Optional[Tensor]):
        """The guided velocity closure (one batched forward unless ``extra["batch_passes"]`` is False)."""
        opts, dev, dt = self.options, self.device, self.dtype
        s_t = float(opts.text_scale)
        windows = audio.to(dev, dt).unsqueeze(0)
        tokens = self.dit.audio_tokens(windows)
        null = self.dit.audio_tokens(torch.zeros_like(windows))     # upstream's null audio: zero features
        passes, kind = self._passes(tokens, null)
        y, clip = state.y.to(dev, dt), state.clip.to(dev, dt)
        batched = bool(opts.extra.get("batch_passes", True)) and len(passes) > 1
        if batched:
            texts = torch.cat([p[0] for p in passes])
            audios = torch.cat([p[1] for p in passes])

        def velocity(x: Tensor, sigma: Tensor, with_audio: bool = True) -> Tensor:
            xm = x.to(dev, dt)
            if first is not None:
                xm = torch.cat([first.to(dev, dt), xm[:, :, 1:]], dim=2)
            s = sigma.reshape(1)
            if batched:
                out = self.dit(xm.expand(len(passes), -1, -1, -1, -1), s, texts, clip, y,
                               audio_tokens=audios).float().chunk(len(passes))
            else:
                out = [self.dit(xm, s, t, clip, y, audio_tokens=a).float() for t, a in passes]
            w = weight(float(sigma))
            if isinstance(w, Tensor):
                w = w.to(out[0].device, out[0].dtype)
            if kind == "text+audio":
                uncond, drop_text, cond = out
                return uncond + s_t * (cond - drop_text) + w * (drop_text - uncond)
            if kind == "text":
                drop_text, cond = out
                return drop_text + s_t * (cond - drop_text)
            if kind == "audio":
                drop_audio, cond = out
                return drop_audio + w * (cond - drop_audio)
            return out[0]

        return velocity


FAMILY = InfiniteTalkFamily()

__all__ = ["FAMILY", "INFINITETALK_DEFAULT_PROMPT", "INFINITETALK_NEGATIVE_PROMPT", "InfiniteTalkAudio",
           "InfiniteTalkFamily", "InfiniteTalkGenerator", "InfiniteTalkLatents", "default_shift", "i2v_condition"]
