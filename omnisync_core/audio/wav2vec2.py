"""wav2vec 2.0 as InfiniteTalk runs it: TencentGameMate/chinese-wav2vec2-base (MIT), 12 layer outputs at 25 fps.

InfiniteTalk (``src/audio_analysis/wav2vec2.py``, ``generate_infinitetalk.py`` ``get_embedding``) subclasses
transformers' Wav2Vec2Model: the CNN feature encoder runs at its native ~50 Hz, its features are **linearly
interpolated** (``align_corners=True``) to ``int(seconds * 25)`` frames, and only then do the feature projection and
the transformer run, at 25 Hz. The 12 transformer layer outputs (``hidden_states[1:]``, not the input state) are
stacked: [frames, 12, 768]. Before that the 16 kHz speech is normalised to -23 LUFS (:mod:`.loudness`, pyloudnorm's
algorithm) and passed through Wav2Vec2FeatureExtractor, which for this checkpoint only casts to float32
(``do_normalize`` false; ``do_normalize=True`` applies its zero-mean unit-variance normalisation).
ComfyUI core instead runs the transformer at 50 Hz and interpolates its outputs to 25 fps afterwards, without
loudness normalisation: ``interpolate="hidden"`` reproduces that order (its outputs differ, see the tests).

Other video rates: the features are always made at 25 per second (the rate the InfiniteTalk DiT was trained with,
which also keeps wav2vec2's 128-frame positional convolution at the span it was run at); each video frame at any fps
then takes the window around the 25 fps feature holding its start time (:func:`frame_windows`, through
:class:`~omnisync_core.audio.align.FrameAligner`), so a 30 fps clip reads the same audio instants as a 25 fps one
and the +-2 feature window keeps its +-80 ms span. At 25 fps this is exactly upstream's windowing.

Weights: Hugging Face's layout (``model.safetensors`` of the checkpoint, saved from Wav2Vec2ForPreTraining, keys
``wav2vec2.*`` beside the pre-training heads ``quantizer.*``, ``project_q.*``, ``project_hid.*``, which are not
read), or Kijai's / Comfy's ``wav2vec2-chinese-base_fp16.safetensors`` (the same ``wav2vec2.*`` keys). The positional
convolution's weight norm may be stored as ``weight_g`` / ``weight_v`` or as ``parametrizations.weight.original0/1``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import InputError
from ..model.dit import WeightsError
from ..model.loading import (
    CheckpointMismatchError, iter_safetensors, read_header, resolve_device, resolve_dtype, validate_state_dict,
)
from .align import FpsLike, FrameAligner
from .loudness import LUFS_TARGET, normalize_loudness

__all__ = ["Wav2Vec2Config", "WAV2VEC2_PRESETS", "Wav2Vec2", "wav2vec2_config_from_shapes", "wav2vec2_shapes",
           "is_wav2vec2", "wav2vec2_label", "load_wav2vec2", "normalize_wav2vec2_state_dict", "prepare_speech",
           "encode_speech",
           "frame_windows", "FEATURE_RATE", "SAMPLE_RATE"]

SAMPLE_RATE = 16000
FEATURE_RATE = 25                       # InfiniteTalk's features per second ("Assume the video fps is 25")
_PRETRAINING = ("quantizer.", "project_q.", "project_hid.", "lm_head.", "dropout_features")
_OPTIONAL = ("masked_spec_embed",)      # SpecAugment's mask vector: training only


@dataclass
class Wav2Vec2Config:
    """Hyper-parameters (transformers' Wav2Vec2Config names)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple = (512,) * 7
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"          # "group": GroupNorm on the first conv (base); "layer": LayerNorm on all
    do_stable_layer_norm: bool = False        # pre-norm layers (large checkpoints); base is post-norm
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    do_normalize: bool = False                # the feature extractor's zero-mean unit-variance step

    def __post_init__(self):
        self.conv_dim, self.conv_kernel, self.conv_stride = (tuple(int(v) for v in t) for t in
                                                             (self.conv_dim, self.conv_kernel, self.conv_stride))
        if self.feat_extract_norm not in ("group", "layer"):
            raise InputError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}.")
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise InputError("conv_dim, conv_kernel and conv_stride must have one entry per conv layer.")
        if self.hidden_size % self.num_attention_heads:
            raise InputError(f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads.")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Wav2Vec2Config":
        extra = sorted(set(d) - {f.name for f in fields(cls)})
        if extra:
            raise InputError(f"Unknown wav2vec2 config fields: {', '.join(extra)}.")
        return cls(**d)


WAV2VEC2_PRESETS = {
    "chinese-base": Wav2Vec2Config(),
    # tests: the base's real conv stack (320 samples per frame) and positional conv, narrow widths
    "tiny": Wav2Vec2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                           conv_dim=(16,) * 7),
}


