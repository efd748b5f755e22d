"""HuMo DiT (Phantom-video/HuMo; HuMo-1.7B and the 17B layout): Wan2.1 T2V + Whisper audio cross-attention.

State-dict keys are the upstream ones (``humo/models/wan_modules/model_humo.py``), which ComfyUI's ``HumoWanModel``
uses too, so Comfy-Org's ``humo_1.7B_fp16.safetensors`` loads as it is (a ``model.diffusion_model.`` prefix is
stripped). Beyond Wan2.1 T2V:

- ``audio_proj``: a window of Whisper features per latent frame [8 features x 5 layer groups x 1280] goes through
  Linear-ReLU-Linear-ReLU-Linear to 16 tokens x 1536 and a LayerNorm (eps 1e-5, torch's default, as upstream);
- ``blocks.N.audio_cross_attn_wrapper``: after the text cross-attention and before the FFN, a LayerNorm and an
  attention (q from the video tokens, k/v from the 1536-wide audio tokens, q/k RMSNorm, no RoPE, no gate) in which
  the tokens of latent frame f attend only to the 16 tokens of frame f;
- the reference latent frames are appended after the video frames in time (the next temporal RoPE indices), get
  zero audio windows, and are dropped from the output.

HuMo never skips the audio attention: its null audio is zero Whisper features, which audio_proj's biases and
LayerNorm turn into non-zero tokens. Numerics follow dit.py: fp32 residual stream, linears in their weight dtype.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from math import prod
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import InputError
from .dit import Attention, Head, LayerNorm, OmniSyncDiT, WeightsError
from .loading import (
    CheckpointMismatchError, ValidationReport, read_header, read_safetensors, resolve_device, resolve_dtype,
    validate_state_dict,
)
from .rope import rope_freqs

__all__ = ["HumoConfig", "HUMO_PRESETS", "HumoDiT", "humo_config", "humo_config_from_shapes", "humo_shapes",
           "humo_param_count", "humo_label", "is_humo", "load_humo", "strip_comfy_prefix"]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_DETECT = ("audio_proj.audio_proj_glob_1.layer.weight", "audio_proj.audio_proj_glob_1.layer.bias")


@dataclass
class HumoConfig:
    """Hyper-parameters of the HuMo DiT (Wan2.1 names; audio names from HuMo's AudioProjModel in brackets)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16               # patch-embedding input: 16 (1.7B) or 16 noisy + 4 mask + 16 image (17B)
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    whisper_dim: int = 1280        # width of one Whisper feature [channels]
    whisper_groups: int = 5        # layer groups per feature [blocks]
    audio_window: int = 8          # features per latent frame [seq_len]
    audio_hidden: int = 512        # [intermediate_dim]
    audio_dim: int = 1536          # width of an audio token [output_dim]; the k/v input of the audio attention
    audio_tokens: int = 16         # audio tokens per latent frame [context_tokens]
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise InputError(f"dim {self.dim} must split into {self.num_heads} heads of even size.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_in_dim(self) -> int:
        """Input width of audio_proj: one flattened window of Whisper features."""
        return self.audio_window * self.whisper_groups * self.whisper_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "HumoConfig":
        extra = sorted(set(d) - {f.name for f in fields(cls)})
        if extra:
            raise InputError(f"Unknown HuMo config fields: {', '.join(extra)}.")
        return cls(**d)


HUMO_PRESETS = {
    # tests: 2 heads of 20 (unequal RoPE bands 8/6/6), narrow audio path with HuMo's real window structure
    "tiny": HumoConfig(dim=40, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, text_len=16, whisper_dim=16,
                       audio_hidden=32, audio_dim=24),
    "humo-1.7b": HumoConfig(),                                                            # on Wan2.1 T2V 1.3B
    "humo-17b": HumoConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),   # on Wan2.1 14B
}
_PRESET_LABELS = {"tiny": "HuMo tiny (tests)", "humo-1.7b": "HuMo 1.7B", "humo-17b": "HuMo 17B"}


def humo_config(preset: "str | HumoConfig", **overrides) -> HumoConfig:
    """A copy of a preset (by name) or of a config, with field overrides."""
    if isinstance(preset, str):
        if preset not in HUMO_PRESETS:
            raise InputError(f"Unknown HuMo preset {preset!r}; choose one of {', '.join(HUMO_PRESETS)}.")
        preset = HUMO_PRESETS[preset]
    return replace(preset, **overrides)


# ---------------------------------------------------------------- layers

class _Adapter(nn.Module):
    """Holds one layer under the name `layer` (HuMo's DummyAdapterLayer, which fixes the key names)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class AudioProj(nn.Module):
    """HuMo's AudioProjModel: per latent frame, a window of Whisper features -> `audio_tokens` tokens."""

    def __init__(self, c: HumoConfig):
        super().__init__()
        self.tokens = c.audio_tokens
        self.audio_proj_glob_1 = _Adapter(nn.Linear(c.audio_in_dim, c.audio_hidden))
        self.audio_proj_glob_2 = _Adapter(nn.Linear(c.audio_hidden, c.audio_hidden))
        self.audio_proj_glob_3 = _Adapter(nn.Linear(c.audio_hidden, c.audio_tokens * c.audio_dim))
        self.audio_proj_glob_norm = _Adapter(LayerNorm(c.audio_dim, eps=1e-5))   # nn.LayerNorm's default, as HuMo

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [B, T, audio_window, whisper_groups, whisper_dim] -> tokens [B, T, audio_tokens, audio_dim] fp32."""
        h = rearrange(windows, "b t w g c -> b t (w g c)").to(self.audio_proj_glob_1.layer.weight.dtype)
        h = torch.relu(self.audio_proj_glob_1(h))
        h = torch.relu(self.audio_proj_glob_2(h))
        h = rearrange(self.audio_proj_glob_3(h), "b t (k c) -> b t k c", k=self.tokens)
        return self.audio_proj_glob_norm(h)


class AudioCrossAttention(nn.Module):
    """HuMo's audio_cross_attn_wrapper: LayerNorm, then attention of each latent frame's tokens over its own audio
    tokens (no RoPE, no gate); returns the residual update."""

    def __init__(self, c: HumoConfig):
        super().__init__()
        self.audio_cross_attn = Attention(c.dim, c.num_heads, c.qk_norm, c.eps, context_dim=c.audio_dim)
        self.norm1_audio = LayerNorm(c.dim, c.eps, elementwise_affine=True)

    def forward(self, x, audio, frames: int):
        """x [B, frames*S, dim] fp32; audio [B, frames, K, audio_dim] -> [B, frames*S, dim] fp32."""
        q = rearrange(self.norm1_audio(x), "b (f s) c -> (b f) s c", f=frames)
        y = self.audio_cross_attn(q, rearrange(audio, "b f k c -> (b f) k c"))
        return rearrange(y, "(b f) s c -> b (f s) c", f=frames).float()


class HumoBlock(nn.Module):
    """Wan2.1 attention block with HuMo's audio cross-attention between the text cross-attention and the FFN."""

    def __init__(self, c: HumoConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.self_attn = Attention(c.dim, c.num_heads, c.qk_norm, c.eps)
        self.norm3 = LayerNorm(c.dim, c.eps, elementwise_affine=True) if c.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(c.dim, c.num_heads, c.qk_norm, c.eps)
        self.norm2 = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(c.dim, c.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(c.ffn_dim, c.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, c.dim) / c.dim**0.5)
        self.audio_cross_attn_wrapper = AudioCrossAttention(c)

    def forward(self, x, e, freqs, context, audio, frames: int):
        """x [B, L, dim] fp32; e [B, 6, dim] fp32; audio [B, frames, K, audio_dim]; L = frames * tokens per frame."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).unsqueeze(2).unbind(1)
        y = self.self_attn(self.norm1(x) * (1 + scale1) + shift1, freqs=freqs)
        x = x + y.float() * gate1
        x = x + self.cross_attn(self.norm3(x), context).float()
        x = x + self.audio_cross_attn_wrapper(x, audio, frames)
        y = self.ffn((self.norm2(x) * (1 + scale2) + shift2).to(self.ffn[0].weight.dtype))
        return x + y.float() * gate2


# ---------------------------------------------------------------- model

class HumoDiT(nn.Module):
    """The HuMo DiT with the upstream / ComfyUI state-dict keys. See :meth:`forward`."""

    embed_time = OmniSyncDiT.embed_time      # sigma -> (e, e0), timestep = 1000 * sigma, fp32
    embed_text = OmniSyncDiT.embed_text      # umT5 features [B|1, L, text_dim], zero-padded to text_len

    def __init__(self, config: "HumoConfig | str"):
        super().__init__()
        c = self.config = humo_config(config)
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(HumoBlock(c) for _ in range(c.num_layers))
        self.head = Head(c)
        self.audio_proj = AudioProj(c)
        self.block_swap = None          # a BlockSwap runs the blocks it holds from host memory
        self.init_weights()

    def init_weights(self):
        """Wan's / HuMo's init: xavier linears with zero bias, N(0, .02) text/time embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def _inputs(self, x, sigma, text, audio, reference):
        """Checked and broadcast inputs: (x with the reference frames appended, sigma [B], text, audio windows)."""
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_dim:
            raise InputError(f"x must be a latent [B, {c.in_dim}, T, H, W], got {tuple(x.shape)}.")
        b, _, t, hh, ww = x.shape
        if any(s % p for s, p in zip(x.shape[2:], c.patch_size)):
            raise InputError(f"Latent size {tuple(x.shape[2:])} is not divisible by the patch {c.patch_size}.")
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() not in (1, b):
            raise InputError(f"sigma must be a scalar or have one value per batch item ({b}), got {sigma.numel()}.")
        if text is None or text.ndim != 3 or text.shape[0] not in (1, b) or text.shape[-1] != c.text_dim \
                or text.shape[1] > c.text_len:
            got = None if text is None else tuple(text.shape)
            raise InputError(f"text must be umT5 features [B or 1, L <= {c.text_len}, {c.text_dim}], got {got}.")
        n_ref = 0
        if reference is not None:
            if reference.ndim != 5 or reference.shape[0] not in (1, b) or reference.shape[1] != c.in_dim \
                    or reference.shape[3:] != x.shape[3:]:
                raise InputError(f"reference must be latent frames [B or 1, {c.in_dim}, n_ref, {hh}, {ww}], got "
                                 f"{tuple(reference.shape)}.")
            n_ref = reference.shape[2]
            x = torch.cat([x, reference.to(x.dtype).expand(b, -1, -1, -1, -1)], dim=2)
        win = (c.audio_window, c.whisper_groups, c.whisper_dim)
        if audio is None:
            audio = x.new_zeros(b, t + n_ref, *win)
        if audio.ndim != 5 or audio.shape[0] not in (1, b) or audio.shape[1] not in (t, t + n_ref) \
                or tuple(audio.shape[2:]) != win:
            raise InputError(f"audio must be Whisper windows [B or 1, {t} (+ {n_ref} reference), {win[0]}, {win[1]}, "
                             f"{win[2]}] for {t} latent frames, got {tuple(audio.shape)}.")
        if audio.shape[1] < t + n_ref:          # the reference frames hear silence (zero windows)
            audio = F.pad(audio, (0, 0, 0, 0, 0, 0, 0, n_ref))
        return x, sigma.expand(b), text, audio.expand(b, -1, -1, -1, -1)

    def forward(self, x, sigma, text, audio=None, reference=None):
        """Velocity v = eps - x0 (Wan convention) of the video frames.

        x: [B, in_dim, T, H, W] noisy latent (17B: noise 16 | mask 4 | image latent 16);
        sigma: [B] or scalar in [0, 1] (timestep = 1000 * sigma);
        text: [B or 1, L <= text_len, text_dim] umT5 features (zero-padded to text_len, as Wan);
        audio: [B or 1, T + n_ref, 8, 5, 1280] Whisper windows per latent frame, the reference frames' windows zero;
          [B or 1, T, ...] appends those zero windows; None = all zeros (HuMo's null audio; never skipped);
        reference: [B or 1, in_dim, n_ref, H, W] frames appended after the video in time, or None. For the 1.7B they
          are the 16 x-channels of HuMo's appended frame: the clean reference latent, or zeros in the no-image passes.
        Returns [B, out_dim, T, H, W] in x's dtype; batch items may differ in text, audio, reference and sigma.
        """
        c = self.config
        t = x.shape[2]
        x, sigma, text, audio = self._inputs(x, sigma, text, audio, reference)
        b, _, t_all, hh, ww = x.shape
        pt, ph, pw = c.patch_size
        grid = (t_all // pt, hh // ph, ww // pw)
        w = self.patch_embedding.weight
        tokens = F.conv3d(x.to(w.dtype), w, self.patch_embedding.bias, stride=c.patch_size)
        tokens = rearrange(tokens, "b c t h w -> b (t h w) c").float()
        e, e0 = self.embed_time(sigma)
        context = self.embed_text(text, b)
        a_tokens = self.audio_proj(audio)
        freqs = rope_freqs(c.head_dim, grid, device=x.device)
        swap = self.block_swap
        for i, blk in enumerate(self.blocks):
            args = (tokens, e0, freqs, context, a_tokens, grid[0])
            tokens = blk(*args) if swap is None else swap.run(i, blk, *args)
        n_video = (t // pt) * grid[1] * grid[2]
        y = self.head(tokens[:, :n_video], e)
        y = rearrange(y, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                      t=t // pt, h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)
        return y.to(x.dtype)


# ---------------------------------------------------------------- recognising and loading checkpoints

def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def strip_comfy_prefix(state_dict: Mapping) -> dict:
    """The same mapping without ComfyUI's `model.diffusion_model.` (or `diffusion_model.`) key prefix."""
    for p in _PREFIXES:
        if state_dict and all(k.startswith(p) for k in state_dict):
            return {k[len(p):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def is_humo(shapes: Mapping) -> bool:
    """True when the keys (bare or with ComfyUI's prefix) hold HuMo's audio_proj, as ComfyUI detects it."""
    keys = strip_comfy_prefix(dict.fromkeys(shapes))
    return any(k in keys for k in _DETECT)


def humo_config_from_shapes(shapes: Mapping, num_heads: "int | None" = None) -> HumoConfig:
    """Read a HumoConfig from a checkpoint's key -> shape mapping (values: shapes, tensors or TensorInfo).

    Recognised by `audio_proj.audio_proj_glob_1.layer.*` (as ComfyUI); bare upstream names or ComfyUI's
    `model.diffusion_model.` prefix. Heads: `num_heads`, else a preset of the same width, else dim // 128 (Wan's
    head dim, as ComfyUI). The window split of audio_proj's input (8 features x 5 groups), text_len and eps are not
    visible in shapes: they come from a preset of the same width, else HuMo's values. Raises WeightsError otherwise.
    """
    sd = {k: _shape(v) for k, v in strip_comfy_prefix(shapes).items()}
    if not any(k in sd for k in _DETECT):
        wan = "head.modulation" in sd and "patch_embedding.weight" in sd
        raise WeightsError("Not a HuMo DiT checkpoint: it has no audio_proj.audio_proj_glob_1.layer.* tensors"
                           + (" (it looks like a Wan2.1 DiT without HuMo's audio layers)." if wan else "."))

    def need(key):
        if key not in sd:
            raise WeightsError(f"Cannot read the HuMo DiT architecture: tensor {key} is missing.")
        return sd[key]

    dim, in_dim, *patch = need("patch_embedding.weight")
    same = [p for p in HUMO_PRESETS.values() if p.dim == dim]
    base = same[0] if same else HumoConfig()          # what shapes do not show (text_len, eps, window split)
    window = base.audio_window * base.whisper_groups
    audio_in = need("audio_proj.audio_proj_glob_1.layer.weight")[1]
    audio_dim = need("audio_proj.audio_proj_glob_norm.layer.weight")[0]
    if audio_in % window:
        raise WeightsError(f"audio_proj's input width {audio_in} is not {base.audio_window} x "
                           f"{base.whisper_groups} Whisper features.")
    if num_heads is None:
        if not same and dim % 128:
            raise WeightsError(f"Cannot tell the number of heads for width {dim}; pass num_heads.")
        num_heads = base.num_heads if same else dim // 128
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return replace(
        base, dim=dim, ffn_dim=need("blocks.0.ffn.0.weight")[0], num_heads=num_heads, num_layers=len(layers),
        in_dim=in_dim, out_dim=need("head.head.weight")[0] // prod(patch), patch_size=tuple(patch),
        freq_dim=need("time_embedding.0.weight")[1], text_dim=need("text_embedding.0.weight")[1],
        whisper_dim=audio_in // window, audio_hidden=need("audio_proj.audio_proj_glob_1.layer.weight")[0],
        audio_dim=audio_dim, audio_tokens=need("audio_proj.audio_proj_glob_3.layer.weight")[0] // audio_dim,
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd)


def humo_shapes(config: "HumoConfig | str") -> dict[str, tuple]:
    """Key -> shape of a HumoDiT, built on the meta device."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HumoDiT(config).state_dict().items()}


def humo_param_count(config: "HumoConfig | str") -> int:
    """Number of parameters (1,741,569,088 for 'humo-1.7b')."""
    return sum(prod(s) for s in humo_shapes(config).values())


def humo_label(config: HumoConfig) -> str:
    """'HuMo 1.7B' / 'HuMo 17B' for the released layouts, else 'HuMo (N params)'."""
    for name, preset in HUMO_PRESETS.items():
        if preset == config:
            return _PRESET_LABELS[name]
    return f"HuMo ({humo_param_count(config) / 1e9:.2f} B params)"


def load_humo(path_or_state_dict, device=None, dtype=None, config: "HumoConfig | str | None" = None) -> HumoDiT:
    """Load a HumoDiT (eval mode) from a safetensors file or a state dict, bare or with ComfyUI's prefix.

    The config is `config` (a preset name or HumoConfig) or read from the shapes; the file's header is checked
    against it before any tensor is read. Built on the meta device, tensors assigned (cast to `dtype` if given).
    Raises CheckpointMismatchError (one message listing missing / unexpected / wrong-shape keys) when they do not fit.
    """
    dev = None if device is None else resolve_device(device)
    dt = None if dtype is None else resolve_dtype(dtype, dev)
    if isinstance(path_or_state_dict, Mapping):
        name, shapes = "state dict", {k: _shape(v) for k, v in path_or_state_dict.items()}
    else:
        name = Path(path_or_state_dict).name
        shapes = {k: info.shape for k, info in read_header(path_or_state_dict)[0].items()}
    shapes = strip_comfy_prefix(shapes)
    cfg = humo_config(config) if config is not None else humo_config_from_shapes(shapes)
    stand_ins = {k: torch.empty(s, device="meta") for k, s in shapes.items()}   # validate_state_dict reads .shape
    report: ValidationReport = validate_state_dict(stand_ins, humo_shapes(cfg))
    if not report.ok:
        raise CheckpointMismatchError(f"HuMo DiT ({name})", report)
    if isinstance(path_or_state_dict, Mapping):
        sd = strip_comfy_prefix(path_or_state_dict)
        sd = {k: v.to(device=dev or v.device, dtype=dt if dt is not None and v.is_floating_point() else v.dtype)
              for k, v in sd.items()}
    else:
        sd = strip_comfy_prefix(read_safetensors(path_or_state_dict, device=dev or "cpu", dtype=dt)[0])
    with torch.device("meta"):
        model = HumoDiT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
