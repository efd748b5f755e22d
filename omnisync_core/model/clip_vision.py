"""CLIP ViT-H/14 vision tower as Wan2.1 I2V (and so InfiniteTalk) uses it: the penultimate block's hidden states.

Wan (``wan/modules/clip.py``, open-clip XLM-RoBERTa ViT-H/14) resizes the reference frame, given in [-1, 1], to
224 x 224 with ``F.interpolate(mode="bicubic", align_corners=False)`` (the whole frame, no crop, no antialias), maps
it to [0, 1] and normalises it with CLIP's mean and std, then runs the patch embedding (14 x 14, no bias), the class
token, the position embedding and the pre-LayerNorm, and returns the output of the first 31 of the 32 blocks
(``use_31_block=True``): [B, 257, 1280], without the post-LayerNorm. That is transformers' ``hidden_states[-2]`` and
ComfyUI's ``penultimate_hidden_states``. (ComfyUI's own ``clip_preprocess`` differs: antialiased resize, optional
centre crop, 8-bit rounding; :func:`preprocess` follows Wan.)

Weights: ComfyUI's ``clip_vision_h.safetensors`` layout, which is transformers' CLIPVisionModelWithProjection's:
``vision_model.embeddings.*``, ``vision_model.pre_layrnorm.*`` (sic), ``vision_model.encoder.layers.N.*``,
``vision_model.post_layernorm.*`` and ``visual_projection.weight`` (optional; CLIPVisionModel files lack it).
``vision_model.embeddings.position_ids`` is ignored. ViT-H/14 has 632 M parameters (1.26 GB in fp16); computing the
penultimate state skips the last block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import InputError
from .dit import WeightsError
from .loading import CheckpointMismatchError, iter_safetensors, read_header, resolve_device, resolve_dtype, \
    validate_state_dict

__all__ = ["CLIPVisionConfig", "CLIP_VISION_PRESETS", "CLIPVision", "CLIP_MEAN", "CLIP_STD", "preprocess",
           "encode_image", "clip_vision_config_from_shapes", "clip_vision_label", "clip_vision_shapes",
           "is_clip_vision", "load_clip_vision"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IGNORED = ("vision_model.embeddings.position_ids",)
_ACTS = {"gelu": F.gelu, "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a)}


@dataclass
class CLIPVisionConfig:
    """Hyper-parameters (transformers' CLIPVisionConfig names)."""

    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    intermediate_size: int = 5120
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    projection_dim: "int | None" = 1024

    def __post_init__(self):
        if self.hidden_act not in _ACTS:
            raise InputError(f"hidden_act must be one of {', '.join(_ACTS)}, got {self.hidden_act!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise InputError(f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads.")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_VISION_PRESETS = {
    "vit-h-14": CLIPVisionConfig(),                                   # clip_vision_h.safetensors (ComfyUI's config)
    "tiny": CLIPVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
                             projection_dim=16),
}


class Attention(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size)
                                                                for _ in range(4))

    def forward(self, x):
        split = lambda t: rearrange(t, "b l (n d) -> b n l d", n=self.heads)
        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(rearrange(y, "b n l d -> b l (n d)"))


class MLP(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.act = _ACTS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm transformer block (CLIP's / open-clip's)."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixels):
        x = rearrange(self.patch_embedding(pixels), "b c h w -> b (h w) c")
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise InputError(f"{x.shape[1] - 1} patches do not fit the {self.position_embedding.num_embeddings - 1} "
                             f"position embeddings: give {int((self.position_embedding.num_embeddings - 1) ** 0.5)}^2 "
                             f"patches (preprocess the image first).")
        return x + self.position_embedding.weight.to(x.dtype)


class VisionModel(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPVision(nn.Module):
    """The CLIP vision tower in transformers' / ComfyUI's key names. See :meth:`forward`."""

    def __init__(self, config: "CLIPVisionConfig | str" = "vit-h-14"):
        super().__init__()
        c = self.config = CLIP_VISION_PRESETS[config] if isinstance(config, str) else config
        self.vision_model = VisionModel(c)
        if c.projection_dim:
            self.visual_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """Hidden states of preprocessed pixels [B, 3, 224, 224] after `layer` (transformers' hidden_states[layer]:
        0 = the pre-LayerNorm'd embeddings, -1 = the last block, -2 = the penultimate, Wan's): [B, 257, hidden]."""
        n = self.config.num_hidden_layers
        stop = layer % (n + 1)
        if not -(n + 1) <= layer <= n:
            raise InputError(f"layer must lie in -{n + 1}..{n}, got {layer}.")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels.to(vm.embeddings.patch_embedding.weight.dtype)))
        for blk in vm.encoder.layers[:stop]:
            x = blk(x)
        return x