# ---------------------------------------------------------------- layers

def _lin(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x.to(linear.weight.dtype))


class ConvLayer(nn.Module):
    """One feature-encoder conv (no bias in base) with an optional GroupNorm ("group", layer 0) or LayerNorm."""

    def __init__(self, c: Wav2Vec2Config, i: int):
        super().__init__()
        cin = 1 if i == 0 else c.conv_dim[i - 1]
        self.conv = nn.Conv1d(cin, c.conv_dim[i], c.conv_kernel[i], stride=c.conv_stride[i], bias=c.conv_bias)
        self.norm_kind = "layer" if c.feat_extract_norm == "layer" else ("group" if i == 0 else None)
        if self.norm_kind == "group":
            self.layer_norm = nn.GroupNorm(c.conv_dim[i], c.conv_dim[i], affine=True)
        elif self.norm_kind == "layer":
            self.layer_norm = nn.LayerNorm(c.conv_dim[i], elementwise_affine=True)

    def forward(self, x):
        x = self.conv(x.to(self.conv.weight.dtype))
        if self.norm_kind == "group":
            x = self.layer_norm(x)
        elif self.norm_kind == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.conv_layers = nn.ModuleList(ConvLayer(c, i) for i in range(len(c.conv_dim)))

    def forward(self, samples):
        """samples [B, S] -> CNN features [B, frames, conv_dim[-1]]."""
        x = samples[:, None]
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c.conv_dim[-1], eps=c.layer_norm_eps)
        self.projection = nn.Linear(c.conv_dim[-1], c.hidden_size)

    def forward(self, x):
        return _lin(self.projection, self.layer_norm(x.to(self.layer_norm.weight.dtype)))


class WeightNormConv1d(nn.Module):
    """The positional conv with weight normalisation over every dim but the kernel's (torch's weight_norm, dim=2):
    weight = weight_v * weight_g / ||weight_v||; keys ``weight_g`` [1, 1, K], ``weight_v`` [C, C/groups, K],
    ``bias``."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.groups, self.padding = groups, kernel // 2
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        v = self.weight_v
        w = v * (self.weight_g / torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))
        return F.conv1d(x.to(v.dtype), w, self.bias, padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.conv = WeightNormConv1d(c.hidden_size, c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups)
        self.trim = 1 if c.num_conv_pos_embeddings % 2 == 0 else 0

    def forward(self, x):
        """x [B, T, C] -> [B, T, C]: conv (padding K // 2, the extra last frame of an even kernel dropped), GELU."""
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[..., : -self.trim]
        return F.gelu(y).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.heads = c.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size)
                                                                for _ in range(4))

    def forward(self, x):
        split = lambda t: rearrange(t, "b l (n d) -> b n l d", n=self.heads)
        y = F.scaled_dot_product_attention(split(_lin(self.q_proj, x)), split(_lin(self.k_proj, x)),
                                           split(_lin(self.v_proj, x)))
        return _lin(self.out_proj, rearrange(y, "b n l d -> b l (n d)"))


class FeedForward(nn.Module):
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.intermediate_dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output_dense = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return _lin(self.output_dense, F.gelu(_lin(self.intermediate_dense, x)))