def preprocess(images: torch.Tensor, size: int = 224, value_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """Wan's CLIP input: images [B, 3, H, W] with values in `value_range` ((-1, 1) as Wan passes them, or (0, 1))
    -> [B, 3, size, size] fp32: bicubic resize of the whole image (align_corners=False, no antialias), to [0, 1],
    CLIP mean/std normalisation."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must be [B, 3, H, W], got {tuple(images.shape)}.")
    x = images.float()
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    lo, hi = value_range
    x = (x - lo) / (hi - lo) if (lo, hi) != (0.0, 1.0) else x
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image(model: CLIPVision, images: torch.Tensor, value_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """Wan's ``clip.visual``: reference frames [B, 3, H, W] -> penultimate hidden states [B, 257, 1280] (fp32)."""
    p = model.vision_model.pre_layrnorm.weight
    pixels = preprocess(images.to(p.device), model.config.image_size, value_range)
    return model(pixels).float()


# ---------------------------------------------------------------- checkpoints

def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def is_clip_vision(shapes: Mapping) -> bool:
    """True for a CLIP vision tower in transformers' / ComfyUI's names (ComfyUI's test: encoder layer norms and the
    pre-LayerNorm beside the patch embedding)."""
    return "vision_model.embeddings.patch_embedding.weight" in shapes and "vision_model.pre_layrnorm.weight" in shapes


def clip_vision_config_from_shapes(shapes: Mapping, num_heads: "int | None" = None) -> CLIPVisionConfig:
    """Read a CLIPVisionConfig from key -> shape. Heads: `num_heads`, else a preset of the same width, else
    hidden // 80 (ViT-H: 16 heads of 80). The activation is not visible: "gelu" (ViT-H's, and ComfyUI's config)."""
    sd = {k: _shape(v) for k, v in shapes.items()}
    if not is_clip_vision(sd):
        raise WeightsError("Not a CLIP vision checkpoint: it has no vision_model.embeddings / pre_layrnorm tensors.")
    hidden, channels, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"]
    positions = sd["vision_model.embeddings.position_embedding.weight"][0]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    same = [p for p in CLIP_VISION_PRESETS.values() if p.hidden_size == hidden]
    heads = num_heads or (same[0].num_attention_heads if same else max(1, hidden // 80))
    side = round((positions - 1) ** 0.5)
    return replace(same[0] if same else CLIPVisionConfig(), hidden_size=hidden, num_hidden_layers=len(layers),
                   num_attention_heads=heads,
                   intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"][0], patch_size=patch,
                   image_size=side * patch, num_channels=channels,
                   projection_dim=sd["visual_projection.weight"][0] if "visual_projection.weight" in sd else None)


def clip_vision_label(config: CLIPVisionConfig) -> str:
    """'CLIP ViT-H/14 vision' for clip_vision_h's layout, else the width, depth and patch."""
    if config == CLIP_VISION_PRESETS["vit-h-14"]:
        return "CLIP ViT-H/14 vision"
    return f"CLIP vision ({config.num_hidden_layers} layers x {config.hidden_size}, patch {config.patch_size})"


def clip_vision_shapes(config: "CLIPVisionConfig | str") -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in CLIPVision(config).state_dict().items()}


def load_clip_vision(path_or_state_dict, device=None, dtype=None, config: "CLIPVisionConfig | str | None" = None
                     ) -> CLIPVision:
    """Load from safetensors or a state dict (``clip_vision_h.safetensors``, transformers'
    CLIPVisionModel[WithProjection] names) into a meta-built model, tensor by tensor, strictly (CheckpointMismatchError lists missing / unexpected /
    wrong-shape keys). Config: `config`, else read from the shapes. Eval mode, no gradients."""
    dev = None if device is None else resolve_device(device)
    dt = None if dtype is None else resolve_dtype(dtype, dev)
    if isinstance(path_or_state_dict, Mapping):
        name, raw = "state dict", {k: v for k, v in path_or_state_dict.items() if k not in _IGNORED}
        shapes = {k: _shape(v) for k, v in raw.items()}
    else:
        name, raw = Path(path_or_state_dict).name, None
        shapes = {k: i.shape for k, i in read_header(path_or_state_dict)[0].items() if k not in _IGNORED}
    cfg = (CLIP_VISION_PRESETS[config] if isinstance(config, str) else config) if config is not None \
        else clip_vision_config_from_shapes(shapes)
    report = validate_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()},
                                 clip_vision_shapes(cfg))
    if not report.ok:
        raise CheckpointMismatchError(f"CLIP vision tower ({name})", report)
    if raw is None:
        raw = dict(iter_safetensors(path_or_state_dict, device=dev or "cpu", keys=shapes))
    sd = {k: v.to(device=dev or v.device, dtype=dt if dt is not None and v.is_floating_point() else v.dtype)
          for k, v in raw.items()}
    with torch.device("meta"):
        model = CLIPVision(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