class EncoderLayer(nn.Module):
    """Post-norm (base) or pre-norm (``do_stable_layer_norm``) transformer layer."""

    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.stable = c.do_stable_layer_norm
        self.attention = Attention(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.feed_forward = FeedForward(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        if self.stable:
            x = x + self.attention(self.layer_norm(x))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, c: Wav2Vec2Config):
        super().__init__()
        self.stable = c.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(c)
        self.layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x) -> list[torch.Tensor]:
        """x [B, T, C] -> the output of every layer, [B, T, C] each (the last one after the final norm when stable)."""
        x = x + self.pos_conv_embed(x)
        if not self.stable:
            x = self.layer_norm(x)
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        if self.stable:
            outs[-1] = self.layer_norm(outs[-1])
        return outs


class Wav2Vec2(nn.Module):
    """wav2vec 2.0 in transformers' Wav2Vec2Model key names (no prefix). See :meth:`forward`."""

    def __init__(self, config: "Wav2Vec2Config | str" = "chinese-base"):
        super().__init__()
        c = self.config = WAV2VEC2_PRESETS[config] if isinstance(config, str) else config
        self.feature_extractor = FeatureEncoder(c)
        self.feature_projection = FeatureProjection(c)
        self.encoder = Encoder(c)

    def forward(self, samples: torch.Tensor, num_frames: "int | None" = None, interpolate: str = "features"
                ) -> torch.Tensor:
        """Layer outputs of 16 kHz input values [B, S] (or [S]): [B, frames, num_hidden_layers, hidden_size] fp32.

        num_frames: None = the CNN's native rate (~50 Hz: (S - 400) // 320 + 1 frames for the base); else the CNN
        features are resampled to that many frames (linear, align_corners=True) before the transformer, as InfiniteTalk
        does (``interpolate="features"``), or the transformer runs at the native rate and its layer outputs are
        resampled afterwards, as ComfyUI core does (``interpolate="hidden"``).
        """
        if interpolate not in ("features", "hidden"):
            raise InputError(f"interpolate must be 'features' or 'hidden', got {interpolate!r}.")
        x = samples[None] if samples.ndim == 1 else samples
        if x.ndim != 2:
            raise InputError(f"samples must be [S] or [B, S], got {tuple(samples.shape)}.")
        if x.shape[1] < sum(self.config.conv_kernel):
            raise InputError(f"{x.shape[1]} samples are too few for one wav2vec2 frame.")
        feats = self.feature_extractor(x)
        if num_frames is not None and interpolate == "features":
            feats = _resample(feats, num_frames)
        out = torch.stack(self.encoder(self.feature_projection(feats)), dim=2).float()
        if num_frames is not None and interpolate == "hidden":
            out = rearrange(_resample(rearrange(out, "b t l c -> b t (l c)"), num_frames), "b t (l c) -> b t l c",
                            l=self.config.num_hidden_layers)
        return out


def _resample(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T, C] -> [B, frames, C], linear with align_corners=True (InfiniteTalk's linear_interpolation)."""
    if frames < 1:
        raise InputError(f"num_frames must be at least 1, got {frames}.")
    return F.interpolate(x.transpose(1, 2), size=int(frames), mode="linear", align_corners=True).transpose(1, 2)


# ---------------------------------------------------------------- speech -> features -> windows

def prepare_speech(samples, *, loudness: bool = True, do_normalize: bool = False) -> np.ndarray:
    """16 kHz mono speech as InfiniteTalk feeds it: -23 LUFS (:func:`~.loudness.normalize_loudness`, skipped for
    silence), then Wav2Vec2FeatureExtractor (float32; zero-mean unit variance with ``do_normalize``)."""
    x = np.asarray(samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples, dtype=np.float32)
    if x.ndim != 1:
        raise InputError(f"speech must be mono samples [S], got shape {x.shape}.")
    if loudness:
        x = normalize_loudness(x, SAMPLE_RATE, LUFS_TARGET)
    if do_normalize:
        x = ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)
    return x


@torch.no_grad()
def encode_speech(model: Wav2Vec2, samples, *, rate: FpsLike = FEATURE_RATE, loudness: bool = True,
                  interpolate: str = "features", device=None) -> torch.Tensor:
    """InfiniteTalk's get_embedding: 16 kHz mono speech [S] -> wav2vec2 features [int(S / 16000 * rate), 12, 768]
    (fp32, on the model's device). ``rate`` stays at 25 for InfiniteTalk (see the module docstring for other video
    rates); the frame count is computed exactly (Fraction), as ``int(duration * 25)`` is for whole samples."""
    x = prepare_speech(samples, loudness=loudness, do_normalize=model.config.do_normalize)
    frames = int(Fraction(len(x), SAMPLE_RATE) * Fraction(rate))
    if frames < 1:
        raise InputError(f"{len(x)} samples are shorter than one feature frame at {rate} per second.")
    p = next(model.parameters())
    t = torch.from_numpy(x).to(device=device or p.device)
    return model(t, frames, interpolate=interpolate)[0]


def frame_windows(features: torch.Tensor, frames: torch.Tensor, fps: FpsLike, feature_rate: FpsLike = FEATURE_RATE,
                  window: int = 5) -> torch.Tensor:
    """Per-video-frame windows for the InfiniteTalk DiT: features [N, L, C] at `feature_rate` -> [F, window, L, C].

    Video frame i at `fps` reads the window centred on the feature whose interval holds its start time i / fps
    (clamped to the track, as upstream clamps). At fps == feature_rate frame i is centred on feature i, which is
    upstream's ``arange(start, end)[:, None] + arange(window) - window // 2``."""
    if features.ndim != 3:
        raise InputError(f"features must be [N, layers, dim], got {tuple(features.shape)}.")
    half = window // 2
    idx = FrameAligner(fps, feature_rate).window_indices(torch.as_tensor(frames), half, window - 1 - half,
                                                         features.shape[0])
    return features[idx.to(features.device)]


# ---------------------------------------------------------------- checkpoints

def normalize_wav2vec2_state_dict(state_dict: Mapping) -> dict:
    """Bare Wav2Vec2Model keys: strip ``wav2vec2.`` (HF pre-training / Kijai / Comfy files), drop the pre-training
    heads and SpecAugment's mask vector, and name the weight norm ``weight_g`` / ``weight_v``."""
    out = {}
    for k, v in state_dict.items():
        k = k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k
        if k.startswith(_PRETRAINING) or k in _OPTIONAL:
            continue
        k = k.replace("conv.parametrizations.weight.original0", "conv.weight_g")
        k = k.replace("conv.parametrizations.weight.original1", "conv.weight_v")
        out[k] = v
    return out


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def is_wav2vec2(shapes: Mapping) -> bool:
    """True for a wav2vec2 encoder (bare or ``wav2vec2.`` keys), as ComfyUI detects it (``encoder.layer_norm.bias``
    beside the feature encoder)."""
    sd = normalize_wav2vec2_state_dict(dict.fromkeys(shapes))
    return "encoder.layer_norm.bias" in sd and "feature_extractor.conv_layers.0.conv.weight" in sd


def wav2vec2_config_from_shapes(shapes: Mapping, num_heads: "int | None" = None) -> Wav2Vec2Config:
    """Read a Wav2Vec2Config from key -> shape (shapes, tensors or TensorInfo). Heads: `num_heads`, else
    a preset of the same width, else hidden_size // 64 (base 12, large 16). Post-norm vs pre-norm is not visible in
    the shapes: "group" feature norms mean base (post-norm), "layer" ones large (pre-norm), as ComfyUI assumes."""
    sd = {k: _shape(v) for k, v in normalize_wav2vec2_state_dict(shapes).items()}
    if not is_wav2vec2(sd):
        raise WeightsError("Not a wav2vec2 checkpoint: it has no encoder.layer_norm / feature_extractor tensors.")
    convs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.conv", k))})
    dims = tuple(sd[f"feature_extractor.conv_layers.{i}.conv.weight"][0] for i in convs)
    kernels = tuple(sd[f"feature_extractor.conv_layers.{i}.conv.weight"][2] for i in convs)
    layer_norms = "feature_extractor.conv_layers.1.layer_norm.weight" in sd
    hidden = sd["encoder.layer_norm.weight"][0]
    base = WAV2VEC2_PRESETS["chinese-base"]
    strides = base.conv_stride if kernels == base.conv_kernel else tuple(max(1, k // 2) for k in kernels)
    g = sd["encoder.pos_conv_embed.conv.weight_v"]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    same = [p.num_attention_heads for p in WAV2VEC2_PRESETS.values() if p.hidden_size == hidden]
    heads = num_heads or (same[0] if same else max(1, hidden // 64))
    return Wav2Vec2Config(
        hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=heads,
        intermediate_size=sd["encoder.layers.0.feed_forward.intermediate_dense.weight"][0], conv_dim=dims,
        conv_kernel=kernels, conv_stride=strides, conv_bias="feature_extractor.conv_layers.0.conv.bias" in sd,
        feat_extract_norm="layer" if layer_norms else "group", do_stable_layer_norm=layer_norms,
        num_conv_pos_embeddings=g[2], num_conv_pos_embedding_groups=hidden // g[1])


def wav2vec2_label(config: Wav2Vec2Config) -> str:
    """'wav2vec2 base (12 layers x 768)' / 'wav2vec2 large (24 layers x 1024)'; the keys cannot tell
    chinese-wav2vec2-base from other base checkpoints."""
    size = {768: "base", 1024: "large"}.get(config.hidden_size, f"{config.hidden_size}-wide")
    return f"wav2vec2 {size} ({config.num_hidden_layers} layers x {config.hidden_size})"


def wav2vec2_shapes(config: "Wav2Vec2Config | str") -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Wav2Vec2(config).state_dict().items()}


def load_wav2vec2(path_or_state_dict, device=None, dtype=None, config: "Wav2Vec2Config | str | None" = None
                  ) -> Wav2Vec2:
    """Load from a safetensors file or a state dict (HF / Kijai / Comfy layouts, see the module docstring) into a
    meta-built model, tensor by tensor, strictly: CheckpointMismatchError lists missing / unexpected / wrong-shape
    keys. Config: `config`, else read from the shapes (strides of non-base conv stacks cannot be read: pass it)."""
    dev = None if device is None else resolve_device(device)
    dt = None if dtype is None else resolve_dtype(dtype, dev)
    if isinstance(path_or_state_dict, Mapping):
        name, raw = "state dict", dict(path_or_state_dict)
        shapes = {k: _shape(v) for k, v in raw.items()}
    else:
        name, raw = Path(path_or_state_dict).name, None
        shapes = {k: i.shape for k, i in read_header(path_or_state_dict)[0].items()}
    plain = normalize_wav2vec2_state_dict(shapes)
    cfg = (WAV2VEC2_PRESETS[config] if isinstance(config, str) else config) if config is not None \
        else wav2vec2_config_from_shapes(plain)
    stand_ins = {k: torch.empty(s, device="meta") for k, s in plain.items()}
    report = validate_state_dict(stand_ins, wav2vec2_shapes(cfg))
    if not report.ok:
        raise CheckpointMismatchError(f"wav2vec2 encoder ({name})", report)
    if raw is None:
        keep = {k for k in shapes if normalize_wav2vec2_state_dict({k: 0})}
        raw = dict(iter_safetensors(path_or_state_dict, device=dev or "cpu", keys=keep))
    sd = {k: v.to(device=dev or v.device, dtype=dt if dt is not None and v.is_floating_point() else v.dtype)
          for k, v in normalize_wav2vec2_state_dict(raw).items()}
    with torch.device("meta"):
        model = Wav2Vec2(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)

